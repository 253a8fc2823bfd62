"""The MCP resources: trace://{id} (active path), trace://{id}/tree (every branch), experiences://memory."""

from __future__ import annotations

import json
from typing import Any

from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.types import INVALID_PARAMS

from agent import TraceError
from agent.experiences import ExperienceFile
from server.settings import Settings
from server.state import state_of

PAGE_SIZE = 50


async def _trace_json(ctx: Context, trace_id: str, whole_tree: bool) -> str:
    state = state_of(ctx.request_context.lifespan_context)
    assert state is not None
    engine = state.engine
    try:
        trace = await engine.get(trace_id)
    except TraceError as exc:
        raise ResourceNotFoundError(str(exc)) from None
    messages = await (engine.tree(trace_id) if whole_tree else engine.path(trace_id))
    body = {"trace": trace.model_dump(mode="json"), "messages": [m.model_dump(mode="json") for m in messages]}
    return json.dumps(body, ensure_ascii=False)


def register_resources(mcp: MCPServer, settings: Settings) -> None:
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
        description="Lessons from reflections on earlier traces, one section per reflection",
    )
    async def experiences() -> str:
        return await ExperienceFile(settings.experiences).read_text()


def _resource(trace: Any) -> dict[str, Any]:
    label = trace.name or trace.trace_id
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
