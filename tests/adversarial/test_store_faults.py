"""The store as faults hit it: another process holding the write lock, and kill -9 during a reflection."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import anyio
import pytest
from mcp import Client

from agent.trace.sqlite import SQLiteTraceStore
from server.app import build_server
from server.settings import Settings
from tests.fakes import ScriptedModel, models_for, reply
from tests.server.helpers import call, wait_done

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


async def test_a_long_foreign_write_lock_delays_a_run_but_never_kills_the_engine(tmp_path, workspace):
    """Another process holds BEGIN EXCLUSIVE for ~7 s (beyond busy_timeout): the run's writes are retried
    until it lets go, the trace completes, and the server answers throughout (before: the engine died, every
    request got HTTP 500, the trace read running forever)."""
    settings = Settings.for_data_dir(tmp_path / "data", model="scripted", workspace=workspace)
    model = ScriptedModel([reply("done despite the lock")], delay=0.5)
    async with Client(build_server(settings, models=models_for(scripted=model)), mode="legacy") as client:
        tid = (await call(client, "create_trace", prompt="go"))["trace_id"]
        holder = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import sqlite3, time
                db = sqlite3.connect({str(settings.db)!r}, isolation_level=None, timeout=30)
                db.execute("BEGIN EXCLUSIVE")
                print("locked", flush=True)
                time.sleep(7)
                db.execute("COMMIT")
            """)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with anyio.fail_after(5):  # reads go on while the lock is held
            assert (await call(client, "get_trace", trace_id=tid))["trace"]["trace_id"] == tid
        done = await wait_done(client, tid)
        assert done["answer"] == "done despite the lock"
        holder.wait(15)
        holder.stdout.close()
        later = (await call(client, "create_trace", prompt="and again"))["trace_id"]  # the engine is alive
        assert (await wait_done(client, later))["trace"]["outcome"] == "answered"


def test_kill_9_during_a_reflection_never_leaves_the_head_on_it(tmp_path):
    path = tmp_path / "traces.db"
    script = textwrap.dedent(f"""
        import anyio
        from agent import AgentRunner, RunConfig
        from agent.experiences import Experiences
        from agent.reflection import reflect_on_trace
        from agent.tools.registry import ToolRegistry
        from agent.trace.sqlite import SQLiteTraceStore
        from tests.fakes import ScriptedModel, models_for, reply

        class Slow(ScriptedModel):
            async def complete(self, messages, tools, **kw):
                if kw.get("tool_choice") == "none":
                    print("reflecting", flush=True)
                    await anyio.sleep(3600)
                return reply("the answer")

        async def main():
            store = await SQLiteTraceStore.open({str(path)!r})
            experiences = Experiences({str(tmp_path / "experiences.md")!r})
            runner = AgentRunner(store, tools=ToolRegistry(), models=models_for(scripted=Slow([])), default_model="scripted")

            async def reflect(trace, head):
                return (await reflect_on_trace(runner, experiences, trace.trace_id, head=head)).events

            runner.reflector = reflect
            async with runner:
                trace = await runner.start([{{"role": "user", "content": "q"}}], RunConfig(reflect=True))
                print(trace.trace_id, flush=True)
                await anyio.sleep(3600)

        anyio.run(main)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert proc.stdout is not None
    trace_id = proc.stdout.readline().strip()
    assert proc.stdout.readline().strip() == "reflecting"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()

    async def check() -> None:
        store = await SQLiteTraceStore.open(path)
        try:
            trace = await store.get_trace(trace_id)
            main_path = await store.get_path(trace_id)
            assert [m.role for m in main_path] == ["system", "user", "assistant"]
            assert trace.head_sequence == main_path[-1].sequence and main_path[-1].content == "the answer"
            assert trace.status.value == "completed"  # the answer was stored before the reflection began
            tree = await store.get_tree(trace_id)
            assert tree[-1].side and tree[-1].role == "user"  # the reflection prompt stays on its side branch
        finally:
            await store.close()

    anyio.run(check)
