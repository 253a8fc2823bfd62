"""Protocol logging for handshake-era clients: ``logging/setLevel`` per connection, and trace lifecycle
events and standing warnings sent as ``notifications/message`` at their level.

The 2026-07-28 era dropped connection-level logging, so modern requests get "method not found" and no
background log ever reaches them. What is logged is what ``get_trace`` shows anyway: ids, names, tool
names (never their arguments), the one-sentence error of a failed trace, a downstream server's reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import mcp.types as types
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.session import ServerSession
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from agent.engine import Engine
from agent.trace.events import MessageStored, TraceChanged, TraceDeleted, TraceEvent
from agent.trace.models import Outcome, Status, Trace
from server.connections import SEND_SECONDS, Connections, Outbox
from server.state import state_of

log = logging.getLogger(__name__)

LEVELS: tuple[types.LoggingLevel, ...] = (
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
)
DEFAULT_LEVEL: types.LoggingLevel = "warning"
"""What a connection that never called logging/setLevel hears: failures and warnings only."""
LOGGER = "agent-trace"
QUESTION_CHARS = 200
ERROR_CHARS = 400


def rank(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else len(LEVELS)


@dataclass(frozen=True)
class Entry:
    level: types.LoggingLevel
    event: str
    message: str
    trace_id: str | None = None

    def data(self) -> dict[str, Any]:
        body: dict[str, Any] = {"event": self.event, "message": self.message}
        if self.trace_id is not None:
            body["trace_id"] = self.trace_id
        return body


@dataclass(eq=False)
class _Connection:
    outbox: Outbox
    level: types.LoggingLevel = DEFAULT_LEVEL
    warned: set[str] = field(default_factory=set)
    """The standing warnings already sent to it."""


class _Hub:
    """One engine's log listeners (handshake-era connections) and the trace states it has seen."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.connections = Connections(_Connection)
        self.statuses: dict[str, Status] = {}

    def connection(self, session: ServerSession) -> tuple[_Connection, bool]:
        """The record for this request's connection (dropped when it closes), and whether it is new."""
        return self.connections.get(session)

    async def standing(self, record: _Connection, ctx: ServerRequestContext[Any, Any]) -> None:
        """Send the warnings that stand (downstream servers that failed) which this connection has not had,
        on this request's own stream (a new connection's GET stream may not be open yet)."""
        for entry in await downstream_warnings(self.engine):
            if entry.message not in record.warned and rank(entry.level) >= rank(record.level):
                record.warned.add(entry.message)
                await self.send(record, entry, ctx)

    def broadcast(self, entry: Entry) -> None:
        for record in self.connections.records():
            if rank(entry.level) >= rank(record.level):
                record.outbox.post(partial(_send, entry, None))

    async def send(self, record: _Connection, entry: Entry, ctx: ServerRequestContext[Any, Any]) -> None:
        """In the request's task, through the request's session: the connection's first one may be scoped
        to a request long answered."""
        with anyio.move_on_after(SEND_SECONDS):
            try:
                await _send(entry, ctx.request_id, ctx.session)
            except Exception:
                log.debug("dropping a log listener whose stream failed", exc_info=True)
                record.outbox.drop()

    def entries(self, event: TraceEvent) -> list[Entry]:
        """The log entries an engine event makes (a status change, a tool call), remembering statuses."""
        if isinstance(event, TraceDeleted):
            self.statuses.pop(event.trace_id, None)
            return []
        if isinstance(event, MessageStored):
            message = event.message
            if message.side or message.role != "assistant" or not message.tool_calls:
                return []
            names = ", ".join(dict.fromkeys(c.function.name for c in message.tool_calls))
            text = f"Trace {event.trace_id} called {names}."
            return [Entry("debug", "tool_called", text, event.trace_id)]
        if not isinstance(event, TraceChanged):
            return []
        trace = event.trace
        before = self.statuses.get(trace.trace_id)
        if trace.status is Status.RUNNING:
            self.statuses[trace.trace_id] = trace.status
        else:
            self.statuses.pop(trace.trace_id, None)  # only running traces are remembered: bounded
        if event.created:
            return [
                Entry("info", "started", f"Trace {_label(trace)} started on {trace.model}.", trace.trace_id)
            ]
        if trace.status is before:
            return []
        return [status_entry(trace)]


async def _send(entry: Entry, related_request_id: types.RequestId | None, session: ServerSession) -> None:
    note = types.LoggingMessageNotification(
        params=types.LoggingMessageNotificationParams(level=entry.level, data=entry.data(), logger=LOGGER)
    )
    await session.send_notification(note, related_request_id=related_request_id)


def status_entry(trace: Trace) -> Entry:
    """The entry for a trace that has just changed status."""
    tid, label = trace.trace_id, _label(trace)
    outcome = trace.outcome
    if outcome is Outcome.RUNNING:
        return Entry("info", "running", f"Trace {label} is running again.", tid)
    if outcome is Outcome.NEEDS_INPUT:
        question = _cut(trace.question or "", QUESTION_CHARS)
        return Entry("notice", "needs_input", f"Trace {label} needs input: {question}", tid)
    if outcome is Outcome.FAILED:
        error = _cut(trace.error or "no reason recorded", ERROR_CHARS)
        return Entry("error", "failed", f"Trace {label} failed: {error}", tid)
    if outcome is Outcome.INTERRUPTED:
        return Entry("warning", "interrupted", f"Trace {label} was interrupted; run_trace continues it.", tid)
    if outcome is Outcome.STOPPED:
        return Entry("info", "stopped", f"Trace {label} stopped.", tid)
    if outcome is Outcome.HIT_LIMIT:
        reason = trace.stop_reason.value if trace.stop_reason else "a limit"
        return Entry("info", "finished", f"Trace {label} stopped at {reason} before answering.", tid)
    return Entry("info", "finished", f"Trace {label} finished with an answer.", tid)


async def downstream_warnings(engine: Engine) -> list[Entry]:
    """One warning per downstream MCP server that failed (as agent_info lists them, else by their status)."""
    failed: dict[str, str] = {}
    if engine.downstream is None:
        return []
    try:
        # agent_info's own source (it is not called: it also probes providers, which imports their SDKs)
        describe: Callable[[], list[Any]] | None = getattr(engine.downstream, "describe", None)
        for server in describe() if describe is not None else []:
            entry = server.model_dump() if hasattr(server, "model_dump") else dict(server)
            if entry.get("state") == "failed":
                failed[str(entry.get("name"))] = str(entry.get("reason") or "no reason given")
        status: Callable[[], dict[str, str]] | None = getattr(engine.downstream, "status", None)
        if describe is None and status is not None:
            for name, state in status().items():
                if state.startswith("failed"):
                    failed[name] = state.removeprefix("failed: ") or "no reason given"
    except Exception:
        log.exception("could not read the downstream servers' state")
    return [
        Entry(
            "warning",
            "server_failed",
            f"MCP server {name!r} is unavailable to the agent: {_cut(why, ERROR_CHARS)}",
        )
        for name, why in failed.items()
    ]


class ProtocolLog:
    """The logging capability: a middleware for the requests, a pump per engine for the events."""

    def __init__(self) -> None:
        self._hubs: dict[Engine, _Hub] = {}

    async def pump(self, engine: Engine, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Turn engine events into log notifications until cancelled (in the lifespan's task group)."""
        hub = self._hubs[engine] = _Hub(engine)
        try:
            async with anyio.create_task_group() as senders, engine.subscribe() as events:
                hub.connections.serve(senders)
                task_status.started()
                async for event in events:
                    try:
                        for entry in hub.entries(event):
                            hub.broadcast(entry)
                    except Exception:
                        log.exception("could not send a log notification for trace %s", event.trace_id)
                senders.cancel_scope.cancel()
        finally:
            self._hubs.pop(engine, None)

    def _hub(self, ctx: ServerRequestContext[Any, Any]) -> _Hub | None:
        state = state_of(ctx.lifespan_context)
        return self._hubs.get(state.engine) if state is not None else None

    async def middleware(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """Answer ``logging/setLevel``, advertise ``logging`` in ``initialize``, remember connections."""
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        if ctx.method == "logging/setLevel":
            if modern:
                raise MCPError(
                    code=types.METHOD_NOT_FOUND,
                    message=f"logging/setLevel is not part of protocol {ctx.protocol_version}.",
                )
            level = (ctx.params or {}).get("level")
            if level not in LEVELS:
                raise MCPError(
                    code=types.INVALID_PARAMS, message=f"level must be one of {', '.join(LEVELS)}."
                )
            hub = self._hub(ctx)
            if hub is not None:
                record, _ = hub.connection(ctx.session)
                record.level = level
                await hub.standing(record, ctx)
            return {}
        result = await call_next(ctx)
        if ctx.method == "initialize":
            return with_capability(result, "logging")
        # a notification (notifications/initialized) has no stream of its own: the first request brings them
        hub = None if modern or ctx.request_id is None else self._hub(ctx)
        if hub is not None:
            record, new = hub.connection(ctx.session)
            if new:  # on this request's own stream: a fresh connection's GET stream may not be open yet
                await hub.standing(record, ctx)
        return result


def with_capability(result: HandlerResult, name: str) -> dict[str, Any]:
    """An ``initialize`` / ``server/discover`` result (wire form) that also advertises ``name``."""
    if result is None:
        wire: dict[str, Any] = {}
    elif isinstance(result, dict):
        wire = result
    else:
        wire = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    capabilities = wire.setdefault("capabilities", {})
    capabilities.setdefault(name, {})
    return wire


def _label(trace: Trace) -> str:
    if trace.name:
        return f"{trace.trace_id} ({_cut(trace.name, 60)})"
    return trace.trace_id


def _cut(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


__all__ = ["DEFAULT_LEVEL", "LEVELS", "ProtocolLog", "with_capability"]
