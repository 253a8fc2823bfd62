"""Learning from experience: reflections become lessons, lessons are recalled into later traces.

The markdown file (one ``## <trace_id> (<YYYY-MM-DD HH:MM>)`` section per reflection, a bullet per
lesson) is the human-readable source of truth; recall ranks its lessons with SQLite FTS5, and
consolidation keeps it near its budget. Every write and every read is size-bounded (``limits``).
``Experiences`` is the one object the server needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from agent import defaults
from agent.experiences.consolidate import ConsolidationResult, consolidate
from agent.experiences.file import ExperienceFile
from agent.experiences.limits import (
    MAX_LESSON_CHARS,
    MAX_LESSONS_PER_REFLECTION,
    MAX_RECALL_CHARS,
    MAX_REFLECTION_SCAN_CHARS,
    MAX_VIEW_CHARS,
)
from agent.experiences.markdown import (
    Lesson,
    ParsedFile,
    Section,
    bullet_items,
    cut,
    normalize,
    parse,
    render_section,
)
from agent.experiences.recall import LESSONS_HEADING, LessonIndex, build_match_query, format_lessons_block
from agent.experiences.view import FileKey
from agent.llm.base import Model

log = logging.getLogger(__name__)

DEFAULT_RECALL_LIMIT = defaults.EXPERIENCE_RECALL
DEFAULT_CONSOLIDATION_BUDGET = defaults.EXPERIENCE_BUDGET

__all__ = [
    "DEFAULT_CONSOLIDATION_BUDGET",
    "DEFAULT_RECALL_LIMIT",
    "LESSONS_HEADING",
    "ConsolidationResult",
    "ExperienceFile",
    "Experiences",
    "FileKey",
    "Lesson",
    "LessonIndex",
    "ParsedFile",
    "Section",
    "build_match_query",
    "format_lessons_block",
    "lessons_from_reflection",
    "parse",
    "render_section",
    "source_line",
]


def lessons_from_reflection(
    text: str, *, max_lessons: int = MAX_LESSONS_PER_REFLECTION, max_chars: int = MAX_LESSON_CHARS
) -> list[str]:
    """The bullets of a reflection (its prose is framing, not lessons); with none, the whole text.

    At most ``max_lessons`` of them, each cut at ``max_chars`` with a marker saying so.
    """
    text = str(text or "")
    scanned = text[:MAX_REFLECTION_SCAN_CHARS]
    lessons = bullet_items(scanned)
    if len(scanned) < len(text) and len(lessons) > 1 and len(lessons[-1]) <= max_chars:
        lessons = lessons[:-1]  # the scan may have ended inside it, and a cut would not say so
    if not lessons:
        whole = normalize(scanned)
        lessons = [whole] if whole else []
    if len(lessons) > max_lessons:
        log.info("a reflection held %d lessons; keeping the first %d", len(lessons), max_lessons)
    return [cut(lesson, max_chars) for lesson in lessons[:max_lessons]]


def source_line(trace_id: str, first_sequence: int | None = None, last_sequence: int | None = None) -> str:
    """The ``_source:_`` value for a reflection: ``trace <id>, sequences 1–12``."""
    if first_sequence is None or last_sequence is None:
        return f"trace {trace_id}"
    return f"trace {trace_id}, sequences {first_sequence}\u2013{last_sequence}"


class Experiences:
    """The experiences file plus its recall index: append, read, recall and consolidate lessons."""

    changes_in_store = False
    """Whether writes announce themselves in the store's change log (the database backend does); a file is
    watched instead (``watch``), which also catches hand edits and other processes."""

    def __init__(self, path: str | os.PathLike[str], index: LessonIndex | None = None):
        self.file = ExperienceFile(path)
        self.index = index or LessonIndex(self.file)
        self._consolidating = anyio.Lock()

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def location(self) -> str:
        """Where the lessons live, for a host to read: the markdown file."""
        return str(self.path)

    async def append_reflection(
        self, trace_id: str, reflection_text: str, *, source: str, when: datetime | None = None
    ) -> list[str]:
        """Record one reflection as a section and return the lessons recorded ([] for empty text).

        A non-empty answer means the file changed. Lessons are bounded in count and length.
        """
        lessons = await anyio.to_thread.run_sync(lessons_from_reflection, reflection_text)
        if not lessons:
            return []
        await self.file.append_section(trace_id, lessons, when or datetime.now(UTC), source)
        self.index.invalidate()
        return lessons

    async def read_text(self) -> str:
        """The whole file, unbounded: for curation and tests; readers get :meth:`read_bounded`."""
        return await self.file.read_text()

    async def read_bounded(self, max_chars: int = MAX_VIEW_CHARS) -> tuple[str, bool]:
        """At most ``max_chars`` of the file: the newest whole sections that fit, in file order, and a
        last line saying how many were left out; the flag says whether any were."""
        return await self.file.read_bounded(max_chars)

    async def lessons(self) -> list[Lesson]:
        """The lessons in file order: the newest ``MAX_INDEXED_LESSONS``, each cut to ``MAX_LESSON_CHARS``."""
        return await self.index.lessons()

    async def lesson_count(self) -> int:
        return await self.index.count()

    async def recall(
        self, query: str, limit: int = DEFAULT_RECALL_LIMIT, *, max_chars: int = MAX_RECALL_CHARS
    ) -> list[Lesson]:
        """The lessons most relevant to ``query``, best first, near-duplicates skipped; at most
        ``limit`` of them (0 turns recall off) and ``max_chars`` of text in all."""
        return await self.index.search(query, limit, max_chars)

    async def change_key(self) -> FileKey:
        """The file's (mtime_ns, size, inode), None when missing: pass it to :meth:`changed_since`."""
        return await self.file.stat_key()

    async def changed_since(self, key: FileKey) -> tuple[bool, FileKey]:
        """Whether the file changed (here or in another process) since ``key`` was taken, and the new key."""
        current = await self.change_key()
        return current != key, current

    async def watch(
        self,
        on_change: Callable[[], Awaitable[object]],
        *,
        interval: float = defaults.FEED_POLL_SECONDS,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``on_change`` whenever the file changes, until cancelled (run it in a task group with
        ``await tg.start(experiences.watch, notify)``: changes after ``start`` returns are seen)."""
        key = await self.change_key()
        task_status.started()
        while True:
            await anyio.sleep(interval)
            changed, key = await self.changed_since(key)
            if changed:
                try:
                    await on_change()
                except Exception:
                    log.exception("could not report a change of %s", self.path.name)

    async def consolidate(
        self, model: Model, budget: int = DEFAULT_CONSOLIDATION_BUDGET, force: bool = False
    ) -> ConsolidationResult:
        """One curation pass; a second pass asked for while one runs is skipped, not queued."""
        if self._consolidating.locked():
            count = await self.lesson_count()
            return ConsolidationResult(
                before=count, after=count, skipped_reason="A consolidation pass is already running."
            )
        async with self._consolidating:
            try:
                return await consolidate(self.file, model, budget, force=force)
            finally:
                self.index.invalidate()

    def close(self) -> None:
        self.index.close()
