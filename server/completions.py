"""``completion/complete``: trace ids for the ``trace_id`` argument of the ``trace://{trace_id}…`` templates
and of the prompts, sequences for ``trace://{trace_id}/messages/{sequence}``.

Answered in a middleware because MCPServer's ``@completion()`` handler gets no request context, so it
could not reach the engine. Completion values are bare strings (the protocol has no label beside a
value), so a trace's name cannot be shown next to its id: the typed text matches the start of an id or
of a name, and the ids of the most recent matches come back.
"""

from __future__ import annotations

from typing import Any

import mcp.types as types
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from pydantic import ValidationError

from agent import TraceError
from agent.engine import Engine
from server.protocol_logging import with_capability
from server.state import state_of

MAX_VALUES = 100
"""The protocol's cap on one answer."""
SCANNED_TRACES = 500
"""How many of the newest traces a prefix is matched against (completion must stay instant)."""
SCANNED_MESSAGES = 200
TRACE_TEMPLATES = frozenset(
    {"trace://{trace_id}", "trace://{trace_id}/tree", "trace://{trace_id}/messages/{sequence}"}
)
TRACE_PROMPTS = frozenset({"review_trace"})


async def trace_ids(engine: Engine, typed: str) -> types.Completion:
    """The newest traces whose id, or name, starts with what was typed (case-insensitive)."""
    prefix = typed.strip().lower()
    matches: list[str] = []
    scanned, cursor = 0, None
    while scanned < SCANNED_TRACES:
        page = await engine.list_traces(limit=min(200, SCANNED_TRACES - scanned), cursor=cursor)
        for trace in page.traces:
            name = (trace.name or "").lower()
            if trace.trace_id.startswith(prefix) or (prefix and name.startswith(prefix)):
                matches.append(trace.trace_id)
        scanned += len(page.traces)
        cursor = page.next_cursor
        if cursor is None or not page.traces:
            break
    more = cursor is not None and scanned >= SCANNED_TRACES
    return types.Completion(
        values=matches[:MAX_VALUES], total=len(matches), has_more=more or len(matches) > MAX_VALUES
    )


async def sequences(engine: Engine, trace_id: str | None, typed: str) -> types.Completion:
    """The latest active-path sequences of the trace named in the context that start with what was typed."""
    if not trace_id:
        return types.Completion(values=[])
    try:
        tail = await engine.tail(trace_id, SCANNED_MESSAGES)
    except TraceError:
        return types.Completion(values=[])
    values = [str(m.sequence) for m in reversed(tail) if str(m.sequence).startswith(typed.strip())]
    return types.Completion(values=values[:MAX_VALUES], total=len(values), has_more=len(values) > MAX_VALUES)


async def complete(engine: Engine, params: types.CompleteRequestParams) -> types.Completion:
    """Values for one argument of one of our templates or prompts; none for anything else."""
    ref, argument = params.ref, params.argument
    ours = (isinstance(ref, types.ResourceTemplateReference) and ref.uri in TRACE_TEMPLATES) or (
        isinstance(ref, types.PromptReference) and ref.name in TRACE_PROMPTS
    )
    if not ours:
        return types.Completion(values=[])
    if argument.name == "trace_id":
        return await trace_ids(engine, argument.value)
    if argument.name == "sequence" and isinstance(ref, types.ResourceTemplateReference):
        known = (params.context.arguments if params.context else None) or {}
        return await sequences(engine, known.get("trace_id"), argument.value)
    return types.Completion(values=[])


async def completion_middleware(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Answer ``completion/complete`` and advertise ``completions`` (both eras have it)."""
    if ctx.method == "completion/complete":
        try:
            params = types.CompleteRequestParams.model_validate(ctx.params or {})
        except ValidationError:
            raise MCPError(
                code=types.INVALID_PARAMS,
                message="completion/complete needs a ref (ref/prompt or ref/resource) and an argument {name, value}.",
            ) from None
        state = state_of(ctx.lifespan_context)
        completion = (
            await complete(state.engine, params) if state is not None else types.Completion(values=[])
        )
        return types.CompleteResult(completion=completion)
    result = await call_next(ctx)
    if ctx.method in ("initialize", "server/discover"):
        return with_capability(result, "completions")
    return result
