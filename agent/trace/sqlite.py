"""The default TraceStore: one SQLite file (aiosqlite, WAL) that any number of processes may share.

Messages are rows keyed by (trace_id, sequence) with a parent pointer; the head, the claim (run token,
owner, lease) and the stop request live on the trace row. Triggers move the head, add up usage and log
every change in the ``changes`` table in the same statement, which other processes tail cheaply
(``PRAGMA data_version`` first). One writer connection; every write is one statement or one short
``BEGIN IMMEDIATE`` transaction, shielded from cancellation (a stopped run never abandons a write half
way) and retried with backoff while another process holds the write lock. Appends that queue behind a
write go in together as one statement (group commit): concurrent runs share the trips to SQLite.
``synchronous=NORMAL``: in WAL mode a process crash keeps every committed row; a power cut may lose the
last few commits, the price of sub-millisecond appends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio

from agent import defaults
from agent.errors import TraceMoved, TraceNotFound, TraceRunning
from agent.trace.migrations import migrate
from agent.trace.models import (
    Message,
    NewMessage,
    RunHandle,
    Status,
    StopReason,
    Trace,
    TraceConfig,
    utc_now,
)
from agent.trace.rows import (
    HANDLE_COLUMNS,
    MESSAGE_COLUMNS,
    N_MESSAGE,
    N_TRACE,
    TRACE_COLUMNS,
    handle_from_row,
    message_from_row,
    trace_from_row,
)
from agent.trace.rows import prefixed as _prefixed
from agent.trace.store import (
    OPEN_OWNERS,
    Change,
    ChangeKind,
    ClaimLost,
    TracePage,
    decode_cursor,
    encode_cursor,
    owner_alive,
    process_owner,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
WRITE_RETRY_SECONDS = 30.0
"""How long a write keeps retrying while another process holds the database's write lock."""


def _busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or (
        "locked" in str(exc) or "busy" in str(exc)
    )


def _locked(exc: Exception) -> bool:
    """Still locked by another process after every retry: trying the appends one by one would not help."""
    return isinstance(exc, sqlite3.OperationalError) and _busy(exc)


def _prepare_database(path: str) -> None:
    """Create, migrate and switch to WAL in a worker thread before the async connections open.

    A new database is created readable by its owner only (SQLite gives its -wal and -shm files the same
    mode): traces hold whatever the agents read. An existing file keeps the mode its owner gave it."""
    if path != ":memory:" and not os.path.exists(path):
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        migrate(db)
    finally:
        db.close()


_BATCH_COLUMNS = (
    "trace_id, parent, role, content, tool_calls, tool_call_id, name, usage, created_at, side, meta, token"
)
_BATCH_ROW = "(" + ", ".join("?" * len(_BATCH_COLUMNS.split(","))) + ")"
_BATCH_LIMIT = 64
"""Appends written in one statement at most (12 parameters each, far below SQLite's limit)."""


@dataclass(eq=False)
class _Append:
    """One message waiting to be written, and what became of it."""

    trace_id: str
    message: NewMessage
    parent: int | None
    token: str | None
    side: bool
    created_at: str = field(default_factory=utc_now)
    params: tuple[Any, ...] = field(init=False)
    """The row's values, serialised by the caller (a message that cannot be fails its own append only)."""
    result: Message | Exception | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        message = self.message
        self.params = (
            self.trace_id,
            self.parent,
            message.role,
            message.content,
            json.dumps([c.model_dump() for c in message.tool_calls]) if message.tool_calls else None,
            message.tool_call_id,
            message.name,
            message.usage.model_dump_json() if message.usage else None,
            self.created_at,
            int(self.side),
            json.dumps(message.meta) if message.meta else None,
            self.token,
        )

    def stored(self, sequence: int) -> Message:
        return Message(
            **self.message.model_dump(),
            sequence=sequence,
            parent_sequence=self.parent,
            created_at=self.created_at,
            side=self.side,
        )


class SQLiteTraceStore:
    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        *,
        lease_seconds: float = defaults.LEASE_SECONDS,
    ):
        self._writer = writer
        self._reader = reader
        self._write_lock = anyio.Lock(fast_acquire=True)  # the write itself yields; no extra loop turn
        self._appends: list[_Append] = []
        self._lease_seconds = lease_seconds
        self._data_version: int | None = None
        self.owner = process_owner()
        OPEN_OWNERS.add(self.owner)

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        lease_seconds: float = defaults.LEASE_SECONDS,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    ) -> SQLiteTraceStore:
        """Open (creating and migrating) the database at ``path``; claims of dead processes are swept.

        Close it with ``close()``.
        """
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(_prepare_database, str(path))
        writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            await cls._configure(writer, busy_timeout_ms)
            reader = await aiosqlite.connect(path, isolation_level=None)
            try:
                await cls._configure(reader, busy_timeout_ms)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await reader.close()
                raise
        except BaseException:
            with anyio.CancelScope(shield=True):
                await writer.close()
            raise
        store = cls(writer, reader, lease_seconds=lease_seconds)
        try:
            await store.sweep()
        except BaseException:
            await store.close()
            raise
        return store

    @staticmethod
    async def _configure(db: aiosqlite.Connection, busy_timeout_ms: int) -> None:
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        await db.execute("PRAGMA synchronous = NORMAL")

    async def close(self) -> None:
        OPEN_OWNERS.discard(self.owner)
        with anyio.CancelScope(shield=True):
            await self._reader.close()
            await self._writer.close()

    # -- writing ----------------------------------------------------------------------------------

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` (shielded, under the write lock), retrying while the database is locked."""
        with anyio.CancelScope(shield=True):
            async with self._write_lock:
                result = await self._until_unlocked(attempt)
        return result

    @staticmethod
    async def _until_unlocked(attempt: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + WRITE_RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                return await attempt()
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() + delay > deadline:
                    raise
                log.warning("the trace database is locked by another process; retrying a write")
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _write(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """One statement: atomic by itself, one trip to the connection's thread."""

        async def attempt() -> list[Any]:
            return list(await self._writer.execute_fetchall(sql, params))

        return await self._retrying(attempt)

    async def _transaction(self, body: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Several statements as one ``BEGIN IMMEDIATE`` transaction: all of them or none."""

        async def attempt() -> T:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                result = await body(self._writer)
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            await self._writer.execute("COMMIT")
            return result

        return await self._retrying(attempt)

    @staticmethod
    async def _insert_message(
        db: aiosqlite.Connection,
        trace_id: str,
        message: NewMessage,
        parent: int | None,
        token: str | None,
        side: bool,
    ) -> Message:
        (stored,) = await SQLiteTraceStore._insert_messages(
            db, [_Append(trace_id, message, parent, token, side)]
        )
        if isinstance(stored, Exception):
            raise stored
        return stored

    @staticmethod
    async def _insert_messages(
        db: aiosqlite.Connection, items: Sequence[_Append]
    ) -> list[Message | Exception]:
        """One INSERT for messages of distinct traces, each at its trace's next sequence (the trigger moves
        the head); a main-path message lands only while its token holds the claim (NULL matches nothing)."""
        rows = await db.execute_fetchall(
            f"WITH v({_BATCH_COLUMNS}) AS (VALUES {', '.join([_BATCH_ROW] * len(items))}) "
            f"INSERT INTO messages (trace_id, {MESSAGE_COLUMNS}) "
            "SELECT t.trace_id, t.last_sequence + 1, v.parent, v.role, v.content, v.tool_calls, "
            "v.tool_call_id, v.name, v.usage, v.created_at, v.side, v.meta "
            "FROM v JOIN traces t ON t.trace_id = v.trace_id WHERE v.side OR t.run_token = v.token "
            "RETURNING trace_id, sequence",
            [value for item in items for value in item.params],
        )
        sequences: dict[str, int] = {row[0]: row[1] for row in rows}
        missing = [item.trace_id for item in items if item.trace_id not in sequences]
        found: set[str] = set()
        if missing:
            marks = ", ".join("?" * len(missing))
            found = {
                r[0]
                for r in await db.execute_fetchall(
                    f"SELECT trace_id FROM traces WHERE trace_id IN ({marks})", missing
                )
            }
        out: list[Message | Exception] = []
        for item in items:
            sequence = sequences.get(item.trace_id)
            if sequence is None:
                out.append(
                    ClaimLost(item.trace_id) if item.trace_id in found else TraceNotFound(item.trace_id)
                )
            else:
                out.append(item.stored(sequence))
        return out

    async def _read_trace_on(self, db: aiosqlite.Connection, trace_id: str) -> Trace:
        rows = list(
            await db.execute_fetchall(f"SELECT {TRACE_COLUMNS} FROM traces WHERE trace_id = ?", (trace_id,))
        )
        if not rows:
            raise TraceNotFound(trace_id)
        return trace_from_row(rows[0])

    async def create(
        self, trace: Trace, messages: Sequence[NewMessage], token: str
    ) -> tuple[Trace, list[Message]]:
        async def body(db: aiosqlite.Connection) -> tuple[Trace, list[Message]]:
            await db.execute(
                f"INSERT INTO traces ({TRACE_COLUMNS}, owner, run_token, lease_until) "
                f"VALUES ({', '.join('?' * (N_TRACE + 3))})",
                (
                    trace.trace_id, trace.name, trace.uid, trace.model, trace.config.model_dump_json(),
                    trace.status.value, trace.stop_reason.value if trace.stop_reason else None,
                    trace.head_sequence, trace.created_at, trace.updated_at, trace.error,
                    trace.usage.model_dump_json(), json.dumps(trace.lessons), json.dumps(trace.tags),
                    trace.started_at or trace.created_at, trace.question,
                    json.dumps(trace.result) if trace.result is not None else None,
                    trace.forked_from.model_dump_json() if trace.forked_from else None,
                    self.owner, token, time.time() + self._lease_seconds,
                ),
            )  # fmt: skip
            stored: list[Message] = []
            for message in messages:
                parent = stored[-1].sequence if stored else None
                stored.append(await self._insert_message(db, trace.trace_id, message, parent, token, False))
            return await self._read_trace_on(db, trace.trace_id), stored

        return await self._transaction(body)

    async def claim(
        self,
        trace_id: str,
        token: str,
        *,
        head: int | None,
        model: str,
        config: TraceConfig,
        messages: Sequence[NewMessage] = (),
        read_head: int | None = None,
    ) -> tuple[Trace, list[Message]]:
        async def take(db: aiosqlite.Connection, holder: str | None) -> Trace | None:
            now = time.time()
            condition = "(run_token IS NULL OR run_token = ? OR lease_until < ?"
            params: list[Any] = [token, now]
            if holder is not None:  # its owner is dead on this host: take the claim over at once
                condition += " OR owner = ?"
                params.append(holder)
            condition += ")"
            if read_head is not None:
                condition += " AND head_sequence = ?"
                params.append(read_head)
            stamp = utc_now()
            rows = await db.execute_fetchall(
                "UPDATE traces SET status = 'running', stop_reason = NULL, error = NULL, question = NULL, "
                "result = NULL, head_sequence = ?, model = ?, config = ?, owner = ?, run_token = ?, "
                "lease_until = ?, stop_requested = 0, updated_at = ?, started_at = ? "
                f"WHERE trace_id = ? AND ({condition}) RETURNING {TRACE_COLUMNS}",
                (
                    head, model, config.model_dump_json(), self.owner, token, now + self._lease_seconds,
                    stamp, stamp, trace_id, *params,
                ),
            )  # fmt: skip
            taken = list(rows)
            return trace_from_row(taken[0]) if taken else None

        if not messages:  # the common claim is one statement: no transaction needed
            taken = await self._retrying(lambda: take(self._writer, None))
            if taken is not None:
                return taken, []

        async def body(db: aiosqlite.Connection) -> tuple[Trace, list[Message]]:
            if await take(db, None) is None:
                rows = list(
                    await db.execute_fetchall(
                        "SELECT owner, head_sequence FROM traces WHERE trace_id = ?", (trace_id,)
                    )
                )
                if not rows:
                    raise TraceNotFound(trace_id)
                holder, now_at = rows[0]
                if read_head is not None and now_at != read_head and not owner_alive(holder):
                    raise TraceMoved(trace_id, now_at)
                if owner_alive(holder) or await take(db, holder) is None:
                    raise TraceRunning(trace_id)
            stored: list[Message] = []
            for message in messages:
                parent = stored[-1].sequence if stored else head
                stored.append(await self._insert_message(db, trace_id, message, parent, token, False))
            return await self._read_trace_on(db, trace_id), stored

        return await self._transaction(body)

    async def append(
        self, trace_id: str, message: NewMessage, parent: int | None, *, token: str | None, side: bool = False
    ) -> Message:
        """Group commit: appends that arrive while a write is in flight go in together, in one statement
        (one trip to the connection's thread, one commit), so many concurrent runs cost far less than
        one write each. Each append still returns only once its message is committed."""
        item = _Append(trace_id, message, parent, token, side)
        self._appends.append(item)
        with anyio.CancelScope(shield=True):
            async with self._write_lock:
                while item.result is None:
                    await self._write_appends()
        result = item.result
        assert result is not None  # the loop above ends only once it is set
        if isinstance(result, Exception):
            raise result
        return result

    async def _write_appends(self) -> None:
        """Write the oldest pending appends of distinct traces (a trace's next one waits for the next batch)."""
        batch: list[_Append] = []
        seen: set[str] = set()
        for pending in self._appends:
            if pending.trace_id not in seen and len(batch) < _BATCH_LIMIT:
                seen.add(pending.trace_id)
                batch.append(pending)
        taken = set(batch)  # by identity
        self._appends = [pending for pending in self._appends if pending not in taken]
        results = await self._try_insert(batch)
        if len(batch) > 1 and isinstance(results[0], sqlite3.Error) and not _locked(results[0]):
            results = [(await self._try_insert([item]))[0] for item in batch]  # a bad one fails alone
        for item, result in zip(batch, results, strict=True):
            item.result = result

    async def _try_insert(self, batch: list[_Append]) -> list[Message | Exception]:
        """Each append's message or error; an error of the statement itself is every append's."""
        try:
            return await self._until_unlocked(lambda: self._insert_messages(self._writer, batch))
        except Exception as exc:
            return [exc] * len(batch)

    async def finish(
        self,
        trace_id: str,
        token: str,
        *,
        status: Status,
        stop_reason: StopReason | None,
        error: str | None,
        release: bool = True,
        question: str | None = None,
        result: Any = None,
    ) -> Trace:
        clear = ", owner = NULL, run_token = NULL, lease_until = NULL" if release else ""
        rows = await self._write(
            "UPDATE traces SET status = ?, stop_reason = ?, error = ?, question = ?, result = ?, "
            f"stop_requested = 0, updated_at = ?{clear} WHERE trace_id = ? AND run_token = ? "
            f"RETURNING {TRACE_COLUMNS}",
            (
                status.value, stop_reason.value if stop_reason else None, error, question,
                json.dumps(result) if result is not None else None, utc_now(), trace_id, token,
            ),
        )  # fmt: skip
        if not rows:
            await self.get_trace(trace_id)  # TraceNotFound when it is gone altogether
            raise ClaimLost(trace_id)
        return trace_from_row(rows[0])

    async def release(self, trace_id: str, token: str) -> Trace | None:
        rows = await self._write(
            "UPDATE traces SET owner = NULL, run_token = NULL, lease_until = NULL, stop_requested = 0 "
            f"WHERE trace_id = ? AND run_token = ? RETURNING {TRACE_COLUMNS}",
            (trace_id, token),
        )
        return trace_from_row(rows[0]) if rows else None

    async def renew(self) -> dict[str, str]:
        rows = await self._write(
            "UPDATE traces SET lease_until = ? WHERE owner = ? AND run_token IS NOT NULL "
            "RETURNING trace_id, run_token",
            (time.time() + self._lease_seconds, self.owner),
        )
        return {trace_id: token for trace_id, token in rows}

    async def request_stop(self, trace_id: str) -> bool:
        rows = await self._write(
            "UPDATE traces SET stop_requested = 1 WHERE trace_id = ? AND status = 'running' "
            "AND run_token IS NOT NULL RETURNING trace_id",
            (trace_id,),
        )
        if rows:
            return True
        await self.get_trace(trace_id)  # TraceNotFound for an unknown trace
        return False

    async def sweep(self) -> list[str]:
        owners = [
            row[0]
            for row in await self._reader.execute_fetchall(
                "SELECT DISTINCT owner FROM traces WHERE run_token IS NOT NULL AND owner IS NOT NULL"
            )
        ]
        dead = [owner for owner in owners if not owner_alive(owner)]
        marks = ", ".join("?" * len(dead))
        dead_clause = f" OR owner IN ({marks})" if dead else ""
        rows = await self._write(
            "UPDATE traces SET "
            # a stop asked for before its owner died is honoured: stopped, not interrupted
            "status = CASE WHEN status <> 'running' THEN status WHEN stop_requested THEN 'stopped' "
            "ELSE 'interrupted' END, "
            "stop_reason = CASE WHEN status <> 'running' THEN stop_reason WHEN stop_requested THEN 'stopped' "
            "ELSE 'interrupted' END, "
            "owner = NULL, run_token = NULL, lease_until = NULL, stop_requested = 0, updated_at = ? "
            # two indexed lookups (claimed traces, running ones), not a scan of every trace ever stored
            "WHERE trace_id IN (SELECT trace_id FROM traces WHERE run_token IS NOT NULL AND "
            f"(lease_until IS NULL OR lease_until < ?{dead_clause}) "
            "UNION ALL SELECT trace_id FROM traces WHERE status = 'running' AND run_token IS NULL) "
            "RETURNING trace_id, status",
            (utc_now(), time.time(), *dead),
        )
        await self._prune_changes()
        ended = (Status.INTERRUPTED.value, Status.STOPPED.value)
        return [trace_id for trace_id, status in rows if status in ended]

    async def _prune_changes(self) -> None:
        await self._write(
            # the newest row always stays: ids are max + 1, so they never go back and readers never miss one
            f"DELETE FROM changes WHERE id IN (SELECT id FROM changes ORDER BY id LIMIT {defaults.PRUNE_CHANGES_BATCH}) "
            "AND created_at < ? AND id < (SELECT max(id) FROM changes)",
            (time.time() - defaults.CHANGE_RETENTION_SECONDS,),
        )

    async def note_change(self, kind: ChangeKind, trace_id: str = "") -> None:
        await self._write(
            "INSERT INTO changes (trace_id, kind, created_at) VALUES (?, ?, ?)", (trace_id, kind, time.time())
        )

    # -- reading ----------------------------------------------------------------------------------

    async def get_trace(self, trace_id: str) -> Trace:
        return await self._read_trace_on(self._reader, trace_id)

    async def get_message(self, trace_id: str, sequence: int) -> Message | None:
        rows = list(
            await self._reader.execute_fetchall(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE trace_id = ? AND sequence = ?",
                (trace_id, sequence),
            )
        )
        return message_from_row(rows[0]) if rows else None

    async def get_children(self, trace_id: str, sequence: int) -> list[Message]:
        rows = await self._reader.execute_fetchall(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE trace_id = ? AND parent_sequence = ? ORDER BY sequence",
            (trace_id, sequence),
        )
        return [message_from_row(r) for r in rows]

    async def get_path(self, trace_id: str, head: int | None = None) -> list[Message]:
        """The chain from the first message to ``head`` (default: the trace's head), oldest first.

        An indexed walk up the parent pointers: its cost is the path's length, not the tree's size.
        """
        if head is None:
            head = (await self.get_trace(trace_id)).head_sequence
            if head is None:
                return []
        rows = await self._reader.execute_fetchall(
            "WITH RECURSIVE path(seq) AS ("
            "  SELECT ? UNION ALL"
            "  SELECT m.parent_sequence FROM messages m JOIN path p ON m.trace_id = ? AND m.sequence = p.seq"
            "  WHERE m.parent_sequence IS NOT NULL"
            f") SELECT {_prefixed(MESSAGE_COLUMNS, 'm')} "
            "FROM path p JOIN messages m ON m.trace_id = ? AND m.sequence = p.seq ORDER BY m.sequence",
            (head, trace_id, trace_id),
        )
        return [message_from_row(r) for r in rows]

    async def get_tree(self, trace_id: str) -> list[Message]:
        rows = await self._reader.execute_fetchall(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE trace_id = ? ORDER BY sequence", (trace_id,)
        )
        return [message_from_row(r) for r in rows]

    async def list_traces(
        self,
        *,
        status: str | None = None,
        uid: str | None = None,
        tag: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> TracePage:
        """Newest first; ``next_cursor`` continues where this page ended (stable under new inserts)."""
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if uid is not None:
            where.append("uid = ?")
            params.append(uid)
        if tag is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(traces.tags) WHERE value = ?)")
            params.append(tag)
        if cursor:
            created_at, trace_id = decode_cursor(cursor)
            where.append("(created_at, trace_id) < (?, ?)")
            params.extend([created_at, trace_id])
        sql = f"SELECT {TRACE_COLUMNS} FROM traces"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, trace_id DESC LIMIT ?"
        rows = list(await self._reader.execute_fetchall(sql, (*params, limit + 1)))
        traces = [trace_from_row(r) for r in rows[:limit]]
        next_cursor = encode_cursor(traces[-1]) if len(rows) > limit and traces else None
        return TracePage(traces=traces, next_cursor=next_cursor)

    async def get_tail(self, trace_id: str, count: int) -> list[Message]:
        """The last ``count`` messages of the active path, oldest first: a walk of ``count`` steps."""
        head = (await self.get_trace(trace_id)).head_sequence
        if head is None or count <= 0:
            return []
        rows = await self._reader.execute_fetchall(
            "WITH RECURSIVE path(seq, depth) AS ("
            "  SELECT ?, 1 UNION ALL"
            "  SELECT m.parent_sequence, p.depth + 1 FROM messages m JOIN path p ON m.trace_id = ? AND m.sequence = p.seq"
            "  WHERE m.parent_sequence IS NOT NULL AND p.depth < ?"
            f") SELECT {_prefixed(MESSAGE_COLUMNS, 'm')} "
            "FROM path p JOIN messages m ON m.trace_id = ? AND m.sequence = p.seq ORDER BY m.sequence",
            (head, trace_id, count, trace_id),
        )
        return [message_from_row(r) for r in rows]

    async def delete(self, trace_id: str) -> bool:
        """Remove a trace that nobody holds, with its messages; False when it is claimed (running)."""

        async def body(db: aiosqlite.Connection) -> bool:
            rows = list(
                await db.execute_fetchall("SELECT run_token FROM traces WHERE trace_id = ?", (trace_id,))
            )
            if not rows:
                raise TraceNotFound(trace_id)
            if rows[0][0] is not None:
                return False
            await db.execute("DELETE FROM messages WHERE trace_id = ?", (trace_id,))
            await db.execute("DELETE FROM run_handles WHERE trace_id = ?", (trace_id,))
            await db.execute("DELETE FROM traces WHERE trace_id = ?", (trace_id,))
            return True

        return await self._transaction(body)

    async def prune(self, finished_before: str) -> int:
        """Delete finished traces (unclaimed, not running, not waiting for an answer) last updated before
        ``finished_before``, a batch per transaction."""

        async def batch(db: aiosqlite.Connection) -> int:
            ids = [
                row[0]
                for row in await db.execute_fetchall(
                    "SELECT trace_id FROM traces WHERE run_token IS NULL "
                    "AND status NOT IN ('running', 'needs_input') AND updated_at < ? LIMIT ?",
                    (finished_before, defaults.PRUNE_TRACES_BATCH),
                )
            ]
            if ids:
                marks = ", ".join("?" * len(ids))
                await db.execute(f"DELETE FROM messages WHERE trace_id IN ({marks})", ids)
                await db.execute(f"DELETE FROM run_handles WHERE trace_id IN ({marks})", ids)
                await db.execute(f"DELETE FROM traces WHERE trace_id IN ({marks})", ids)
            return len(ids)

        removed = 0
        while True:  # a batch per transaction: other processes write in between
            count = await self._transaction(batch)
            removed += count
            if count < defaults.PRUNE_TRACES_BATCH:
                return removed

    # -- run handles ----------------------------------------------------------------------------------

    async def add_handle(self, handle_id: str, trace_id: str, *, held: bool = False) -> RunHandle:
        await self._write(  # inserts nothing for an unknown trace
            "INSERT INTO run_handles (handle_id, trace_id, created_at, held_by) SELECT ?, trace_id, ?, ? "
            "FROM traces WHERE trace_id = ? ON CONFLICT (handle_id) DO NOTHING",
            (handle_id, utc_now(), self.owner if held else None, trace_id),
        )
        handle = await self.get_handle(handle_id)
        if handle is None:
            raise TraceNotFound(trace_id)
        return handle

    async def end_handle(self, handle_id: str, final: dict[str, Any]) -> None:
        await self._write(
            "UPDATE run_handles SET final = ? WHERE handle_id = ? AND final IS NULL",
            (json.dumps(final, ensure_ascii=False), handle_id),
        )

    async def get_handle(self, handle_id: str) -> RunHandle | None:
        rows = list(
            await self._reader.execute_fetchall(
                f"SELECT {HANDLE_COLUMNS} FROM run_handles WHERE handle_id = ?", (handle_id,)
            )
        )
        return handle_from_row(rows[0]) if rows else None

    async def open_handle(self, trace_id: str) -> RunHandle | None:
        rows = list(
            await self._reader.execute_fetchall(
                f"SELECT {HANDLE_COLUMNS} FROM run_handles WHERE trace_id = ? AND final IS NULL "
                "AND held_by IS NULL ORDER BY created_at DESC, rowid DESC LIMIT 1",
                (trace_id,),
            )
        )
        return handle_from_row(rows[0]) if rows else None

    async def running_ids(self) -> list[str]:
        rows = await self._reader.execute_fetchall(
            "SELECT trace_id FROM traces WHERE status = 'running' ORDER BY created_at"
        )
        return [r[0] for r in rows]

    async def reflecting_ids(self) -> list[str]:
        rows = await self._reader.execute_fetchall(
            "SELECT trace_id FROM traces WHERE run_token IS NOT NULL AND status <> 'running' AND lease_until >= ?",
            (time.time(),),
        )
        return [r[0] for r in rows]

    async def stops_requested(self) -> list[str]:
        rows = await self._reader.execute_fetchall(
            "SELECT trace_id FROM traces WHERE owner = ? AND run_token IS NOT NULL AND stop_requested",
            (self.owner,),
        )
        return [r[0] for r in rows]

    # -- the change feed --------------------------------------------------------------------------

    async def last_change_id(self) -> int:
        rows = list(await self._reader.execute_fetchall("SELECT coalesce(max(id), 0) FROM changes"))
        return int(rows[0][0])

    async def changes_after(self, change_id: int, limit: int = 500) -> list[Change]:
        rows = await self._reader.execute_fetchall(
            "SELECT c.id, c.trace_id, c.kind, c.sequence, c.token, "
            f"{_prefixed(MESSAGE_COLUMNS, 'm')}, {_prefixed(TRACE_COLUMNS, 't')} FROM changes c "
            "LEFT JOIN messages m ON c.kind = 'message' AND m.trace_id = c.trace_id AND m.sequence = c.sequence "
            "LEFT JOIN traces t ON c.kind IN ('created', 'trace') AND t.trace_id = c.trace_id "
            "WHERE c.id > ? ORDER BY c.id LIMIT ?",
            (change_id, limit),
        )
        changes = []
        for row in rows:
            message_row = row[5 : 5 + N_MESSAGE]
            trace_row = row[5 + N_MESSAGE : 5 + N_MESSAGE + N_TRACE]
            changes.append(
                Change(
                    id=row[0],
                    trace_id=row[1],
                    kind=row[2],
                    sequence=row[3],
                    token=row[4],
                    message=message_from_row(message_row) if message_row[0] is not None else None,
                    trace=trace_from_row(trace_row) if trace_row[0] is not None else None,
                )
            )
        return changes

    async def wait_for_changes(self, timeout: float) -> None:
        """Poll ``PRAGMA data_version`` (it moves when another connection commits) until it moves."""
        deadline = anyio.current_time() + timeout
        while True:
            rows = list(await self._reader.execute_fetchall("PRAGMA data_version"))
            version = int(rows[0][0])
            if self._data_version is None:
                self._data_version = version
            elif version != self._data_version:
                self._data_version = version
                return
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return
            await anyio.sleep(min(defaults.FEED_POLL_SECONDS, remaining))
