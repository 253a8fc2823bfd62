"""Size limits of the experiences file: one careless or hostile reflection must not reach every client.

A 3 MB reflection once made the file 3.1 MB: every read of it passed the MCP client's 1 MiB message
limit, and recall put 3 MB into an unrelated trace's system prompt. Writes are bounded here, and so
are reads, because a file written by an old version or by hand can already be huge.
"""

from __future__ import annotations

# -- writing ----------------------------------------------------------------------------------------
MAX_LESSONS_PER_REFLECTION = 10
"""The reflection prompt asks for 2 to 5 bullets; the rest of a longer answer is dropped."""
MAX_LESSON_CHARS = 500
"""A lesson is one short sentence or two (about 80 words); a longer one is cut with a visible marker."""
MAX_LABEL_CHARS = 200
"""A section's heading and source line are labels, not content."""
MAX_REFLECTION_SCAN_CHARS = 200_000
"""Only this much of a reflection is searched for lessons: a 20 MB reply must not stall the parse."""

# -- reading ----------------------------------------------------------------------------------------
MAX_RECALL_CHARS = 8_000
"""The most lesson text one recall returns (about 2,000 tokens), whatever ``limit`` asks for."""
MAX_RECALL_CANDIDATES = 200
"""Ranked lessons looked at to fill ``limit`` after skipping near-duplicates and oversized ones."""
NEAR_DUPLICATE_JACCARD = 0.8
"""Two lessons whose word sets overlap this much say the same thing: recall keeps the better ranked."""
MAX_VIEW_CHARS = 50_000
"""The bounded view readers get (about 12,000 tokens): far under the 1 MiB MCP message limit even
JSON-escaped twice, and under hosts' caps on tool output."""
MAX_PREAMBLE_CHARS = 2_000
"""What precedes the first section (the title, a note by hand) in a bounded view."""
MAX_SCAN_BYTES = 8 * 1024 * 1024
"""Recall and the bounded view read at most the newest 8 MiB of the file; a healthy file is ~100 KB."""
MAX_SECTION_SCAN_CHARS = 256 * 1024
"""Of a larger section only this much is parsed for recall: a section we write is at most ~5 KB, a
hand-kept list of notes may be long, and this bounds the lessons one section can make at once."""
MAX_INDEXED_LESSONS = 2_000
"""The newest lessons recall ranks; consolidation keeps a file near its budget (100) anyway."""

# -- consolidation ----------------------------------------------------------------------------------
MAX_CONSOLIDATION_LESSONS = 200
"""The oldest lessons shown to the model in one pass (at most ~100,000 characters); the rest stay as
they are and come up in a later pass."""
