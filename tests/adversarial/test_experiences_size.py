"""A 3 MB reflection, or a file an old version made huge, reaches no client and no system prompt whole.

Issue 14 item 5: one 3 MB reflection made ``experiences.md`` 3.1 MB; reading it failed for every client
(1 MiB message limit) and an unrelated new trace got a 3,146,096-character system prompt through recall.
Driven through the server as a client does; the only fake is the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import Client
from mcp.types import TextResourceContents

from agent.experiences.limits import MAX_LESSON_CHARS
from server.app import build_server
from server.settings import Settings
from tests.fakes import ScriptedModel, models_for, reply
from tests.server.helpers import call, wait_done

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

HUGE_LESSON = "When an upload fails, retry the upload " + "and retry it again " * 165_000  # ~3.1 MB
PROMPT_BOUND = 20_000  # the skills prompt plus a few bounded lessons, with room to spare


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "workspace"
    root.mkdir()
    (root / "README.md").write_text("# Demo\n", encoding="utf-8")
    return root


def _server(tmp_path: Path, workspace: Path, model: ScriptedModel, experiences: str | None = None):
    settings = Settings.for_data_dir(tmp_path / "data", model="scripted", workspace=workspace)
    settings.data_dir.mkdir(parents=True)
    if experiences is not None:
        settings.experiences.write_text(experiences, encoding="utf-8")
    return settings, build_server(settings, models=models_for(scripted=model))


def _answer(messages: list[dict], tools: list[dict]):
    if "reflect" in (messages[-1]["content"] or "").lower():
        shorts = [f"- Short lesson {n} about uploads" for n in range(12)]
        return reply("Lessons:\n" + "\n".join([*shorts[:3], f"- {HUGE_LESSON}", *shorts[3:]]))
    return reply("done")


async def test_a_3_mb_reflection_is_recorded_bounded(tmp_path: Path, workspace: Path) -> None:
    model = ScriptedModel([_answer])
    settings, server = _server(tmp_path, workspace, model)
    async with Client(server, mode="legacy") as client:
        tid = (await call(client, "create_trace", prompt="Upload the report"))["trace_id"]
        await wait_done(client, tid)
        reflected = await call(client, "reflect_trace", trace_id=tid)
        # the scan stops inside the huge lesson: the three before it, and it, cut with a marker
        assert reflected["lessons"][:3] == [f"Short lesson {n} about uploads" for n in range(3)]
        assert len(reflected["lessons"]) == 4 and "[…cut from" in reflected["lessons"][3]
        assert all(len(lesson) <= MAX_LESSON_CHARS for lesson in reflected["lessons"])
        assert settings.experiences.stat().st_size < 10_000

        view = await call(client, "get_experiences", query="upload failed, retry")
        assert "content" not in view  # with a query: the ranked lessons only
        assert 0 < sum(len(lesson["text"]) for lesson in view["lessons"]) < 10_000
        whole = await call(client, "get_experiences")
        assert len(whole["content"]) < 10_000
        [markdown] = (await client.read_resource("experiences://memory")).contents
        assert isinstance(markdown, TextResourceContents) and len(markdown.text) < 10_000

        calls_before = len(model.calls)
        new = (await call(client, "create_trace", prompt="The upload failed; retry it"))["trace_id"]
        await wait_done(client, new)
    system = model.calls[calls_before]["messages"][0]["content"]
    assert "retry the upload" in system and len(system) < PROMPT_BOUND


async def test_recall_from_a_file_an_old_version_made_huge_is_bounded(
    tmp_path: Path, workspace: Path
) -> None:
    old_file = (
        "# Experiences\n\n## 0123456789abcdef0123456789abcdef (2026-11-20 10:00)\n_source: trace x_\n\n"
        f"- {HUGE_LESSON}\n\n## notes\n- Check the upload token before retrying an upload.\n"
    )
    assert len(old_file) > 3_000_000
    model = ScriptedModel([reply("done")])
    _, server = _server(tmp_path, workspace, model, old_file)
    async with Client(server, mode="legacy") as client:
        tid = (await call(client, "create_trace", prompt="The upload failed; retry the upload"))["trace_id"]
        await wait_done(client, tid)
    system = model.calls[0]["messages"][0]["content"]
    assert "Check the upload token" in system and "When an upload fails" in system
    assert len(system) < PROMPT_BOUND
