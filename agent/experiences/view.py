"""The bounded view of the experiences file that readers get: whole sections, newest kept first.

Clients read the file through one MCP message (the SDK client refuses messages over 1 MiB) into a
model's context, so a reader never gets more than ``max_chars``. Sections are never cut: going from
the newest, each section that still fits is kept (one that does not is skipped, and an older,
smaller one may still fit), they are shown in file order, and a last line says how many were left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.experiences.limits import MAX_PREAMBLE_CHARS
from agent.experiences.markdown import TITLE, split

FileKey = tuple[int, int, int] | None
"""(mtime_ns, size, inode) of the file, None when it is missing: changes with every write we make,
because each write puts a new inode in place, and with any edit by hand that changes time or size."""


@dataclass(frozen=True)
class Window:
    """The newest part of the file: all of it when it is small, else its tail from a section heading on.

    ``preamble`` and ``skipped_sections`` describe what was not read (the file's start, bounded, and
    how many section headings the unread part holds), so a view can say what it left out.
    """

    text: str
    key: FileKey
    complete: bool = True
    preamble: str = ""
    skipped_sections: int = 0


def bounded_view(window: Window, max_chars: int) -> tuple[str, bool]:
    """The view of ``window`` in at most ``max_chars`` characters, and whether anything was left out."""
    max_chars = max(0, max_chars)
    if window.complete and len(window.text) <= max_chars:
        return window.text, False  # the common case: the file as it is
    preamble, sections = split(window.text)
    if not window.complete:
        preamble = window.preamble
    preamble = preamble.strip() or TITLE
    preamble_cut = len(preamble) > MAX_PREAMBLE_CHARS
    if preamble_cut:
        preamble = preamble[:MAX_PREAMBLE_CHARS].rstrip() + " …"
    total = len(sections) + window.skipped_sections
    room = max_chars - len(preamble) - len(_note(total, total)) - 4  # the longest note it could need
    kept: list[int] = []
    for index in range(len(sections) - 1, -1, -1):  # newest first
        size = len(sections[index].strip("\n")) + 2
        if size <= room:
            kept.append(index)
            room -= size
    left_out = total - len(kept)
    text = _render(preamble, [sections[i] for i in reversed(kept)], left_out, total)
    return text[:max_chars], bool(left_out) or preamble_cut


def _render(preamble: str, sections: list[str], left_out: int, total: int) -> str:
    parts = [preamble, *(section.strip("\n") for section in sections)]
    if left_out:
        parts.append(_note(left_out, total))
    return "\n\n".join(parts) + "\n"


def _note(left_out: int, total: int) -> str:
    if not left_out:
        return ""
    noun = "section" if total == 1 else "sections"
    # a metadata line (see markdown.META_KEYS): whoever parses the view does not take it for a lesson
    return f"_left out: {left_out:,} of {total:,} {noun}, to keep this view short (older ones first, and any too large to show)_"
