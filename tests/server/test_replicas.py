"""Two HTTP server processes on one PostgreSQL behave as one server (issue 13).

Each replica has a data directory of its own, so only the database is shared: a wait on B follows a run
on A with progress, stop from B ends it, list_running sees both replicas' runs, a kill -9 of A leaves its
run ``interrupted`` for B to resume, and a lesson reflected on A is recalled on B (and B's subscribers
hear of it). The model is the fake OpenAI server on loopback.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
import mcp.types as types
import pytest
from mcp import Client

from tests.fake_openai import completion
from tests.processes import HttpServer
from tests.server.helpers import call, wait_done
from tests.store_backends import PG_SKIP_REASON, PG_URL, fresh_pg_url

if PG_URL is None:
    pytest.skip(PG_SKIP_REASON, allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

LIST_CALL = {"id": "call_1", "type": "function", "function": {"name": "list_files", "arguments": "{}"}}


def replica(tmp_path: Path, workspace: Path, name: str, db: str, fake) -> HttpServer:
    """One server process: its own data directory, the shared database, the fake model."""
    env = fake.env
    folder = tmp_path / name
    folder.mkdir()
    return HttpServer(folder, workspace, "--db", db, "--model", "openai:gpt-test", env=env)


@pytest.fixture
def database() -> str:
    return fresh_pg_url()


@pytest.fixture
def replicas(
    tmp_path, workspace, fake_openai, database, monkeypatch
) -> Iterator[tuple[HttpServer, HttpServer]]:
    monkeypatch.chdir(tmp_path)  # a URL taken for a relative path must not leave files in the repository
    db = database
    first = replica(tmp_path, workspace, "a", db, fake_openai)
    try:
        second = replica(tmp_path, workspace, "b", db, fake_openai)
    except BaseException:
        first.close()
        raise
    try:
        yield first, second
    finally:
        first.close()
        second.close()


async def stored_in(database: str, trace_id: str) -> None:
    """The replicas really share PostgreSQL (a URL read as a path would give each a SQLite file)."""
    import asyncpg

    db = await asyncpg.connect(database)
    try:
        found = 0
        if await db.fetchval("SELECT to_regclass('traces') IS NOT NULL"):
            found = await db.fetchval("SELECT count(*) FROM traces WHERE trace_id = $1", trace_id)
    finally:
        await db.close()
    assert found == 1, f"trace {trace_id} is not in {database}: the servers did not open the PostgreSQL URL"


async def model_requests(fake, count: int) -> None:
    """Until the fake model has been asked ``count`` times (a run on some replica is in its model call)."""
    with anyio.fail_after(20):
        while len(fake.requests) < count:
            await anyio.sleep(0.02)


async def test_runs_on_either_replica_are_listed_and_stopped_from_the_other(replicas, fake_openai, database):
    fake_openai.script = [("hang", None)]
    a, b = replicas
    async with Client(a.url) as on_a, Client(b.url) as on_b:
        on_first = (await call(on_a, "create_trace", prompt="Look around"))["trace_id"]
        on_second = (await call(on_b, "create_trace", prompt="Look around too"))["trace_id"]
        for tid in (on_first, on_second):
            await stored_in(database, tid)
        await model_requests(fake_openai, 2)
        for client in (on_a, on_b):
            assert set((await call(client, "list_running"))["running"]) == {on_first, on_second}
        assert (await call(on_b, "stop_trace", trace_id=on_first))["status"] == "stopping"
        assert (await call(on_a, "stop_trace", trace_id=on_second))["status"] == "stopping"
        assert (await wait_done(on_b, on_first))["trace"]["status"] == "stopped"
        assert (await wait_done(on_a, on_second))["trace"]["status"] == "stopped"
        assert (await call(on_b, "list_running"))["running"] == []


async def test_a_wait_on_b_follows_a_run_on_a_with_progress(replicas, fake_openai):
    fake_openai.script = [("slow", (1.0, completion(None, tool_calls=[LIST_CALL]))), ("hang", None)]
    a, b = replicas
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)

    async with Client(a.url) as on_a, Client(b.url) as on_b:
        tid = (await call(on_a, "create_trace", prompt="Look around"))["trace_id"]
        waited: dict = {}

        async def wait_on_b() -> None:
            result = await on_b.call_tool(
                "get_trace",
                {"trace_id": tid, "wait_seconds": 30, "after_sequence": 2},
                progress_callback=on_progress,
            )
            waited.update(result.structured_content or {})

        async with anyio.create_task_group() as group:
            group.start_soon(wait_on_b)
            await model_requests(fake_openai, 2)  # A ran the tool and asked again: the run hangs there
            with anyio.fail_after(20):
                while not any(p.startswith("list_files returned") for p in progress):
                    await anyio.sleep(0.02)
            assert (await call(on_b, "stop_trace", trace_id=tid))["status"] == "stopping"
    # the first progress for A's model turn comes before its tool result (B may also replay A's first
    # messages, stored before its wait began, as its change feed catches up)
    assert progress.index("assistant called list_files()") < next(
        i for i, p in enumerate(progress) if p.startswith("list_files returned")
    )
    assert waited["trace"]["status"] == "stopped"
    assert len(fake_openai.requests) == 2  # B never called the model: A ran the trace


async def test_a_killed_replicas_run_is_interrupted_and_resumed_on_the_other(replicas, fake_openai):
    fake_openai.script = [("hang", None)]
    a, b = replicas
    async with Client(b.url) as on_b:
        async with Client(a.url) as on_a:
            tid = (await call(on_a, "create_trace", prompt="Start here"))["trace_id"]
            await model_requests(fake_openai, 1)
            os.kill(a.process.pid, signal.SIGKILL)
            a.process.wait()  # reaped: its pid is gone, as a dead host's lease would be lapsed
        assert (await wait_done(on_b, tid))["trace"]["status"] == "interrupted"
        fake_openai.script = [("json", completion("Resumed on B."))]
        await call(on_b, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "Go on"}])
        done = await wait_done(on_b, tid)
        assert (done["trace"]["status"], done["answer"]) == ("completed", "Resumed on B.")
    roles = [m["role"] for m in fake_openai.requests[-1]["body"]["messages"]]
    assert roles == ["system", "user", "user"]  # the path A stored, then B's message


async def test_a_lesson_reflected_on_a_is_recalled_on_b(replicas, fake_openai):
    a, b = replicas
    lesson = "Read README.md before answering questions about a project"
    fake_openai.script = [
        ("json", completion("The project answers 42.")),
        ("json", completion(f"- {lesson}")),
    ]
    async with (
        Client(a.url) as on_a,
        Client(b.url) as on_b,
        on_b.listen(resource_subscriptions=["experiences://memory"]) as heard,
    ):
        tid = (await call(on_a, "create_trace", prompt="What does this project answer?"))["trace_id"]
        await wait_done(on_a, tid)
        assert (await call(on_a, "reflect_trace", trace_id=tid))["lessons"] == [lesson]
        with anyio.fail_after(10):
            event = await heard.__anext__()
        assert event.uri == "experiences://memory"
        found = await call(on_b, "get_experiences", query="questions about the project README")
        assert [(l["text"], l["trace_id"]) for l in found["lessons"]] == [(lesson, tid)]
        whole = await call(on_b, "get_experiences")
        assert f"- {lesson}" in whole["content"] and "(in the database; " in whole["path"]
        fake_openai.script = [("json", completion("Done."))]
        second = (await call(on_b, "create_trace", prompt="Answer a question about the README"))["trace_id"]
        await wait_done(on_b, second)
    system = fake_openai.requests[-1]["body"]["messages"][0]["content"]
    assert lesson in system  # B recalled A's lesson into its new trace's prompt


async def test_lessons_asked_for_on_b_wait_for_the_automatic_reflection_running_on_a(replicas, fake_openai):
    a, b = replicas
    lesson = "Check the changelog before naming a version"
    fake_openai.script = [("json", completion("Version 3.")), ("slow", (2.0, completion(f"- {lesson}")))]
    async with Client(a.url) as on_a, Client(b.url) as on_b:
        tid = (await call(on_a, "create_trace", prompt="Which version is this?", reflect=True))["trace_id"]
        await wait_done(on_b, tid)  # the answer is out; A is still reflecting on it
        found = await call(on_b, "get_experiences", query="changelog version")
    assert [(l["text"], l["trace_id"]) for l in found["lessons"]] == [(lesson, tid)]


async def test_the_experiences_resource_on_b_renders_a_lesson_reflected_on_a(replicas, fake_openai):
    a, b = replicas
    fake_openai.script = [("json", completion("Done.")), ("json", completion("- Keep answers short"))]
    async with Client(a.url) as on_a, Client(b.url) as on_b:
        tid = (await call(on_a, "create_trace", prompt="Say something"))["trace_id"]
        await wait_done(on_a, tid)
        await call(on_a, "reflect_trace", trace_id=tid)
        [content] = (await on_b.read_resource("experiences://memory")).contents
    assert isinstance(content, types.TextResourceContents) and "- Keep answers short" in content.text
