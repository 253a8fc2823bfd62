"""Experiences: lesson parsing, safe appends, FTS5 recall and model-driven consolidation."""

from __future__ import annotations

import json
import sys
import textwrap
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from agent.errors import ModelCallError
from agent.experiences import (
    LESSONS_HEADING,
    ExperienceFile,
    Experiences,
    build_match_query,
    format_lessons_block,
    lessons_from_reflection,
    parse,
    render_section,
    source_line,
)
from agent.llm.base import ModelResponse
from agent.reflection.prompt import REFLECTION_PROMPT, reflection_prompt

TID_A = "3f2a" + "0" * 28
TID_B = "b" * 32
WHEN = datetime(2026, 11, 26, 14, 5, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]


# --- the reflection prompt ---------------------------------------------------------------------


def test_reflection_prompt_asks_for_lessons_and_adds_focus() -> None:
    assert "reflect" in REFLECTION_PROMPT and "lessons" in REFLECTION_PROMPT
    assert "bullet" in REFLECTION_PROMPT
    assert reflection_prompt(None) == REFLECTION_PROMPT
    assert reflection_prompt("  ") == REFLECTION_PROMPT
    assert reflection_prompt("tool errors").endswith("\n\nFocus: tool errors")


# --- parsing -----------------------------------------------------------------------------------


def test_parse_keeps_title_and_reads_a_canonical_section() -> None:
    text = "# Experiences\n\nSome intro.\n\n" + render_section(
        TID_A, ["lesson one", "lesson two"], WHEN, f"trace {TID_A}, sequences 1–12"
    )
    parsed = parse(text)
    assert parsed.preamble == "# Experiences\n\nSome intro."
    [section] = parsed.sections
    assert section.trace_id == TID_A and section.when == "2026-11-26 14:05"
    assert section.source == f"trace {TID_A}, sequences 1–12"
    assert [lesson.text for lesson in section.lessons] == ["lesson one", "lesson two"]
    assert all(lesson.trace_id == TID_A and lesson.source == section.source for lesson in section.lessons)
    assert len({lesson.id for lesson in section.lessons}) == 2


def test_render_section_format() -> None:
    text = render_section(TID_A, ["do X when Y", "  spaced\n  out  "], WHEN, "trace x, sequences 1–3")
    assert text == (
        f"## {TID_A} (2026-11-26 14:05)\n_source: trace x, sequences 1–3_\n\n- do X when Y\n- spaced out\n"
    )


def test_parse_hand_edited_sections() -> None:
    text = textwrap.dedent(
        f"""\
        # Experiences
        ## {TID_A}
        * star bullet
        + plus bullet
        1. numbered one
        2) numbered two
           continued under two

           still two after a blank line
        - lone dash follows
        -
        ### a sub-heading is not a lesson
        ---
        ## Notes I wrote myself
        First paragraph
        spans two lines.

        Second paragraph.
        ## {TID_B} (2026-01-02 03:04) extra words)
        - weird heading still parses
        """
    )
    parsed = parse(text)
    assert parsed.preamble == "# Experiences"
    first, notes, third = parsed.sections
    assert first.trace_id == TID_A and first.when is None  # missing date is fine
    assert [l.text for l in first.lessons] == [
        "star bullet",
        "plus bullet",
        "numbered one",
        "numbered two continued under two still two after a blank line",
        "lone dash follows",
    ]
    assert notes.heading == "Notes I wrote myself" and notes.trace_id is None
    assert [l.text for l in notes.lessons] == ["First paragraph spans two lines.", "Second paragraph."]
    assert third.heading.startswith(TID_B) and third.lessons[0].text == "weird heading still parses"


def test_lesson_ids_are_stable_and_unique() -> None:
    section = render_section(TID_A, ["same text", "same text", "other"], WHEN, "s")
    ids = [l.id for l in parse(section + "\n" + section).lessons()]
    assert len(ids) == len(set(ids)) == 6
    assert ids == [l.id for l in parse(section + "\n" + section).lessons()]
    edited = parse(section.replace("other", "other, edited")).lessons()
    assert edited[2].id != ids[2] and edited[0].id == ids[0]


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "\n\n",
        "no headings at all\n- a bullet in the preamble",
        "##",
        "## (",
        "## x (2026-13-99 99:99)",
        "\x00\x01\ufffd## \n- \n* \n1.\n```\n## unterminated fence",
        "_source: x_",
        "## a\n_source: only meta_",
        "\r\n## crlf\r\n- windows line\r\n",
        "#" * 5000,
        "- " * 10000,
    ],
)
def test_parse_never_raises(garbage: str) -> None:
    parsed = parse(garbage)
    assert isinstance(parsed.preamble, str)
    for lesson in parsed.lessons():
        assert lesson.text and "\n" not in lesson.text


def test_parse_preamble_bullets_are_not_lessons_and_crlf_works() -> None:
    assert parse("# Experiences\n- not a lesson\n").lessons() == []
    assert [l.text for l in parse("## crlf\r\n- windows line\r\n").lessons()] == ["windows line"]


def test_lessons_from_reflection() -> None:
    assert lessons_from_reflection("Here are the lessons:\n- one\n  more\n* two\n\n1. three") == [
        "one more",
        "two",
        "three",
    ]
    assert lessons_from_reflection("  Just prose,\nno bullets.  ") == ["Just prose, no bullets."]
    assert lessons_from_reflection("   ") == []


# --- the file ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_append_creates_file_with_title_and_round_trips(tmp_path: Path) -> None:
    file = ExperienceFile(tmp_path / "deep" / "dir" / "experiences.md")
    assert await file.read_text() == ""
    section = await file.append_section(
        TID_A, ["check the schema first", "retry once"], WHEN, "trace a, sequences 1–4"
    )
    await file.append_section(TID_B, ["third"], WHEN, "trace b")
    text = await file.read_text()
    assert text.startswith("# Experiences\n\n" + section + "\n## " + TID_B)
    parsed = parse(text)
    assert parsed.preamble == "# Experiences"
    assert [(s.trace_id, [l.text for l in s.lessons]) for s in parsed.sections] == [
        (TID_A, ["check the schema first", "retry once"]),
        (TID_B, ["third"]),
    ]


@pytest.mark.anyio
async def test_append_after_hand_edit_without_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "experiences.md"
    path.write_text("# Mine\n## notes\n- hand lesson")
    await ExperienceFile(path).append_section(TID_A, ["new"], WHEN, "s")
    parsed = parse(path.read_text())
    assert parsed.preamble == "# Mine"
    assert [l.text for l in parsed.lessons()] == ["hand lesson", "new"]


@pytest.mark.anyio
async def test_replace_keeps_a_dated_backup(tmp_path: Path) -> None:
    path = tmp_path / "experiences.md"
    file = ExperienceFile(path)
    assert await file.replace("# Experiences\n") is None  # nothing to back up yet
    await file.append_section(TID_A, ["old lesson"], WHEN, "s")
    old = path.read_text()
    backup = await file.replace("# Experiences\n\n## new\n- new lesson\n")
    assert backup is not None and backup.parent == tmp_path
    assert backup.name.startswith("experiences.") and backup.suffix == ".md" and "T" in backup.name
    assert backup.read_text() == old
    assert path.read_text() == "# Experiences\n\n## new\n- new lesson\n"
    second = await file.replace("# Experiences\n")
    assert second is not None and second != backup and backup.read_text() == old
    assert await file.replace("x", backup=False) is None
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.anyio
async def test_writes_replace_a_symlinked_file_s_target_and_keep_the_link(tmp_path: Path) -> None:
    target = tmp_path / "dotfiles" / "experiences.md"
    target.parent.mkdir()
    target.write_text("# Experiences\n")
    link = tmp_path / "experiences.md"
    link.symlink_to(target)
    file = ExperienceFile(link)
    await file.append_section(TID_A, ["through the link"], WHEN, "s")
    await file.rewrite(lambda old: old + "\n## more\n- rewritten\n", backup=False)
    assert link.is_symlink()
    assert [l.text for l in parse(target.read_text()).lessons()] == ["through the link", "rewritten"]
    assert not list(tmp_path.rglob(".*.tmp"))


@pytest.mark.anyio
async def test_a_young_temporary_file_is_left_alone(tmp_path: Path) -> None:
    """It may belong to a writer still at work on a file another path names; only stale ones go."""
    file = ExperienceFile(tmp_path / "experiences.md")
    young = tmp_path / ".experiences.md.abcd1234.tmp"
    young.write_text("half a file")
    await file.append_section(TID_A, ["lesson"], WHEN, "s")
    assert young.exists()


_CHILD = """
import sys, anyio
from datetime import datetime, timezone
from agent.experiences import ExperienceFile

async def main():
    f = ExperienceFile(sys.argv[1])
    for i in range(int(sys.argv[3]) if len(sys.argv) > 3 else 5):
        lessons = [f"proc {sys.argv[2]} section {i} lesson {j} " + "x" * 2000 for j in range(3)]
        await f.append_section("c" * 32, lessons, datetime.now(timezone.utc), f"proc {sys.argv[2]} {i}")

anyio.run(main)
"""


@pytest.mark.anyio
@pytest.mark.slow
async def test_concurrent_appends_from_tasks_and_processes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "experiences.md"
    file = ExperienceFile(path)
    expected: dict[str, list[str]] = {}

    async def append_from_task(n: int) -> None:
        lessons = [f"task {n} lesson {j} " + "y" * 3000 for j in range(4)]
        expected[f"task {n}"] = lessons
        await file.append_section(f"{n:032x}", lessons, WHEN, f"task {n}")

    async def append_from_process(n: int) -> None:
        await anyio.run_process([sys.executable, "-c", _CHILD, str(path), str(n)], cwd=ROOT, check=True)

    async with anyio.create_task_group() as tg:
        for n in range(2):
            tg.start_soon(append_from_process, n)
        for n in range(20):
            tg.start_soon(append_from_task, n)
    for p in range(2):
        for i in range(5):
            expected[f"proc {p} {i}"] = [f"proc {p} section {i} lesson {j} " + "x" * 2000 for j in range(3)]

    parsed = parse(path.read_text())
    assert parsed.preamble == "# Experiences"
    got = {s.source: [l.text for l in s.lessons] for s in parsed.sections}
    assert len(parsed.sections) == 30
    assert got == expected


# --- recall ------------------------------------------------------------------------------------


async def _seeded(tmp_path: Path) -> Experiences:
    exp = Experiences(tmp_path / "experiences.md")
    await exp.append_reflection(
        TID_A,
        "- Run pytest with -x to stop at the first failing test\n"
        "- Read the README before editing configuration files",
        source="a",
    )
    await exp.append_reflection(
        TID_B,
        "- When a web request times out, retry once with a longer timeout\n"
        "- Parse JSON answers with a schema, never with regexes",
        source="b",
    )
    return exp


@pytest.mark.anyio
async def test_recall_ranks_the_relevant_lesson_first_and_respects_the_limit(tmp_path: Path) -> None:
    exp = await _seeded(tmp_path)
    [best, *_] = await exp.recall("Fix the failing tests: pytest reports three failures", 5)
    assert "pytest" in best.text and best.trace_id == TID_A
    top = await exp.recall("the web request timed out while fetching JSON", 1)
    assert len(top) == 1 and "timeout" in top[0].text
    assert len(await exp.recall("pytest README request JSON schema timeout", 3)) == 3
    assert await exp.recall("completely unrelated astronomy question", 5) == []
    assert await exp.lesson_count() == 4
    exp.close()


@pytest.mark.anyio
async def test_recall_limit_zero_turns_it_off(tmp_path: Path) -> None:
    exp = await _seeded(tmp_path)
    assert await exp.recall("pytest failing tests", 0) == []
    assert format_lessons_block([]) == ""
    exp.close()


@pytest.mark.anyio
async def test_index_is_rebuilt_after_a_hand_edit(tmp_path: Path) -> None:
    exp = await _seeded(tmp_path)
    assert await exp.recall("kubernetes deployment", 5) == []
    with exp.path.open("a") as handle:  # a person edits the file behind our back
        handle.write("\n## my notes\n- Check kubernetes pod logs before redeploying a deployment\n")
    [hit] = await exp.recall("kubernetes deployment", 5)
    assert hit.heading == "my notes"
    exp.path.write_text("# Experiences\n")
    assert await exp.recall("pytest", 5) == []
    exp.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "query",
    [
        '"unbalanced quote',
        "(pytest AND) OR NOT",
        "pyt* NEAR(a b)",
        "col:pytest ^start -neg +plus",
        "",
        "   ",
        "a an the of",
        "AND OR NOT",
        "'; DROP TABLE lessons; --",
        "\x00\ufffd🙂 émoji pytest",
    ],
)
async def test_recall_queries_are_safe(tmp_path: Path, query: str) -> None:
    exp = await _seeded(tmp_path)
    lessons = await exp.recall(query, 5)
    assert isinstance(lessons, list)
    if "pytest" in query:
        assert lessons and "pytest" in lessons[0].text
    exp.close()


def test_build_match_query_quotes_words() -> None:
    assert (
        build_match_query('Fix "pytest" (NEAR) AND the * tests!') == '"fix" OR "pytest" OR "near" OR "tests"'
    )
    assert build_match_query("a an of") == ""


@pytest.mark.anyio
async def test_format_lessons_block(tmp_path: Path) -> None:
    exp = await _seeded(tmp_path)
    block = format_lessons_block(await exp.recall("pytest failing", 5))
    assert block.startswith(LESSONS_HEADING + "\n")
    assert "- Run pytest with -x to stop at the first failing test" in block
    exp.close()


# --- the facade --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_append_reflection_records_source_and_lessons(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    src = source_line(TID_A, 1, 12)
    assert src == f"trace {TID_A}, sequences 1–12"
    lessons = await exp.append_reflection(TID_A, "No bullets here, just one thought.", source=src, when=WHEN)
    assert lessons == ["No bullets here, just one thought."]
    assert await exp.append_reflection(TID_A, "  ", source=src) == []
    text = await exp.read_text()
    assert f"## {TID_A} (2026-11-26 14:05)\n_source: {src}_\n\n- No bullets here" in text
    assert [l.text for l in await exp.lessons()] == lessons
    exp.close()


# --- consolidation -----------------------------------------------------------------------------


class ScriptedModel:
    """A Model that answers with canned text and records what it was asked."""

    name = "scripted"

    def __init__(self, answer: str | Exception, during: Any = None):
        self.answer = answer
        self.during = during
        self.calls: list[dict[str, Any]] = []

    async def complete(self, messages, tools, *, temperature, on_text=None) -> ModelResponse:
        self.calls.append({"messages": messages, "tools": tools, "temperature": temperature})
        if self.during is not None:
            await self.during()
        if isinstance(self.answer, Exception):
            raise self.answer
        return ModelResponse(content=self.answer)


async def _curation_file(tmp_path: Path) -> tuple[Experiences, dict[str, str]]:
    exp = Experiences(tmp_path / "experiences.md")
    await exp.append_reflection(
        TID_A,
        "- Run pytest with -x to stop at the first failure\n"
        "- Indent Python with tabs\n"
        "- Read the README before editing files",
        source="trace a",
        when=WHEN,
    )
    await exp.append_reflection(
        TID_B,
        "- Use pytest -x so the run stops at the first failure\n- Indent Python with four spaces, never tabs",
        source="trace b",
        when=WHEN,
    )
    ids = {l.text.split()[0] + str(i): l.id for i, l in enumerate(await exp.lessons())}
    return exp, ids


def _plan(ids: dict[str, str], *, forget_readme: bool) -> str:
    keep = [
        {"text": "Run pytest with -x to stop at the first failure", "from": [ids["Run0"], ids["Use3"]]},
        {"text": "Indent Python with four spaces, never tabs", "from": [ids["Indent4"]]},
    ]
    if not forget_readme:
        keep.append({"text": "Read the README before editing files", "from": [ids["Read2"]]})
    drop = [{"id": ids["Indent1"], "reason": "contradicted by a later lesson (spaces, not tabs)"}]
    return "Here is the plan:\n```json\n" + json.dumps({"keep": keep, "drop": drop}) + "\n```"


@pytest.mark.anyio
async def test_consolidation_merges_drops_and_keeps_a_backup(tmp_path: Path) -> None:
    exp, ids = await _curation_file(tmp_path)
    old = await exp.read_text()
    model = ScriptedModel(_plan(ids, forget_readme=True))
    result = await exp.consolidate(model, budget=3)

    assert model.calls[0]["temperature"] == 0 and model.calls[0]["tools"] == []
    prompt = model.calls[0]["messages"][-1]["content"]
    assert all(i in prompt for i in ids.values())
    assert result.skipped_reason is None and result.changed
    assert (result.before, result.after, result.merged) == (5, 3, 1)
    assert [(d.id, d.reason) for d in result.dropped] == [
        (ids["Indent1"], "contradicted by a later lesson (spaces, not tabs)")
    ]
    assert result.kept_unaccounted == [ids["Read2"]]  # the model forgot it: kept verbatim
    assert result.backup_path is not None and result.backup_path.read_text() == old

    text = await exp.read_text()
    parsed = parse(text)
    assert parsed.preamble == "# Experiences"
    texts = [l.text for l in parsed.lessons()]
    assert sorted(texts) == sorted(
        [
            "Read the README before editing files",
            "Indent Python with four spaces, never tabs",
            "Run pytest with -x to stop at the first failure",
        ]
    )
    assert "Indent Python with tabs" not in texts
    consolidated = parsed.sections[-1]
    # filed under its newest source's trace, as every section of the format is
    assert consolidated.heading == consolidated.trace_id == TID_A and consolidated.when is not None
    source = consolidated.source or ""
    assert f"trace {TID_A}" in source and f"trace {TID_B}" in source
    assert [l.text for l in consolidated.lessons] == ["Run pytest with -x to stop at the first failure"]
    assert "_dropped: Indent Python with tabs (contradicted" in text
    assert await exp.recall("indent python", 5)  # the index follows the rewrite
    exp.close()


@pytest.mark.anyio
async def test_consolidation_with_a_full_plan_accounts_for_everything(tmp_path: Path) -> None:
    exp, ids = await _curation_file(tmp_path)
    result = await exp.consolidate(ScriptedModel(_plan(ids, forget_readme=False)), budget=3)
    assert result.kept_unaccounted == [] and result.after == 3
    exp.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "answer",
    [
        "I cannot do that.",
        '{"keep": [{"text": "x", "from": [',
        '{"keep": "everything"}',
        '{"keep": [{"from": ["abc"]}]}',
        "[1, 2, 3]",
    ],
)
async def test_malformed_answer_changes_nothing(tmp_path: Path, answer: str) -> None:
    exp, _ = await _curation_file(tmp_path)
    before = await exp.read_text()
    result = await exp.consolidate(ScriptedModel(answer), budget=0)
    assert result.skipped_reason and "nothing was changed" in result.skipped_reason and not result.changed
    assert result.backup_path is None and result.before == result.after == 5
    assert await exp.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiences.md"]
    exp.close()


@pytest.mark.anyio
async def test_invented_or_unknown_ids_never_lose_lessons(tmp_path: Path) -> None:
    exp, _ids = await _curation_file(tmp_path)
    answer = json.dumps(
        {
            "keep": [{"text": "An invented lesson", "from": ["nope"]}],
            "drop": [{"id": "also-nope", "reason": "?"}],
        }
    )
    result = await exp.consolidate(ScriptedModel(answer), budget=0)
    assert result.skipped_reason == "The model found nothing to merge or drop."
    assert await exp.lesson_count() == 5
    exp.close()


@pytest.mark.anyio
async def test_consolidation_within_budget_or_failing_model_is_skipped(tmp_path: Path) -> None:
    exp, _ = await _curation_file(tmp_path)
    model = ScriptedModel("{}")
    within = await exp.consolidate(model, budget=5)
    assert within.skipped_reason and model.calls == []
    failed = await exp.consolidate(
        ScriptedModel(ModelCallError("The provider is down.")), budget=0, force=True
    )
    assert failed.skipped_reason == "The model call failed: The provider is down."
    assert await exp.lesson_count() == 5
    exp.close()


@pytest.mark.anyio
async def test_reflection_appended_during_consolidation_survives(tmp_path: Path) -> None:
    exp, ids = await _curation_file(tmp_path)

    async def reflect_meanwhile() -> None:
        await exp.append_reflection("d" * 32, "- A lesson written while the model was thinking", source="d")

    result = await exp.consolidate(
        ScriptedModel(_plan(ids, forget_readme=False), during=reflect_meanwhile), budget=3
    )
    assert result.skipped_reason is None and result.after == 4
    assert "A lesson written while the model was thinking" in [l.text for l in await exp.lessons()]
    exp.close()


def _with_section(section: str, old: str) -> str:
    return old + section


@pytest.mark.anyio
@pytest.mark.slow
async def test_rewrites_racing_appends_from_another_process_lose_nothing(tmp_path: Path) -> None:
    """A rewrite replaces the inode; a writer that waited on the old one must retry on the new file."""
    path = tmp_path / "experiences.md"
    file = ExperienceFile(path)
    await file.append_section(TID_A, ["seed"], WHEN, "seed")

    async def rewrite_repeatedly() -> None:
        for _ in range(2000):  # start once the child is appending, so the two really overlap
            if "proc 7 section 0" in await file.read_text():
                break
            await anyio.sleep(0.005)
        for n in range(40):
            await file.rewrite(
                partial(_with_section, f"\n## rewrite {n}\n- rewritten lesson {n}\n"), backup=False
            )

    async def append_from_process() -> None:
        await anyio.run_process([sys.executable, "-c", _CHILD, str(path), "7", "40"], cwd=ROOT, check=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(append_from_process)
        tg.start_soon(rewrite_repeatedly)
    texts = {l.text for l in parse(path.read_text()).lessons()}
    assert {f"rewritten lesson {n}" for n in range(40)} <= texts
    assert {f"proc 7 section {i} lesson {j} " + "x" * 2000 for i in range(40) for j in range(3)} <= texts


@pytest.mark.anyio
async def test_an_experiences_path_that_is_a_dangling_link_is_written_where_it_points(tmp_path: Path) -> None:
    """A link into a sync folder that does not exist yet: the folder is made, not an internal error."""
    link = tmp_path / "experiences.md"
    link.symlink_to(tmp_path / "sync" / "later" / "experiences.md")
    exp = Experiences(link)
    await exp.append_reflection("a" * 32, "- Read the file first.", source="sequences 1-3")
    assert "Read the file first." in (tmp_path / "sync" / "later" / "experiences.md").read_text()
    exp.close()


def test_a_merge_is_filed_under_its_newest_traced_source_even_when_a_hand_written_one_is_newer() -> None:
    from agent.experiences.consolidate import merged_sections
    from agent.experiences.markdown import Lesson

    by_id = {
        "t": Lesson(id="t", text="Read the README.", heading=TID_A, trace_id=TID_A, when="2025-01-01 10:00"),
        "h": Lesson(id="h", text="Read the README first.", heading="My notes", when="2025-03-01 10:00"),
        "only": Lesson(id="only", text="Be brief.", heading="My notes", when="2025-03-01 10:00"),
    }
    merged = [("Read the README before editing.", ["t", "h"]), ("Be brief.", ["only"])]
    assert merged_sections(merged, by_id) == [(TID_A, [merged[0]]), (None, [merged[1]])]
