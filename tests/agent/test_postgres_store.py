"""What only the PostgreSQL backend has: numbered migrations under a lock, LISTEN/NOTIFY, a pool that
survives dropped connections, claims raced across pools, and the start-up error sentence."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import pytest

from tests.store_backends import PG_SKIP_REASON, PG_URL, fresh_pg_url, require_postgres

if PG_URL is None:
    pytest.skip(PG_SKIP_REASON, allow_module_level=True)

import asyncpg

from agent.errors import SchemaTooNew, TraceError, TraceRunning
from agent.trace import pg_migrations
from agent.trace.backends import open_store, redact_url
from agent.trace.models import NewMessage, Status, StopReason, Trace, TraceConfig
from agent.trace.postgres import DatabaseUnreachable, PostgresTraceStore, _settings
from agent.trace.store import new_token

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg_url() -> str:
    """A fresh schema on the test server (the whole module skips, in one line, when none answers)."""
    return fresh_pg_url()


def with_params(url: str, **params: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode([*parse_qsl(parts.query), *params.items()])))


def schema_of(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))["search_path"]


async def admin():
    """A plain connection to the test server, outside any store."""
    import asyncpg

    return await asyncpg.connect(require_postgres())


def user(text: str = "hi") -> NewMessage:
    return NewMessage(role="user", content=text)


async def test_migrations_are_recorded_and_sessions_configured(pg_url):
    store = await PostgresTraceStore.open(pg_url, statement_timeout=7.0)
    try:
        async with store._pool.acquire() as db:
            rows = await db.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
            assert [(r["version"], r["name"]) for r in rows] == [
                (n, step.__name__) for n, step in enumerate(pg_migrations.MIGRATIONS, start=1)
            ]
            assert await db.fetchval("SHOW statement_timeout") == "7s"
            assert await db.fetchval("SELECT current_schema()") == schema_of(pg_url)
    finally:
        await store.close()


def test_the_schema_is_agent_trace_unless_the_url_names_one():
    schema, settings = _settings("postgresql://u@h/d", 30.0)
    assert (schema, settings["search_path"]) == ("agent_trace", "agent_trace")
    schema, settings = _settings("postgresql://u@h/d?search_path=mine,public&statement_timeout=0", 30.0)
    assert schema == "mine" and "search_path" not in settings and "statement_timeout" not in settings


async def test_a_newer_schema_is_refused_with_a_sentence(pg_url):
    await (await PostgresTraceStore.open(pg_url)).close()
    db = await admin()
    try:
        await db.execute(f"INSERT INTO \"{schema_of(pg_url)}\".schema_migrations VALUES (99, 'm099_future')")
    finally:
        await db.close()
    with pytest.raises(SchemaTooNew, match="newer than this agent-trace-mcp"):
        await PostgresTraceStore.open(pg_url)


async def test_a_database_of_the_first_schema_is_upgraded_with_its_data(pg_url):
    """Made by migration 1 alone, with a finished trace and one whose owner died, then opened."""
    import asyncpg

    db = await asyncpg.connect(pg_url)
    try:
        assert await pg_migrations.migrate(db, schema_of(pg_url), upto=1) == 1
        usage = json.dumps({"prompt_tokens": 3, "completion_tokens": 2, "llm_calls": 1, "tool_calls": 0})
        for trace_id, status, head, owner in (
            ("old", "completed", 2, None),
            ("crashed", "running", 1, "x:1:y"),
        ):
            await db.execute(
                "INSERT INTO traces (trace_id, name, uid, model, config, status, head_sequence, last_sequence, "
                "created_at, updated_at, usage, owner, run_token, lease_until) VALUES ($1, 'n', 'u', 'offline', "
                "'{}', $2, $3, $3, '2026-01-01T00:00:00', '2026-01-01T00:00:00', $4, $5, "
                "CASE WHEN $5::text IS NULL THEN NULL ELSE 'tok' END, now() - interval '1 hour')",
                trace_id, status, head, usage, owner,
            )  # fmt: skip
            await db.execute(
                "INSERT INTO messages (trace_id, sequence, role, content, created_at) "
                "VALUES ($1, 1, 'user', '\"hello\"', '2026-01-01T00:00:00')",
                trace_id,
            )
        await db.execute(
            "INSERT INTO messages (trace_id, sequence, parent_sequence, role, content, usage, created_at) "
            "VALUES ('old', 2, 1, 'assistant', '\"hi\"', '{\"prompt_tokens\": 3, \"completion_tokens\": 2}', "
            "'2026-01-01T00:00:01')"
        )
    finally:
        await db.close()

    store = await PostgresTraceStore.open(pg_url)
    try:
        old = await store.get_trace("old")
        assert (old.status, old.head_sequence, old.usage.llm_calls, old.lessons) == (
            Status.COMPLETED, 2, 1, [],
        )  # fmt: skip
        assert [m.content for m in await store.get_path("old")] == ["hello", "hi"]
        crashed = await store.get_trace("crashed")  # its lease lapsed an hour ago: swept on open
        assert (crashed.status, crashed.stop_reason) == (Status.INTERRUPTED, StopReason.INTERRUPTED)
        token = new_token()
        start = await store.last_change_id()
        await store.claim("old", token, head=2, model="offline", config=old.config, messages=[user("again")])
        trace = await store.get_trace("old")
        assert trace.head_sequence == 3 and trace.status is Status.RUNNING and trace.usage.llm_calls == 1
        assert [c.kind for c in await store.changes_after(start)] == ["trace", "message"]
    finally:
        await store.close()


async def test_replicas_starting_together_migrate_once(pg_url):
    stores: list[PostgresTraceStore] = []

    async def start() -> None:
        stores.append(await PostgresTraceStore.open(pg_url))

    try:
        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(start)
        assert len(stores) == 4
        async with stores[0]._pool.acquire() as db:
            versions = [r[0] for r in await db.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
        assert versions == list(range(1, len(pg_migrations.MIGRATIONS) + 1))
    finally:
        for store in stores:
            await store.close()


# -- the change feed ----------------------------------------------------------------------------------


async def listening_pid(channel: str) -> int | None:
    db = await admin()
    try:
        return await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE query = $1 ORDER BY backend_start DESC LIMIT 1",
            f'LISTEN "{channel}"',
        )
    finally:
        await db.close()


async def test_the_listener_listens_again_after_its_backend_is_terminated(pg_url):
    store = await PostgresTraceStore.open(pg_url)
    writer = await PostgresTraceStore.open(pg_url)
    try:
        cursor = await store.last_change_id()
        await store.wait_for_changes(0)  # starts listening
        first = await listening_pid(store._channel)
        assert first is not None
        db = await admin()
        try:
            assert await db.fetchval("SELECT pg_terminate_backend($1)", first)
        finally:
            await db.close()
        await writer.note_change("experiences")  # committed while this store may not be listening
        with anyio.fail_after(20):
            while (pid := await listening_pid(store._channel)) in (None, first):
                await store.wait_for_changes(60)
        assert pid != first
        # the feed re-reads from its cursor, so what came while it was deaf is not lost
        assert [c.kind for c in await store.changes_after(cursor)] == ["experiences"]
        await writer.note_change("experiences", "t2")
        with anyio.fail_after(20):  # woken by a NOTIFY on the new connection, not by the 60 s timeout
            await store.wait_for_changes(60)
        assert [c.trace_id for c in await store.changes_after(cursor)] == ["", "t2"]
    finally:
        await writer.close()
        await store.close()


async def test_changes_are_numbered_in_commit_order(pg_url):
    """A writer of the log waits for one that has not committed yet, so a reader past id N never
    meets a smaller id later (a bare sequence would hand out ids in write order)."""
    store = await PostgresTraceStore.open(pg_url)
    import asyncpg

    slow = await asyncpg.connect(pg_url)
    try:
        tx = slow.transaction()
        await tx.start()
        await slow.execute("INSERT INTO changes (trace_id, kind) VALUES ('slow', 'experiences')")
        async with anyio.create_task_group() as group:
            group.start_soon(store.note_change, "experiences", "fast")
            db = await admin()
            try:  # the fast writer is waiting on the log's lock: seen from the server, not assumed
                with anyio.fail_after(20):
                    while not await db.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    ):
                        await anyio.sleep(0.01)
            finally:
                await db.close()
            assert await store.changes_after(0) == []
            await tx.commit()
        assert [c.trace_id for c in await store.changes_after(0)] == ["slow", "fast"]
    finally:
        await slow.close()
        await store.close()


async def test_an_open_transaction_that_appended_holds_no_writer_back(pg_url):
    """Changes are logged as their transaction commits: one that appended and stays open delays no other
    writer, and its change, numbered at its commit, comes after the changes committed meanwhile."""
    store = await PostgresTraceStore.open(pg_url)
    import asyncpg

    slow = await asyncpg.connect(pg_url)
    try:
        for trace_id in ("slow", "fast"):
            await store.create(Trace(trace_id=trace_id, model="offline"), [], "tok-" + trace_id)
        start = await store.last_change_id()
        tx = slow.transaction()
        await tx.start()
        await slow.execute(
            "INSERT INTO messages (trace_id, sequence, role, content, created_at) "
            "VALUES ('slow', 1, 'user', '\"late\"', '2026-01-01T00:00:00')"
        )
        with anyio.fail_after(10):  # not waiting on the open transaction
            await store.append("fast", user("first"), None, token="tok-fast")
            await store.note_change("experiences")
        assert [c.kind for c in await store.changes_after(start)] == ["message", "experiences"]
        await tx.commit()
        changes = await store.changes_after(start)
        assert [(c.trace_id, c.kind) for c in changes] == [
            ("fast", "message"), ("", "experiences"), ("slow", "message"),
        ]  # fmt: skip
        assert changes[-1].token == "tok-slow" and changes[-1].message.content == "late"
    finally:
        await slow.close()
        await store.close()


# -- connections ----------------------------------------------------------------------------------------


async def test_dropped_pool_connections_do_not_fail_an_idle_run(pg_url):
    """Every connection of the pool is terminated while the run waits (on its model, say); its next
    read and append go through on new connections."""
    url = with_params(pg_url, application_name=f"drop-{os.getpid()}")
    store = await PostgresTraceStore.open(url)
    try:
        token = new_token()
        await store.create(Trace(trace_id="t", model="offline"), [user()], token)
        db = await admin()
        try:
            killed = [
                row["pid"]
                for row in await db.fetch(
                    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                    f"drop-{os.getpid()}",
                )
            ]
            assert killed
            with anyio.fail_after(20):  # gone on the server (the pool may open new ones meanwhile)
                while await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", killed):
                    await anyio.sleep(0.01)
        finally:
            await db.close()
        assert (await store.get_trace("t")).status is Status.RUNNING
        answer = await store.append("t", NewMessage(role="assistant", content="a"), 1, token=token)
        assert answer.sequence == 2 and (await store.get_trace("t")).head_sequence == 2
    finally:
        await store.close()


async def test_backends_terminated_under_busy_writers_fail_no_write_and_store_none_twice(pg_url):
    """pg_terminate_backend again and again while ten runs append: a connection ended while idle is
    refused by asyncpg before anything is sent (InternalClientError), one ended during a COMMIT leaves
    its outcome unknown; both are retried, each message stored exactly once."""
    name = f"busy-{os.getpid()}"
    store = await PostgresTraceStore.open(with_params(pg_url, application_name=name), pool_size=4)
    try:
        tokens = {f"t{n}": new_token() for n in range(10)}
        for tid, token in tokens.items():
            await store.create(Trace(trace_id=tid, model="offline"), [user()], token)

        async def write(tid: str) -> None:
            parent = 1
            for step in range(40):
                message = NewMessage(role="assistant", content=f"{tid} step {step}")
                parent = (await store.append(tid, message, parent, token=tokens[tid])).sequence

        db = await admin()
        try:
            async with anyio.create_task_group() as group:
                for tid in tokens:
                    group.start_soon(write, tid)
                for _ in range(15):
                    await anyio.sleep(0.05)
                    await db.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                        name,
                    )
        finally:
            await db.close()
        for tid in tokens:
            path = await store.get_path(tid)
            assert [m.content for m in path[1:]] == [f"{tid} step {n}" for n in range(40)]
    finally:
        await store.close()


class Proxy:
    """A TCP relay to the test server that can cut every connection and turn new ones away: an outage
    (a restart, a failover) with nothing faked past the socket."""

    def __init__(self, host: str, port: int):
        self._target = (host, port)
        self._writers: set[asyncio.StreamWriter] = set()
        self.refusing = False
        self.turned_away = 0

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.turned_away += 1
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()
                self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_write_during_an_outage_waits_for_the_database_and_lands(pg_url):
    """Every connection is cut and new ones are turned away; an append made meanwhile is retried on a
    new connection once the database is back, and the listener comes back with it."""
    target = urlsplit(pg_url)
    async with Proxy(target.hostname or "127.0.0.1", target.port or 5432) as proxy:
        url = urlunsplit(target._replace(netloc=f"{target.username}@127.0.0.1:{proxy.port}"))
        store = await PostgresTraceStore.open(url)
        try:
            token = new_token()
            await store.create(Trace(trace_id="t", model="offline"), [user()], token)
            await store.wait_for_changes(0)  # listening, through the relay too
            proxy.refusing = True
            proxy.cut()
            stored: list[int] = []

            async def append() -> None:
                message = await store.append("t", NewMessage(role="assistant", content="a"), 1, token=token)
                stored.append(message.sequence)

            async with anyio.create_task_group() as group:
                group.start_soon(append)
                with anyio.fail_after(20):
                    while proxy.turned_away < 2:  # the store is retrying against the outage
                        await anyio.sleep(0.01)
                assert stored == []
                proxy.refusing = False
            assert stored == [2] and (await store.get_trace("t")).head_sequence == 2
            with anyio.fail_after(20):  # the listener was lost: this wait listens again and returns
                await store.wait_for_changes(60)
            await store.note_change("experiences")
            with anyio.fail_after(20):  # and a NOTIFY on the new connection wakes the next
                await store.wait_for_changes(60)
        finally:
            await store.close()


async def test_a_bad_url_is_one_sentence_without_the_password():
    base = urlsplit(require_postgres())
    host = base.hostname or "127.0.0.1"
    refused = f"postgresql://alice:s3cret@{host}:1/db"
    with pytest.raises(DatabaseUnreachable) as caught:
        await open_store(refused)
    text = str(caught.value)
    assert (
        text
        == f"Cannot connect to the trace database postgresql://alice:***@{host}:1/db: the connection was refused."
    )
    missing = f"postgresql://{base.username or 'postgres'}:s3cret@{base.netloc.rpartition('@')[2]}/no_such_db_here?password=s3cret"
    with pytest.raises(DatabaseUnreachable) as caught:
        await PostgresTraceStore.open(missing)
    text = str(caught.value)
    assert "s3cret" not in text and "no_such_db_here" in text and "\n" not in text
    assert text.count(". ") == 0 and text.endswith(".")


def test_redact_url_hides_passwords_in_both_places():
    assert redact_url("postgresql://u:p%40ss@h:5/d?sslmode=require&password=x") == (
        "postgresql://u:***@h:5/d?sslmode=require&password=***"
    )
    assert redact_url("postgres://u@h/d") == "postgres://u@h/d"
    assert (
        redact_url("postgresql:///d?host=/run/pg&password=s3cret")
        == "postgresql:///d?host=/run/pg&password=***"
    )


# -- claims ---------------------------------------------------------------------------------------------


async def test_a_claim_race_between_two_pools_has_exactly_one_winner(pg_url):
    """Two stores (two replicas' pools), four claimers each, on each of 40 idle traces."""
    one = await PostgresTraceStore.open(pg_url)
    two = await PostgresTraceStore.open(pg_url)
    try:
        for i in range(40):
            token = new_token()
            await one.create(Trace(trace_id=f"t{i}", model="offline"), [user()], token)
            await one.finish(
                f"t{i}", token, status=Status.COMPLETED, stop_reason=StopReason.END_TURN, error=None
            )
        winners: dict[str, list[str]] = {f"t{i}": [] for i in range(40)}

        async def claim(store: PostgresTraceStore, trace_id: str) -> None:
            token = new_token()
            try:
                await store.claim(
                    trace_id, token, head=1, model="offline", config=TraceConfig(), messages=[user()]
                )
            except TraceRunning:
                return
            winners[trace_id].append(token)

        async with anyio.create_task_group() as group:
            for trace_id in winners:
                for store in (one, two, one, two, one, two, one, two):
                    group.start_soon(claim, store, trace_id)
        assert all(len(tokens) == 1 for tokens in winners.values())
        held = {**await one.renew(), **await two.renew()}
        assert held == {trace_id: tokens[0] for trace_id, tokens in winners.items()}
        for trace_id in winners:  # the winner's message alone was appended
            assert [m.sequence for m in await one.get_tree(trace_id)] == [1, 2]
    finally:
        await two.close()
        await one.close()


@pytest.mark.slow
def test_a_killed_process_loses_no_committed_message(pg_url):
    """Every sequence the writer reported as stored survives its SIGKILL; its run reads interrupted once
    another process sweeps (its pid is gone from this host), and any process may resume it."""
    script = textwrap.dedent(
        f"""
        import anyio
        from agent.trace.models import NewMessage, Trace
        from agent.trace.postgres import PostgresTraceStore

        async def main():
            store = await PostgresTraceStore.open({pg_url!r})
            token = "tok"
            await store.create(Trace(trace_id="t", model="offline"), [], token)
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
        store = await PostgresTraceStore.open(pg_url)
        try:
            trace = await store.get_trace("t")
            assert trace.status is Status.INTERRUPTED
            path = await store.get_path("t")
            assert len(path) >= reported
            assert [m.sequence for m in path] == list(range(1, len(path) + 1))
            claimed, _ = await store.claim(
                "t", new_token(), head=len(path), model="offline", config=TraceConfig()
            )
            assert claimed.status is Status.RUNNING
        finally:
            await store.close()

    anyio.run(check)


async def test_a_schema_the_user_may_not_create_is_one_sentence(pg_url):
    db = await admin()
    role = f"agent_trace_test_{os.getpid()}_nobody"
    try:
        await db.execute(f'CREATE ROLE "{role}" LOGIN')
        base = urlsplit(pg_url)
        url = urlunsplit(base._replace(netloc=f"{role}:s3cret@{base.netloc.rpartition('@')[2]}"))
        with pytest.raises(TraceError) as caught:
            await PostgresTraceStore.open(url)
        text = str(caught.value)
        assert text.startswith(f"Cannot set up the trace schema '{schema_of(pg_url)}'")
        assert "permission denied" in text and "s3cret" not in text
    finally:
        await db.execute(f'DROP ROLE IF EXISTS "{role}"')
        await db.close()


async def test_a_database_that_refuses_the_start_up_sweep_is_one_sentence(pg_url, monkeypatch):
    async def refused(self: PostgresTraceStore) -> None:
        raise asyncpg.QueryCanceledError("canceling statement due to statement timeout")

    monkeypatch.setattr(PostgresTraceStore, "sweep", refused)
    with pytest.raises(TraceError) as caught:
        await PostgresTraceStore.open(pg_url)
    assert str(caught.value).startswith("Cannot read the traces in ") and "statement timeout" in str(
        caught.value
    )
