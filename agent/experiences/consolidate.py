"""Curation: merge duplicate lessons and drop contradicted ones, using the model, losing nothing else.

An append-only file only grows and contradicts itself (ExpeL curates its insight list for this
reason). The model proposes a plan; the code applies it conservatively: a lesson the plan does not
mention is kept verbatim, a malformed answer changes nothing, and the plan is applied to the file as
it is when the rewrite happens (under the file lock), so a reflection appended while the model was
thinking survives. The previous file is kept beside it as a dated backup. What the model sees and
what it may write are bounded (see ``limits``): the oldest lessons, each cut short.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import TraceError
from agent.experiences.file import ExperienceFile
from agent.experiences.limits import MAX_CONSOLIDATION_LESSONS, MAX_LABEL_CHARS, MAX_LESSON_CHARS
from agent.experiences.markdown import TITLE, Lesson, ParsedFile, cut, normalize, parse, render_section
from agent.llm.base import Model

log = logging.getLogger(__name__)

CONSOLIDATED_HEADING = "consolidated"
MAX_DROPPED_NOTE_CHARS = 2_000
"""The ``_dropped:_`` and ``_source:_`` notes of a consolidated section are records for people; the
full list is in the result and the backup."""

SYSTEM_PROMPT = (
    "You curate a list of lessons an AI agent learned from earlier tasks. Merge lessons that say the "
    "same thing into one short lesson, and drop a lesson only when a LATER lesson contradicts it or it "
    "is plainly wrong. Keep every other lesson, unchanged or lightly reworded. Lessons are listed "
    "oldest first, each with its id. Answer ONLY with a JSON object of this shape:\n"
    '{"keep": [{"text": "<lesson>", "from": ["<id>", ...]}], '
    '"drop": [{"id": "<id>", "reason": "<why it was dropped>"}]}\n'
    'Every id must appear exactly once: in the "from" list of one kept lesson, or in "drop".'
)


class KeptLesson(BaseModel):
    model_config = ConfigDict(populate_by_name=True, coerce_numbers_to_str=True)

    text: str
    from_ids: list[str] = Field(default_factory=list, alias="from")


class DroppedLesson(BaseModel):
    model_config = ConfigDict(coerce_numbers_to_str=True)

    id: str
    reason: str = "no reason given"


class ConsolidationPlan(BaseModel):
    """The model's answer, validated before anything is written."""

    keep: list[KeptLesson] = Field(default_factory=list)
    drop: list[DroppedLesson] = Field(default_factory=list)


class DroppedReport(BaseModel):
    id: str
    text: str
    reason: str


class ConsolidationResult(BaseModel):
    """What a pass did; ``skipped_reason`` says why nothing was written, when nothing was.

    ``changed`` is true when the file was rewritten: the caller's cue to tell readers it changed.
    """

    before: int
    after: int
    dropped: list[DroppedReport] = Field(default_factory=list)
    merged: int = 0
    kept_unaccounted: list[str] = Field(default_factory=list)
    backup_path: Path | None = None
    skipped_reason: str | None = None
    changed: bool = False
    failed: bool = False
    """The pass could not be made (the model call failed or its plan was unusable), as opposed to a pass
    that found nothing to do."""


async def consolidate(
    file: ExperienceFile, model: Model, budget: int, *, force: bool = False
) -> ConsolidationResult:
    """Run one consolidation pass when the file holds more than ``budget`` lessons (or when forced)."""
    text = await file.read_text()
    lessons = await anyio.to_thread.run_sync(_lessons_of, text)  # a large file must not stall the loop
    count = len(lessons)
    if not lessons:
        return ConsolidationResult(before=0, after=0, skipped_reason="The experiences file has no lessons.")
    if not force and count <= budget:
        return ConsolidationResult(
            before=count, after=count, skipped_reason=f"{count} lessons is within the budget of {budget}."
        )
    listed = lessons[:MAX_CONSOLIDATION_LESSONS]  # the oldest: what they merge into goes last
    plan = await ask_plan(model, listed, before=count)
    if isinstance(plan, ConsolidationResult):
        return plan
    return await _apply(file, listed, plan, before=count)


async def ask_plan(
    model: Model, lessons: list[Lesson], *, before: int
) -> ConsolidationPlan | ConsolidationResult:
    """The model's plan for ``lessons``, or the skipped result saying why there is none."""
    try:
        response = await model.complete(plan_messages(lessons), [], temperature=0)
    except TraceError as exc:
        return ConsolidationResult(
            before=before, after=before, skipped_reason=f"The model call failed: {exc}", failed=True
        )
    except Exception:
        log.exception("consolidation model call failed")
        return ConsolidationResult(
            before=before, after=before, skipped_reason="The model call failed.", failed=True
        )
    plan, problem = parse_plan(response.content or "")
    if plan is None:
        return ConsolidationResult(before=before, after=before, skipped_reason=problem, failed=True)
    return plan


def parse_plan(content: str) -> tuple[ConsolidationPlan | None, str]:
    """The validated plan, or None and a sentence saying what was wrong with the answer."""
    text = content.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None, "The model's answer held no JSON object; nothing was changed."
    try:
        data: Any = json.loads(text[start : end + 1])
        return ConsolidationPlan.model_validate(data), ""
    except (ValueError, ValidationError) as exc:
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        return None, f"The model's answer was not a valid consolidation plan ({first}); nothing was changed."


def plan_messages(lessons: list[Lesson]) -> list[dict[str, Any]]:
    listing = "\n".join(
        f"{number}. [{lesson.id}] ({lesson.when or 'undated'}, {cut(lesson.heading, MAX_LABEL_CHARS)}) "
        f"{cut(lesson.text, MAX_LESSON_CHARS)}"
        for number, lesson in enumerate(lessons, start=1)
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Lessons ({len(lessons)}), oldest first:\n{listing}"},
    ]


def resolver(lessons: list[Lesson]) -> Callable[[str], str | None]:
    """Map what the model wrote to a lesson id: the id itself, "[id]", or the lesson's list number."""
    by_id = {lesson.id: lesson for lesson in lessons}

    def resolve(ref: str) -> str | None:
        ref = ref.strip().strip("[]#").strip()
        if ref in by_id:
            return ref
        if ref.isdigit() and 1 <= int(ref) <= len(lessons):
            return lessons[int(ref) - 1].id
        return None

    return resolve


@dataclass(frozen=True)
class Decision:
    """What a plan does to the lessons the model saw; both backends apply it to what is current."""

    by_id: dict[str, Lesson]
    removed: set[str]  # merged into the consolidated section, or dropped
    merged: list[tuple[str, list[str]]]  # (new text, ids it replaces)
    dropped: list[DroppedReport]
    unaccounted: list[str]  # neither kept, merged nor dropped: left as they were

    def nothing(self, before: int) -> ConsolidationResult | None:
        """The result when the plan changes nothing, else None."""
        if self.merged or self.dropped:
            return None
        return ConsolidationResult(
            before=before,
            after=before,
            kept_unaccounted=self.unaccounted,
            skipped_reason="The model found nothing to merge or drop.",
        )


def decide(lessons: list[Lesson], plan: ConsolidationPlan) -> Decision:
    """Resolve the model's plan against the ``lessons`` it was shown, ignoring what it invented."""
    by_id = {lesson.id: lesson for lesson in lessons}
    resolve = resolver(lessons)
    unchanged: set[str] = set()  # kept as they were: stay in their own section
    removed: set[str] = set()
    merged: list[tuple[str, list[str]]] = []
    for keep in plan.keep:
        refs = (resolve(ref) for ref in keep.from_ids)
        ids = list(dict.fromkeys(i for i in refs if i is not None and i not in removed | unchanged))
        text = cut(normalize(keep.text), MAX_LESSON_CHARS)
        if not ids or not text:
            continue  # a lesson with no known origin is invented, not curated; an empty one says nothing
        if len(ids) == 1 and by_id[ids[0]].text == text:
            unchanged.add(ids[0])
        else:
            merged.append((text, ids))
            removed.update(ids)
    dropped: list[DroppedReport] = []
    for drop in plan.drop:
        ident = resolve(drop.id)
        if ident is None or ident in removed | unchanged:
            continue  # unknown, already dropped, or also kept: keeping wins
        removed.add(ident)
        reason = cut(normalize(drop.reason), MAX_LABEL_CHARS) or "no reason given"
        text = cut(by_id[ident].text, MAX_LESSON_CHARS)
        dropped.append(DroppedReport(id=ident, text=text, reason=reason))
    unaccounted = [lesson.id for lesson in lessons if lesson.id not in removed | unchanged]
    return Decision(by_id, removed, merged, dropped, unaccounted)


async def _apply(
    file: ExperienceFile, lessons: list[Lesson], plan: ConsolidationPlan, *, before: int
) -> ConsolidationResult:
    """Apply the plan for the ``lessons`` the model saw; ``before`` counts every lesson in the file."""
    decision = decide(lessons, plan)
    nothing = decision.nothing(before)
    if nothing is not None:
        return nothing
    when = datetime.now(UTC)
    rewrite = await file.rewrite(
        lambda current: _render(
            parse(current), decision.removed, decision.merged, decision.dropped, decision.by_id, when
        )
    )
    return ConsolidationResult(
        before=before,
        after=len(await anyio.to_thread.run_sync(_lessons_of, rewrite.new_text)),
        dropped=decision.dropped,
        merged=len(decision.merged),
        kept_unaccounted=decision.unaccounted,
        backup_path=rewrite.backup_path,
        changed=rewrite.changed,
    )


def _render(
    current: ParsedFile,
    removed: set[str],
    merged: list[tuple[str, list[str]]],
    dropped: list[DroppedReport],
    by_id: dict[str, Lesson],
    when: datetime,
) -> str:
    """The new file: title, every section minus removed lessons, then the consolidated section.

    Applied to the file as it is now; a lesson appended or edited since the model saw the list has
    an id the plan does not name, so it stays.
    """
    parts = [current.preamble.strip() or TITLE]
    for section in current.sections:
        remaining = [lesson for lesson in section.lessons if lesson.id not in removed]
        if len(remaining) == len(section.lessons):
            parts.append(section.raw.strip("\n"))  # untouched: hand formatting kept as is
        elif remaining:
            heading = section.heading if section.heading != "(untitled)" else ""
            parts.append(
                render_section(heading, [l.text for l in remaining], section.when, section.source).strip()
            )
    listing = "; ".join(f"{d.text} ({d.reason})" for d in dropped)
    for index, (trace_id, lessons) in enumerate(merged_sections(merged, by_id)):
        notes = {"dropped": cut(listing, MAX_DROPPED_NOTE_CHARS)} if dropped and index == 0 else None
        parts.append(
            render_section(
                trace_id or CONSOLIDATED_HEADING,
                [text for text, _ in lessons],
                when,
                merged_from(lessons, by_id),
                notes,
            ).strip()
        )
    return "\n\n".join(parts) + "\n"


def merged_sections(
    merged: list[tuple[str, list[str]]], by_id: dict[str, Lesson]
) -> list[tuple[str | None, list[tuple[str, list[str]]]]]:
    """Merged lessons grouped under the trace of each one's newest source, so every section stays a
    ``## <trace_id> (<date>)`` section as the experiences format has it (None: only hand-written sources)."""
    groups: dict[str | None, list[tuple[str, list[str]]]] = {}
    for text, ids in merged:
        traced = [by_id[i] for i in ids if i in by_id and by_id[i].trace_id]  # hand-written ones have none
        newest = max(traced, key=lambda lesson: lesson.when or "", default=None)
        groups.setdefault(newest.trace_id if newest else None, []).append((text, ids))
    return list(groups.items())


def merged_from(lessons: list[tuple[str, list[str]]], by_id: dict[str, Lesson]) -> str:
    """The ``_source:_`` of a section of merged lessons: the lessons it was made from."""
    origins = list(dict.fromkeys(origin_label(by_id[i]) for _, ids in lessons for i in ids if i in by_id))
    return cut(f"merged from {', '.join(origins)}", MAX_DROPPED_NOTE_CHARS)


def _lessons_of(text: str) -> list[Lesson]:
    return parse(text).lessons()


def origin_label(lesson: Lesson) -> str:
    label = f"trace {lesson.trace_id}" if lesson.trace_id else lesson.heading
    return f"{label} ({lesson.when})" if lesson.when else label
