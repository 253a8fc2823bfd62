"""Trace storage: the TraceStore protocol and its SQLite implementation (aiosqlite, WAL).

Messages are rows keyed by (trace_id, sequence) with a parent pointer; the head lives on the trace row.
One writer connection makes every write a single statement (atomic by itself, one trip to aiosqlite's
thread), shielded from cancellation so a stopped run never abandons a write; a second connection reads
committed data only. ``synchronous=NORMAL``: in WAL mode a process crash keeps every committed row
(a power cut may lose the last few commits — the price of sub-millisecond appends).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import sqlite3
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import anyio
from pydantic import BaseModel

from agent.errors import TraceError, TraceNotFound
from agent.trace.migrations import migrate
from agent.trace.models import (
    Message,
    MessageUsage,
    NewMessage,
    Status,
    StopReason,
    ToolCall,
    Trace,
    TraceConfig,
    TraceUsage,
    utc_now,
)


class TracePage(BaseModel):
    traces: list[Trace]
    next_cursor: str | None = None


class TraceStore(Protocol):
    """What the runner needs from storage; a PostgreSQL backend implements the same."""

    async def create_trace(self, trace: Trace) -> Trace: ...
    async def get_trace(self, trace_id: str) -> Trace: ...
    async def update_trace(self, trace_id: str, **changes: Any) -> Trace: ...
    async def append_message(
        self, trace_id: str, message: NewMessage, parent_sequence: int | None
    ) -> Message: ...
    async def get_message(self, trace_id: str, sequence: int) -> Message | None: ...
    async def get_children(self, trace_id: str, sequence: int) -> list[Message]: ...
    async def get_path(self, trace_id: str, head: int | None = None) -> list[Message]: ...
    async def get_tree(self, trace_id: str) -> list[Message]: ...
    async def list_traces(
        self, *, status: str | None = None, uid: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> TracePage: ...
    async def mark_interrupted(self) -> list[str]: ...
    async def close(self) -> None: ...


_TRACE_COLUMNS = "trace_id, name, uid, model, config, status, stop_reason, head_sequence, created_at, updated_at, error, usage, lessons"
_MESSAGE_COLUMNS = (
    "sequence, parent_sequence, role, content, tool_calls, tool_call_id, name, usage, created_at"
)
_UPDATABLE = {
    "name",
    "uid",
    "model",
    "config",
    "status",
    "stop_reason",
    "head_sequence",
    "error",
    "usage",
    "lessons",
}


def _trace_from_row(row: sqlite3.Row | tuple) -> Trace:
    (
        trace_id,
        name,
        uid,
        model,
        config,
        status,
        stop_reason,
        head,
        created,
        updated,
        error,
        usage,
        lessons,
    ) = row
    return Trace(
        trace_id=trace_id,
        name=name,
        uid=uid,
        model=model,
        config=TraceConfig.model_validate_json(config),
        status=Status(status),
        stop_reason=StopReason(stop_reason) if stop_reason else None,
        head_sequence=head,
        created_at=created,
        updated_at=updated,
        error=error,
        usage=TraceUsage.model_validate_json(usage),
        lessons=json.loads(lessons),
    )


def _message_from_row(row: sqlite3.Row | tuple) -> Message:
    sequence, parent, role, content, tool_calls, tool_call_id, name, usage, created = row
    return Message(
        sequence=sequence,
        parent_sequence=parent,
        role=role,
        content=content,
        tool_calls=[ToolCall.model_validate(c) for c in json.loads(tool_calls)] if tool_calls else None,
        tool_call_id=tool_call_id,
        name=name,
        usage=MessageUsage.model_validate_json(usage) if usage else None,
        created_at=created,
    )


def _encode_column(key: str, value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if key == "lessons":
        return json.dumps(value)
    return value


def _encode_cursor(trace: Trace) -> str:
    raw = json.dumps([trace.created_at, trace.trace_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        created_at, trace_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return str(created_at), str(trace_id)
    except Exception as exc:
        raise TraceError(
            f"The cursor '{cursor}' is not one list_traces returned; start again without a cursor."
        ) from exc


def _prepare_database(path: str) -> None:
    """Create, migrate and switch to WAL in a worker thread before the async connections open."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        migrate(db)
    finally:
        db.close()


_OPEN_OWNERS: set[str] = set()
"""Owner ids of the stores open in this process (a closed store's running traces are orphans)."""


def _owner_alive(owner: str | None) -> bool:
    """Whether the store that marked a trace running may still be running it.

    Owners are ``host:pid:nonce``; another process on this host counts as alive while its pid exists.
    Traces of other hosts, or with no owner, count as orphaned: the database is meant for one machine.
    """
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner in _OPEN_OWNERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SQLiteTraceStore:
    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self._writer = writer
        self._reader = reader
        self._write_lock = anyio.Lock()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        _OPEN_OWNERS.add(self.owner)

    @classmethod
    async def open(cls, path: str | Path) -> SQLiteTraceStore:
        """Open (creating and migrating) the database at ``path``; traces a dead process left running
        become interrupted. Close it with ``close()`` (or use ``open_store``)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(_prepare_database, str(path))
        writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            await cls._configure(writer)
            reader = await aiosqlite.connect(path, isolation_level=None)
            await cls._configure(reader)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await writer.close()
            raise
        store = cls(writer, reader)
        return store

    @staticmethod
    async def _configure(db: aiosqlite.Connection) -> None:
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA synchronous = NORMAL")

    async def close(self) -> None:
        _OPEN_OWNERS.discard(self.owner)
        with anyio.CancelScope(shield=True):
            await self._reader.close()
            await self._writer.close()

    # -- writes ---------------------------------------------------------------------------------

    async def _write(self, sql: str, params: tuple) -> list[sqlite3.Row]:
        """One statement, so SQLite makes it atomic, in one trip to the connection's thread.

        Shielded: a cancelled caller (a stopped run) cannot abandon a write half way.
        """
        with anyio.CancelScope(shield=True):
            async with self._write_lock:
                return list(await self._writer.execute_fetchall(sql, params))

    async def create_trace(self, trace: Trace) -> Trace:
        values = (
            trace.trace_id, trace.name, trace.uid, trace.model, trace.config.model_dump_json(), trace.status.value,
            trace.stop_reason.value if trace.stop_reason else None, trace.head_sequence, trace.created_at,
            trace.updated_at, trace.error, trace.usage.model_dump_json(), json.dumps(trace.lessons),
        )  # fmt: skip
        await self._write(
            f"INSERT INTO traces ({_TRACE_COLUMNS}, owner) VALUES ({', '.join('?' * 14)})",
            (*values, self.owner),
        )
        return trace

    async def update_trace(self, trace_id: str, **changes: Any) -> Trace:
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot update trace fields {sorted(unknown)}")
        changes["updated_at"] = utc_now()
        if changes.get("status") == Status.RUNNING:
            changes["owner"] = self.owner  # so another process opening the database leaves this run alone
        assignments = ", ".join(f"{key} = ?" for key in changes)
        params = tuple(_encode_column(k, v) for k, v in changes.items()) + (trace_id,)
        rows = await self._write(
            f"UPDATE traces SET {assignments} WHERE trace_id = ? RETURNING {_TRACE_COLUMNS}", params
        )
        if not rows:
            raise TraceNotFound(trace_id)
        return _trace_from_row(rows[0])

    async def append_message(
        self, trace_id: str, message: NewMessage, parent_sequence: int | None
    ) -> Message:
        """Store ``message`` as a child of ``parent_sequence`` and move the head to it, in one commit.

        The sequence is the trace's ``last_sequence + 1``; the trigger of migration 3 moves the head and
        adds the message's usage to the trace's totals in the same statement.
        """
        created_at = utc_now()
        usage = message.usage.model_dump_json() if message.usage else None
        tool_calls = json.dumps([c.model_dump() for c in message.tool_calls]) if message.tool_calls else None
        rows = await self._write(
            f"INSERT INTO messages (trace_id, {_MESSAGE_COLUMNS}) "
            "SELECT trace_id, last_sequence + 1, ?, ?, ?, ?, ?, ?, ?, ? FROM traces WHERE trace_id = ? "
            "RETURNING sequence",
            (
                parent_sequence,
                message.role,
                message.content,
                tool_calls,
                message.tool_call_id,
                message.name,
                usage,
                created_at,
                trace_id,
            ),
        )
        if not rows:
            raise TraceNotFound(trace_id)
        return Message(
            **message.model_dump(),
            sequence=rows[0][0],
            parent_sequence=parent_sequence,
            created_at=created_at,
        )

    async def mark_interrupted(self) -> list[str]:
        """Traces left ``running`` by a process that died become ``interrupted``; a live process's runs
        (another server on the same database) are left alone."""
        running = await self._reader.execute_fetchall(
            "SELECT trace_id, owner FROM traces WHERE status = 'running'"
        )
        orphaned = []
        for trace_id, owner in running:
            if _owner_alive(owner):
                continue
            rows = await self._write(
                "UPDATE traces SET status = 'interrupted', stop_reason = 'interrupted', updated_at = ? "
                "WHERE trace_id = ? AND status = 'running' AND owner IS ? RETURNING trace_id",
                (utc_now(), trace_id, owner),
            )
            orphaned += [r[0] for r in rows]
        return orphaned

    # -- reads ----------------------------------------------------------------------------------

    async def get_trace(self, trace_id: str) -> Trace:
        cursor = await self._reader.execute(
            f"SELECT {_TRACE_COLUMNS} FROM traces WHERE trace_id = ?", (trace_id,)
        )
        row = await cursor.fetchone()
        if row is None:
            raise TraceNotFound(trace_id)
        return _trace_from_row(row)

    async def get_message(self, trace_id: str, sequence: int) -> Message | None:
        cursor = await self._reader.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE trace_id = ? AND sequence = ?",
            (trace_id, sequence),
        )
        row = await cursor.fetchone()
        return _message_from_row(row) if row else None

    async def get_children(self, trace_id: str, sequence: int) -> list[Message]:
        cursor = await self._reader.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE trace_id = ? AND parent_sequence = ? ORDER BY sequence",
            (trace_id, sequence),
        )
        return [_message_from_row(r) for r in await cursor.fetchall()]

    async def get_path(self, trace_id: str, head: int | None = None) -> list[Message]:
        """The chain from the first message to ``head`` (default: the trace's head), oldest first.

        An indexed walk up the parent pointers: its cost is the path's length, not the tree's size.
        """
        if head is None:
            head = (await self.get_trace(trace_id)).head_sequence
            if head is None:
                return []
        cursor = await self._reader.execute(
            "WITH RECURSIVE path(seq) AS ("
            "  SELECT ? UNION ALL"
            "  SELECT m.parent_sequence FROM messages m JOIN path p ON m.trace_id = ? AND m.sequence = p.seq"
            "  WHERE m.parent_sequence IS NOT NULL"
            f") SELECT {', '.join('m.' + c.strip() for c in _MESSAGE_COLUMNS.split(','))} "
            "FROM path p JOIN messages m ON m.trace_id = ? AND m.sequence = p.seq ORDER BY m.sequence",
            (head, trace_id, trace_id),
        )
        return [_message_from_row(r) for r in await cursor.fetchall()]

    async def get_tree(self, trace_id: str) -> list[Message]:
        cursor = await self._reader.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE trace_id = ? ORDER BY sequence", (trace_id,)
        )
        return [_message_from_row(r) for r in await cursor.fetchall()]

    async def list_traces(
        self, *, status: str | None = None, uid: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> TracePage:
        """Newest first; ``next_cursor`` continues where this page ended (stable under new inserts)."""
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if uid is not None:
            where.append("uid = ?")
            params.append(uid)
        if cursor:
            created_at, trace_id = _decode_cursor(cursor)
            where.append("(created_at, trace_id) < (?, ?)")
            params.extend([created_at, trace_id])
        sql = f"SELECT {_TRACE_COLUMNS} FROM traces"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, trace_id DESC LIMIT ?"
        rows = await (await self._reader.execute(sql, (*params, limit + 1))).fetchall()
        traces = [_trace_from_row(r) for r in rows[:limit]]
        next_cursor = _encode_cursor(traces[-1]) if len(rows) > limit and traces else None
        return TracePage(traces=traces, next_cursor=next_cursor)


async def open_store(path: str | Path) -> SQLiteTraceStore:
    """Open the default (SQLite) store and mark traces a dead process left running as interrupted."""
    store = await SQLiteTraceStore.open(path)
    try:
        await store.mark_interrupted()
    except BaseException:
        await store.close()
        raise
    return store
