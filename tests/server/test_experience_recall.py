"""Learning from experience through the server: recall into new traces, provenance, reflect-on-finish."""

from __future__ import annotations

import anyio
import pytest
from mcp import Client

from server.app import build_server
from server.settings import Settings
from tests.fakes import models_for
from tests.server.helpers import call, full, wait_done

pytestmark = pytest.mark.anyio

EXPERIENCES = """\
# Experiences

## 0123456789abcdef0123456789abcdef (2026-11-20 10:00)
_source: trace 0123456789abcdef0123456789abcdef, sequences 1–6_

- When asked to summarise a README, read it with read_file before answering.
- Quote the project name exactly as the README spells it.

## hand-written notes
- Never guess file paths; list_files first when unsure.
- Parachute deployment logs live under flights/.
"""


@pytest.fixture
def settings(tmp_path, workspace) -> Settings:
    s = Settings.for_data_dir(tmp_path / "data", model="scripted", workspace=workspace, experience_recall=2)
    s.data_dir.mkdir(parents=True)
    s.experiences.write_text(EXPERIENCES, encoding="utf-8")
    return s


@pytest.fixture
async def client(settings, model):
    async with Client(build_server(settings, models=models_for(scripted=model)), mode="legacy") as c:
        yield c


async def test_a_new_trace_recalls_the_most_relevant_lessons_up_to_the_budget(client):
    tid = (await call(client, "create_trace", prompt="Summarise the README of this project."))["trace_id"]
    await wait_done(client, tid)
    view = await full(client, tid)
    system = view["messages"][0]["content"]
    assert "## Lessons from earlier traces" in system
    assert set(view["trace"]["lessons"]) == {  # the two README lessons, of four; --experience-recall 2
        "When asked to summarise a README, read it with read_file before answering.",
        "Quote the project name exactly as the README spells it.",
    }
    for lesson in view["trace"]["lessons"]:
        assert lesson in system
    assert "Parachute" not in system


async def test_recall_argument_overrides_and_zero_turns_it_off(client):
    tid = (await call(client, "create_trace", prompt="Summarise the README.", recall=0))["trace_id"]
    await wait_done(client, tid)
    view = await full(client, tid)
    assert (
        view["trace"]["lessons"] == [] and "Lessons from earlier traces" not in view["messages"][0]["content"]
    )
    tid = (await call(client, "create_trace", prompt="Summarise the README.", recall=1))["trace_id"]
    await wait_done(client, tid)
    assert len((await full(client, tid))["trace"]["lessons"]) == 1


async def test_a_hand_edit_is_recalled_at_once(client, settings):
    text = settings.experiences.read_text(encoding="utf-8")
    settings.experiences.write_text(
        text + "- Rocket altimeters must be zeroed before launch.\n", encoding="utf-8"
    )
    tid = (await call(client, "create_trace", prompt="How do I zero the rocket altimeter?"))["trace_id"]
    await wait_done(client, tid)
    view = await full(client, tid)
    assert view["trace"]["lessons"][0] == "Rocket altimeters must be zeroed before launch."


async def test_get_experiences_with_a_query_ranks_lessons(client, settings):
    result = await call(client, "get_experiences", query="parachute logs")
    assert set(result) == {"lessons", "path"}  # with a query: the ranked lessons only, not the whole file
    assert result["lessons"][0]["text"] == "Parachute deployment logs live under flights/."
    whole = await call(client, "get_experiences")
    assert "lessons" not in whole and whole["content"] == settings.experiences.read_text(encoding="utf-8")


async def test_reflect_on_finish_appends_a_section_without_a_second_call(client, settings):
    tid = (await call(client, "create_trace", prompt="Use read_file to read README.md", reflect=True))[
        "trace_id"
    ]
    await wait_done(client, tid)
    with anyio.fail_after(10):
        while f"## {tid} (" not in settings.experiences.read_text(encoding="utf-8"):
            await anyio.sleep(0.02)
    text = settings.experiences.read_text(encoding="utf-8")
    assert f"_source: trace {tid}, sequences 1" in text
    assert text.startswith(EXPERIENCES.rstrip("\n"))  # the hand-written part is untouched


async def test_skills_shape_the_system_prompt_and_load_skill_reads_one(tmp_path, workspace):
    from tests.fakes import ScriptedModel, reply
    from tests.fakes import call as tool_call

    skills = tmp_path / "skills"
    (skills / "rockets").mkdir(parents=True)
    (skills / "rockets" / "SKILL.md").write_text(
        "---\nname: rockets\ndescription: How to check a rocket before launch.\n---\n\nStep 1: zero the altimeter.\n"
    )
    (skills / "broken").mkdir()
    (skills / "broken" / "SKILL.md").write_text("no front matter here\n")
    model = ScriptedModel([reply(None, tool_call("load_skill", name="rockets")), reply("ok")])
    settings = Settings.for_data_dir(
        tmp_path / "data", model="scripted", workspace=workspace, skills_dir=skills
    )
    async with Client(build_server(settings, models=models_for(scripted=model)), mode="legacy") as client:
        tid = (await call(client, "create_trace", prompt="prepare the launch", model="scripted"))["trace_id"]
        await wait_done(client, tid)
        view = await full(client, tid)
    system = view["messages"][0]["content"]
    assert "rockets" in system and "How to check a rocket before launch." in system and "load_skill" in system
    assert "broken" not in system
    assert "Step 1: zero the altimeter." in view["messages"][3]["content"]
    # a system prompt given by the caller is used as is
    assert view["trace"]["config"]["system_prompt"] is None


async def test_reflection_past_the_budget_consolidates_in_the_background(tmp_path, workspace):
    """Over --experience-budget, a pass merges and drops as the model says, keeping a dated backup."""
    import json

    from tests.fakes import ScriptedModel, reply

    plan = {
        "keep": [{"text": "Read the README with read_file before summarising it.", "from": ["1", "2"]}],
        "drop": [{"id": "3", "reason": "a later reflection says to list files first"}],
    }

    def answer(messages, tools):
        if "JSON" in (messages[0]["content"] or "") and "keep" in messages[0]["content"]:
            return reply(json.dumps(plan))
        if "reflect" in (messages[-1]["content"] or "").lower():
            return reply("- List files before guessing a path.")
        return reply("done")

    settings = Settings.for_data_dir(
        tmp_path / "data", model="scripted", workspace=workspace, experience_recall=0, experience_budget=3
    )
    settings.data_dir.mkdir(parents=True)
    settings.experiences.write_text(
        "# Experiences\n\n## notes\n- Read the README before summarising.\n"
        "- Use read_file on the README first.\n- Guess file paths to save time.\n",
        encoding="utf-8",
    )
    server = build_server(settings, models=models_for(scripted=ScriptedModel([answer])))
    async with Client(server, mode="legacy") as client:
        tid = (await call(client, "create_trace", prompt="summarise"))["trace_id"]
        await wait_done(client, tid)
        await call(client, "reflect_trace", trace_id=tid)
        with anyio.fail_after(10):
            while not list(settings.data_dir.glob("experiences.*.md")):
                await anyio.sleep(0.02)
    text = settings.experiences.read_text(encoding="utf-8")
    assert "Read the README with read_file before summarising it." in text
    assert "- Guess file paths to save time." not in text
    assert "List files before guessing a path." in text  # not named by the plan: kept
    (backup,) = settings.data_dir.glob("experiences.*.md")
    assert "Guess file paths to save time." in backup.read_text(encoding="utf-8")
