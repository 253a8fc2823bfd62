"""The MCP resources: trace://{id} (active path), trace://{id}/tree (every branch), experiences://memory."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.types import INVALID_PARAMS

from agent import TraceError
from agent.engine import Engine
from agent.experiences import ExperienceFile
from agent.trace.models import Message, Trace
from server.settings import Settings
from server.state import ServerState, state_of
from server.views import ANSWER_BYTES, elide, escaped_size, shown_message

PAGE_SIZE = 50


_CUTS: tuple[int | None, ...] = (None, 16_000, 2_000, 200, 0)
"""A trace resource is whole when it fits ANSWER_BYTES, else every message listed with long contents cut."""


def _engine(ctx: Context) -> Engine:
    state = state_of(ctx.request_context.lifespan_context)
    assert state is not None
    return state.engine


def trace_body(trace: Trace, messages: list[Message]) -> str:
    """JSON {trace, messages}: uncut when it fits, else contents cut (with a marker naming the message's own
    resource) until it does; a trace of so many messages that even markers do not fit keeps its latest
    ones, and a note says where the rest are."""
    head = trace.model_dump(mode="json")
    for limit in _CUTS:
        dumped = [shown_message(message, trace.trace_id, limit, nulls=True) for message in messages]
        text = _dumps({"trace": head, "messages": dumped})
        if escaped_size(text) <= ANSWER_BYTES:
            return text
    room = ANSWER_BYTES - escaped_size(_dumps({"trace": head, "messages": [], "note": "x" * 300}))
    kept: list[dict[str, Any]] = []
    for item in reversed(dumped):
        room -= escaped_size(_dumps(item)) + 2
        if room < 0:
            break
        kept.append(item)
    kept.reverse()
    left = len(dumped) - len(kept)
    note = (
        f"The first {left:,} of {len(dumped):,} messages are left out to stay under 1 MiB; "
        f"get_trace(trace_id='{trace.trace_id}', view='full') pages through every one."
    )
    return _dumps({"trace": head, "messages": kept, "note": note})


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


async def _trace_json(ctx: Context, trace_id: str, whole_tree: bool) -> str:
    engine = _engine(ctx)
    try:
        trace = await engine.get(trace_id)
    except TraceError as exc:
        raise ResourceNotFoundError(str(exc)) from None
    messages = await (engine.tree(trace_id) if whole_tree else engine.path(trace_id))
    return trace_body(trace, messages)


def register_resources(mcp: MCPServer, settings: Settings, current: Callable[[], ServerState | None]) -> None:
    """``current`` gives the lifespan's state: the static experiences resource gets no request context."""

    @mcp.resource(
        "trace://{trace_id}/messages/{sequence}",
        name="trace-message",
        title="One message of a trace, uncut",
        mime_type="application/json",
        description="JSON of one stored message (any branch), with its whole content",
    )
    async def trace_message(trace_id: str, sequence: str, ctx: Context) -> str:
        engine = _engine(ctx)
        if not sequence.isdigit() or len(sequence) > 18:  # past 2^63 a database cannot hold it either
            raise ResourceNotFoundError(f"{elide(sequence, 20)} is not a message sequence (1, 2, 3…).")
        try:
            await engine.get(trace_id)
        except TraceError as exc:
            raise ResourceNotFoundError(str(exc)) from None
        message = await engine.message(trace_id, int(sequence))
        if message is None:
            raise ResourceNotFoundError(f"Trace '{trace_id}' has no message with sequence {int(sequence)}.")
        return message.model_dump_json()

    @mcp.resource(
        "trace://{trace_id}/tree",
        name="trace-tree",
        title="Trace (every branch)",
        mime_type="application/json",
        description="JSON {trace, messages}: every message of every branch, by sequence",
    )
    async def trace_tree(trace_id: str, ctx: Context) -> str:
        return await _trace_json(ctx, trace_id, whole_tree=True)

    @mcp.resource(
        "trace://{trace_id}",
        name="trace",
        title="Trace",
        mime_type="application/json",
        description="JSON {trace, messages}: the trace and its active path",
    )
    async def trace(trace_id: str, ctx: Context) -> str:
        return await _trace_json(ctx, trace_id, whole_tree=False)

    @mcp.resource(
        "experiences://memory",
        name="experiences",
        title="Experiences",
        mime_type="text/markdown",
        description="Lessons from reflections on earlier traces, one section per reflection (newest kept if cut)",
    )
    async def experiences() -> str:
        state = current()
        try:
            if state is None:  # served before the engine opened: the file is what there is
                text, _ = await ExperienceFile(settings.experiences).read_bounded()
            else:
                text, _ = await state.engine.experiences_text()
        except (
            TraceError
        ) as exc:  # a folder or a FIFO named by --experiences: the sentence get_experiences gives
            raise MCPError(code=INVALID_PARAMS, message=str(exc)) from None
        return text


def _resource(trace: Trace) -> dict[str, Any]:
    label = " ".join((trace.name or trace.trace_id).split())[:80]
    return {
        "uri": f"trace://{trace.trace_id}",
        "name": f"trace-{trace.trace_id}",
        "title": f"{label} ({trace.status.value})",
        "description": f"Trace on {trace.model}, created {trace.created_at}",
        "mimeType": "application/json",
    }


async def resource_list_middleware(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """``resources/list``: experiences://memory, then the traces newest first, PAGE_SIZE a page."""
    state = state_of(ctx.lifespan_context)
    if ctx.method != "resources/list" or state is None:
        return await call_next(ctx)
    cursor = (ctx.params or {}).get("cursor")
    # Start from the SDK's own answer so era-specific fields (resultType, cache hints) stay as it sets them.
    result = await call_next(ctx)
    wire: dict[str, Any] = (
        dict(result)
        if isinstance(result, dict)
        else result.model_dump(by_alias=True, mode="json", exclude_none=True)
        if result is not None
        else {}
    )
    static = [] if cursor else list(wire.get("resources", []))
    try:
        page = await state.engine.list_traces(limit=PAGE_SIZE, cursor=cursor or None)
    except TraceError as exc:
        raise MCPError(code=INVALID_PARAMS, message=str(exc)) from None
    wire["resources"] = static + [_resource(t) for t in page.traces]
    wire.pop("nextCursor", None)
    if page.next_cursor:
        wire["nextCursor"] = page.next_cursor
    return wire
