"""The MCP tools: thin — validate, call the engine, shape the answer. Names and shapes follow product.md.

Every answer is written for the model that reads it: compact JSON text (the structured copy is for
programs), sized with ``server.views``, and every wait bounded by ``--max-wait``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from agent import Message, RunConfig, Trace, TraceError, defaults
from agent.engine import Engine
from agent.errors import storage_trouble
from agent.trace.models import Status
from server.arguments import (
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SYSTEM_PROMPT_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    MAX_TOOL_NAME_CHARS,
    MAX_TOOLS,
    MAX_UID_CHARS,
    TAG_PATTERN,
    Sequence_,
    StrList,
    TraceId,
    check_messages_size,
    is_trace_id,
)
from server.progress import Progress, ProgressLines
from server.state import ServerState, state_of
from server.views import (
    MESSAGES_VIEW_CHARS,
    ROWS_BYTES,
    TAIL_MESSAGES,
    RowBudget,
    answer_of,
    compact_row,
    elide,
    messages_view,
    one_line,
    result_left_out,
    row_answer_chars,
    row_result_chars,
    row_with_answer,
    shorten,
    size_of,
    still_running,
    suggested_wait,
    summary,
)

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

READ_ONLY = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
RUNS_AGENT = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=True
)
"""create_trace / run_trace: destructive unless every tool the agent could call only reads (set per listing)."""
STOPS = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
LEARNS = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
)
REWRITES = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=True
)
DELETES = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
)
AGENT_TOOLS = ("create_trace", "run_trace")


class Started(BaseModel):
    trace_id: str
    status: Literal["started"] = "started"
    message: str


class Stopping(BaseModel):
    model_config = ConfigDict(extra="allow")

    trace_id: str | None = None
    status: Literal["stopping", "not_running"] | None = None
    stopping: list[str] | None = None
    not_running: list[str] | None = None


class Reflected(BaseModel):
    trace_id: str
    reflection: str
    lessons: list[str] = Field(description="the lessons recorded in the experiences file")


class Running(BaseModel):
    running: list[str]
    traces: list[dict[str, Any]] = Field(description="compact rows with steps, started_at and last_action")
    note: str | None = None


class TraceAnswer(BaseModel):
    """get_trace's answer; its fields depend on ``view`` (summary, messages or full)."""

    model_config = ConfigDict(extra="allow")
    trace: dict[str, Any]


class Awaited(BaseModel):
    done: list[dict[str, Any]] = Field(
        description="compact rows (with answer/result/question) of finished traces"
    )
    running: list[str]
    more_done: list[str] | None = Field(
        None, description="finished traces left out of done to keep the answer short (ask for them by id)"
    )
    next: str | None = None


class TraceList(BaseModel):
    traces: list[dict[str, Any]]
    next_cursor: str | None = None
    note: str | None = None


class LessonView(BaseModel):
    text: str
    heading: str | None = None
    trace_id: str | None = None


class ExperiencesView(BaseModel):
    path: str
    content: str | None = Field(None, description="the experiences markdown, newest sections first if cut")
    truncated: bool | None = Field(None, description="true when content was cut to its newest sections")
    lessons: list[LessonView] | None = Field(None, description="with query: the ranked lessons, best first")


class Consolidated(BaseModel):
    before: int
    after: int
    merged: int = 0
    dropped: list[dict[str, Any]] = Field(default_factory=list)
    backup_path: str | None = Field(None, description="the dated copy of the file before this pass")
    prior_version: int | None = Field(
        None,
        description="PostgreSQL: the version this pass replaced (`agent-trace-mcp experiences export FILE "
        "--as-of N` writes it out)",
    )
    skipped_reason: str | None = None


class Deleted(BaseModel):
    trace_id: str
    deleted: bool


class AgentInfoView(BaseModel):
    model_config = ConfigDict(extra="allow")
    tools: list[dict[str, Any]]
    servers: list[dict[str, Any]]
    default_model: str
    providers: dict[str, bool]
    workspace: str
    skills: list[dict[str, str]]


def state_from(ctx: Context) -> ServerState:
    state = state_of(ctx.request_context.lifespan_context)
    assert state is not None, "the lifespan has not produced the engine"
    return state


def engine_of(ctx: Context) -> Engine:
    return state_from(ctx).engine


def compact(model: BaseModel, *, drop_none: bool = False, optional: tuple[str, ...] = ()) -> CallToolResult:
    """The answer as compact JSON text (no indentation) for the reading model and as the structured
    object for programs: the same keys in both, so a documented field is there whichever one is read.
    ``drop_none`` leaves out every null field, ``optional`` only those named."""
    data = model.model_dump(mode="json", exclude_none=drop_none)
    for key in optional:
        if data.get(key, 0) is None:
            del data[key]
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)


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
        except Exception as exc:
            log.exception("tool %s failed", fn.__name__)
            raise ToolError(
                f"{fn.__name__} failed: {cause}"
                if (cause := storage_trouble(exc))
                else f"{fn.__name__} failed with an internal error; the server log has the details."
            ) from None

    wrapper.__doc__ = inspect.cleandoc(fn.__doc__ or "")  # the description a calling model reads
    return wrapper


Messages = Annotated[
    list[dict[str, Any]] | None,
    Field(
        max_length=MAX_MESSAGES,
        description="OpenAI chat messages, e.g. [{'role': 'user', 'content': 'Summarise README.md'}]",
    ),
]
RunMessages = Annotated[
    list[dict[str, Any]],
    Field(
        default_factory=list,
        max_length=MAX_MESSAGES,
        json_schema_extra={"default": []},
        description="OpenAI chat messages to append, e.g. [{'role': 'user', 'content': 'Now fix it'}]",
    ),
]


DESCRIPTION_CHARS = 160
"""agent_info gives each tool one line of about this length (shorter when there are hundreds)."""
SUGGESTED_WAIT = re.compile(r"wait_seconds=\d+")
"""A wait a tool description suggests (written with the default; tools/list rewrites it to the server's)."""


def wait_description(max_wait: float) -> str:
    return f"Wait up to this long (capped at the server's --max-wait, {max_wait:g} s)"


WaitSeconds = Annotated[
    float,
    Field(
        ge=0,
        description=wait_description(defaults.MAX_WAIT_SECONDS),  # tools/list names the server's own
    ),
]
MaxTokens = Annotated[
    int | None,
    Field(ge=1, description="Token budget for a run (prompt + completion); it ends hit_limit when spent"),
]
TimeoutSeconds = Annotated[
    float | None,
    Field(gt=0, le=86_400, description="Wall-clock limit for a run, in seconds; it ends hit_limit"),
]
Tags = Annotated[
    StrList | None,
    Field(max_length=MAX_TAGS, description=f"Labels to group traces by (at most {MAX_TAGS})"),
]


def started_message(trace: Trace, verb: str, max_wait: float) -> str:
    wait = suggested_wait(max_wait)
    return (
        f"Trace {trace.trace_id} {verb} on {trace.model}. It runs in the background: call "
        f"get_trace(trace_id, wait_seconds={wait}) to wait for it (await_traces for several)."
    )


def capped(engine: Engine, wait_seconds: float) -> tuple[float, str | None]:
    """The wait the server grants, and a note when it is less than asked."""
    limit = engine.settings.max_wait
    if wait_seconds <= limit:
        return wait_seconds, None
    return (
        limit,
        f"wait_seconds is capped at {limit:g} s, the server's --max-wait (asked {wait_seconds:g} s).",
    )


def check_sizes(
    name: str | None,
    uid: str | None,
    tags: list[str] | None,
    tools: list[str] | None,
    system_prompt: str | None,
    confirm_tools: list[str] | None = None,
) -> None:
    """Oversized fields are refused at creation, so one record can never poison shared listings."""
    if name is not None and len(name) > MAX_NAME_CHARS:
        raise ToolError(f"name is {len(name):,} characters; at most {MAX_NAME_CHARS} are allowed.")
    if uid is not None and len(uid) > MAX_UID_CHARS:
        raise ToolError(f"uid is {len(uid):,} characters; at most {MAX_UID_CHARS} are allowed.")
    for tag in tags or []:
        if not tag or len(tag) > MAX_TAG_CHARS:
            raise ToolError(f"Each tag must be 1 to {MAX_TAG_CHARS} characters; one is {len(tag):,}.")
        if re.fullmatch(TAG_PATTERN, tag) is None:
            raise ToolError(f"A tag cannot hold control characters; got {elide(tag)}.")
    for argument, names in (("tools", tools), ("confirm_tools", confirm_tools)):
        if names is None:
            continue
        if len(names) > MAX_TOOLS:
            raise ToolError(f"{argument} lists {len(names):,} names; at most {MAX_TOOLS} are allowed.")
        if any(len(t) > MAX_TOOL_NAME_CHARS for t in names):
            raise ToolError(f"A name in {argument} is longer than {MAX_TOOL_NAME_CHARS} characters.")
    if system_prompt is not None and len(system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
        raise ToolError(
            f"system_prompt is {len(system_prompt):,} characters; at most {MAX_SYSTEM_PROMPT_CHARS:,} are allowed."
        )


def shown_default(value: Any) -> Any:
    """The default a host reads in the schema, for an argument left None in the call when not given: a new
    trace takes the default (the engine's, from agent.defaults), a fork its source's value."""
    return Field(json_schema_extra={"default": value})


def register_tools(mcp: MCPServer) -> None:
    @mcp.tool(title="Create trace", annotations=RUNS_AGENT)
    @tool_errors
    async def create_trace(
        ctx: Context,
        messages: Messages = None,
        prompt: Annotated[
            str | None,
            Field(
                max_length=MAX_PROMPT_CHARS,
                description="The task, as one user message (after messages, when both are given)",
            ),
        ] = None,
        model: Annotated[
            str | None,
            Field(
                max_length=200, description="'provider:name': 'openai:gpt-4o', 'anthropic:<model>', 'offline'"
            ),
        ] = None,
        temperature: Annotated[
            float | None,
            Field(ge=0, le=2, description="Sampling temperature"),
            shown_default(defaults.TEMPERATURE),
        ] = None,
        max_iterations: Annotated[
            int | None,
            Field(ge=1, le=defaults.MAX_ITERATIONS_LIMIT, description="Most model calls in one run"),
            shown_default(defaults.MAX_ITERATIONS),
        ] = None,
        system_prompt: Annotated[
            str | None, Field(description="System prompt; none: built from skills and recalled lessons")
        ] = None,
        tools: Annotated[
            StrList | None,
            Field(
                description="Whitelist of tool names ('read_file', 'calc__add') or server names ('calc'); none: all"
            ),
        ] = None,
        name: Annotated[str | None, Field(description="A name for the trace, for people")] = None,
        uid: Annotated[str | None, Field(description="Who the trace is for (a label to filter by)")] = None,
        tags: Tags = None,
        recall: Annotated[
            int | None,
            Field(ge=0, le=50, description="Lessons from experience to recall into the prompt (0: none)"),
        ] = None,
        reflect: Annotated[
            bool | None,
            Field(description="Reflect automatically when the run completes or fails"),
            shown_default(False),
        ] = None,
        max_tokens: MaxTokens = None,
        timeout_seconds: TimeoutSeconds = None,
        output_schema: Annotated[
            dict[str, Any] | None,
            Field(
                description="A JSON Schema the final answer must satisfy; the valid JSON comes back as result"
            ),
        ] = None,
        ask_host: Annotated[
            bool | None,
            Field(description="Give the agent an ask_host(question) tool: it pauses the run as needs_input"),
            shown_default(True),
        ] = None,
        confirm_tools: Annotated[
            StrList | None,
            Field(description="Tools or servers whose calls wait for your approval (run_trace(approve=...))"),
        ] = None,
        from_trace: Annotated[
            TraceId | None,
            Field(
                description="Fork: start from a copy of this trace's path and settings (arguments given here "
                "override them; the source is unchanged)"
            ),
        ] = None,
        from_sequence: Annotated[
            Sequence_ | None,
            Field(description="Fork: copy the source's path up to this sequence (default: its head)"),
        ] = None,
    ) -> Started:
        """Start a new agent trace in the background and return its id at once.

        The agent calls its tools (agent_info lists them) until it answers. Follow it with
        get_trace(trace_id, wait_seconds=30) — a compact summary — or await_traces for several.
        """
        check_messages_size(messages)
        all_messages = list(messages or [])
        if prompt is not None and not prompt.strip() and not all_messages and from_trace is None:
            raise ToolError("prompt is empty (only whitespace); give the task as text.")
        if prompt:
            all_messages.append({"role": "user", "content": prompt})
        if not all_messages and from_trace is None:
            raise ToolError("Give the task as prompt (a string) or messages (OpenAI chat messages).")
        check_sizes(name, uid, tags, tools, system_prompt, confirm_tools)
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
            tags=tags,
            max_tokens=max_tokens,
            timeout_seconds=timeout_seconds,
            output_schema=output_schema,
            ask_host=ask_host,
            confirm_tools=confirm_tools,
            from_trace=from_trace,
            from_sequence=from_sequence,
        )
        engine = engine_of(ctx)
        trace = await engine.create(all_messages, config)
        verb = "started" if from_trace is None else f"forked from {from_trace} and started"
        started = Started(
            trace_id=trace.trace_id, message=started_message(trace, verb, engine.settings.max_wait)
        )
        return compact(started)  # type: ignore[return-value]

    @mcp.tool(title="Run trace", annotations=RUNS_AGENT)
    @tool_errors
    async def run_trace(
        ctx: Context,
        trace_id: TraceId,
        messages: RunMessages,
        insert_after: Annotated[
            Sequence_ | None,
            Field(
                description="None: continue from the head. A sequence: rewind there and branch (past an assistant "
                "message's tool results); with no messages, regenerate from there"
            ),
        ] = None,
        answer: Annotated[
            str | None,
            Field(
                max_length=MAX_PROMPT_CHARS,
                description="Your answer to the question a needs_input trace asks",
            ),
        ] = None,
        approve: Annotated[
            bool | None,
            Field(
                description="For a tool call waiting for approval: true runs it, false declines it (answer: why)"
            ),
        ] = None,
        model: Annotated[
            str | None, Field(max_length=200, description="Another model for this run and after")
        ] = None,
        temperature: Annotated[
            float | None, Field(ge=0, le=2, description="Another sampling temperature")
        ] = None,
        max_iterations: Annotated[
            int | None,
            Field(ge=1, le=defaults.MAX_ITERATIONS_LIMIT, description="Most model calls in this run"),
        ] = None,
        tools: Annotated[StrList | None, Field(description="Another whitelist of tools or servers")] = None,
        max_tokens: MaxTokens = None,
        timeout_seconds: TimeoutSeconds = None,
    ) -> Started:
        """Continue, rewind, regenerate, or answer a trace that is not running; returns at once while the run
        goes on. Overrides (model, temperature, budgets, tools) apply to this run and are stored with the trace."""
        engine = engine_of(ctx)
        check_sizes(None, None, None, tools, None)
        config = RunConfig(
            insert_after=insert_after,
            answer=answer,
            approve=approve,
            model=model,
            temperature=temperature,
            max_iterations=max_iterations,
            tools=tools,
            max_tokens=max_tokens,
            timeout_seconds=timeout_seconds,
        )
        check_messages_size(messages)
        trace = await engine.continue_(trace_id, messages or [], config)
        again = Started(
            trace_id=trace.trace_id,
            message=started_message(trace, "is running again", engine.settings.max_wait),
        )
        return compact(again)  # type: ignore[return-value]

    @mcp.tool(title="Stop traces", annotations=STOPS)
    @tool_errors
    async def stop_trace(
        ctx: Context,
        trace_id: Annotated[TraceId | None, Field(description="The trace to stop")] = None,
        trace_ids: Annotated[
            StrList | None, Field(max_length=500, description="Several traces to stop")
        ] = None,
        tag: Annotated[
            str | None,
            Field(
                max_length=MAX_TAG_CHARS,
                pattern=TAG_PATTERN,
                description="Stop every running trace with this tag",
            ),
        ] = None,
    ) -> Stopping:
        """Stop running traces promptly (a model call in flight included); each ends 'stopped', wherever it runs."""
        engine = engine_of(ctx)
        if trace_id is not None and trace_ids is None and tag is None:
            stopping = await engine.stop(trace_id)  # unknown trace: a tool error, not "not_running"
            one = Stopping(trace_id=trace_id, status="stopping" if stopping else "not_running")
            return compact(one, drop_none=True)  # type: ignore[return-value]
        ids = await targets(engine, "stop_trace", trace_id, trace_ids, tag)
        stopped: list[str] = []
        idle: list[str] = []
        for tid in ids:
            (stopped if await engine.stop(tid) else idle).append(tid)
        return compact(Stopping(stopping=stopped, not_running=idle), drop_none=True)  # type: ignore[return-value]

    @mcp.tool(title="Reflect on trace", annotations=LEARNS)
    @tool_errors
    async def reflect_trace(
        ctx: Context,
        trace_id: TraceId,
        focus: Annotated[
            str | None,
            Field(max_length=2000, description="What the reflection should look at, e.g. 'tool errors'"),
        ] = None,
    ) -> Reflected:
        """Ask the trace's model for lessons on a side branch (the main path is untouched) and append them to
        the experiences file, where later traces recall them."""
        reflection = await engine_of(ctx).reflect(trace_id, focus)
        text = reflection.text if len(reflection.text) <= 4000 else reflection.text[:4000] + "… [cut]"
        return compact(Reflected(trace_id=trace_id, reflection=text, lessons=reflection.lessons))  # type: ignore[return-value]

    @mcp.tool(title="List running traces", annotations=READ_ONLY)
    @tool_errors
    async def list_running(ctx: Context) -> Running:
        """The traces running now, in any process sharing the store, with their steps and latest action."""
        engine = engine_of(ctx)
        rows: list[dict[str, Any]] = []
        budget = RowBudget()
        ids = await engine.running()
        for tid in ids:
            trace = await engine.get(tid)
            tail = await engine.tail(tid, 2)
            row = compact_row(trace)
            row["started_at"] = trace.started_at
            row["last_action"] = one_line(tail[-1], {}) if tail else None
            if not budget.take(row):
                break
            rows.append(row)
        left = len(ids) - len(rows)
        note = (
            f"Rows for {left} more running traces are left out to keep this answer short; "
            "get_trace(trace_id) shows any of them."
            if left
            else None
        )
        return compact(Running(running=ids, traces=rows, note=note), optional=("note",))  # type: ignore[return-value]

    @mcp.tool(title="Get trace", annotations=READ_ONLY, structured_output=True)
    @tool_errors
    async def get_trace(
        ctx: Context,
        trace_id: TraceId,
        wait_seconds: WaitSeconds = 0,
        after_sequence: Annotated[
            int | None,
            Field(ge=0, le=10**12, description="Only messages after this sequence (and their progress)"),
        ] = None,
        view: Annotated[
            Literal["summary", "messages", "full"],
            Field(
                description="summary (default, ≤ 4 KB); messages: the steps, each cut at max_chars; full: uncut"
            ),
        ] = "summary",
        max_chars: Annotated[
            int,
            Field(ge=0, le=MESSAGES_VIEW_CHARS, description="view=messages: cut each message at this length"),
        ] = 2000,
    ) -> TraceAnswer:
        """The trace as a compact summary (answer, question, latest steps) by default; with wait_seconds, a
        long-poll that returns as soon as the trace stops running, sending progress meanwhile."""
        engine = engine_of(ctx)
        seconds, note = capped(engine, wait_seconds)
        trace = await wait_with_progress(engine, ctx, trace_id, seconds, after_sequence)
        if trace.status is not Status.RUNNING:
            note = None  # the wait ended early: its cap did not matter
        elif seconds > 0:
            note = ((note + " ") if note else "") + f"Waited {seconds:g} s."
        if view == "summary":
            tail = await engine.tail(trace_id, TAIL_MESSAGES)
            last_text = await engine.last_text(trace_id, tail)
            body = summary(trace, tail, last_text, note=note, max_wait=engine.settings.max_wait)
        else:
            body = messages_view(
                trace, await engine.path(trace_id), after_sequence, max_chars, full=view == "full"
            )
            if trace.status is Status.RUNNING and "next" not in body:
                body["next"] = still_running(trace, view, body["last_sequence"], engine.settings.max_wait)
            if note:
                body["note"] = note
        return compact(TraceAnswer.model_validate(body))  # type: ignore[return-value]

    @mcp.tool(title="Await traces", annotations=READ_ONLY)
    @tool_errors
    async def await_traces(
        ctx: Context,
        trace_ids: Annotated[
            StrList | None, Field(max_length=500, description="The traces to wait on")
        ] = None,
        tag: Annotated[
            str | None,
            Field(
                max_length=MAX_TAG_CHARS, pattern=TAG_PATTERN, description="Wait on every trace with this tag"
            ),
        ] = None,
        mode: Annotated[
            Literal["any", "all"],
            Field(description="any: return when one has finished; all: when every one has"),
        ] = "any",
        wait_seconds: WaitSeconds = 30,
    ) -> Awaited:
        """Wait on several traces at once; returns compact rows (answer, result, question) for the finished
        ones and the ids still running."""
        engine = engine_of(ctx)
        ids = await targets(engine, "await_traces", None, trace_ids, tag, every=True)
        if not ids:
            return compact(
                Awaited(done=[], running=[], next=f"No trace has the tag {elide(tag)}."),
                optional=("more_done",),
            )  # type: ignore[return-value]
        seconds, note = capped(engine, wait_seconds)
        lines, reports = ProgressLines(engine), Progress(ctx)

        async def progress(trace_id: str, message: Message) -> None:
            await reports.send(f"{trace_id[:8]}: {await lines.line(trace_id, message)}")

        async def beat() -> None:
            await reports.send("still waiting on traces")

        traces = await engine.await_traces(
            ids, every=mode == "all", seconds=seconds, on_message=progress, on_idle=beat
        )
        await reports.settle()
        found = {t.trace_id for t in traces}
        gone = [tid for tid in ids if tid not in found]
        running = [t.trace_id for t in traces if t.status is Status.RUNNING]
        finished = [t for t in traces if t.status is not Status.RUNNING]
        done: list[dict[str, Any]] = []
        more: list[str] = []  # finished, past the answer's budget: named only
        answer_chars, result_chars = row_answer_chars(len(finished)), row_result_chars(len(finished))
        budget, left_out = RowBudget(), []
        for trace in finished:
            if not budget.full:
                tail = await engine.tail(trace.trace_id, TAIL_MESSAGES if trace.question else 1)
                row = row_with_answer(trace, tail, answer_chars, result_chars)
                if budget.take(row):
                    done.append(row)
                    if row["result"] is None and trace.result is not None:
                        left_out.append(result_left_out(trace, answer_of(trace, tail), named=True))
                    continue
            more.append(trace.trace_id)
        hints = [*([note] if note and running else []), *left_out]
        if gone:
            more_gone = f" and {len(gone) - 20} more" if len(gone) > 20 else ""
            hints.append(
                f"Deleted while waited on (not in done or running): {', '.join(gone[:20])}{more_gone}."
            )
        if more:
            hints.append(
                f"{len(more)} more finished traces are in more_done, left out to keep this answer short: "
                "call await_traces(trace_ids=[...]) with some of them for their answers."
            )
        if running:
            hints.append(
                f"{len(running)} still running: call await_traces again with their ids "
                f"(wait_seconds ≤ {suggested_wait(engine.settings.max_wait)})."
            )
        shown = Awaited(done=done, running=running, more_done=more or None, next=" ".join(hints) or None)
        return compact(shown, optional=("next", "more_done"))  # type: ignore[return-value]

    @mcp.tool(title="List traces", annotations=READ_ONLY)
    @tool_errors
    async def list_traces(
        ctx: Context,
        status: Annotated[Status | None, Field(description="Only traces with this status")] = None,
        uid: Annotated[
            str | None, Field(max_length=MAX_UID_CHARS, description="Only traces created with this uid")
        ] = None,
        tag: Annotated[
            str | None,
            Field(max_length=MAX_TAG_CHARS, pattern=TAG_PATTERN, description="Only traces with this tag"),
        ] = None,
        limit: Annotated[int, Field(ge=1, le=200, description="Traces per page")] = 20,
        cursor: Annotated[
            str | None, Field(max_length=1000, description="next_cursor from the previous page")
        ] = None,
    ) -> TraceList:
        """Traces as compact rows (no config, no lesson texts), newest first, a page at a time."""
        page = await engine_of(ctx).list_traces(
            status=status.value if status else None, uid=uid, tag=tag, limit=limit, cursor=cursor
        )
        rows: list[dict[str, Any]] = []
        budget = RowBudget()  # however large the limit, the page stays a size a model can read
        for trace in page.traces:
            if not budget.take(row := compact_row(trace)):
                break
            rows.append(row)
        if len(rows) == len(page.traces):
            return compact(TraceList(traces=rows, next_cursor=page.next_cursor), optional=("note",))  # type: ignore[return-value]
        cut = TraceList(
            traces=rows,
            next_cursor=page.cursor_after(len(rows)),
            note=f"{len(rows)} rows fill this answer; next_cursor continues with the rest.",
        )
        return compact(cut)  # type: ignore[return-value]

    @mcp.tool(title="Get experiences", annotations=READ_ONLY)
    @tool_errors
    async def get_experiences(
        ctx: Context,
        query: Annotated[
            str | None,
            Field(max_length=10_000, description="Return only the lessons most relevant to this text"),
        ] = None,
        limit: Annotated[int, Field(ge=1, le=100, description="Most lessons returned for a query")] = 10,
    ) -> ExperiencesView:
        """The experiences markdown (lessons from reflections); with query, only the ranked lessons. Waits
        briefly for automatic reflections under way, so lessons of a trace that just answered are in."""
        engine = engine_of(ctx)
        await engine.settle_reflections()
        path = engine.experiences.location
        if query:
            found = await engine.recall(query, limit)
            lessons = [LessonView(text=l.text, heading=l.heading, trace_id=l.trace_id) for l in found]
            return compact(ExperiencesView(path=path, lessons=lessons), drop_none=True)  # type: ignore[return-value]
        content, truncated = await engine.experiences_text()
        shown = ExperiencesView(path=path, content=content, truncated=truncated or None)  # said only when cut
        return compact(shown, drop_none=True)  # type: ignore[return-value]

    @mcp.tool(title="Consolidate experiences", annotations=REWRITES)
    @tool_errors
    async def consolidate_experiences(
        ctx: Context,
        model: Annotated[
            str | None,
            Field(max_length=200, description="Model to merge lessons with; none: the server default"),
        ] = None,
    ) -> Consolidated:
        """Merge duplicate lessons and drop contradicted ones now (the prior lessons are kept: a dated
        backup, or on PostgreSQL a prior version)."""
        result = await engine_of(ctx).consolidate(model)
        if result.failed:  # the pass could not be made: an error a model acts on, not "nothing to do"
            raise ToolError(result.skipped_reason or "The consolidation failed; nothing was changed.")
        return compact(
            Consolidated(  # type: ignore[return-value]
                before=result.before,
                after=result.after,
                merged=result.merged,
                dropped=[d.model_dump() for d in result.dropped[:50]],
                backup_path=str(result.backup_path) if result.backup_path else None,
                prior_version=getattr(result, "prior_version", None),
                skipped_reason=result.skipped_reason,
            )
        )

    @mcp.tool(title="Delete trace", annotations=DELETES)
    @tool_errors
    async def delete_trace(ctx: Context, trace_id: TraceId) -> Deleted:
        """Delete a trace that is not running, with all its messages (lessons it taught stay in experiences)."""
        engine = engine_of(ctx)
        if not await engine.delete(trace_id):
            raise ToolError(f"Trace '{trace_id}' is running; stop it (stop_trace) before you delete it.")
        return compact(Deleted(trace_id=trace_id, deleted=True))  # type: ignore[return-value]

    @mcp.tool(title="What the agent can use", annotations=READ_ONLY)
    @tool_errors
    async def agent_info(ctx: Context) -> AgentInfoView:
        """What the background agent can use: its tools (name, one line, server), the downstream MCP servers
        (up, or failed with the reason), the default model and which providers are configured, the workspace,
        the skills."""
        state = state_from(ctx)
        info = await state.engine.agent_info()
        tools: list[dict[str, Any]] = []
        skills: list[dict[str, Any]] = []
        for limit in (DESCRIPTION_CHARS, 60, 0):  # many tools or skills: shorter lines, then names alone
            tools = [
                {"name": t.name, "server": t.server, "read_only": t.read_only}
                | ({"description": shorten(t.description, limit)} if limit != 0 else {})
                for t in info.tools
            ]
            skills = [
                {"name": k["name"]}
                | ({"description": shorten(k["description"], limit)} if limit != 0 else {})
                for k in info.skills
            ]
            if size_of(tools) + size_of(skills) <= ROWS_BYTES:
                break
        notes = list(state.notes)
        if limit != DESCRIPTION_CHARS:
            notes.append(
                f"The descriptions are shortened ({len(tools)} tools, {len(skills)} skills) to keep this "
                "answer short"
                + (" (left out)" if limit == 0 else "")
                + "; create_trace(tools=[...]) narrows what the agent may call."
            )
        body: dict[str, Any] = {
            "tools": tools,
            "servers": info.servers,
            "default_model": info.default_model,
            "providers": info.providers,
            "workspace": info.workspace,
            "skills": skills,
            "max_wait_seconds": state.engine.settings.max_wait,
        }
        if notes:
            body["notes"] = notes
        return compact(AgentInfoView.model_validate(body))  # type: ignore[return-value]


TAG_PAGE = 500
MAX_TAGGED_TRACES = 5_000
"""The most traces a tag may name in one stop_trace / await_traces call (each is read and followed)."""


async def targets(
    engine: Engine,
    tool: str,
    trace_id: str | None,
    trace_ids: list[str] | None,
    tag: str | None,
    *,
    every: bool = False,
) -> list[str]:
    """The traces a many-trace call (``tool``) names: ids (each must exist, checked before anything is
    done), or the traces with a tag: ``every`` one, else those a stop applies to (running or waiting for
    input)."""
    ids = [*([trace_id] if trace_id else []), *(trace_ids or [])]
    if not ids and tag is None:
        named = "trace_id, trace_ids or tag" if tool == "stop_trace" else "trace_ids or tag"
        raise ToolError(f"{tool} needs {named}.")
    for tid in trace_ids or []:
        if not is_trace_id(tid):
            raise ToolError(
                f"Argument 'trace_ids' of {tool} must hold trace ids (32 hex characters, as create_trace "
                f"returned them); got {elide(tid)}."
            )
    for tid in dict.fromkeys(ids):
        await engine.get(tid)  # an unknown id: a tool error, and nothing has been stopped yet
    if tag is not None:
        statuses = [None] if every else [Status.RUNNING.value, Status.NEEDS_INPUT.value]
        for status in statuses:
            cursor: str | None = None
            while True:  # every page: a tag's oldest traces count as much as its newest
                page = await engine.list_traces(status=status, tag=tag, limit=TAG_PAGE, cursor=cursor)
                ids += [t.trace_id for t in page.traces]
                if len(ids) > MAX_TAGGED_TRACES:
                    raise ToolError(
                        f"Tag {elide(tag)} names more than {MAX_TAGGED_TRACES:,} traces, too many for one "
                        f"{tool} call: name them with trace_ids (up to 500 a call) instead."
                    )
                if (cursor := page.next_cursor) is None:
                    break
    return list(dict.fromkeys(ids))


async def wait_with_progress(
    engine: Engine, ctx: Context, trace_id: str, wait_seconds: float, after_sequence: int | None
) -> Trace:
    """Wait for the trace to stop running, reporting each stored message as progress (and a heartbeat)."""
    lines, reports = ProgressLines(engine), Progress(ctx)

    async def progress(message: Message) -> None:
        await reports.send(await lines.line(trace_id, message))

    async def beat() -> None:
        await reports.send("still running")

    trace = await engine.wait(trace_id, wait_seconds, progress, after_sequence=after_sequence, on_idle=beat)
    await reports.settle()
    return trace


async def patch_tools_list(result: Any, state: ServerState) -> Any:
    """tools/list: create_trace/run_trace are destructive unless every tool the agent could call only reads;
    wait_seconds, and the waits descriptions suggest, follow this server's own --max-wait; the schemas
    are concise (``concise_schema``)."""
    read_only = state.engine.agent_is_read_only()
    max_wait = state.engine.settings.max_wait
    suggested = f"wait_seconds={suggested_wait(max_wait)}"
    tools = result.get("tools") if isinstance(result, dict) else getattr(result, "tools", None)
    for tool in tools or []:
        name = tool.get("name") if isinstance(tool, dict) else tool.name
        if isinstance(tool, dict):
            for key in ("inputSchema", "outputSchema"):
                if isinstance(tool.get(key), dict):
                    tool[key] = concise_schema(tool[key])
        else:
            tool.input_schema = concise_schema(tool.input_schema)
            if tool.output_schema is not None:
                tool.output_schema = concise_schema(tool.output_schema)
        schema = tool.get("inputSchema") if isinstance(tool, dict) else tool.input_schema
        wait = ((schema or {}).get("properties") or {}).get("wait_seconds")
        if isinstance(wait, dict):
            wait["description"] = wait_description(max_wait)
        description = tool.get("description") if isinstance(tool, dict) else tool.description
        if description and "wait_seconds=" in description:
            description = SUGGESTED_WAIT.sub(suggested, description)
            if isinstance(tool, dict):
                tool["description"] = description
            else:
                tool.description = description
        if name not in AGENT_TOOLS:
            continue
        if isinstance(tool, dict):
            tool.setdefault("annotations", {})["destructiveHint"] = not read_only
        elif tool.annotations is not None:
            tool.annotations = tool.annotations.model_copy(update={"destructive_hint": not read_only})
    return result


def concise_schema(node: Any) -> Any:
    """A schema without what pydantic adds for people: each ``title`` (the property's own name again) and
    ``default: null`` (an optional argument says so by not being required). Every host reads tools/list
    into its model's context: this is about a sixth of it, and no validation changes."""
    if isinstance(node, list):
        return [concise_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {
        key: concise_schema(value)
        for key, value in node.items()
        if not (key == "title" and isinstance(value, str)) and not (key == "default" and value is None)
    }
