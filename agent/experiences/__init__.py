"""Learning from experience: reflections become lessons, lessons are recalled into later traces.

The markdown file (one ``## <trace_id> (<YYYY-MM-DD HH:MM>)`` section per reflection, a bullet per
lesson) is the human-readable source of truth; recall ranks its lessons with SQLite FTS5, and
consolidation keeps it bounded. ``Experiences`` is the one object the server needs.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import anyio

from agent.experiences.consolidate import ConsolidationResult, consolidate
from agent.experiences.file import ExperienceFile
from agent.experiences.markdown import (
    Lesson,
    ParsedFile,
    Section,
    bullet_items,
    normalize,
    parse,
    render_section,
)
from agent.experiences.recall import LESSONS_HEADING, LessonIndex, build_match_query, format_lessons_block
from agent.llm.base import Model

DEFAULT_RECALL_LIMIT = 5
DEFAULT_CONSOLIDATION_BUDGET = 60

__all__ = [
    "DEFAULT_CONSOLIDATION_BUDGET",
    "DEFAULT_RECALL_LIMIT",
    "LESSONS_HEADING",
    "ConsolidationResult",
    "ExperienceFile",
    "Experiences",
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


def lessons_from_reflection(text: str) -> list[str]:
    """The bullets of a reflection (its prose is framing, not lessons); with none, the whole text."""
    bullets = bullet_items(text)
    if bullets:
        return bullets
    whole = normalize(text or "")
    return [whole] if whole else []


def source_line(trace_id: str, first_sequence: int | None = None, last_sequence: int | None = None) -> str:
    """The ``_source:_`` value for a reflection: ``trace <id>, sequences 1–12``."""
    if first_sequence is None or last_sequence is None:
        return f"trace {trace_id}"
    return f"trace {trace_id}, sequences {first_sequence}\u2013{last_sequence}"


class Experiences:
    """The experiences file plus its recall index: append, read, recall and consolidate lessons."""

    def __init__(self, path: str | os.PathLike[str], index: LessonIndex | None = None):
        self.file = ExperienceFile(path)
        self.index = index or LessonIndex(self.file)
        self._consolidating = anyio.Lock()

    @property
    def path(self) -> Path:
        return self.file.path

    async def append_reflection(
        self, trace_id: str, reflection_text: str, *, source: str, when: datetime | None = None
    ) -> list[str]:
        """Record one reflection as a section and return the lessons it holds ([] for empty text)."""
        lessons = lessons_from_reflection(reflection_text)
        if not lessons:
            return []
        await self.file.append_section(trace_id, lessons, when or datetime.now(UTC), source)
        self.index.invalidate()
        return lessons

    async def read_text(self) -> str:
        return await self.file.read_text()

    async def lessons(self) -> list[Lesson]:
        return await self.index.lessons()

    async def lesson_count(self) -> int:
        return len(await self.index.lessons())

    async def recall(self, query: str, limit: int = DEFAULT_RECALL_LIMIT) -> list[Lesson]:
        """The lessons most relevant to ``query``, best first, at most ``limit`` (0 turns recall off)."""
        return await self.index.search(query, limit)

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
