"""Experiences in PostgreSQL: the same public API as the markdown file, test for test, plus what only the
database has (rows with their source, ts_rank_cd recall, versions kept by consolidation and import,
replicas sharing lessons). The contract tests run on both backends; the database ones skip in one line
when no PostgreSQL answers."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.experiences import Experiences, parse, render_section, source_line
from agent.experiences.backends import export_experiences, import_experiences, open_experiences
from agent.experiences.limits import MAX_LESSON_CHARS
from agent.llm.base import ModelResponse
from agent.trace.backends import open_store
from tests.store_backends import PG_URL, fresh_pg_url, require_postgres

pytestmark = pytest.mark.anyio

TID_A = "3f2a" + "0" * 28
TID_B = "b" * 32
WHEN = datetime(2026, 11, 26, 14, 5, tzinfo=UTC)
BACKENDS = ["file", "database"] if PG_URL else ["file"]


class ScriptedModel:
    """A Model that answers with canned text, optionally doing something while it "thinks"."""

    name = "scripted"

    def __init__(self, answer: str, during: Any = None):
        self.answer = answer
        self.during = during
        self.calls: list[dict[str, Any]] = []

    async def complete(self, messages, tools, *, temperature, on_text=None) -> ModelResponse:
        self.calls.append({"messages": messages, "temperature": temperature})
        if self.during is not None:
            await self.during()
        return ModelResponse(content=self.answer)


def new_db(backend: str, folder: Path) -> str:
    return fresh_pg_url() if backend == "database" else str(folder / "traces.db")


async def open_book(db: str, folder: Path) -> tuple[Experiences, Any]:
    """The experiences of the store at ``db`` with that store (close both); a file in ``folder`` on SQLite."""
    store = await open_store(db)
    return open_experiences(db, folder / "experiences.md", store), store


@pytest.fixture(params=BACKENDS)
async def book(request, tmp_path) -> AsyncIterator[Experiences]:
    experiences, store = await open_book(new_db(request.param, tmp_path), tmp_path)
    yield experiences
    experiences.close()
    await store.close()


@pytest.fixture
async def pg_book(tmp_path) -> AsyncIterator[Experiences]:
    require_postgres()
    experiences, store = await open_book(new_db("database", tmp_path), tmp_path)
    yield experiences
    experiences.close()
    await store.close()


async def two_reflections(book: Experiences) -> None:
    await book.append_reflection(
        TID_A,
        "Some framing prose.\n- Run pytest with -x to stop at the first failure\n- Indent Python with tabs\n"
        "- Read the README before editing files",
        source=source_line(TID_A, 1, 12),
        when=WHEN,
    )
    await book.append_reflection(
        TID_B,
        "- Use pytest -x so the run stops at the first failure\n- Indent Python with four spaces, never tabs",
        source=source_line(TID_B),
        when=WHEN,
    )


def plan(*, forget_readme: bool) -> str:
    """A consolidation plan naming lessons by list number, which both backends resolve alike."""
    keep: list[dict[str, Any]] = [
        {"text": "Run pytest with -x to stop at the first failure", "from": ["1", "4"]},
        {"text": "Indent Python with four spaces, never tabs", "from": ["5"]},
    ]
    if not forget_readme:
        keep.append({"text": "Read the README before editing files", "from": ["3"]})
    drop = [{"id": "2", "reason": "contradicted by a later lesson (spaces, not tabs)"}]
    return "```json\n" + json.dumps({"keep": keep, "drop": drop}) + "\n```"


def without_stamps(text: str) -> str:
    return re.sub(r"\(\d{4}-\d{2}-\d{2} \d{2}:\d{2}\)", "(WHEN)", text)


# -- the contract: both backends ---------------------------------------------------------------------


async def test_reflections_render_as_the_file_format(book, tmp_path):
    assert await book.read_text() == "" and await book.lesson_count() == 0
    await two_reflections(book)
    text = await book.read_text()
    assert text.startswith(
        f"# Experiences\n\n## {TID_A} (2026-11-26 14:05)\n_source: trace {TID_A}, sequences 1–12_\n\n"
    )
    assert (
        f"- Indent Python with tabs\n- Read the README before editing files\n\n## {TID_B} (2026-11-26 14:05)"
        in text
    )
    assert text.endswith("- Indent Python with four spaces, never tabs\n")
    assert [l.text for l in parse(text).lessons()] == [l.text for l in await book.lessons()]
    assert await book.lesson_count() == 5
    assert {(l.trace_id, l.when) for l in await book.lessons()} == {
        (TID_A, "2026-11-26 14:05"),
        (TID_B, "2026-11-26 14:05"),
    }
    assert book.path == tmp_path / "experiences.md"


async def test_recall_ranks_skips_near_duplicates_and_is_bounded(book):
    await two_reflections(book)
    await book.append_reflection(TID_B, "- Run pytest with -x to stop at the first failure!", source="again")
    found = await book.recall("why does pytest keep failing at the first failure?", 5)
    texts = [l.text for l in found]
    assert texts[0].startswith(("Run pytest", "Use pytest"))
    assert sum(t.startswith("Run pytest with -x") for t in texts) == 1  # the repeat is a near-duplicate
    assert "Read the README before editing files" not in texts
    assert len(await book.recall("pytest failure", 1)) == 1
    assert await book.recall("pytest failure", 0) == []
    assert await book.recall("pytest failure", 5, max_chars=10) == []
    for odd in ['"', "a AND (b OR", "-pytest", "NEAR(x y)", "pytest:*", "' OR 1=1 --", "the and of", ""]:
        assert isinstance(await book.recall(odd, 5), list)


async def test_lessons_are_bounded_whatever_a_reflection_holds(book):
    lessons = await book.append_reflection(TID_A, "- " + "word " * 400, source="long")
    assert len(lessons) == 1 and len(lessons[0]) <= MAX_LESSON_CHARS and "cut from" in lessons[0]
    assert await book.append_reflection(TID_A, "   ", source="empty") == []
    assert (await book.lessons())[0].text == lessons[0]


async def test_the_bounded_view_keeps_the_newest_whole_sections(book):
    for n in range(30):
        await book.append_reflection(
            f"{n:032x}", f"- lesson number {n} " + "pad " * 60, source=f"s{n}", when=WHEN
        )
    text, cut = await book.read_bounded(2_000)
    assert cut and len(text) <= 2_000 and text.startswith("# Experiences\n\n")
    assert f"{29:032x}" in text and f"{0:032x}" not in text
    assert re.search(r"_left out: \d+ of 30 sections", text)
    whole, cut = await book.read_bounded()
    assert not cut and whole == await book.read_text()


async def test_consolidation_merges_drops_and_keeps_the_prior_version(book):
    await two_reflections(book)
    before = await book.read_text()
    result = await book.consolidate(ScriptedModel(plan(forget_readme=True)), budget=3)
    assert result.skipped_reason is None and result.changed
    assert (result.before, result.after, result.merged) == (5, 3, 1)
    assert [d.reason for d in result.dropped] == ["contradicted by a later lesson (spaces, not tabs)"]
    assert len(result.kept_unaccounted) == 1  # the README lesson, forgotten by the model: kept
    text = await book.read_text()
    assert sorted(l.text for l in parse(text).lessons()) == [
        "Indent Python with four spaces, never tabs",
        "Read the README before editing files",
        "Run pytest with -x to stop at the first failure",
    ]
    consolidated = parse(text).sections[-1]
    assert consolidated.trace_id == TID_A and f"trace {TID_A}" in (consolidated.source or "")
    assert "_dropped: Indent Python with tabs (contradicted" in text
    assert await book.recall("indent python", 5)
    if result.backup_path is not None:
        assert result.backup_path.read_text() == before
    else:
        assert await book.read_text(version=result.prior_version) == before  # type: ignore[call-arg, attr-defined]


async def test_a_reflection_during_consolidation_survives(book):
    await two_reflections(book)

    async def reflect_meanwhile() -> None:
        await book.append_reflection("d" * 32, "- A lesson written while the model was thinking", source="d")

    result = await book.consolidate(ScriptedModel(plan(forget_readme=False), reflect_meanwhile), budget=3)
    assert result.skipped_reason is None and result.after == 4
    assert "A lesson written while the model was thinking" in [l.text for l in await book.lessons()]


async def test_a_malformed_plan_or_the_budget_changes_nothing(book):
    await two_reflections(book)
    before = await book.read_text()
    within = await book.consolidate(ScriptedModel("{}"), budget=5)
    assert within.skipped_reason == "5 lessons is within the budget of 5."
    bad = await book.consolidate(ScriptedModel("I cannot do that."), budget=0)
    assert bad.skipped_reason and "nothing was changed" in bad.skipped_reason and not bad.changed
    invented = json.dumps({"keep": [{"text": "An invented lesson", "from": ["nope"]}]})
    assert (await book.consolidate(ScriptedModel(invented), budget=0)).skipped_reason == (
        "The model found nothing to merge or drop."
    )
    assert await book.read_text() == before


async def test_the_change_key_moves_with_each_write(book):
    key = await book.change_key()
    await two_reflections(book)
    changed, key = await book.changed_since(key)
    assert changed
    assert await book.changed_since(key) == (False, key)
    await book.consolidate(ScriptedModel(plan(forget_readme=False)), budget=0)
    assert (await book.changed_since(key))[0]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_export_and_import_round_trip_through_a_file(backend, tmp_path):
    """Export what one store learned, import it into another: the same markdown, the same lessons."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    first_db, second_db = new_db(backend, here), new_db(backend, there)
    first, store = await open_book(first_db, here)
    try:
        await two_reflections(first)
        text = await first.read_text()
    finally:
        first.close()
        await store.close()
    exported = await export_experiences(first_db, here / "experiences.md", tmp_path / "out.md")
    assert (exported.sections, exported.lessons) == (2, 5)
    assert (tmp_path / "out.md").read_text(encoding="utf-8") == text
    imported = await import_experiences(second_db, there / "experiences.md", tmp_path / "out.md")
    assert (imported.sections, imported.lessons) == (2, 5)
    second, store = await open_book(second_db, there)
    try:
        assert await second.read_text() == text
        assert [l.text for l in await second.recall("indent python", 5)]
        changes = await store.changes_after(0)
        assert [c.kind for c in changes][-1] == "experiences"  # every replica hears of the import
    finally:
        second.close()
        await store.close()


# -- what only the database has ----------------------------------------------------------------------


async def rows(book: Any, sql: str, *args: Any) -> list[Any]:
    async def body(db):
        return await db.fetch(sql, *args)

    return await book._store.read_with(body)


async def test_lessons_are_rows_with_their_source_trace_and_sequences(pg_book):
    await two_reflections(pg_book)
    sections = await rows(
        pg_book, "SELECT trace_id, first_sequence, last_sequence, source FROM experience_sections ORDER BY id"
    )
    assert [tuple(r) for r in sections] == [
        (TID_A, 1, 12, f"trace {TID_A}, sequences 1–12"),
        (TID_B, None, None, f"trace {TID_B}"),
    ]
    lessons = await rows(pg_book, "SELECT text, search::text FROM experience_lessons ORDER BY id")
    assert len(lessons) == 5 and "'pytest'" in lessons[0]["search"]


async def test_recall_is_ts_rank_cd_over_websearch_to_tsquery(pg_book):
    await pg_book.append_reflection(
        TID_A,
        "- Cache the HTTP client between calls\n- Retry the flaky network calls with backoff",
        source="a",
    )
    await pg_book.append_reflection(
        TID_B, "- Retry network calls; network calls to the API retry on 503", source="b"
    )
    found = [l.text for l in await pg_book.recall("network retry", 5)]
    assert found[0].startswith("Retry network calls;")  # denser in the words asked for
    assert "Cache the HTTP client between calls" not in found
    stemmed = [l.text for l in await pg_book.recall("caching clients", 5)]
    assert stemmed == ["Cache the HTTP client between calls"]
    assert await pg_book.recall("ourselves yourselves", 5) == []  # stop words to PostgreSQL alone


async def test_every_version_reads_back_and_versions_are_listed(pg_book):
    await two_reflections(pg_book)
    v0 = await pg_book.read_text()
    await pg_book.consolidate(ScriptedModel(plan(forget_readme=False)), budget=0)
    v1 = await pg_book.read_text()
    await pg_book.append_reflection("c" * 32, "- A later lesson", source="c", when=WHEN)
    await pg_book.consolidate(ScriptedModel(json.dumps({"drop": [{"id": "1", "reason": "stale"}]})), budget=0)
    assert [(v.version, v.kind) for v in await pg_book.versions()] == [
        (1, "consolidation"),
        (2, "consolidation"),
    ]
    assert await pg_book.read_text(version=0) == v0
    later = render_section("c" * 32, ["A later lesson"], WHEN, "c")
    assert await pg_book.read_text(version=1) == v1 + "\n" + later  # era 1 includes what came after it
    assert "A later lesson" in await pg_book.read_text()
    with pytest.raises(Exception, match="no version 9"):
        await pg_book.read_text(version=9)


async def test_an_import_replaces_the_current_lessons_and_keeps_the_prior_version(pg_book, tmp_path):
    await two_reflections(pg_book)
    before = await pg_book.read_text()
    hand = tmp_path / "hand.md"
    hand.write_text(
        "# Experiences\n\nKept by hand.\n\n## notes\n\nProse is a lesson too.\n\n- and a bullet\n"
        "  continued here\n\n## \n\n- untitled\n\n## empty\n",
        encoding="utf-8",
    )
    result = await pg_book.import_file(hand)
    assert (result.sections, result.lessons) == (2, 3)
    text = await pg_book.read_text()
    assert text == (
        "# Experiences\n\nKept by hand.\n\n## notes\n\n- Prose is a lesson too.\n- and a bullet continued here\n\n"
        "## \n\n- untitled\n"
    )
    assert await pg_book.read_text(version=result.version - 1) == before
    assert await pg_book.lesson_count() == 3


async def test_replicas_share_lessons_and_a_nul_character_is_kept_out(pg_book, tmp_path):
    other, store = await open_book(pg_book._store._url, tmp_path)
    try:
        key = await other.change_key()
        await pg_book.append_reflection(TID_A, "- Quote paths with spaces\x00 in shell commands", source="a")
        assert (await other.changed_since(key))[0]
        [found] = await other.recall("shell paths", 5)
        assert found.text == "Quote paths with spaces\ufffd in shell commands" and found.trace_id == TID_A
    finally:
        other.close()
        await store.close()


async def test_two_replicas_consolidating_at_once_apply_one_plan(pg_book, tmp_path):
    await two_reflections(pg_book)
    other, store = await open_book(pg_book._store._url, tmp_path)
    try:
        racing = ScriptedModel(plan(forget_readme=False))

        async def race() -> None:
            second = await other.consolidate(racing, budget=0)
            assert second.changed  # it applied first, under the lock

        first = await pg_book.consolidate(ScriptedModel(plan(forget_readme=False), race), budget=0)
        assert not first.changed and first.skipped_reason == "Another pass already changed those lessons."
        assert await pg_book.lesson_count() == 3 and len(await pg_book.versions()) == 1
    finally:
        other.close()
        await store.close()


async def test_a_consolidated_database_renders_what_the_file_would_hold(pg_book, tmp_path):
    file_book = Experiences(tmp_path / "file.md")
    try:
        for book in (file_book, pg_book):
            await two_reflections(book)
            await book.consolidate(ScriptedModel(plan(forget_readme=True)), budget=0)
        assert without_stamps(await pg_book.read_text()) == without_stamps(await file_book.read_text())
    finally:
        file_book.close()


async def test_the_engine_keeps_experiences_in_postgresql_and_the_file_beside_sqlite(tmp_path):
    from agent.engine import EngineSettings, open_engine
    from agent.experiences.database import DatabaseExperiences

    for db, kind in (
        (str(tmp_path / "traces.db"), Experiences),
        (PG_URL and fresh_pg_url(), DatabaseExperiences),
    ):
        if db is None:
            continue
        settings = EngineSettings(
            data_dir=tmp_path, db=db, experiences=tmp_path / "experiences.md", model="offline"
        )
        async with open_engine(settings) as engine:
            assert type(engine.experiences) is kind
            await engine.experiences.append_reflection(TID_A, "- A lesson", source="a")
            assert [l.text for l in await engine.recall("lesson", 5)] == ["A lesson"]
    assert (tmp_path / "experiences.md").read_text(encoding="utf-8").count(
        "A lesson"
    ) == 1  # the file one only


def test_the_command_refuses_a_missing_import_file_or_export_folder(tmp_path, capsys):
    """`experiences import` of a file that is not there would empty the lessons; `export` into a folder
    that does not exist would make it: both are a sentence and change nothing."""
    from server.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "experiences.md").write_text(
        "## " + TID_A + " (2026-11-26 14:05)\n- Keep me.\n", encoding="utf-8"
    )
    before = (data / "experiences.md").read_bytes()
    missing = tmp_path / "nope.md"
    assert main(["experiences", "import", str(missing), "--data-dir", str(data)]) == 2
    assert f"{missing} is not a file (nothing was changed)" in capsys.readouterr().err
    notes = tmp_path / "notes.md"
    notes.write_text("notes for Tuesday\n- buy milk\n", encoding="utf-8")  # the wrong file, named by mistake
    assert main(["experiences", "import", str(notes), "--data-dir", str(data)]) == 2
    assert "holds no reflection's lessons" in capsys.readouterr().err
    assert (
        main(["experiences", "import", str(Path(__file__).parents[2] / "README.md"), "--data-dir", str(data)])
        == 2
    )  # headings, no reflection
    assert "not an experiences file" in capsys.readouterr().err
    nowhere = tmp_path / "no-such-folder" / "out.md"
    assert main(["experiences", "export", str(nowhere), "--data-dir", str(data)]) == 2
    assert f"the folder {nowhere.parent} does not exist" in capsys.readouterr().err
    assert not nowhere.parent.exists()
    assert main(["experiences", "export", str(tmp_path), "--data-dir", str(data)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert (data / "experiences.md").read_bytes() == before
    assert main(["experiences", "export", str(tmp_path / "out.md"), "--data-dir", str(data)]) == 0
    assert "wrote 1 section(s), 1 lesson(s)" in capsys.readouterr().out


def test_the_lessons_an_import_replaced_are_written_out_with_as_of(tmp_path, capsys):
    """The database keeps the version before every import and consolidation; the command names it and
    `experiences export FILE --as-of N` brings it back."""
    from server.cli import main

    require_postgres()
    db = ["--data-dir", str(tmp_path / "data"), "--db", fresh_pg_url()]
    (tmp_path / "data").mkdir()
    first, second = tmp_path / "first.md", tmp_path / "second.md"
    first.write_text("## " + TID_A + " (2026-11-26 14:05)\n- Keep me.\n", encoding="utf-8")
    second.write_text("## " + TID_B + " (2026-11-27 09:00)\n- Newer.\n", encoding="utf-8")
    assert main(["experiences", "import", str(first), *db]) == 0
    assert main(["experiences", "import", str(second), *db]) == 0
    said = capsys.readouterr().out.splitlines()[-1]
    assert said.endswith(
        "the lessons before it are version 1 (experiences export FILE --as-of 1 writes them out)"
    )
    back = tmp_path / "back.md"
    assert main(["experiences", "export", str(back), "--as-of", "1", *db]) == 0
    text = back.read_text(encoding="utf-8")
    assert "Keep me." in text and "Newer." not in text
    assert main(["experiences", "export", str(back), "--as-of", "7", *db]) == 2
    assert "The experiences have no version 7." in capsys.readouterr().err


def test_the_file_store_says_it_keeps_dated_backups_rather_than_versions(tmp_path, capsys):
    from server.cli import main

    plain = ["--data-dir", str(tmp_path / "plain")]
    (tmp_path / "plain").mkdir()
    assert main(["experiences", "export", str(tmp_path / "x.md"), "--as-of", "1", *plain]) == 2
    assert "only a PostgreSQL store keeps versions" in capsys.readouterr().err
