"""The PostgreSQL TraceStore (``pip install 'agent-trace-mcp[postgres]'``): any number of replicas, one database.

Same tables and semantics as the SQLite store. An append is one statement (a data-modifying CTE): the
trace row is locked and its sequence counter, head and usage totals move, the message row is inserted.
Claims are compare-and-set updates with leases on the database's clock. Changes are logged by deferred
triggers as each transaction commits, numbered in commit order, and each NOTIFYs its id; a dedicated
listening connection wakes the change feed, which reads the rows. The schema defaults to ``agent_trace`` (set another with ``?search_path=NAME``).

A dropped connection is replaced by the pool; a write is retried unless the drop hit its COMMIT (then it
may have landed, and the caller hears so), a read always is. Durability is the server's: every commit is
flushed (``synchronous_commit=on``); a URL with ``?synchronous_commit=off`` trades the last commits before
a server crash for speed, as SQLite's ``synchronous=NORMAL`` does for a power cut.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import anyio
import asyncpg

from agent import defaults
from agent.errors import TraceError, TraceMoved, TraceNotFound, TraceRunning
from agent.trace.backends import redact_url
from agent.trace.models import Message, NewMessage, RunHandle, Status, StopReason, Trace, TraceConfig
from agent.trace.pg_migrations import Db, migrate
from agent.trace.rows import (
    HANDLE_COLUMNS,
    MESSAGE_COLUMNS,
    N_MESSAGE,
    N_TRACE,
    TRACE_COLUMNS,
    handle_from_row,
    message_from_row,
    prefixed,
    trace_from_row,
)
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

POOL_SIZE = defaults.PG_POOL_SIZE
DEFAULT_SCHEMA = "agent_trace"
CONNECT_TIMEOUT_SECONDS = 10.0
STATEMENT_TIMEOUT_SECONDS = 30.0
IDLE_IN_TRANSACTION_SECONDS = 60.0
"""A client stuck inside a transaction would hold the change log's lock; the server ends it after this."""
RETRY_SECONDS = 30.0
"""How long a read or write keeps retrying while the database cannot be reached (a restart, a failover)."""
UNKNOWN_OUTCOME_ATTEMPTS = 5
"""An append whose COMMIT is cut off is looked for and written again at most this many times in all."""
FEED_COALESCE_SECONDS = 0.01
"""After a NOTIFY the feed waits this long for the rest of a burst, so a busy cluster costs a read per
burst, not per commit (events of other replicas arrive this much later; a run's own events do not wait)."""
_CONTENT = [c.strip() for c in MESSAGE_COLUMNS.split(",")].index("content")


class DatabaseUnreachable(TraceError):
    """The database did not answer; the sentence names the URL without its password."""

    def __init__(self, url: str, exc: BaseException):
        super().__init__(f"Cannot connect to the trace database {redact_url(url)}: {_reason(exc)}.")


class WriteOutcomeUnknown(TraceError):
    """The connection dropped while a write was being committed: it may or may not have been stored."""

    def __init__(self, trace_id: str, *, what: str | None = None):
        super().__init__(
            f"The connection to the trace database dropped while a write to {what or f'trace {trace_id!r}'} "
            "was being committed; it may or may not have been stored."
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.args[0]) if exc.args else type(exc).__name__
    if isinstance(exc, TimeoutError):
        return f"it did not answer within {CONNECT_TIMEOUT_SECONDS:g} seconds"
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in str(exc):
        return "the connection was refused"
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    if isinstance(exc, ValueError):
        return "the URL is not a valid PostgreSQL URL"
    return str(exc) or type(exc).__name__


def _retryable(exc: BaseException) -> bool:
    """The same work may succeed when tried again: the connection failed (not the statement), or the
    server rolled the transaction back to break a deadlock."""
    if isinstance(exc, asyncpg.InterfaceError):
        return "closed" in str(exc)
    if _broken(exc):
        return True
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError
        | asyncpg.DeadlockDetectedError
        | asyncpg.SerializationError,
    )


def _broken(exc: BaseException) -> bool:
    """A pooled connection whose server ended it while it sat idle (pg_terminate_backend, a restart):
    asyncpg has read the FATAL notice but not yet the close, and refuses the next query with
    InternalClientError ("cannot switch to state …"). Nothing was sent: a new connection may run it."""
    return isinstance(exc, asyncpg.InternalClientError)


def _settings(url: str, statement_timeout: float) -> tuple[str, dict[str, str]]:
    """The schema the store lives in and the session settings not already given in the URL."""
    given = dict(parse_qsl(urlsplit(url).query))
    settings = {
        "application_name": "agent-trace-mcp",
        "statement_timeout": str(int(statement_timeout * 1000)),
        "idle_in_transaction_session_timeout": str(int(IDLE_IN_TRANSACTION_SECONDS * 1000)),
        "search_path": DEFAULT_SCHEMA,
    }
    schema = given.get("search_path", DEFAULT_SCHEMA).split(",")[0].strip().strip('"')
    return schema, {k: v for k, v in settings.items() if k not in given}


def _clean(args: Sequence[Any]) -> tuple[Any, ...]:
    """PostgreSQL text cannot hold U+0000: in plain text values it becomes U+FFFD (content is JSON)."""
    return tuple(a.replace("\x00", "\ufffd") if isinstance(a, str) and "\x00" in a else a for a in args)


def _message(row: Iterable[Any]) -> Message:
    values = list(row)
    if values[_CONTENT] is not None:
        values[_CONTENT] = json.loads(values[_CONTENT])
    return message_from_row(values)


def _trace(row: Iterable[Any]) -> Trace:
    return trace_from_row(tuple(row))


async def _keep_session(conn: object) -> None:
    """Released connections skip asyncpg's reset query: the store sets no session state (asyncpg still
    rolls back an open transaction)."""


_APPEND = f"""
WITH t AS (
    UPDATE traces SET
        last_sequence = last_sequence + 1,
        head_sequence = CASE WHEN $3 THEN head_sequence ELSE last_sequence + 1 END,
        updated_at = iso_utc(clock_timestamp()),
        usage = usage || jsonb_build_object(
            'prompt_tokens', coalesce((usage ->> 'prompt_tokens')::bigint, 0) + $4,
            'completion_tokens', coalesce((usage ->> 'completion_tokens')::bigint, 0) + $5,
            'llm_calls', coalesce((usage ->> 'llm_calls')::bigint, 0) + (CASE WHEN $7 = 'assistant' AND $12::jsonb IS NOT NULL THEN 1 ELSE 0 END),
            'tool_calls', coalesce((usage ->> 'tool_calls')::bigint, 0) + (CASE WHEN $7 = 'tool' THEN 1 ELSE 0 END),
            'compactions', coalesce((usage ->> 'compactions')::bigint, 0) + $14,
            'tokens_saved', coalesce((usage ->> 'tokens_saved')::bigint, 0) + $15)
    WHERE trace_id = $1 AND ($3 OR run_token = $2)
    RETURNING trace_id, last_sequence, run_token, updated_at
), m AS (
    INSERT INTO messages (trace_id, {MESSAGE_COLUMNS})
    SELECT trace_id, last_sequence, $6, $7, $8, $9, $10, $11, $12, updated_at, $3, $13 FROM t
    RETURNING sequence, created_at
)
SELECT sequence, created_at FROM m
"""

_CLAIM = f"""
UPDATE traces SET status = 'running', stop_reason = NULL, error = NULL, question = NULL, result = NULL,
    head_sequence = $1, model = $2, config = $3, owner = $4, run_token = $5,
    lease_until = clock_timestamp() + make_interval(secs => $6), stop_requested = false,
    updated_at = iso_utc(clock_timestamp()), started_at = iso_utc(clock_timestamp())
WHERE trace_id = $7 AND (run_token IS NULL OR run_token = $5 OR lease_until < clock_timestamp() OR owner = $8)
    AND ($9::bigint IS NULL OR head_sequence = $9)
RETURNING {TRACE_COLUMNS}
"""

_SWEEP = """
WITH doomed AS (
    SELECT trace_id FROM traces
    WHERE (run_token IS NOT NULL
           AND (lease_until IS NULL OR lease_until < clock_timestamp() OR owner = ANY($1::text[])))
       OR (status = 'running' AND run_token IS NULL)
    FOR UPDATE SKIP LOCKED
)
UPDATE traces t SET
    status = CASE WHEN t.status <> 'running' THEN t.status WHEN t.stop_requested THEN 'stopped'
        ELSE 'interrupted' END,
    stop_reason = CASE WHEN t.status <> 'running' THEN t.stop_reason WHEN t.stop_requested THEN 'stopped'
        ELSE 'interrupted' END,
    owner = NULL, run_token = NULL, lease_until = NULL, stop_requested = false,
    updated_at = iso_utc(clock_timestamp())
FROM doomed WHERE t.trace_id = doomed.trace_id
RETURNING t.trace_id, t.status
"""

_PATH = f"""
WITH RECURSIVE path AS (
    SELECT {MESSAGE_COLUMNS} FROM messages WHERE trace_id = $1 AND sequence = $2
    UNION ALL
    SELECT {prefixed(MESSAGE_COLUMNS, "m")} FROM path p
    JOIN messages m ON m.trace_id = $1 AND m.sequence = p.parent_sequence AND m.sequence < p.sequence
) SELECT {MESSAGE_COLUMNS} FROM path ORDER BY sequence
"""

_CHANGES = f"""
SELECT c.id, c.trace_id, c.kind, c.sequence, c.token,
       {prefixed(MESSAGE_COLUMNS, "m")}, {prefixed(TRACE_COLUMNS, "t")}
FROM changes c
LEFT JOIN messages m ON c.kind = 'message' AND m.trace_id = c.trace_id AND m.sequence = c.sequence
LEFT JOIN traces t ON c.kind IN ('created', 'trace') AND t.trace_id = c.trace_id
WHERE c.id > $1 ORDER BY c.id LIMIT $2
"""

_TAIL = f"""
WITH RECURSIVE path AS (
    SELECT {MESSAGE_COLUMNS}, 1 AS depth FROM messages WHERE trace_id = $1 AND sequence = $2
    UNION ALL
    SELECT {prefixed(MESSAGE_COLUMNS, "m")}, p.depth + 1 FROM path p
    JOIN messages m ON m.trace_id = $1 AND m.sequence = p.parent_sequence AND m.sequence < p.sequence
    WHERE p.depth < $3
) SELECT {MESSAGE_COLUMNS} FROM path ORDER BY sequence
"""

_PRUNE = f"""
DELETE FROM traces WHERE trace_id IN (
    SELECT trace_id FROM traces
    WHERE run_token IS NULL AND status NOT IN ('running', 'needs_input') AND updated_at < $1
    LIMIT {defaults.PRUNE_TRACES_BATCH} FOR UPDATE SKIP LOCKED
) RETURNING trace_id
"""


def _compaction(meta: dict[str, Any] | None) -> tuple[int, int]:
    """(1, tokens saved) for a message recording a context compaction, else (0, 0): what SQLite's
    append trigger reads from ``meta.compaction``."""
    record = meta.get("compaction") if meta else None
    if record is None:
        return 0, 0
    saved = record.get("tokens_saved") if isinstance(record, dict) else None
    return 1, int(saved) if isinstance(saved, int | float) and not isinstance(saved, bool) else 0


def _json_or_none(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None


def _tags(tags: Sequence[str]) -> str:
    """jsonb cannot hold U+0000 even escaped: a tag's becomes U+FFFD, as in plain text values."""
    return json.dumps([tag.replace("\x00", "\ufffd") for tag in tags])


class PostgresTraceStore:
    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        *,
        url: str,
        settings: dict[str, str],
        channel: str,
        lease_seconds: float = defaults.LEASE_SECONDS,
    ):
        self._pool = pool
        self._url = url
        self._settings = settings
        self._channel = channel
        self._lease_seconds = lease_seconds
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._listen_lock = anyio.Lock()
        self._wakeup = anyio.Event()
        self.owner = process_owner()
        OPEN_OWNERS.add(self.owner)

    @property
    def url(self) -> str:
        """The database URL it was opened with (redact it before showing it: it may hold a password)."""
        return self._url

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        lease_seconds: float = defaults.LEASE_SECONDS,
        pool_size: int = POOL_SIZE,
        statement_timeout: float = STATEMENT_TIMEOUT_SECONDS,
    ) -> PostgresTraceStore:
        """Connect, migrate (creating the schema) and sweep; a first connection error is one sentence
        naming the URL without its password. Close it with ``close()``."""
        schema, settings = _settings(url, statement_timeout)
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                timeout=CONNECT_TIMEOUT_SECONDS,
                server_settings=settings,
                reset=_keep_session,
            )
        except (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DatabaseUnreachable(url, exc) from exc
        try:
            async with pool.acquire() as db:
                try:
                    await migrate(db, schema)
                    channel = await db.fetchval("SELECT change_channel(current_schema())")
                except asyncpg.PostgresError as exc:
                    raise TraceError(
                        f"Cannot set up the trace schema '{schema}' in {redact_url(url)}: {_reason(exc)}."
                    ) from exc
            store = cls(pool, url=url, settings=settings, channel=channel, lease_seconds=lease_seconds)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _close_pool(pool)
            raise
        try:
            await store.sweep()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await store.close()
            if isinstance(exc, asyncpg.PostgresError):  # a sentence, as for the first connection
                raise TraceError(f"Cannot read the traces in {redact_url(url)}: {_reason(exc)}.") from exc
            raise
        return store

    async def close(self) -> None:
        OPEN_OWNERS.discard(self.owner)
        with anyio.CancelScope(shield=True):
            listener, self._listener = self._listener, None
            if listener is not None:
                await _close_connection(listener)
            await _close_pool(self._pool)

    # -- connections --------------------------------------------------------------------------------

    async def _retrying(
        self,
        body: Callable[[Db], Awaitable[T]],
        *,
        transaction: bool,
        idempotent: bool,
        trace_id: str = "",
        what: str | None = None,
    ) -> T:
        """Run ``body`` on a pooled connection (in a transaction when asked), again on a new one while the
        database cannot be reached; a non-idempotent write whose COMMIT was cut off is not repeated."""
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.05
        while True:
            stage = ["connecting"]
            try:
                return await self._attempt(body, transaction, stage)
            except Exception as exc:
                if not _retryable(exc):
                    raise
                if stage[0] == "committing" and not idempotent and not _broken(exc):
                    raise WriteOutcomeUnknown(trace_id, what=what) from exc  # (a broken one never sent it)
                if time.monotonic() + delay > deadline:
                    raise DatabaseUnreachable(self._url, exc) from exc
                log.warning("the trace database connection failed (%s); retrying", _reason(exc))
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _attempt(self, body: Callable[[Db], Awaitable[T]], transaction: bool, stage: list[str]) -> T:
        async with self._pool.acquire() as db:
            try:
                if not transaction:
                    return await body(db)
                tx = db.transaction()
                await tx.start()
                try:
                    result = await body(db)
                except BaseException:
                    await _rollback(tx)
                    raise
                stage[0] = "committing"
                await tx.commit()
                return result
            except Exception as exc:
                if _broken(exc):
                    db.terminate()  # the pool replaces a closed connection rather than lend it again
                raise

    async def _read(self, body: Callable[[Db], Awaitable[T]]) -> T:
        return await self._retrying(body, transaction=False, idempotent=True)

    async def _write(
        self, body: Callable[[Db], Awaitable[T]], *, idempotent: bool = False, trace_id: str = ""
    ) -> T:
        """Shielded from cancellation, like SQLite's writes: a stopped run never abandons a write half way."""
        with anyio.CancelScope(shield=True):
            result = await self._retrying(
                body, transaction=not idempotent, idempotent=idempotent, trace_id=trace_id
            )
        return result

    async def read_with(self, body: Callable[[Db], Awaitable[T]]) -> T:
        """Run ``body`` on a pooled connection, again on a new one while the database cannot be reached:
        for the tables kept beside the traces (the experiences)."""
        return await self._read(body)

    async def write_with(self, body: Callable[[Db], Awaitable[T]], *, what: str) -> T:
        """Run ``body`` as one transaction, shielded and retried like the store's writes; a COMMIT cut
        off is one sentence naming ``what`` was being written."""
        with anyio.CancelScope(shield=True):
            result = await self._retrying(body, transaction=True, idempotent=False, what=what)
        return result

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def body(db: Db) -> list[asyncpg.Record]:
            return await db.fetch(sql, *_clean(args))

        return await self._read(body)

    # -- writing ----------------------------------------------------------------------------------

    async def _insert_message(
        self, db: Db, trace_id: str, message: NewMessage, parent: int | None, token: str | None, side: bool
    ) -> Message:
        usage = message.usage
        compactions, saved = _compaction(message.meta)
        row = await db.fetchrow(
            _APPEND,
            *_clean([
                trace_id, token, side, usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0, parent, message.role,
                json.dumps(message.content, ensure_ascii=False) if message.content is not None else None,
                json.dumps([c.model_dump() for c in message.tool_calls]) if message.tool_calls else None,
                message.tool_call_id, message.name, usage.model_dump_json() if usage else None,
                json.dumps(message.meta) if message.meta else None, compactions, saved,
            ]),
        )  # fmt: skip
        if row is None:
            found = await db.fetchval("SELECT 1 FROM traces WHERE trace_id = $1", *_clean([trace_id]))
            raise ClaimLost(trace_id) if found else TraceNotFound(trace_id)
        return Message(
            **message.model_dump(),
            sequence=row["sequence"],
            parent_sequence=parent,
            created_at=row["created_at"],
            side=side,
        )

    @staticmethod
    async def _read_trace_on(db: Db, trace_id: str) -> Trace:
        row = await db.fetchrow(
            f"SELECT {TRACE_COLUMNS} FROM traces WHERE trace_id = $1", *_clean([trace_id])
        )
        if row is None:
            raise TraceNotFound(trace_id)
        return _trace(row)

    async def create(
        self, trace: Trace, messages: Sequence[NewMessage], token: str
    ) -> tuple[Trace, list[Message]]:
        async def body(db: Db) -> tuple[Trace, list[Message]]:
            await db.execute(
                f"INSERT INTO traces ({TRACE_COLUMNS}, owner, run_token, lease_until) VALUES "
                f"({', '.join(f'${i}' for i in range(1, N_TRACE + 3))}, "
                f"clock_timestamp() + make_interval(secs => ${N_TRACE + 3}))",
                *_clean([
                    trace.trace_id, trace.name, trace.uid, trace.model, trace.config.model_dump_json(),
                    trace.status.value, trace.stop_reason.value if trace.stop_reason else None,
                    trace.head_sequence, trace.created_at, trace.updated_at, trace.error,
                    trace.usage.model_dump_json(), json.dumps(trace.lessons), _tags(trace.tags),
                    trace.started_at or trace.created_at, trace.question, _json_or_none(trace.result),
                    trace.forked_from.model_dump_json() if trace.forked_from else None,
                    self.owner, token, self._lease_seconds,
                ]),
            )  # fmt: skip
            stored: list[Message] = []
            for message in messages:
                parent = stored[-1].sequence if stored else None
                stored.append(await self._insert_message(db, trace.trace_id, message, parent, token, False))
            return await self._read_trace_on(db, trace.trace_id), stored

        return await self._write(body, trace_id=trace.trace_id)

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
        async def take(db: Db, holder: str | None) -> bool:
            rows = await db.fetch(
                _CLAIM,
                *_clean([
                    head, model, config.model_dump_json(), self.owner, token, self._lease_seconds, trace_id,
                    holder, read_head,
                ]),
            )  # fmt: skip
            return bool(rows)

        async def body(db: Db) -> tuple[Trace, list[Message]]:
            if not await take(db, None):
                row = await db.fetchrow(
                    "SELECT owner, head_sequence FROM traces WHERE trace_id = $1", *_clean([trace_id])
                )
                if row is None:
                    raise TraceNotFound(trace_id)
                holder = row["owner"]
                if read_head is not None and row["head_sequence"] != read_head and not owner_alive(holder):
                    raise TraceMoved(trace_id, row["head_sequence"])
                # its owner is dead on this host: take the claim over at once (compare-and-set on the owner)
                if holder is None or owner_alive(holder) or not await take(db, holder):
                    raise TraceRunning(trace_id)
            stored: list[Message] = []
            for message in messages:
                parent = stored[-1].sequence if stored else head
                stored.append(await self._insert_message(db, trace_id, message, parent, token, False))
            return await self._read_trace_on(db, trace_id), stored

        return await self._write(body, trace_id=trace_id)

    async def append(
        self, trace_id: str, message: NewMessage, parent: int | None, *, token: str | None, side: bool = False
    ) -> Message:
        async def body(db: Db) -> Message:
            return await self._insert_message(db, trace_id, message, parent, token, side)

        attempts = 0
        while True:  # a COMMIT cut off: look, and write again only if it is not there
            try:
                return await self._write(body, trace_id=trace_id)
            except WriteOutcomeUnknown:
                attempts += 1
                if (stored := await self._appended(trace_id, message, parent, side)) is not None:
                    return stored
                if attempts == UNKNOWN_OUTCOME_ATTEMPTS:
                    raise
                log.warning(
                    "a write to trace %s was cut off before it was stored; writing it again", trace_id
                )

    async def _appended(
        self, trace_id: str, message: NewMessage, parent: int | None, side: bool
    ) -> Message | None:
        """The stored ``message`` when the cut-off COMMIT went through: the newest message with its parent
        and branch (a side branch may have appended since, so not simply the trace's last), if it is
        ``message``; else None."""
        rows = await self._fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE trace_id = $1 "
            "AND parent_sequence IS NOT DISTINCT FROM $2 AND side = $3 ORDER BY sequence DESC LIMIT 1",
            trace_id,
            parent,
            side,
        )
        if not rows:
            return None
        found = _message(rows[0])
        same = (
            found.role == message.role
            and found.content == message.content
            and found.tool_calls == message.tool_calls
            and found.tool_call_id == message.tool_call_id
        )
        return found if same else None

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

        async def body(db: Db) -> asyncpg.Record | None:
            return await db.fetchrow(
                "UPDATE traces SET status = $1, stop_reason = $2, error = $3, question = $4, result = $5, "
                f"stop_requested = false, updated_at = iso_utc(clock_timestamp()){clear} "
                f"WHERE trace_id = $6 AND run_token = $7 RETURNING {TRACE_COLUMNS}",
                *_clean([
                    status.value, stop_reason.value if stop_reason else None, error, question,
                    _json_or_none(result), trace_id, token,
                ]),
            )  # fmt: skip

        row = await self._write(body, trace_id=trace_id)
        if row is None:
            await self.get_trace(trace_id)  # TraceNotFound when it is gone altogether
            raise ClaimLost(trace_id)
        return _trace(row)

    async def release(self, trace_id: str, token: str) -> Trace | None:
        async def body(db: Db) -> asyncpg.Record | None:
            return await db.fetchrow(
                "UPDATE traces SET owner = NULL, run_token = NULL, lease_until = NULL, stop_requested = false "
                f"WHERE trace_id = $1 AND run_token = $2 RETURNING {TRACE_COLUMNS}",
                *_clean([trace_id, token]),
            )

        row = await self._write(body, trace_id=trace_id)
        return _trace(row) if row is not None else None

    async def renew(self) -> dict[str, str]:
        async def body(db: Db) -> list[asyncpg.Record]:
            return await db.fetch(
                "UPDATE traces SET lease_until = clock_timestamp() + make_interval(secs => $1) "
                "WHERE owner = $2 AND run_token IS NOT NULL RETURNING trace_id, run_token",
                self._lease_seconds,
                self.owner,
            )

        return {row["trace_id"]: row["run_token"] for row in await self._write(body, idempotent=True)}

    async def request_stop(self, trace_id: str) -> bool:
        async def body(db: Db) -> Any:
            return await db.fetchval(
                "UPDATE traces SET stop_requested = true WHERE trace_id = $1 AND status = 'running' "
                "AND run_token IS NOT NULL RETURNING trace_id",
                *_clean([trace_id]),
            )

        if await self._write(body, idempotent=True) is not None:
            return True
        await self.get_trace(trace_id)  # TraceNotFound for an unknown trace
        return False

    async def sweep(self) -> list[str]:
        """Replicas sweep at the same time: each takes the rows no other has locked (SKIP LOCKED)."""
        owners = await self._fetch(
            "SELECT DISTINCT owner FROM traces WHERE run_token IS NOT NULL AND owner IS NOT NULL"
        )
        dead = [row["owner"] for row in owners if not owner_alive(row["owner"])]

        async def body(db: Db) -> list[asyncpg.Record]:
            return await db.fetch(_SWEEP, dead)

        rows = await self._write(body, idempotent=True)
        await self._prune_changes()
        ended = (Status.INTERRUPTED.value, Status.STOPPED.value)
        return [row["trace_id"] for row in rows if row["status"] in ended]

    async def _prune_changes(self) -> None:
        async def body(db: Db) -> None:
            await db.execute(
                "DELETE FROM changes WHERE id IN (SELECT id FROM changes WHERE created_at < "
                f"clock_timestamp() - make_interval(secs => $1) ORDER BY id LIMIT {defaults.PRUNE_CHANGES_BATCH} "
                "FOR UPDATE SKIP LOCKED)",
                defaults.CHANGE_RETENTION_SECONDS,
            )

        await self._write(body, idempotent=True)

    async def note_change(self, kind: ChangeKind, trace_id: str = "") -> None:
        async def body(db: Db) -> None:
            await db.execute(
                "INSERT INTO changes (trace_id, kind) VALUES ($1, $2)", *_clean([trace_id, kind])
            )

        await self._write(body, idempotent=True)

    async def delete(self, trace_id: str) -> bool:
        """Remove a trace nobody holds; its messages go with it (ON DELETE CASCADE)."""

        async def body(db: Db) -> bool:
            if await db.fetchval(
                "DELETE FROM traces WHERE trace_id = $1 AND run_token IS NULL RETURNING true",
                *_clean([trace_id]),
            ):
                return True
            if await db.fetchval("SELECT true FROM traces WHERE trace_id = $1", *_clean([trace_id])) is None:
                raise TraceNotFound(trace_id)
            return False

        return await self._write(body, trace_id=trace_id)

    # -- run handles ----------------------------------------------------------------------------------

    async def add_handle(self, handle_id: str, trace_id: str, *, held: bool = False) -> RunHandle:
        async def body(db: Db) -> None:
            await db.execute(  # inserts nothing for an unknown trace
                "INSERT INTO run_handles (handle_id, trace_id, created_at, held_by) "
                "SELECT $1, trace_id, iso_utc(clock_timestamp()), $3 FROM traces WHERE trace_id = $2 "
                "ON CONFLICT (handle_id) DO NOTHING",
                *_clean([handle_id, trace_id]),
                self.owner if held else None,
            )

        await self._write(body, idempotent=True)
        handle = await self.get_handle(handle_id)
        if handle is None:
            raise TraceNotFound(trace_id)
        return handle

    async def end_handle(self, handle_id: str, final: dict[str, Any]) -> None:
        async def body(db: Db) -> None:
            await db.execute(
                "UPDATE run_handles SET final = $1 WHERE handle_id = $2 AND final IS NULL",
                *_clean([json.dumps(final, ensure_ascii=False), handle_id]),
            )

        await self._write(body, idempotent=True)

    async def get_handle(self, handle_id: str) -> RunHandle | None:
        rows = await self._fetch(f"SELECT {HANDLE_COLUMNS} FROM run_handles WHERE handle_id = $1", handle_id)
        return handle_from_row(tuple(rows[0])) if rows else None

    async def open_handle(self, trace_id: str) -> RunHandle | None:
        rows = await self._fetch(
            f"SELECT {HANDLE_COLUMNS} FROM run_handles WHERE trace_id = $1 AND final IS NULL "
            "AND held_by IS NULL ORDER BY created_at DESC, seq DESC LIMIT 1",
            trace_id,
        )
        return handle_from_row(tuple(rows[0])) if rows else None

    async def prune(self, finished_before: str) -> int:
        """Delete finished, unclaimed traces last updated before ``finished_before``, a batch per
        transaction; replicas pruning at once each take rows the other has not locked."""

        async def body(db: Db) -> int:
            return len(await db.fetch(_PRUNE, finished_before))

        removed = 0
        while True:
            batch = await self._write(body, idempotent=True)
            removed += batch
            if batch < defaults.PRUNE_TRACES_BATCH:
                return removed

    # -- reading ----------------------------------------------------------------------------------

    async def get_trace(self, trace_id: str) -> Trace:
        async def body(db: Db) -> Trace:
            return await self._read_trace_on(db, trace_id)

        return await self._read(body)

    async def get_message(self, trace_id: str, sequence: int) -> Message | None:
        rows = await self._fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE trace_id = $1 AND sequence = $2",
            trace_id,
            sequence,
        )
        return _message(rows[0]) if rows else None

    async def get_children(self, trace_id: str, sequence: int) -> list[Message]:
        rows = await self._fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE trace_id = $1 AND parent_sequence = $2 "
            "ORDER BY sequence",
            trace_id,
            sequence,
        )
        return [_message(r) for r in rows]

    async def get_path(self, trace_id: str, head: int | None = None) -> list[Message]:
        """The chain from the first message to ``head`` (default: the trace's head), oldest first.

        A recursive CTE that probes the primary key once per step: its cost is the path's length.
        """
        if head is None:
            head = (await self.get_trace(trace_id)).head_sequence
            if head is None:
                return []
        return [_message(r) for r in await self._fetch(_PATH, trace_id, head)]

    async def get_tree(self, trace_id: str) -> list[Message]:
        rows = await self._fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE trace_id = $1 ORDER BY sequence", trace_id
        )
        return [_message(r) for r in rows]

    async def get_tail(self, trace_id: str, count: int) -> list[Message]:
        """The last ``count`` messages of the active path, oldest first: a walk of ``count`` steps."""
        head = (await self.get_trace(trace_id)).head_sequence
        if head is None or count <= 0:
            return []
        return [_message(r) for r in await self._fetch(_TAIL, trace_id, head, count)]

    async def list_traces(
        self,
        *,
        status: str | None = None,
        uid: str | None = None,
        tag: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> TracePage:
        """Newest first; ``next_cursor`` continues where this page ended (the same cursors as SQLite)."""
        where: list[str] = []
        params: list[Any] = []

        def param(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        if status is not None:
            where.append(f"status = {param(status)}")
        if uid is not None:
            where.append(f"uid = {param(uid)}")
        if tag is not None:
            where.append(f"tags @> {param(_tags([tag]))}::jsonb")
        if cursor:
            created_at, trace_id = decode_cursor(cursor)
            where.append(f"(created_at, trace_id) < ({param(created_at)}, {param(trace_id)})")
        sql = f"SELECT {TRACE_COLUMNS} FROM traces"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY created_at DESC, trace_id DESC LIMIT {param(limit + 1)}"
        rows = await self._fetch(sql, *params)
        traces = [_trace(r) for r in rows[:limit]]
        next_cursor = encode_cursor(traces[-1]) if len(rows) > limit and traces else None
        return TracePage(traces=traces, next_cursor=next_cursor)

    async def running_ids(self) -> list[str]:
        rows = await self._fetch("SELECT trace_id FROM traces WHERE status = 'running' ORDER BY created_at")
        return [r["trace_id"] for r in rows]

    async def reflecting_ids(self) -> list[str]:
        rows = await self._fetch(
            "SELECT trace_id FROM traces WHERE run_token IS NOT NULL AND status <> 'running' "
            "AND lease_until >= clock_timestamp()"
        )
        return [r["trace_id"] for r in rows]

    async def stops_requested(self) -> list[str]:
        rows = await self._fetch(
            "SELECT trace_id FROM traces WHERE owner = $1 AND run_token IS NOT NULL AND stop_requested",
            self.owner,
        )
        return [r["trace_id"] for r in rows]

    # -- the change feed --------------------------------------------------------------------------

    async def last_change_id(self) -> int:
        rows = await self._fetch("SELECT coalesce(max(id), 0) FROM changes")
        return int(rows[0][0])

    async def changes_after(self, change_id: int, limit: int = 500) -> list[Change]:
        changes = []
        for row in await self._fetch(_CHANGES, change_id, limit):
            message_row = tuple(row[5 + i] for i in range(N_MESSAGE))
            trace_row = tuple(row[5 + N_MESSAGE + i] for i in range(N_TRACE))
            changes.append(
                Change(
                    id=row[0],
                    trace_id=row[1],
                    kind=row[2],
                    sequence=row[3],
                    token=row[4],
                    message=_message(message_row) if message_row[0] is not None else None,
                    trace=_trace(trace_row) if trace_row[0] is not None else None,
                )
            )
        return changes

    async def wait_for_changes(self, timeout: float) -> None:
        """Wait for a NOTIFY on the listening connection, or ``timeout``.

        With no listening connection (the first call, or it was lost) this one connects and LISTENs, then
        returns at once, so the feed re-reads from its cursor what it may have missed meanwhile.
        """
        listener = self._listener
        if listener is None or listener.is_closed():
            if listener is not None:
                log.warning("the change feed's listening connection was lost; listening again")
            self._wakeup = anyio.Event()  # what came before is read from the cursor once this returns
            try:
                await self._listen()
            except Exception as exc:
                if not _retryable(exc):
                    raise
                log.warning("cannot listen for changes (%s); retrying", _reason(exc))
                await anyio.sleep(timeout)
            return
        with anyio.move_on_after(timeout):
            await self._wakeup.wait()
            await anyio.sleep(FEED_COALESCE_SECONDS)  # commits come in bursts: one read for the burst
        self._wakeup = anyio.Event()

    async def _listen(self) -> None:
        async with self._listen_lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            self._listener = None
            db = await asyncpg.connect(
                self._url, timeout=CONNECT_TIMEOUT_SECONDS, server_settings=self._settings
            )
            try:
                db.add_termination_listener(self._listener_lost)
                await db.add_listener(self._channel, self._notified)
            except BaseException:
                db.terminate()
                raise
            self._listener = db

    def _notified(self, db: object, pid: int, channel: str, payload: object) -> None:
        self._wakeup.set()

    def _listener_lost(self, db: object) -> None:
        self._wakeup.set()


async def _rollback(tx: asyncpg.transaction.Transaction) -> None:
    try:
        await tx.rollback()
    except Exception:  # the connection is gone: the server rolled back; the pool discards it
        log.debug("rollback failed", exc_info=True)


async def _close_connection(db: asyncpg.Connection[asyncpg.Record]) -> None:
    try:
        with anyio.fail_after(5):
            await db.close()
    except Exception:
        db.terminate()


async def _close_pool(pool: asyncpg.Pool[asyncpg.Record]) -> None:
    try:
        with anyio.fail_after(10):
            await pool.close()
    except Exception:
        pool.terminate()
