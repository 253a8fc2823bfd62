"""The MCP tools: thin — validate, call the engine, shape the answer. Names and shapes follow product.md."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from agent import Message, RunConfig, Trace, TraceError, defaults
from agent.core.runner import last_answer
from agent.engine import Engine
from agent.trace.models import Status
from server.state import state_of

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

READ_ONLY = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
ACTS = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
)
STOPS = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)


class Started(BaseModel):
    trace_id: str
    status: Literal["started"] = "started"
    message: str


class Stopping(BaseModel):
    trace_id: str
    status: Literal["stopping", "not_running"]


class Reflected(BaseModel):
    trace_id: str
    reflection: str
    lessons: list[str] = Field(description="the lessons recorded in the experiences file")


class Running(BaseModel):
    running: list[str]


class TraceView(BaseModel):
    trace: Trace
    messages: list[Message]
    answer: str | None = Field(description="the text of the last assistant message on the active path")


class TraceList(BaseModel):
    traces: list[Trace]
    next_cursor: str | None = None


class LessonView(BaseModel):
    text: str
    heading: str | None = None
    trace_id: str | None = None


class ExperiencesView(BaseModel):
    content: str
    path: str
    lessons: list[LessonView] | None = Field(None, description="with query: the ranked lessons, best first")


def engine_of(ctx: Context) -> Engine:
    state = state_of(ctx.request_context.lifespan_context)
    assert state is not None, "the lifespan has not produced the engine"
    return state.engine


def tool_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Engine refusals become tool errors with their sentence; anything else is logged with its
    traceback and reaches the client as a plain sentence, never as the exception's text."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except TraceError as exc:
            raise ToolError(str(exc)) from None
        except ToolError:
            raise
        except Exception:
            log.exception("tool %s failed", fn.__name__)
            raise ToolError(
                f"{fn.__name__} failed with an internal error; the server log has the details."
            ) from None

    wrapper.__doc__ = inspect.cleandoc(fn.__doc__ or "")  # the description a calling model reads
    return wrapper


Messages = Annotated[
    list[dict[str, Any]] | None,
    Field(description="OpenAI chat messages, e.g. [{'role': 'user', 'content': 'Summarise README.md'}]"),
]
TraceId = Annotated[str, Field(description="The trace id that create_trace returned (32 hex characters)")]


def started_message(trace: Trace, verb: str) -> str:
    return (
        f"Trace {trace.trace_id} {verb} on {trace.model}. It runs in the background: call "
        f"get_trace(trace_id, wait_seconds=60) to wait for it, or read trace://{trace.trace_id}."
    )


def register_tools(mcp: MCPServer) -> None:
    @mcp.tool(title="Create trace", annotations=ACTS)
    @tool_errors
    async def create_trace(
        ctx: Context,
        messages: Messages = None,
        prompt: Annotated[
            str | None, Field(description="The task, as one user message (shorthand for messages)")
        ] = None,
        model: Annotated[
            str | None, Field(description="'provider:name': 'openai:gpt-4o', 'anthropic:<model>', 'offline'")
        ] = None,
        temperature: Annotated[
            float, Field(ge=0, le=2, description="Sampling temperature")
        ] = defaults.TEMPERATURE,
        max_iterations: Annotated[
            int, Field(ge=1, le=defaults.MAX_ITERATIONS_LIMIT, description="Most model calls in one run")
        ] = defaults.MAX_ITERATIONS,
        system_prompt: Annotated[
            str | None, Field(description="System prompt; none: built from skills and recalled lessons")
        ] = None,
        tools: Annotated[
            list[str] | None,
            Field(
                description="Whitelist of tool names ('read_file', 'calc__add') or server names ('calc'); none: all"
            ),
        ] = None,
        name: Annotated[str | None, Field(description="A name for the trace, for people")] = None,
        uid: Annotated[
            str | None, Field(description="Who the trace is for (filter list_traces by it)")
        ] = None,
        recall: Annotated[
            int | None,
            Field(ge=0, le=50, description="Lessons from experience to recall into the prompt (0: none)"),
        ] = None,
        reflect: Annotated[
            bool, Field(description="Reflect automatically when the run completes or fails")
        ] = False,
    ) -> Started:
        """Start a new agent trace in the background and return its id at once.

        The agent calls tools until it answers; watch it with get_trace(wait_seconds=…) or the trace:// resource.
        """
        all_messages = list(messages or [])
        if prompt:
            all_messages.append({"role": "user", "content": prompt})
        if not all_messages:
            raise ToolError("Give the task as prompt (a string) or messages (OpenAI chat messages).")
        config = RunConfig(
            model=model,
            temperature=temperature,
            max_iterations=max_iterations,
            system_prompt=system_prompt,
            tools=tools,
            name=name,
            uid=uid,
            recall=recall,
            reflect=reflect,
        )
        trace = await engine_of(ctx).create(all_messages, config)
        return Started(trace_id=trace.trace_id, message=started_message(trace, "started"))

    @mcp.tool(title="Run trace", annotations=ACTS)
    @tool_errors
    async def run_trace(
        ctx: Context,
        trace_id: TraceId,
        messages: Messages = None,
        insert_after: Annotated[
            int | None,
            Field(
                description="None: continue from the head. A sequence: rewind there and branch (past an assistant "
                "message's tool results); with no messages, regenerate from there"
            ),
        ] = None,
    ) -> Started:
        """Continue, rewind or regenerate a finished trace; returns at once while the run goes on."""
        trace = await engine_of(ctx).continue_(trace_id, messages or [], RunConfig(insert_after=insert_after))
        return Started(trace_id=trace.trace_id, message=started_message(trace, "is running again"))

    @mcp.tool(title="Stop trace", annotations=STOPS)
    @tool_errors
    async def stop_trace(ctx: Context, trace_id: TraceId) -> Stopping:
        """Stop a running trace promptly (a model call in flight included); it ends with status 'stopped'."""
        stopping = await engine_of(ctx).stop(trace_id)  # unknown trace: a tool error, not "not_running"
        return Stopping(trace_id=trace_id, status="stopping" if stopping else "not_running")

    @mcp.tool(title="Reflect on trace", annotations=ACTS)
    @tool_errors
    async def reflect_trace(
        ctx: Context,
        trace_id: TraceId,
        focus: Annotated[
            str | None, Field(description="What the reflection should look at, e.g. 'tool errors'")
        ] = None,
    ) -> Reflected:
        """Ask the trace's model for lessons on a side branch (the main path is untouched) and append them to
        the experiences file, where later traces recall them."""
        reflection = await engine_of(ctx).reflect(trace_id, focus)
        return Reflected(trace_id=trace_id, reflection=reflection.text, lessons=reflection.lessons)

    @mcp.tool(title="List running traces", annotations=READ_ONLY)
    async def list_running(ctx: Context) -> Running:
        """The ids of the traces running now."""
        return Running(running=await engine_of(ctx).running())

    @mcp.tool(title="Get trace", annotations=READ_ONLY)
    @tool_errors
    async def get_trace(
        ctx: Context,
        trace_id: TraceId,
        wait_seconds: Annotated[
            float,
            Field(
                ge=0,
                le=3600,
                description="Wait up to this long for the trace to stop running, sending progress",
            ),
        ] = 0,
        after_sequence: Annotated[
            int | None, Field(description="Only return active-path messages after this sequence")
        ] = None,
    ) -> TraceView:
        """The trace, its active-path messages and its last answer; with wait_seconds, a long-poll that returns
        as soon as the trace is not running, sending a progress notification per stored message meanwhile."""
        engine = engine_of(ctx)
        trace = await wait_with_progress(engine, ctx, trace_id, wait_seconds)
        path = await engine.path(trace_id)
        shown = [m for m in path if after_sequence is None or m.sequence > after_sequence]
        return TraceView(trace=trace, messages=shown, answer=last_answer(path))

    @mcp.tool(title="List traces", annotations=READ_ONLY)
    @tool_errors
    async def list_traces(
        ctx: Context,
        status: Annotated[Status | None, Field(description="Only traces with this status")] = None,
        uid: Annotated[str | None, Field(description="Only traces created with this uid")] = None,
        limit: Annotated[int, Field(ge=1, le=200, description="Traces per page")] = 20,
        cursor: Annotated[str | None, Field(description="next_cursor from the previous page")] = None,
    ) -> TraceList:
        """Traces, newest first, a page at a time."""
        page = await engine_of(ctx).list_traces(
            status=status.value if status else None, uid=uid, limit=limit, cursor=cursor
        )
        return TraceList(traces=page.traces, next_cursor=page.next_cursor)

    @mcp.tool(title="Get experiences", annotations=READ_ONLY)
    @tool_errors
    async def get_experiences(
        ctx: Context,
        query: Annotated[
            str | None, Field(description="Also return the lessons most relevant to this text, best first")
        ] = None,
        limit: Annotated[int, Field(ge=1, le=100, description="Most lessons returned for a query")] = 10,
    ) -> ExperiencesView:
        """The experiences markdown file (reflections as lessons); with query, the ranked lessons too."""
        engine = engine_of(ctx)
        lessons = None
        if query:
            found = await engine.recall(query, limit)
            lessons = [LessonView(text=l.text, heading=l.heading, trace_id=l.trace_id) for l in found]
        return ExperiencesView(
            content=await engine.experiences_text(), path=str(engine.experiences.path), lessons=lessons
        )

    @mcp.tool(title="Consolidate experiences", annotations=ACTS)
    @tool_errors
    async def consolidate_experiences(
        ctx: Context,
        model: Annotated[
            str | None, Field(description="Model to merge lessons with; none: the server default")
        ] = None,
    ) -> dict[str, Any]:
        """Merge duplicate lessons and drop contradicted ones now, keeping a dated backup of the file."""
        result = await engine_of(ctx).consolidate(model)
        return result.model_dump(mode="json")


def describe(message: Message, tool_names: dict[str, str]) -> str:
    """A short line for a progress notification, e.g. 'assistant called calc__add'."""
    if message.role == "assistant" and message.tool_calls:
        for call in message.tool_calls:
            tool_names[call.id] = call.function.name
        return "assistant called " + ", ".join(c.function.name for c in message.tool_calls)
    text = (message.content or "").strip().replace("\n", " ")
    short = text[:80] + ("…" if len(text) > 80 else "")
    if message.role == "tool":
        return f"{tool_names.get(message.tool_call_id or '', 'tool')} returned: {short}"
    if message.role == "assistant":
        return f"assistant answered: {short}"
    return f"{message.role}: {short}"


async def wait_with_progress(engine: Engine, ctx: Context, trace_id: str, wait_seconds: float) -> Trace:
    """Wait for the trace to stop running, reporting each message stored meanwhile as progress."""
    tool_names: dict[str, str] = {}
    if wait_seconds > 0:
        for message in await engine.path(trace_id):  # name the results of calls made before we listened
            describe(message, tool_names)

    async def progress(message: Message) -> None:
        await ctx.report_progress(message.sequence, None, describe(message, tool_names))

    return await engine.wait(trace_id, wait_seconds, progress)
