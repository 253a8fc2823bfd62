"""Experiences in PostgreSQL, when the store is: sections and lessons as rows, recall by full-text search.

The same public API as :class:`Experiences` (a subclass, so the engine and the reflection take either),
with the database as the source of truth instead of a markdown file, shared by every replica: a section
per reflection with its source trace and sequences, a row per lesson with a generated ``tsvector``.
Recall ranks with ``websearch_to_tsquery`` and ``ts_rank_cd``; a consolidation or an import retires
lessons in a new numbered version inside one transaction, so every prior version still reads back
(``read_text(version=…)``). The markdown is rendered exactly as the file backend writes it. The engine
announces each change through the store's change log; ``import_file`` announces its own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from pydantic import Field

from agent.errors import TraceError
from agent.experiences import DEFAULT_CONSOLIDATION_BUDGET, DEFAULT_RECALL_LIMIT, Experiences
from agent.experiences import lessons_from_reflection as split_lessons
from agent.experiences.backends import TransferResult
from agent.experiences.consolidate import (
    CONSOLIDATED_HEADING,
    MAX_DROPPED_NOTE_CHARS,
    ConsolidationPlan,
    ConsolidationResult,
    DroppedReport,
    ask_plan,
    decide,
    merged_from,
    merged_sections,
)
from agent.experiences.file import ExperienceFile
from agent.experiences.limits import (
    MAX_CONSOLIDATION_LESSONS,
    MAX_INDEXED_LESSONS,
    MAX_LABEL_CHARS,
    MAX_LESSON_CHARS,
    MAX_RECALL_CANDIDATES,
    MAX_RECALL_CHARS,
    MAX_VIEW_CHARS,
)
from agent.experiences.markdown import TITLE, Lesson, cut, format_when, normalize, parse, render_section
from agent.experiences.recall import bounded_lesson, build_match_query, pick
from agent.experiences.view import FileKey, Window, bounded_view
from agent.llm.base import Model
from agent.trace.backends import redact_url
from agent.trace.pg_migrations import Db
from agent.trace.postgres import PostgresTraceStore

log = logging.getLogger(__name__)

TEXT_SEARCH_CONFIG = "english"
"""Stemming and stop words of recall (the generated ``search`` column uses the same)."""
RANK_NORMALIZATION = 1
"""``ts_rank_cd`` divides by 1 + log(length): long lessons do not win by repeating words, as in bm25."""
MAX_WINDOW_SECTIONS = 2_000
"""The newest sections a bounded view renders before choosing what fits (a healthy store holds ~50)."""
_LOCK = (
    "SELECT pg_advisory_xact_lock(hashtextextended('agent-trace-mcp:experiences:' || current_schema(), 0))"
)
_CURRENT_VERSION = "(SELECT coalesce(max(version), 0) FROM experience_versions)"
_SEQUENCES = re.compile(r"sequences (\d+)\s*[\u2013-]\s*(\d+)")
_NOTE = re.compile(r"^_(?P<key>dropped|merged):\s*(?P<value>.*?)_\s*$")

_SECTIONS = """
SELECT s.id, s.heading, s.trace_id, s.written, s.source, s.notes,
       array_agg(l.id ORDER BY l.position) AS lesson_ids, array_agg(l.text ORDER BY l.position) AS texts
FROM experience_sections s
JOIN experience_lessons l ON l.section_id = s.id AND (l.retired_in IS NULL OR l.retired_in > $1)
WHERE s.created_in <= $1
GROUP BY s.id
"""

_LESSON_FIELDS = "l.id, l.text, s.heading, s.trace_id, s.written, s.source"

_RECALL = f"""
SELECT {_LESSON_FIELDS}
FROM experience_lessons l JOIN experience_sections s ON s.id = l.section_id,
     websearch_to_tsquery('{TEXT_SEARCH_CONFIG}', $1) AS q
WHERE l.retired_in IS NULL AND l.search @@ q
ORDER BY ts_rank_cd(l.search, q, {RANK_NORMALIZATION}) DESC, l.id DESC
LIMIT $2
"""


@dataclass(frozen=True)
class ExperienceVersion:
    """One step of the experiences' history: a consolidation or an import (version 0: before any)."""

    version: int
    kind: str
    created_at: str
    summary: dict[str, Any]


class DatabaseConsolidationResult(ConsolidationResult):
    prior_version: int | None = Field(
        None, description="the version this pass replaced; read it back with read_text(version=...)"
    )


@dataclass
class _Section:
    heading: str
    trace_id: str | None
    written: str | None
    source: str | None
    notes: dict[str, str]
    lessons: list[str]
    lesson_ids: list[int]

    def render(self) -> str:
        return render_section(self.heading, self.lessons, self.written, self.source, self.notes)


def _clean(text: str) -> str:
    """PostgreSQL text cannot hold U+0000."""
    return text.replace("\x00", "\ufffd")


def _sequences(source: str) -> tuple[int | None, int | None]:
    found = _SEQUENCES.search(source or "")
    return (int(found.group(1)), int(found.group(2))) if found else (None, None)


def _section(row: Any) -> _Section:
    return _Section(
        heading=row["heading"],
        trace_id=row["trace_id"],
        written=row["written"],
        source=row["source"],
        notes=json.loads(row["notes"]) if row["notes"] else {},
        lessons=list(row["texts"]),
        lesson_ids=list(row["lesson_ids"]),
    )


def _lesson(row: Any) -> Lesson:
    return Lesson(
        id=str(row["id"]),
        text=row["text"],
        heading=row["heading"] or "(untitled)",
        trace_id=row["trace_id"],
        when=row["written"],
        source=row["source"],
    )


def render(preamble: str | None, sections: Sequence[_Section]) -> str:
    """The markdown exactly as the file backend writes it: the title, then a section per reflection."""
    if preamble is None and not sections:
        return ""
    parts = [(preamble or "").strip() or TITLE, *(section.render().strip("\n") for section in sections)]
    return "\n\n".join(parts) + "\n"


def _recall_query(text: str) -> str:
    """The words of ``text`` the file backend would search for, OR-ed in ``websearch_to_tsquery`` syntax.

    ``build_match_query`` keeps only quoted ``\\w+`` runs, so nothing the user wrote reaches the parser as
    an operator.
    """
    match = build_match_query(text)
    return " or ".join(word.strip('"') for word in match.split(" OR ")) if match else ""


class DatabaseExperiences(Experiences):
    """Experiences kept in the trace store's PostgreSQL schema; ``path`` is where ``export`` writes by default."""

    changes_in_store = True

    def __init__(self, store: PostgresTraceStore, path: str | Path):
        # no file and no in-memory index: the database is both (Experiences.__init__ would open them)
        self._store = store
        self._path = Path(path).expanduser()
        self._consolidating = anyio.Lock()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def location(self) -> str:
        """The database, not ``path``: no file holds the lessons until an export writes one."""
        return (
            f"{redact_url(self._store.url)} (in the database; 'agent-trace-mcp experiences export FILE' "
            "writes them out as markdown)"
        )

    # -- writing ----------------------------------------------------------------------------------

    async def append_reflection(
        self, trace_id: str, reflection_text: str, *, source: str, when: datetime | None = None
    ) -> list[str]:
        """Record one reflection as a section of lesson rows, in one transaction; [] for empty text."""
        lessons = await anyio.to_thread.run_sync(split_lessons, reflection_text)
        if not lessons:
            return []
        heading = cut(normalize(trace_id), MAX_LABEL_CHARS)
        label = cut(normalize(source or ""), MAX_LABEL_CHARS)
        first, last = _sequences(label)
        written = format_when(when or datetime.now(UTC))

        async def body(db: Db) -> None:
            section_id = await db.fetchval(
                "INSERT INTO experience_sections "
                "(heading, trace_id, first_sequence, last_sequence, written, source, created_in) "
                f"VALUES ($1, $2, $3, $4, $5, $6, {_CURRENT_VERSION}) RETURNING id",
                _clean(heading), _clean(trace_id), first, last, written, _clean(label) or None,
            )  # fmt: skip
            await _insert_lessons(db, section_id, [_clean(lesson) for lesson in lessons])

        await self._store.write_with(body, what="the experiences")
        await self._store.note_change("experiences", trace_id)  # every replica announces experiences://memory
        return lessons

    async def consolidate(
        self, model: Model, budget: int = DEFAULT_CONSOLIDATION_BUDGET, force: bool = False
    ) -> ConsolidationResult:
        """One curation pass: the plan is applied in one transaction that retires the merged and dropped
        lessons in a new version (the prior one stays readable); a second pass here is skipped."""
        if self._consolidating.locked():
            count = await self.lesson_count()
            return ConsolidationResult(
                before=count, after=count, skipped_reason="A consolidation pass is already running."
            )
        async with self._consolidating:
            count = await self.lesson_count()
            if not count:
                return ConsolidationResult(
                    before=0, after=0, skipped_reason="The experiences hold no lessons."
                )
            if not force and count <= budget:
                return ConsolidationResult(
                    before=count,
                    after=count,
                    skipped_reason=f"{count} lessons is within the budget of {budget}.",
                )
            listed = await self._oldest_lessons(MAX_CONSOLIDATION_LESSONS)
            plan = await ask_plan(model, listed, before=count)
            if isinstance(plan, ConsolidationResult):
                return plan
            return await self._apply(listed, plan, before=count)

    async def _apply(
        self, lessons: list[Lesson], plan: ConsolidationPlan, *, before: int
    ) -> ConsolidationResult:
        """As the file backend decides (kept, merged, dropped), applied to the lessons still current."""
        decision = decide(lessons, plan)
        nothing = decision.nothing(before)
        if nothing is not None:
            return nothing
        by_id, removed, merged, dropped = decision.by_id, decision.removed, decision.merged, decision.dropped
        when = format_when(datetime.now(UTC))

        async def body(db: Db) -> tuple[int, int, list[tuple[str, list[str]]], list[DroppedReport]] | None:
            await db.execute(_LOCK)  # another replica's pass or import waits; appends do not
            rows = await db.fetch(
                "SELECT id FROM experience_lessons WHERE id = ANY($1::bigint[]) AND retired_in IS NULL FOR UPDATE",
                [int(i) for i in removed],
            )
            current = {str(row["id"]) for row in rows}  # another replica may have retired some meanwhile
            live_merged = [(text, ids) for text, ids in merged if any(i in current for i in ids)]
            live_dropped = [d for d in dropped if d.id in current]
            if not live_merged and not live_dropped:
                return None
            summary = {"merged": len(live_merged), "dropped": [d.model_dump() for d in live_dropped]}
            version = await _new_version(db, "consolidation", None, summary)
            await db.execute(
                "UPDATE experience_lessons SET retired_in = $1 WHERE id = ANY($2::bigint[])",
                version,
                [int(i) for i in current],
            )
            listing = "; ".join(f"{d.text} ({d.reason})" for d in live_dropped)
            for index, (trace_id, lessons) in enumerate(merged_sections(live_merged, by_id)):
                notes = (
                    {"dropped": cut(listing, MAX_DROPPED_NOTE_CHARS)} if live_dropped and index == 0 else {}
                )
                section_id = await db.fetchval(
                    "INSERT INTO experience_sections (heading, trace_id, written, source, notes, created_in) "
                    "VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                    trace_id or CONSOLIDATED_HEADING, trace_id, when,
                    _clean(merged_from(lessons, by_id)), json.dumps(notes), version,
                )  # fmt: skip
                await _insert_lessons(db, section_id, [_clean(text) for text, _ in lessons])
            after = await db.fetchval("SELECT count(*) FROM experience_lessons WHERE retired_in IS NULL")
            return version, after, live_merged, live_dropped

        applied = await self._store.write_with(body, what="the experiences")
        if applied is None:
            return ConsolidationResult(
                before=before,
                after=before,
                kept_unaccounted=decision.unaccounted,
                skipped_reason="Another pass already changed those lessons.",
            )
        version, after, live_merged, live_dropped = applied
        await self._store.note_change("experiences")
        return DatabaseConsolidationResult(
            before=before,
            after=after,
            dropped=live_dropped,
            merged=len(live_merged),
            kept_unaccounted=decision.unaccounted,
            changed=True,
            prior_version=version - 1,
        )

    async def import_file(self, path: str | Path) -> TransferResult:
        """Load an experiences.md as the new current version (the prior one stays readable), in one
        transaction, and announce the change to every replica. Lessons are cut as the file backend cuts them."""
        text = await ExperienceFile(path).read_text()
        parsed = await anyio.to_thread.run_sync(parse, text)
        sections = [
            _Section(
                heading="" if section.heading == "(untitled)" else cut(section.heading, MAX_LABEL_CHARS),
                trace_id=section.trace_id,
                written=section.when,
                source=cut(section.source, MAX_LABEL_CHARS) if section.source else None,
                notes=_notes(section.raw),
                lessons=[cut(lesson.text, MAX_LESSON_CHARS) for lesson in section.lessons],
                lesson_ids=[],
            )
            for section in parsed.sections
            if section.lessons
        ]

        async def body(db: Db) -> int:
            await db.execute(_LOCK)
            version = await _new_version(
                db, "import", _clean(parsed.preamble.strip() or TITLE), {"file": Path(path).name}
            )
            await db.execute(
                "UPDATE experience_lessons SET retired_in = $1 WHERE retired_in IS NULL", version
            )
            for section in sections:
                first, last = _sequences(section.source or "")
                section_id = await db.fetchval(
                    "INSERT INTO experience_sections (heading, trace_id, first_sequence, last_sequence, "
                    "written, source, notes, created_in) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                    _clean(section.heading), section.trace_id, first, last, section.written,
                    _clean(section.source) if section.source else None,
                    json.dumps({k: _clean(v) for k, v in section.notes.items()}), version,
                )  # fmt: skip
                await _insert_lessons(db, section_id, [_clean(lesson) for lesson in section.lessons])
            return version

        version = await self._store.write_with(body, what="the experiences")
        await self._store.note_change("experiences")
        return TransferResult(len(sections), sum(len(s.lessons) for s in sections), version)

    async def export(self, path: str | Path, *, version: int | None = None) -> TransferResult:
        """Write the markdown (now, or as of ``version``) to ``path`` atomically; an existing file there is
        kept as a dated backup beside it."""
        preamble, sections = await self._sections(version)
        await ExperienceFile(path).replace(render(preamble, sections), backup=True)
        return TransferResult(len(sections), sum(len(s.lessons) for s in sections), version)

    # -- reading ----------------------------------------------------------------------------------

    async def read_text(self, *, version: int | None = None) -> str:
        """The whole markdown, unbounded (now, or as of ``version``): for export, curation and tests."""
        preamble, sections = await self._sections(version)
        return render(preamble, sections)

    async def read_bounded(self, max_chars: int = MAX_VIEW_CHARS) -> tuple[str, bool]:
        """At most ``max_chars``: the newest whole sections that fit, in order, and a line saying how many
        were left out (the file backend's view, over the newest ``MAX_WINDOW_SECTIONS``)."""

        async def body(db: Db) -> tuple[str | None, list[_Section], int]:
            preamble = await _preamble(db, None)
            rows = await db.fetch(
                f"{_SECTIONS} ORDER BY s.id DESC LIMIT $2", 2**31 - 1, MAX_WINDOW_SECTIONS + 1
            )
            total = len(rows)
            if total > MAX_WINDOW_SECTIONS:
                total = await db.fetchval(
                    "SELECT count(DISTINCT section_id) FROM experience_lessons WHERE retired_in IS NULL"
                )
            return preamble, [_section(row) for row in reversed(rows[:MAX_WINDOW_SECTIONS])], total

        preamble, sections, total = await self._store.read_with(body)
        text = render(preamble, sections)
        complete = total <= len(sections)
        window = Window(
            text=text if complete else "\n\n".join(s.render().strip("\n") for s in sections) + "\n",
            key=None,
            complete=complete,
            preamble=(preamble or TITLE) if not complete else "",
            skipped_sections=total - len(sections),
        )
        return await anyio.to_thread.run_sync(bounded_view, window, max_chars)

    async def lessons(self) -> list[Lesson]:
        """The current lessons in order: the newest ``MAX_INDEXED_LESSONS``, each cut to ``MAX_LESSON_CHARS``."""
        rows = await self._fetch(
            f"SELECT {_LESSON_FIELDS} FROM experience_lessons l JOIN experience_sections s ON s.id = l.section_id "
            "WHERE l.retired_in IS NULL ORDER BY s.id DESC, l.position DESC LIMIT $1",
            MAX_INDEXED_LESSONS,
        )
        return [bounded_lesson(_lesson(row)) for row in reversed(rows)]

    async def lesson_count(self) -> int:
        rows = await self._fetch("SELECT count(*) AS n FROM experience_lessons WHERE retired_in IS NULL")
        return int(rows[0]["n"])

    async def recall(
        self, query: str, limit: int = DEFAULT_RECALL_LIMIT, *, max_chars: int = MAX_RECALL_CHARS
    ) -> list[Lesson]:
        """The current lessons most relevant to ``query`` by ``ts_rank_cd``, best first (newer wins ties),
        near-duplicates skipped; at most ``limit`` (0 turns recall off) and ``max_chars`` of text in all."""
        if limit <= 0 or max_chars <= 0:
            return []
        words = _recall_query(query)
        if not words:
            return []
        rows = await self._fetch(_RECALL, words, max(limit, MAX_RECALL_CANDIDATES))
        return pick([bounded_lesson(_lesson(row)) for row in rows], limit, max_chars)

    async def versions(self) -> list[ExperienceVersion]:
        """Every consolidation and import, oldest first: each one's prior state is ``version - 1``."""
        rows = await self._fetch(
            "SELECT version, kind, summary, iso_utc(created_at) AS created_at FROM experience_versions "
            "ORDER BY version"
        )
        return [
            ExperienceVersion(row["version"], row["kind"], row["created_at"], json.loads(row["summary"]))
            for row in rows
        ]

    async def change_key(self) -> FileKey:
        """(newest section id, version, current lessons): moves with every append, consolidation and import,
        on any replica."""
        rows = await self._fetch(
            "SELECT (SELECT coalesce(max(id), 0) FROM experience_sections) AS section, "
            f"{_CURRENT_VERSION} AS version, "
            "(SELECT count(*) FROM experience_lessons WHERE retired_in IS NULL) AS lessons"
        )
        row = rows[0]
        return int(row["section"]), int(row["version"]), int(row["lessons"])

    def close(self) -> None:
        """Nothing of its own to close: the store owns the connections."""

    async def _sections(self, version: int | None) -> tuple[str | None, list[_Section]]:
        async def body(db: Db) -> tuple[str | None, list[_Section]]:
            at = 2**31 - 1 if version is None else version
            rows = await db.fetch(f"{_SECTIONS} ORDER BY s.id", at)
            return await _preamble(db, version), [_section(row) for row in rows]

        if version is not None and not await self._version_exists(version):
            raise TraceError(f"The experiences have no version {version}.")
        return await self._store.read_with(body)

    async def _version_exists(self, version: int) -> bool:
        if version == 0:
            return True
        rows = await self._fetch("SELECT 1 FROM experience_versions WHERE version = $1", version)
        return bool(rows)

    async def _oldest_lessons(self, limit: int) -> list[Lesson]:
        rows = await self._fetch(
            f"SELECT {_LESSON_FIELDS} FROM experience_lessons l JOIN experience_sections s ON s.id = l.section_id "
            "WHERE l.retired_in IS NULL ORDER BY s.id, l.position LIMIT $1",
            limit,
        )
        return [_lesson(row) for row in rows]

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async def body(db: Db) -> list[Any]:
            return list(await db.fetch(sql, *args))

        return await self._store.read_with(body)


async def _insert_lessons(db: Db, section_id: int, lessons: list[str]) -> None:
    await db.execute(
        "INSERT INTO experience_lessons (section_id, position, text) "
        "SELECT $1, n, t FROM unnest($2::text[]) WITH ORDINALITY AS u(t, n)",
        section_id,
        lessons,
    )


async def _new_version(db: Db, kind: str, preamble: str | None, summary: dict[str, Any]) -> int:
    """The next version number; the caller holds the experiences lock, so numbers never race."""
    version: int = await db.fetchval(
        "INSERT INTO experience_versions (version, kind, preamble, summary) "
        f"VALUES ({_CURRENT_VERSION} + 1, $1, $2, $3) RETURNING version",
        kind,
        preamble,
        json.dumps(summary),
    )
    return version


async def _preamble(db: Db, version: int | None) -> str | None:
    """What precedes the sections: set by the latest import (as of ``version``); None before any."""
    at = 2**31 - 1 if version is None else version
    row = await db.fetchrow(
        "SELECT preamble FROM experience_versions WHERE preamble IS NOT NULL AND version <= $1 "
        "ORDER BY version DESC LIMIT 1",
        at,
    )
    if row is not None:
        return str(row["preamble"])
    has_rows = await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM experience_sections WHERE created_in <= $1)", at
    )
    return TITLE if has_rows else None


def _notes(raw: str) -> dict[str, str]:
    """A section's ``_dropped:_`` / ``_merged:_`` records (the parser keeps only its source)."""
    notes: dict[str, str] = {}
    for line in raw.splitlines():
        found = _NOTE.match(line.strip())
        if found and found.group("key") not in notes:
            notes[found.group("key")] = normalize(found.group("value"))
    return notes
