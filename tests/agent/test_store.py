"""The SQLite trace store: tree and path, head moves, paging, migrations, interrupted-on-reopen."""

from __future__ import annotations

import sqlite3

import pytest

from agent.errors import TraceNotFound
from agent.trace.models import NewMessage, Status, StopReason, Trace, TraceUsage
from agent.trace.store import SQLiteTraceStore, open_store

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path):
    s = await open_store(tmp_path / "traces.db")
    yield s
    await s.close()


async def new_trace(store, trace_id="t1", **kw) -> Trace:
    return await store.create_trace(Trace(trace_id=trace_id, model="offline", **kw))


async def test_append_builds_a_tree_and_the_path_follows_the_head(store):
    await new_trace(store)
    first = await store.append_message("t1", NewMessage(role="system", content="sys"), None)
    user = await store.append_message("t1", NewMessage(role="user", content="hi"), first.sequence)
    a1 = await store.append_message("t1", NewMessage(role="assistant", content="one"), user.sequence)
    # a second branch off the user message
    a2 = await store.append_message("t1", NewMessage(role="assistant", content="two"), user.sequence)
    assert [first.sequence, user.sequence, a1.sequence, a2.sequence] == [1, 2, 3, 4]
    trace = await store.get_trace("t1")
    assert trace.head_sequence == 4
    assert [m.content for m in await store.get_path("t1")] == ["sys", "hi", "two"]
    assert [m.content for m in await store.get_path("t1", 3)] == ["sys", "hi", "one"]
    assert [m.sequence for m in await store.get_tree("t1")] == [1, 2, 3, 4]
    assert [m.sequence for m in await store.get_children("t1", 2)] == [3, 4]
    await store.update_trace("t1", head_sequence=3)
    assert [m.content for m in await store.get_path("t1")] == ["sys", "hi", "one"]


async def test_usage_totals_accumulate_with_each_message(store):
    from agent.trace.models import MessageUsage

    await new_trace(store)
    await store.append_message("t1", NewMessage(role="user", content="x"), None)
    await store.append_message(
        "t1",
        NewMessage(role="assistant", content="y", usage=MessageUsage(prompt_tokens=7, completion_tokens=3)),
        1,
    )
    await store.append_message("t1", NewMessage(role="tool", content="z", tool_call_id="c"), 2)
    trace = await store.get_trace("t1")
    assert trace.usage == TraceUsage(prompt_tokens=7, completion_tokens=3, llm_calls=1, tool_calls=1)
    stored = await store.get_message("t1", 2)
    assert stored.usage.prompt_tokens == 7


async def test_unicode_and_a_megabyte_round_trip(store):
    await new_trace(store)
    text = "héllo 🌍 — 漢字\n" + "x" * (1024 * 1024)
    await store.append_message("t1", NewMessage(role="user", content=text), None)
    assert (await store.get_message("t1", 1)).content == text


async def test_unknown_trace_is_a_sentence(store):
    with pytest.raises(TraceNotFound, match="no trace 'nope'"):
        await store.get_trace("nope")
    with pytest.raises(TraceNotFound):
        await store.append_message("nope", NewMessage(role="user", content="x"), None)
    with pytest.raises(TraceNotFound):
        await store.update_trace("nope", status=Status.STOPPED)


async def test_list_traces_newest_first_with_filters_and_cursor(store):
    for i in range(5):
        await new_trace(
            store, f"t{i}", uid="alice" if i % 2 else "bob", created_at=f"2026-01-0{i + 1}T00:00:00"
        )
    await store.update_trace("t3", status=Status.COMPLETED)
    page = await store.list_traces(limit=2)
    assert [t.trace_id for t in page.traces] == ["t4", "t3"]
    page2 = await store.list_traces(limit=2, cursor=page.next_cursor)
    assert [t.trace_id for t in page2.traces] == ["t2", "t1"]
    page3 = await store.list_traces(limit=2, cursor=page2.next_cursor)
    assert [t.trace_id for t in page3.traces] == ["t0"] and page3.next_cursor is None
    assert [t.trace_id for t in (await store.list_traces(uid="alice")).traces] == ["t3", "t1"]
    assert [t.trace_id for t in (await store.list_traces(status="completed")).traces] == ["t3"]


async def test_running_traces_become_interrupted_on_reopen(tmp_path):
    path = tmp_path / "traces.db"
    store = await open_store(path)
    await new_trace(store, "alive")
    await store.append_message("alive", NewMessage(role="user", content="x"), None)
    await new_trace(store, "done", status=Status.COMPLETED, stop_reason=StopReason.END_TURN)
    await store.close()  # as if the process died: nothing marked the run finished

    store = await open_store(path)
    try:
        alive = await store.get_trace("alive")
        assert (alive.status, alive.stop_reason) == (Status.INTERRUPTED, StopReason.INTERRUPTED)
        assert (await store.get_trace("done")).status is Status.COMPLETED
        assert len(await store.get_path("alive")) == 1
    finally:
        await store.close()


async def test_schema_is_versioned_and_wal(tmp_path):
    path = tmp_path / "traces.db"
    store = await SQLiteTraceStore.open(path)
    await store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


async def test_a_newer_schema_is_refused_with_a_sentence(tmp_path):
    path = tmp_path / "traces.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(RuntimeError, match="newer than this agent-trace-mcp"):
        await SQLiteTraceStore.open(path)


async def test_bad_cursor_is_a_sentence(store):
    from agent.errors import TraceError

    with pytest.raises(TraceError, match="not one list_traces returned"):
        await store.list_traces(cursor="garbage!")


@pytest.mark.slow
def test_a_killed_process_loses_no_committed_message(tmp_path):
    """Every sequence the writer reported as stored survives a SIGKILL, and the trace reads interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    import anyio

    path = tmp_path / "traces.db"
    script = textwrap.dedent(
        f"""
        import anyio, sys
        from agent.trace.models import NewMessage, Trace
        from agent.trace.store import open_store

        async def main():
            store = await open_store({str(path)!r})
            await store.create_trace(Trace(trace_id="t", model="offline"))
            parent = None
            while True:
                m = await store.append_message("t", NewMessage(role="user", content="x" * 1000), parent)
                parent = m.sequence
                print(m.sequence, flush=True)

        anyio.run(main)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    reported = 0
    for line in proc.stdout:
        reported = int(line)
        if reported >= 200:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()

    async def check():
        store = await open_store(path)
        try:
            trace = await store.get_trace("t")
            assert trace.status is Status.INTERRUPTED
            path_messages = await store.get_path("t")
            assert len(path_messages) >= reported
            assert [m.sequence for m in path_messages] == list(range(1, len(path_messages) + 1))
        finally:
            await store.close()

    anyio.run(check)


async def test_a_second_server_on_the_same_database_leaves_live_runs_alone(tmp_path):
    path = tmp_path / "traces.db"
    first = await open_store(path)
    try:
        await new_trace(first, "live")
        second = await open_store(path)  # e.g. an HTTP server and a stdio server sharing the data dir
        try:
            assert (await second.get_trace("live")).status is Status.RUNNING
        finally:
            await second.close()
    finally:
        await first.close()
    third = await open_store(path)  # the owner has closed: its run is an orphan now
    try:
        assert (await third.get_trace("live")).status is Status.INTERRUPTED
    finally:
        await third.close()
