"""What only the SQLite backend has: the file, WAL, migrations from the first schema, the write lock."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import anyio
import pytest

from agent.errors import SchemaTooNew
from agent.trace import migrations
from agent.trace.models import MessageUsage, NewMessage, Status, StopReason, Trace
from agent.trace.sqlite import SQLiteTraceStore
from agent.trace.store import new_token

pytestmark = pytest.mark.anyio


async def test_schema_is_versioned_and_wal(tmp_path):
    path = tmp_path / "traces.db"
    store = await SQLiteTraceStore.open(path)
    await store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(migrations.MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


async def test_a_new_database_is_private_to_its_owner_in_an_open_folder(tmp_path):
    """The data directory may already exist, world-readable: the traces in it are not."""
    os.chmod(tmp_path, 0o755)
    old_umask = os.umask(0o022)
    try:
        store = await SQLiteTraceStore.open(tmp_path / "traces.db")
        try:
            await store.create(Trace(trace_id="t", model="offline"), [], new_token())
            files = sorted(p.name for p in tmp_path.iterdir())
            assert files == ["traces.db", "traces.db-shm", "traces.db-wal"]
            assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {oct(0o600)}
        finally:
            await store.close()
        existing = tmp_path / "shared.db"
        existing.touch(mode=0o640)
        await (await SQLiteTraceStore.open(existing)).close()
        assert existing.stat().st_mode & 0o777 == 0o640  # a file its owner made keeps its mode
    finally:
        os.umask(old_umask)


async def test_a_newer_schema_is_refused_with_a_sentence(tmp_path):
    path = tmp_path / "traces.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(SchemaTooNew, match="newer than this agent-trace-mcp"):
        await SQLiteTraceStore.open(path)


async def test_a_database_of_the_first_schema_is_upgraded_with_its_data(tmp_path):
    """Made by migration 1 alone, with a finished and a running trace in it, as version 0.0.1 left it."""
    path = tmp_path / "traces.db"
    db = sqlite3.connect(path, isolation_level=None)
    migrations.m001_initial(db)
    db.execute("PRAGMA user_version = 1")
    usage = json.dumps({"prompt_tokens": 3, "completion_tokens": 2, "llm_calls": 1, "tool_calls": 0})
    for trace_id, status, head in (("old", "completed", 2), ("crashed", "running", 1)):
        db.execute(
            "INSERT INTO traces (trace_id, name, uid, model, config, status, stop_reason, head_sequence, "
            "last_sequence, created_at, updated_at, error, usage) VALUES (?, 'n', 'u', 'offline', '{}', ?, NULL, ?, ?, "
            "'2026-01-01T00:00:00', '2026-01-01T00:00:00', NULL, ?)",
            (trace_id, status, head, head, usage),
        )
        db.execute(
            "INSERT INTO messages VALUES (?, 1, NULL, 'user', 'hello', NULL, NULL, NULL, NULL, '2026-01-01T00:00:00')",
            (trace_id,),
        )
    db.execute(
        "INSERT INTO messages VALUES ('old', 2, 1, 'assistant', 'hi', NULL, NULL, NULL, "
        "'{\"prompt_tokens\": 3, \"completion_tokens\": 2}', '2026-01-01T00:00:01')"
    )
    db.close()

    store = await SQLiteTraceStore.open(path)
    try:
        old = await store.get_trace("old")
        assert (old.status, old.head_sequence, old.usage.llm_calls, old.lessons) == (
            Status.COMPLETED,
            2,
            1,
            [],
        )
        assert [m.content for m in await store.get_path("old")] == ["hello", "hi"]
        crashed = await store.get_trace("crashed")  # left running by a process that no longer exists
        assert (crashed.status, crashed.stop_reason) == (Status.INTERRUPTED, StopReason.INTERRUPTED)
        # and the upgraded schema behaves like a new one: claim, append (head and totals follow), log
        token = new_token()
        start = await store.last_change_id()
        await store.claim("old", token, head=2, model="offline", config=old.config,
                          messages=[NewMessage(role="user", content="again")])  # fmt: skip
        trace = await store.get_trace("old")
        assert trace.head_sequence == 3 and trace.status is Status.RUNNING
        assert [c.kind for c in await store.changes_after(start)] == ["trace", "message"]
        passed_in = NewMessage(role="assistant", content="as the caller wrote it")
        await store.append("old", passed_in, 3, token=token)
        reply = NewMessage(role="assistant", content="the model", usage=MessageUsage(prompt_tokens=5))
        await store.append("old", reply, 4, token=token)
        assert (await store.get_trace("old")).usage.llm_calls == 2  # the model's reply only
    finally:
        await store.close()


@pytest.mark.slow
async def test_a_write_waits_out_another_process_holding_the_write_lock(tmp_path):
    """A real second connection takes the write lock for longer than busy_timeout; the append is retried
    with backoff and lands once the lock is gone (before: 'database is locked' ended the run)."""
    path = tmp_path / "traces.db"
    store = await SQLiteTraceStore.open(path, busy_timeout_ms=200)
    try:
        token = new_token()
        await store.create(
            Trace(trace_id="t", model="offline"), [NewMessage(role="user", content="x")], token
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import sqlite3, sys, time
                db = sqlite3.connect({str(path)!r}, isolation_level=None)
                db.execute("BEGIN EXCLUSIVE")
                print("locked", flush=True)
                time.sleep(1.5)
                db.execute("COMMIT")
            """)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        message = await store.append("t", NewMessage(role="assistant", content="y"), 1, token=token)
        assert message.sequence == 2 and time.monotonic() - started > 0.5
        holder.wait(10)
        holder.stdout.close()
    finally:
        await store.close()


@pytest.mark.slow
def test_a_killed_process_loses_no_committed_message(tmp_path):
    """Every sequence the writer reported as stored survives a SIGKILL, and the trace reads interrupted."""
    path = tmp_path / "traces.db"
    script = textwrap.dedent(
        f"""
        import anyio
        from agent.trace.models import NewMessage, Trace
        from agent.trace.sqlite import SQLiteTraceStore

        async def main():
            store = await SQLiteTraceStore.open({str(path)!r})
            token = "tok"
            _, stored = await store.create(Trace(trace_id="t", model="offline"), [], token)
            parent = None
            while True:
                m = await store.append("t", NewMessage(role="user", content="x" * 1000), parent, token=token)
                parent = m.sequence
                print(m.sequence, flush=True)

        anyio.run(main)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    reported = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        reported = int(line)
        if reported >= 200:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()

    async def check() -> None:
        store = await SQLiteTraceStore.open(path)
        try:
            trace = await store.get_trace("t")
            assert trace.status is Status.INTERRUPTED
            path_messages = await store.get_path("t")
            assert len(path_messages) >= reported
            assert [m.sequence for m in path_messages] == list(range(1, len(path_messages) + 1))
        finally:
            await store.close()

    anyio.run(check)


async def test_pruning_the_change_log_never_lets_an_id_come_back(tmp_path):
    """Old change rows are pruned, but the newest stays, so the next id is higher than any a reader saw."""
    path = tmp_path / "traces.db"
    store = await SQLiteTraceStore.open(path)
    try:
        for _ in range(3):
            await store.note_change("experiences")
        last = await store.last_change_id()
        db = sqlite3.connect(path)
        db.execute("UPDATE changes SET created_at = 0")
        db.commit()
        db.close()
        await store.sweep()
        await store._prune_changes()
        assert await store.last_change_id() == last  # everything but the newest row is gone
        await store.note_change("experiences")
        assert [c.id for c in await store.changes_after(last)] == [last + 1]
    finally:
        await store.close()


async def test_concurrent_appends_are_written_together_each_at_its_own_sequence(tmp_path):
    """Group commit: 40 runs appending at once share statements, and every path reads as it was sent."""
    store = await SQLiteTraceStore.open(tmp_path / "traces.db")
    inserts: list[str] = []
    try:
        tokens = {}
        for i in range(40):
            tokens[f"t{i}"] = new_token()
            await store.create(Trace(trace_id=f"t{i}", model="offline"), [], tokens[f"t{i}"])
        execute = store._writer.execute_fetchall

        def counted(sql, params=None):  # each call is one trip to the connection's thread
            inserts.append(sql)
            return execute(sql, params)

        store._writer.execute_fetchall = counted

        async def run(trace_id: str) -> None:
            parent = None
            for step in range(5):
                message = NewMessage(role="user", content=f"{trace_id} step {step}")
                parent = (await store.append(trace_id, message, parent, token=tokens[trace_id])).sequence

        async with anyio.create_task_group() as group:
            for trace_id in tokens:
                group.start_soon(run, trace_id)
        for trace_id in tokens:
            path = await store.get_path(trace_id)
            assert [(m.sequence, m.content) for m in path] == [
                (s + 1, f"{trace_id} step {s}") for s in range(5)
            ]
            assert (await store.get_trace(trace_id)).head_sequence == 5
        assert len(inserts) < 200 / 4  # 200 appends in fewer than 50 statements
    finally:
        await store.close()


async def test_in_one_batch_a_lost_claim_a_missing_trace_and_a_refused_row_fail_alone(tmp_path):
    store = await SQLiteTraceStore.open(tmp_path / "traces.db")
    try:
        token = new_token()
        for trace_id in ("good", "poisoned", "taken"):
            await store.create(Trace(trace_id=trace_id, model="offline"), [], token)
        await store._writer.execute(  # a row SQLite itself refuses, as a full disk or a constraint would
            "CREATE TEMP TRIGGER poison BEFORE INSERT ON messages WHEN NEW.content = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned message'); END"
        )
        outcomes: dict[str, object] = {}
        statements: list[int] = []  # rows each INSERT of messages carried
        execute = store._writer.execute_fetchall

        def counted(sql, params=None):
            if sql.startswith("WITH v("):
                statements.append(len(params) // 12)
            return execute(sql, params)

        store._writer.execute_fetchall = counted

        async def append(key: str, trace_id: str, content: str, owner: str, side: bool = False) -> None:
            message = NewMessage(role="user", content=content)
            try:
                outcomes[key] = (await store.append(trace_id, message, None, token=owner, side=side)).sequence
            except Exception as exc:
                outcomes[key] = type(exc).__name__

        async with store._write_lock:  # hold writes back so that all of them queue for one batch
            async with anyio.create_task_group() as group:
                group.start_soon(append, "good", "good", "fine", token)
                group.start_soon(append, "good again", "good", "fine too", token, True)  # same trace
                group.start_soon(append, "poisoned", "poisoned", "poison", token)
                group.start_soon(append, "taken", "taken", "late", new_token())
                group.start_soon(append, "missing", "missing", "lost", token)
                while len(store._appends) < 5:
                    await anyio.sleep(0.01)
                store._write_lock.release()
            await store._write_lock.acquire()
        assert outcomes == {
            "good": 1,
            "good again": 2,
            "poisoned": "IntegrityError",
            "taken": "ClaimLost",
            "missing": "TraceNotFound",
        }
        assert statements == [4, 1, 1, 1, 1, 1]  # the distinct traces together, refused, then one by one
        assert [m.content for m in await store.get_tree("good")] == ["fine", "fine too"]
        assert await store.get_tree("poisoned") == [] and await store.get_tree("taken") == []
    finally:
        await store.close()
