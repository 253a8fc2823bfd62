"""Experiences stay bounded: huge reflections, huge files written by hand or by an old version."""

from __future__ import annotations

import inspect
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent import defaults
from agent.experiences import (
    Experiences,
    format_lessons_block,
    lessons_from_reflection,
    parse,
    render_section,
)
from agent.experiences.limits import (
    MAX_CONSOLIDATION_LESSONS,
    MAX_INDEXED_LESSONS,
    MAX_LESSON_CHARS,
    MAX_LESSONS_PER_REFLECTION,
    MAX_RECALL_CHARS,
    MAX_SCAN_BYTES,
    MAX_VIEW_CHARS,
)
from agent.experiences.markdown import cut
from agent.llm.base import ModelResponse

WHEN = datetime(2026, 11, 26, 14, 5, tzinfo=UTC)
CUT = "[…cut from"


def _section(n: int, lessons: list[str]) -> str:
    return render_section(f"{n:032x}", lessons, WHEN, f"trace {n:032x}")


def test_cut_keeps_short_text_and_marks_long_text() -> None:
    assert cut("short", 10) == "short"
    long = "word " * 1000
    out = cut(long.strip(), 100)
    assert len(out) <= 100 and out.endswith("[…cut from 4,999 characters]")
    assert out.startswith("word word") and " wor […" not in out  # cut at a word break
    assert len(cut("x" * 10_000, 50)) <= 50


def test_a_huge_prose_reflection_becomes_one_cut_lesson() -> None:
    [lesson] = lessons_from_reflection("Avoid huge answers. " * 150_000)  # 3 MB, no bullets
    assert len(lesson) <= MAX_LESSON_CHARS and lesson.startswith("Avoid huge answers.") and CUT in lesson


def test_a_reflection_keeps_its_first_lessons_each_bounded() -> None:
    text = "\n".join(f"- lesson {i} " + ("long " * 2000 if i == 1 else "") for i in range(1000))
    lessons = lessons_from_reflection(text)
    assert len(lessons) == MAX_LESSONS_PER_REFLECTION
    assert lessons[0] == "lesson 0" and lessons[2] == "lesson 2"
    assert len(lessons[1]) <= MAX_LESSON_CHARS and CUT in lessons[1]


def test_a_reflection_longer_than_the_scan_keeps_no_silently_partial_bullet() -> None:
    long = lessons_from_reflection("- first lesson\n- second lesson " + "x " * 300_000)
    assert long[0] == "first lesson" and long[1].startswith("second lesson x x") and CUT in long[1]
    assert lessons_from_reflection("- first lesson\n" + " " * 300_000 + "\n- second lesson") == [
        "first lesson"
    ]
    short = lessons_from_reflection("- first\n" + "\n" * 199_982 + "- second lesson, all of it")
    assert short == ["first"]  # the scan may have cut "second lesson…" short: it is not kept


@pytest.mark.anyio
async def test_a_3_mb_reflection_leaves_a_small_file(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    lessons = await exp.append_reflection("a" * 32, "- " + "Retry the upload. " * 180_000, source="trace a")
    assert len(lessons) == 1 and len(lessons[0]) <= MAX_LESSON_CHARS
    assert exp.path.stat().st_size < 2 * MAX_LESSON_CHARS
    text, truncated = await exp.read_bounded()
    assert not truncated and text == exp.path.read_text()
    exp.close()


@pytest.mark.anyio
async def test_a_huge_source_or_heading_is_cut(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    await exp.append_reflection("h" * 100_000, "- a lesson", source="s" * 100_000)
    assert exp.path.stat().st_size < 1_000
    [section] = parse(exp.path.read_text()).sections
    assert CUT in section.heading and section.source and CUT in section.source
    exp.close()


@pytest.mark.anyio
async def test_read_bounded_returns_a_small_file_as_it_is(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    assert await exp.read_bounded() == ("", False)
    await exp.append_reflection("a" * 32, "- one\n- two", source="a")
    assert await exp.read_bounded() == (exp.path.read_text(), False)
    exp.close()


@pytest.mark.anyio
async def test_read_bounded_keeps_the_newest_whole_sections_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "experiences.md"
    sections = [_section(n, [f"lesson {n} " + "z" * 900]) for n in range(100)]
    path.write_text("# Experiences\n\n" + "\n".join(sections))
    exp = Experiences(path)
    text, truncated = await exp.read_bounded(10_000)
    assert truncated and len(text) <= 10_000
    body, note = _split_note(text)
    shown = parse(body)
    assert shown.preamble == "# Experiences"
    numbers = [int(s.trace_id or "", 16) for s in shown.sections]
    assert numbers == list(range(100 - len(numbers), 100)) and len(numbers) >= 8  # newest, in order
    assert all(s.raw == sections[n] for s, n in zip(shown.sections, numbers, strict=True))  # whole
    assert note == (
        f"_left out: {100 - len(numbers)} of 100 sections, to keep this view short"
        " (older ones first, and any too large to show)_"
    )
    exp.close()


def _split_note(view: str) -> tuple[str, str]:
    """The view without its last line, and that line: a note that no parse takes for a lesson."""
    body, note = view.rstrip("\n").rsplit("\n\n", 1)
    assert [l.text for l in parse(view).lessons()] == [l.text for l in parse(body).lessons()]
    return body + "\n", note


async def _huge_file(path: Path) -> list[str]:
    """Written as an old version would have: a 3 MB lesson between two ordinary sections."""
    ordinary = [
        _section(1, ["Run pytest with -x to stop at the first failing test"]),
        _section(2, ["Upload retries need a fresh token: refresh it before retrying the upload"]),
        _section(3, ["Read the README before editing configuration files"]),
    ]
    huge = _section(9, ["Retry the upload " + "again and again " * 200_000])
    path.write_text("# Experiences\n\n" + "\n".join([ordinary[0], ordinary[1], huge, ordinary[2]]))
    assert path.stat().st_size > 3_000_000
    return ordinary


@pytest.mark.anyio
async def test_an_already_huge_file_is_read_bounded(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    ordinary = await _huge_file(exp.path)
    text, truncated = await exp.read_bounded()
    assert truncated and len(text) <= MAX_VIEW_CHARS
    body, note = _split_note(text)
    assert [s.raw for s in parse(body).sections] == ordinary
    assert note.startswith("_left out: 1 of 4 sections,")
    exp.close()


@pytest.mark.anyio
async def test_recall_from_an_already_huge_file_is_bounded(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    await _huge_file(exp.path)
    recalled = await exp.recall("retry the upload again", 5)
    assert {l.trace_id for l in recalled} == {f"{9:032x}", f"{2:032x}"}
    assert all(len(l.text) <= MAX_LESSON_CHARS for l in recalled)
    [huge] = [l for l in recalled if l.trace_id == f"{9:032x}"]
    assert huge.text.startswith("Retry the upload again") and CUT in huge.text
    assert len(format_lessons_block(recalled)) < 2_000
    assert await exp.lesson_count() == 4
    exp.close()


@pytest.mark.anyio
async def test_recall_never_returns_more_than_its_character_budget(tmp_path: Path) -> None:
    path = tmp_path / "experiences.md"
    sections = [_section(n, [f"deploy step {n} {f'detail{n} ' * 60}"[:490]]) for n in range(60)]
    path.write_text("# Experiences\n\n" + "\n".join(sections))
    exp = Experiences(path)
    recalled = await exp.recall("deploy step", 100)
    assert sum(len(l.text) for l in recalled) <= MAX_RECALL_CHARS
    assert len(recalled) == MAX_RECALL_CHARS // 490
    small = await exp.recall("deploy step", 100, max_chars=1_000)
    assert len(small) == 2
    assert await exp.recall("deploy step", 5, max_chars=0) == []
    exp.close()


@pytest.mark.anyio
async def test_recall_indexes_the_newest_lessons_only(tmp_path: Path) -> None:
    path = tmp_path / "experiences.md"
    body = "\n".join(f"- lesson number {i} about topic{i}" for i in range(MAX_INDEXED_LESSONS + 500))
    path.write_text(f"# Experiences\n\n## notes\n{body}\n")
    exp = Experiences(path)
    lessons = await exp.lessons()
    assert len(lessons) == MAX_INDEXED_LESSONS and lessons[-1].text.endswith(
        f"topic{MAX_INDEXED_LESSONS + 499}"
    )
    assert await exp.lesson_count() == MAX_INDEXED_LESSONS + 500
    assert await exp.recall("topic3", 5) == []  # among the oldest: not indexed
    [hit] = await exp.recall(f"topic{MAX_INDEXED_LESSONS + 400}", 5)
    assert hit.text.endswith(f"topic{MAX_INDEXED_LESSONS + 400}")
    exp.close()


def test_defaults_come_from_the_settings_module() -> None:
    recall = inspect.signature(Experiences.recall).parameters["limit"].default
    budget = inspect.signature(Experiences.consolidate).parameters["budget"].default
    assert (recall, budget) == (defaults.EXPERIENCE_RECALL, defaults.EXPERIENCE_BUDGET)


class _RecordingModel:
    name = "recording"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    async def complete(self, messages, tools, *, temperature, on_text=None) -> ModelResponse:
        self.prompts.append(messages[-1]["content"])
        return ModelResponse(content=json.dumps({"keep": [], "drop": []}))


@pytest.mark.anyio
async def test_consolidation_sees_the_oldest_lessons_each_cut_short(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    await _huge_file(exp.path)
    with exp.path.open("a") as handle:
        handle.write("\n## many\n" + "".join(f"- filler lesson {i}\n" for i in range(300)))
    model = _RecordingModel()
    result = await exp.consolidate(model, force=True)
    assert result.before == 304 and result.skipped_reason == "The model found nothing to merge or drop."
    [prompt] = model.prompts
    assert len(prompt) < MAX_CONSOLIDATION_LESSONS * (MAX_LESSON_CHARS + 100)
    assert "filler lesson 195" in prompt and "filler lesson 196" not in prompt  # 4 + 196 = 200 listed
    assert CUT in prompt
    exp.close()


@pytest.mark.anyio
async def test_a_file_larger_than_the_scan_window_is_read_from_its_newest_part(tmp_path: Path) -> None:
    path = tmp_path / "experiences.md"
    filler = "padding " * 1_000
    sections = [_section(n, [f"lesson {n} topic{n}", filler]) for n in range(1_200)]
    path.write_text("# Experiences\n\nMy own notes.\n\n" + "\n".join(sections))
    assert path.stat().st_size > MAX_SCAN_BYTES
    exp = Experiences(path)
    text, truncated = await exp.read_bounded()
    assert truncated and len(text) <= MAX_VIEW_CHARS and text.startswith("# Experiences\n\nMy own notes.\n\n")
    body, note = _split_note(text)
    numbers = [int(s.trace_id or "", 16) for s in parse(body).sections]
    assert numbers == list(range(1_200 - len(numbers), 1_200))
    assert note.startswith(f"_left out: {1_200 - len(numbers):,} of 1,200 sections,")
    assert [l.text for l in await exp.recall("topic1199", 5)] == ["lesson 1199 topic1199"]
    assert await exp.recall("topic3", 5) == []  # in the part not read
    exp.close()
