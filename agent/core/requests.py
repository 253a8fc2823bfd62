"""Run requests: a request to run is checked completely and turned into what a run works with, before
anything is written — so a refused run changes nothing.

A new trace (its system prompt built from skills and recalled lessons, or forked from another trace's
path), or an existing one: continued, rewound (``insert_after``), answered (``answer``/``approve`` on a
paused trace), with per-run overrides stored with it.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from agent import defaults
from agent.core.messages import check_placement, ends_in_answer, open_tool_calls, parse_messages
from agent.core.rewind import cut_point
from agent.core.run import Run, Segment, cut_off_result, pending_calls
from agent.core.typed import check_schema
from agent.errors import InvalidMessages, SequenceError
from agent.llm.base import Model
from agent.llm.windows import context_window
from agent.tools.ask import ASK_HOST, AskHostTool
from agent.tools.registry import ToolRegistry
from agent.trace import compaction
from agent.trace.models import ForkPoint, Message, NewMessage, Status, Trace, TraceConfig
from agent.trace.store import TraceStore

DEFAULT_SYSTEM_PROMPT = "You are a capable agent. Use the tools offered when they help, and answer concisely."


class RunConfig(BaseModel):
    """How to run. For a new trace, None means the product default; for an existing one, keep the trace's."""

    model: str | None = Field(
        None, description="'provider:name', e.g. 'openai:gpt-4o', 'anthropic:…', 'offline'"
    )
    temperature: float | None = Field(None, ge=0, le=2)
    max_iterations: int | None = Field(None, ge=1, le=defaults.MAX_ITERATIONS_LIMIT)
    system_prompt: str | None = None
    tools: list[str] | None = None
    name: str | None = None
    uid: str | None = None
    tags: list[str] | None = None
    trace_id: str | None = None
    insert_after: int | None = None
    recall: int | None = Field(None, ge=0)
    reflect: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    timeout_seconds: float | None = Field(None, gt=0)
    output_schema: dict[str, Any] | None = None
    ask_host: bool | None = None
    confirm_tools: list[str] | None = None
    from_trace: str | None = None
    from_sequence: int | None = None
    answer: str | None = None
    approve: bool | None = None


@dataclass
class SystemPrompt:
    text: str
    lessons: list[str] = field(default_factory=list)


SystemPromptBuilder = Callable[[str, RunConfig], Awaitable[SystemPrompt]]
"""Builds a new trace's system prompt from its task text when the caller gave none."""


async def default_system_prompt(task: str, config: RunConfig) -> SystemPrompt:
    return SystemPrompt(DEFAULT_SYSTEM_PROMPT)


@dataclass
class Request:
    """A validated run request: everything ``_commit`` writes, nothing written yet."""

    segment: Segment
    new: Trace | None = None  # a new trace, created with ``messages``
    head: int | None = None  # an existing trace: where the new messages go
    messages: list[NewMessage] = field(default_factory=list)
    behind: Run | None = None  # a local run reflecting on the trace: queue behind it


QueueBehind = Callable[[str, str], Awaitable[Run | None]]
"""Finds a local run reflecting on a trace, for a continuation to queue behind (or refuses)."""


class Requests:
    """Checks run requests against the store and the tools, and builds their Segment."""

    def __init__(
        self,
        store: TraceStore,
        tools: ToolRegistry,
        model: Callable[[str | None], Model],
        *,
        default_model: str,
        system_prompt: SystemPromptBuilder,
        context_tokens: int | None,
        queue_behind: QueueBehind,
    ):
        self._store = store
        self._tools = tools
        self._model = model
        self._default_model = default_model
        self._system_prompt = system_prompt
        self._context_tokens = context_tokens
        self._queue_behind = queue_behind
        self._ask_host = AskHostTool()

    async def prepare(self, raw_messages: Sequence[Any], config: RunConfig, action: str = "run") -> Request:
        """Check everything; write nothing (a refused run changes nothing)."""
        messages = parse_messages(raw_messages)
        if config.trace_id is None:
            return await self._new(messages, config)
        return await self._existing(messages, config, action)

    def segment(
        self, trace: Trace, model: Model, context: list[Message], approved: frozenset[str] = frozenset()
    ) -> Segment:
        """What a run of ``trace`` works with, from its stored config."""
        config = trace.config
        tools = [t for t in self._tools.select(config.tools) if t.name != ASK_HOST]
        if config.ask_host:
            tools.append(self._ask_host)
        return Segment(
            trace,
            model,
            tools,
            context,
            config.max_iterations,
            config.reflect,
            confirm=frozenset(config.confirm_tools or ()),
            approved=approved,
            max_tokens=config.max_tokens,
            timeout_seconds=config.timeout_seconds,
            output_schema=config.output_schema,
            context_tokens=compaction.budget_for(self._context_tokens, context_window(model.name)),
        )

    async def _new(self, messages: list[NewMessage], config: RunConfig) -> Request:
        if config.insert_after is not None:
            raise SequenceError(
                "insert_after applies to an existing trace; give trace_id too, or leave it out."
            )
        if config.answer is not None or config.approve is not None:
            raise InvalidMessages("answer and approve reply to a paused trace: use them with run_trace.")
        source: Trace | None = None
        copied: list[NewMessage] = []
        fork_head: int | None = None
        if config.from_trace is not None:
            source, copied, fork_head = await self._fork_prefix(config, nothing_new=not messages)
        elif config.from_sequence is not None:
            raise SequenceError("from_sequence needs from_trace: the trace to fork.")
        if not messages and not copied:
            raise InvalidMessages("A new trace needs at least one message (or a prompt).")
        spec = config.model or (source.model if source else self._default_model)
        model = self._model(spec)
        self._tools.check_whitelist(config.tools)
        self._tools.check_whitelist(config.confirm_tools, argument="confirm_tools")
        if config.output_schema is not None:
            check_schema(config.output_schema)
        if source is not None:  # a call left open in the source is closed before the fork's own messages
            at_head = fork_head == source.head_sequence
            copied.extend(closing_results(copied, messages, at_head and source.status is Status.STOPPED))
        check_placement(copied, messages)
        base = source.config if source is not None else TraceConfig()
        given = {
            "temperature": config.temperature,
            "max_iterations": config.max_iterations,
            "system_prompt": config.system_prompt,
            "tools": config.tools,
            "recall": config.recall,
            "reflect": config.reflect,
            "max_tokens": config.max_tokens,
            "timeout_seconds": config.timeout_seconds,
            "output_schema": config.output_schema,
            "ask_host": config.ask_host,
            "confirm_tools": config.confirm_tools,
        }
        trace_config = base.model_copy(update={k: v for k, v in given.items() if v is not None})
        lessons: list[str] = list(source.lessons) if source is not None else []
        if not copied and messages[0].role != "system":
            if config.system_prompt is not None:
                prompt = SystemPrompt(config.system_prompt)
            else:
                task = "\n".join(m.content or "" for m in messages if m.role == "user")
                prompt = await self._system_prompt(task, config)
            lessons = prompt.lessons
            messages.insert(0, NewMessage(role="system", content=prompt.text))
        trace = Trace(
            trace_id=secrets.token_hex(16),
            name=config.name,
            uid=config.uid,
            tags=list(dict.fromkeys(config.tags or [])),
            model=model.name if config.model else spec,
            config=trace_config,
            lessons=lessons,
            forked_from=ForkPoint(trace_id=source.trace_id, sequence=fork_head or 0)
            if source is not None
            else None,
        )
        return Request(self.segment(trace, model, []), new=trace, messages=[*copied, *messages])

    async def _fork_prefix(
        self, config: RunConfig, nothing_new: bool
    ) -> tuple[Trace, list[NewMessage], int | None]:
        """The source trace, copies of its path up to ``from_sequence`` (past its tool results), and
        the source sequence the copies end at. The source is only read."""
        assert config.from_trace is not None
        source = await self._store.get_trace(config.from_trace)
        if config.from_sequence is None:
            head = source.head_sequence
        else:
            head = await cut_point(self._store, source, config.from_sequence, "from_sequence")
        path = await self._store.get_path(source.trace_id, head) if head is not None else []
        if nothing_new and ends_in_answer(path):
            head, path = path[-1].parent_sequence, path[:-1]  # a fork with nothing new regenerates the answer
        fields = {"role", "content", "tool_calls", "tool_call_id", "name"}
        copies = [  # compaction records name the source's sequences: the fork compacts on its own
            NewMessage.model_validate(m.model_dump(include=fields))
            for m in path
            if compaction.compaction_of(m) is None
        ]
        return source, copies, head

    async def _existing(self, messages: list[NewMessage], config: RunConfig, action: str) -> Request:
        trace_id = config.trace_id
        assert trace_id is not None
        if config.from_trace is not None or config.from_sequence is not None:
            raise InvalidMessages("from_trace forks into a new trace: use it with create_trace.")
        behind = await self._queue_behind(trace_id, action)
        trace = await self._store.get_trace(trace_id)  # read after the run ahead has written its answer
        head = trace.head_sequence
        if config.insert_after is not None:
            head = await cut_point(self._store, trace, config.insert_after)
        context = await self._store.get_path(trace_id, head) if head is not None else []
        model = self._model(config.model or trace.model)
        if config.tools is not None:
            self._tools.check_whitelist(config.tools)
        changes = {
            "temperature": config.temperature,
            "max_iterations": config.max_iterations,
            "tools": config.tools,
            "max_tokens": config.max_tokens,
            "timeout_seconds": config.timeout_seconds,
        }
        trace_config = trace.config.model_copy(update={k: v for k, v in changes.items() if v is not None})
        trace = trace.model_copy(
            update={"config": trace_config, "model": model.name if config.model else trace.model}
        )
        replies, approved = self._replies(trace, context, config, messages)
        if not messages and not replies and ends_in_answer(context):
            head, context = context[-1].parent_sequence, context[:-1]  # regenerate that answer
        check_placement(context, [*replies, *messages])
        messages = [*replies, *messages]
        stopped = trace.status is Status.STOPPED  # a call the host stopped is not run again by going on
        messages = [*closing_results(context, messages, stopped), *messages]
        return Request(
            self.segment(trace, model, context, approved), head=head, messages=messages, behind=behind
        )

    def _replies(
        self, trace: Trace, context: list[Message], config: RunConfig, messages: list[NewMessage]
    ) -> tuple[list[NewMessage], frozenset[str]]:
        """The host's answer or approval for a paused trace: tool results to store, calls to run."""
        tid = trace.trace_id
        if config.answer is None and config.approve is None:
            if trace.status is Status.NEEDS_INPUT and not messages and config.insert_after is None:
                raise InvalidMessages(
                    f"Trace '{tid}' is waiting for input: reply with answer (approve=true or false for a "
                    "tool approval), or send messages to go on without one."
                )
            return [], frozenset()
        if config.insert_after is not None:
            raise InvalidMessages(
                "answer and approve reply to the question at the trace's head; they cannot be combined with "
                "insert_after."
            )
        if trace.status is not Status.NEEDS_INPUT:
            raise InvalidMessages(
                f"Trace '{tid}' is not waiting for input (it is {trace.status.value}); answer and approve reply to "
                "a trace whose outcome is needs_input."
            )
        if config.approve and messages:
            raise InvalidMessages(
                "approve=true runs the tool call that waits; send messages in a later run_trace, not with it."
            )
        segment = self.segment(trace, self._model(trace.model), context)
        waiting = pending_calls(context)
        asks = [c for c in waiting if c.function.name == ASK_HOST]
        approvals = [c for c in waiting if c.function.name != ASK_HOST and segment.needs_approval(c)]
        if config.approve is not None:
            if not approvals:
                raise InvalidMessages(
                    f"Trace '{tid}' has no tool call waiting for approval; answer its question instead."
                )
            if config.approve:
                if config.answer is None:
                    return [], frozenset(c.id for c in approvals)
                if not asks:  # an answer with approve=true would be lost: say so rather than drop it
                    raise InvalidMessages(
                        f"Trace '{tid}' asks no question, so approve=true takes no answer (answer is the "
                        "reason only with approve=false)."
                    )
                answered = [NewMessage(role="tool", tool_call_id=c.id, content=config.answer) for c in asks]
                return answered, frozenset(c.id for c in approvals)
            reason = (config.answer or "").strip() or "no reason given"
            declined = [
                NewMessage(role="tool", tool_call_id=c.id, content=f"declined: {reason}") for c in approvals
            ]
            return declined, frozenset()
        if not asks:
            raise InvalidMessages(
                f"Trace '{tid}' asks no question; it waits for a tool approval: pass approve=true or approve=false."
            )
        answer = config.answer or ""
        return [NewMessage(role="tool", tool_call_id=c.id, content=answer) for c in asks], frozenset()


def closing_results(
    context: Sequence[Message | NewMessage], messages: list[NewMessage], stopped: bool
) -> list[NewMessage]:
    """Tool results for the calls ``context`` leaves open, when going on would otherwise leave them
    dangling (new messages follow, or the host stopped them: a stopped call is not run again). None when
    the new messages are themselves tool results, or when nothing new comes and the calls may still run."""
    open_ids = open_tool_calls(context)
    if not open_ids or not (messages or stopped) or (messages and messages[0].role == "tool"):
        return []
    text = cut_off_result(stopped=stopped)
    return [NewMessage(role="tool", tool_call_id=call_id, content=text) for call_id in open_ids]
