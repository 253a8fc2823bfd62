"""Knowing the experiences file changed, here or in another process: the cue for change notifications."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import anyio
import pytest

from agent.experiences import Experiences
from agent.llm.base import ModelResponse

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


class _PlanModel:
    name = "plan"

    def __init__(self, plan: dict) -> None:
        self.plan = plan

    async def complete(self, messages, tools, *, temperature, on_text=None) -> ModelResponse:
        return ModelResponse(content=json.dumps(self.plan))


async def test_changed_since_sees_every_kind_of_change(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    key = await exp.change_key()
    assert key is None and await exp.changed_since(key) == (False, None)  # missing, still missing

    assert await exp.append_reflection("a" * 32, "- first", source="a")
    changed, key = await exp.changed_since(key)
    assert changed and key is not None
    assert await exp.changed_since(key) == (False, key)

    assert await exp.append_reflection("a" * 32, "   ", source="a") == []  # nothing recorded: no change
    assert await exp.changed_since(key) == (False, key)

    with exp.path.open("a") as handle:  # a person edits the file
        handle.write("- by hand\n")
    changed, key = await exp.changed_since(key)
    assert changed

    exp.path.unlink()
    assert await exp.changed_since(key) == (True, None)
    exp.close()


async def test_appends_and_consolidation_say_whether_they_changed_the_file(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    await exp.append_reflection("a" * 32, "- Use spaces\n- Use tabs", source="a")
    key = await exp.change_key()
    first, second = await exp.lessons()

    nothing = await exp.consolidate(_PlanModel({"keep": [], "drop": []}), budget=0)
    assert not nothing.changed and await exp.changed_since(key) == (False, key)

    plan = {"keep": [{"text": "Use spaces", "from": [first.id]}], "drop": [{"id": second.id, "reason": "x"}]}
    result = await exp.consolidate(_PlanModel(plan), budget=0)
    assert result.changed and result.skipped_reason is None
    assert (await exp.changed_since(key))[0]
    exp.close()


async def test_watch_reports_changes_made_in_this_process(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    send, receive = anyio.create_memory_object_stream[None](10)

    async def on_change() -> None:
        await send.send(None)

    async with anyio.create_task_group() as tg:
        await tg.start(partial(exp.watch, on_change, interval=0.01))
        for n in range(3):
            await exp.append_reflection(f"{n:032x}", f"- lesson {n}", source="s")
            with anyio.fail_after(5):
                await receive.receive()
        tg.cancel_scope.cancel()
    send.close()
    receive.close()
    exp.close()


_APPENDER = """
import sys, anyio
from datetime import datetime, timezone
from agent.experiences import ExperienceFile

anyio.run(lambda: ExperienceFile(sys.argv[1]).append_section("e" * 32, ["from elsewhere"], datetime.now(timezone.utc), "x"))
"""


@pytest.mark.slow
async def test_watch_reports_a_change_made_by_another_process(tmp_path: Path) -> None:
    exp = Experiences(tmp_path / "experiences.md")
    await exp.append_reflection("a" * 32, "- seed", source="a")
    changed = anyio.Event()

    async def on_change() -> None:
        changed.set()

    async with anyio.create_task_group() as tg:
        await tg.start(partial(exp.watch, on_change, interval=0.01))
        await anyio.run_process([sys.executable, "-c", _APPENDER, str(exp.path)], cwd=ROOT, check=True)
        with anyio.fail_after(10):
            await changed.wait()
        tg.cancel_scope.cancel()
    assert "from elsewhere" in [l.text for l in await exp.lessons()]
    exp.close()
