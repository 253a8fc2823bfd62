"""AgentRunner and RunConfig: the tool-calling loop over a stored trace, with continue, rewind, stop.

Every message is committed before anyone hears of it; a stop cancels the model or tool call in flight and
closes open tool calls so the stored conversation stays valid to send to a model again.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup
from pydantic import BaseModel, Field

from agent.core.messages import check_placement, open_tool_calls, parse_messages
from agent.core.rewind import cut_point
from agent.errors import InvalidMessages, ModelCallError, SequenceError, ToolCallError, TraceRunning
from agent.llm.base import Model, ModelResponse, resolve_model
from agent.tools.registry import Tool, ToolRegistry, openai_tool_schema
from agent.trace.events import EventBus, MessageStored, TraceChanged
from agent.trace.models import Message, NewMessage, Status, StopReason, ToolCall, Trace, TraceConfig
from agent.trace.store import TraceStore

log = logging.getLogger(__name__)

DEFAULT_MODEL = "openai:gpt-4o"
DEFAULT_SYSTEM_PROMPT = "You are a capable agent. Use the tools offered when they help, and answer concisely."
CANCELLED_TOOL_RESULT = "Cancelled: the trace was stopped before this tool call finished."
UNFINISHED_TOOL_RESULT = "Not run: the previous run ended before this tool call finished."
MAX_TOOL_RESULT_CHARS = 100_000


class RunConfig(BaseModel):
    """How to run. For a new trace, None means the product default; for an existing one, keep the trace's."""

    model: str | None = Field(
        None, description="'provider:name', e.g. 'openai:gpt-4o', 'anthropic:…', 'offline'"
    )
    temperature: float | None = Field(None, ge=0, le=2)
    max_iterations: int | None = Field(None, ge=1, le=10_000)
    system_prompt: str | None = None
    tools: list[str] | None = None
    name: str | None = None
    uid: str | None = None
    trace_id: str | None = None
    insert_after: int | None = None
    recall: int | None = Field(None, ge=0)
    reflect: bool | None = None


@dataclass
class SystemPrompt:
    text: str
    lessons: list[str] = field(default_factory=list)


SystemPromptBuilder = Callable[[str, RunConfig], Awaitable[SystemPrompt]]
"""Builds a new trace's system prompt from its task text when the caller gave none."""


async def default_system_prompt(task: str, config: RunConfig) -> SystemPrompt:
    return SystemPrompt(DEFAULT_SYSTEM_PROMPT)


class RunResult(BaseModel):
    trace: Trace
    messages: list[Message] = Field(description="the messages this run stored, in order")
    error: str | None = Field(None, description="why this run failed, when it did")

    @property
    def answer(self) -> str | None:
        return last_answer(self.messages)


def last_answer(messages: Sequence[Message]) -> str | None:
    """The text of the last assistant message that has any."""
    for message in reversed(messages):
        if message.role == "assistant" and message.content:
            return message.content
    return None


@dataclass
class _ActiveRun:
    """A trace being run: the handle ``stop`` reaches, and the scope of the call in flight."""

    trace_id: str
    stop_requested: bool = False
    scope: anyio.CancelScope | None = None
    done: anyio.Event = field(default_factory=anyio.Event)

    def stop(self) -> None:
        self.stop_requested = True
        if self.scope is not None:
            self.scope.cancel()

    @contextmanager
    def guard(self):
        """Run one model or tool step so that ``stop`` cancels it."""
        with anyio.CancelScope() as scope:
            self.scope = scope
            if self.stop_requested:
                scope.cancel()
            try:
                yield scope
            finally:
                self.scope = None


@dataclass
class _Plan:
    """Everything a validated run needs; built before the loop starts."""

    trace: Trace
    model: Model
    tools: list[Tool]
    context: list[Message]
    active: _ActiveRun
    max_iterations: int
    restore: Trace | None = None  # set for side-branch runs: the head and status to put back
    outcome: tuple[Status, StopReason, str | None] | None = None  # how this run itself ended
    wire: dict[int, dict[str, Any]] = field(default_factory=dict)  # OpenAI form of each message, by sequence

    def model_messages(self) -> list[dict[str, Any]]:
        """The active path as the model receives it (each message converted once per run)."""
        for message in self.context:
            if message.sequence not in self.wire:
                self.wire[message.sequence] = message.to_openai()
        return [self.wire[m.sequence] for m in self.context]


class AgentRunner:
    def __init__(
        self,
        store: TraceStore,
        *,
        tools: ToolRegistry | None = None,
        events: EventBus | None = None,
        models: Callable[[str], Model] = resolve_model,
        default_model: str = DEFAULT_MODEL,
        system_prompt: SystemPromptBuilder = default_system_prompt,
        tool_timeout: float | None = 300.0,
    ):
        self.store = store
        self.tools = tools if tools is not None else ToolRegistry()
        self.events = events if events is not None else EventBus()
        self.default_model = default_model
        self._models = models
        self._model_cache: dict[str, Model] = {}
        self._system_prompt = system_prompt
        self._tool_timeout = tool_timeout
        self._active: dict[str, _ActiveRun] = {}

    # -- public API -----------------------------------------------------------------------------

    def running(self) -> list[str]:
        return list(self._active)

    def is_running(self, trace_id: str) -> bool:
        return trace_id in self._active

    def stop(self, trace_id: str) -> bool:
        """Ask a running trace to stop; returns False when it was not running."""
        active = self._active.get(trace_id)
        if active is None:
            return False
        active.stop()
        return True

    async def wait(self, trace_id: str) -> None:
        """Return when the trace is not running (at once if it is not)."""
        active = self._active.get(trace_id)
        if active is not None:
            await active.done.wait()

    def model(self, spec: str | None = None) -> Model:
        """The Model for a spec (cached), raising ModelConfigError at once when it cannot be used."""
        spec = spec or self.default_model
        if spec not in self._model_cache:
            self._model_cache[spec] = self._models(spec)
        return self._model_cache[spec]

    async def start(
        self,
        messages: Sequence[Any],
        config: RunConfig,
        task_group: TaskGroup,
        after: Callable[[Trace], Awaitable[None]] | None = None,
    ) -> Trace:
        """Validate and store, then run in ``task_group``; returns the stored trace at once.

        ``after`` is awaited with the final trace when the run has ended (e.g. to reflect on it).
        """
        plan = await self._prepare(messages, config)

        async def drive() -> None:
            final = plan.trace
            async with aclosing(self._loop(plan)) as steps:
                async for item in steps:
                    if isinstance(item, Trace):
                        final = item
            if after is not None:
                try:
                    await after(final)
                except Exception:
                    log.exception("after-run hook failed for trace %s", final.trace_id)

        task_group.start_soon(drive, name=f"trace {plan.trace.trace_id}")
        return plan.trace

    async def run(self, messages: Sequence[Any], config: RunConfig) -> AsyncIterator[Trace | Message]:
        """Run in the caller's task: yields the stored Trace, each message as stored, then the final Trace."""
        plan = await self._prepare(messages, config)
        looping = False
        try:
            yield plan.trace
            looping = True
            async with aclosing(self._loop(plan)) as steps:
                async for item in steps:
                    yield item
        finally:
            if not looping:  # the caller walked away before the loop began
                with anyio.CancelScope(shield=True):
                    await self._finish(plan, Status.STOPPED, StopReason.STOPPED, None)

    async def run_result(self, messages: Sequence[Any], config: RunConfig) -> RunResult:
        """Run to the end and return the final trace with the messages this run stored."""
        trace: Trace | None = None
        stored: list[Message] = []
        async with aclosing(self.run(messages, config)) as steps:
            async for item in steps:
                if isinstance(item, Trace):
                    trace = item
                else:
                    stored.append(item)
        assert trace is not None
        return RunResult(trace=trace, messages=stored)

    async def run_side_branch(self, trace_id: str, prompt: str, *, max_iterations: int = 1) -> RunResult:
        """Ask the trace's model one more question on a branch off the head, then put the head and status back.

        Used for reflection: the main path is untouched, the branch stays stored in the tree.
        """
        plan = await self._prepare(
            [{"role": "user", "content": prompt}],
            RunConfig(trace_id=trace_id),
            side=True,
            action="reflect on",
        )
        plan.tools = []
        plan.max_iterations = max_iterations
        stored: list[Message] = []
        final = plan.trace
        async with aclosing(self._loop(plan)) as steps:
            async for item in steps:
                if isinstance(item, Trace):
                    final = item
                else:
                    stored.append(item)
        error = plan.outcome[2] if plan.outcome else None
        if plan.outcome and plan.outcome[0] is Status.STOPPED:
            error = f"The run on trace '{trace_id}' was stopped before it answered."
        return RunResult(trace=final, messages=stored, error=error)

    # -- preparing a run ------------------------------------------------------------------------

    def _claim(self, trace_id: str, action: str = "run") -> _ActiveRun:
        if trace_id in self._active:
            raise TraceRunning(trace_id, action)
        active = self._active[trace_id] = _ActiveRun(trace_id)
        return active

    def _release(self, active: _ActiveRun) -> None:
        if self._active.get(active.trace_id) is active:
            del self._active[active.trace_id]
        active.done.set()

    async def _prepare(
        self, raw_messages: Sequence[Any], config: RunConfig, *, side: bool = False, action: str = "run"
    ) -> _Plan:
        """Check everything, then store: a refused run changes nothing."""
        messages = parse_messages(raw_messages)
        if config.trace_id is None:
            return await self._prepare_new(messages, config)
        active = self._claim(config.trace_id, action)
        try:
            return await self._prepare_existing(messages, config, active, side)
        except BaseException:
            self._release(active)
            raise

    async def _prepare_new(self, messages: list[NewMessage], config: RunConfig) -> _Plan:
        if not messages:
            raise InvalidMessages("A new trace needs at least one message (or a prompt).")
        if config.insert_after is not None:
            raise SequenceError(
                "insert_after applies to an existing trace; give trace_id too, or leave it out."
            )
        spec = config.model or self.default_model
        model = self.model(spec)
        self.tools.check_whitelist(config.tools)
        check_placement([], messages)
        trace_config = TraceConfig(
            temperature=0.3 if config.temperature is None else config.temperature,
            max_iterations=config.max_iterations or 200,
            system_prompt=config.system_prompt,
            tools=config.tools,
            recall=config.recall,
            reflect=bool(config.reflect),
        )
        lessons: list[str] = []
        if messages[0].role != "system":
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
            model=spec,
            config=trace_config,
            lessons=lessons,
        )
        active = self._claim(trace.trace_id)
        try:
            await self.store.create_trace(trace)
            self.events.publish(TraceChanged(trace, created=True))
            context: list[Message] = []
            parent = None
            for message in messages:
                stored = await self._append(trace.trace_id, message, parent)
                context.append(stored)
                parent = stored.sequence
            trace = await self.store.get_trace(trace.trace_id)
        except BaseException:
            self._release(active)
            raise
        return _Plan(
            trace, model, self.tools.select(config.tools), context, active, trace_config.max_iterations
        )

    async def _prepare_existing(
        self, messages: list[NewMessage], config: RunConfig, active: _ActiveRun, side: bool
    ) -> _Plan:
        trace_id = config.trace_id
        assert trace_id is not None
        trace = await self.store.get_trace(trace_id)
        parent = trace.head_sequence
        if config.insert_after is not None:
            parent = await cut_point(self.store, trace, config.insert_after)
        context = await self.store.get_path(trace_id, parent) if parent is not None else []
        model = self.model(config.model or trace.model)
        if config.tools is not None:
            self.tools.check_whitelist(config.tools)
        check_placement(context, messages)

        trace_config = trace.config.model_copy(
            update={
                k: v
                for k, v in {
                    "temperature": config.temperature,
                    "max_iterations": config.max_iterations,
                    "tools": config.tools,
                }.items()
                if v is not None
            }
        )
        restore = trace if side else None
        trace = await self.store.update_trace(
            trace_id,
            status=Status.RUNNING,
            stop_reason=None,
            error=None,
            head_sequence=parent,
            config=trace_config,
            model=model.name if config.model else trace.model,
        )
        self.events.publish(TraceChanged(trace))
        if messages and open_tool_calls(context) and messages[0].role != "tool":
            context += await self._close_open_calls(trace_id, context, UNFINISHED_TOOL_RESULT)
        for message in messages:
            stored = await self._append(trace_id, message, context[-1].sequence if context else None)
            context.append(stored)
        trace = await self.store.get_trace(trace_id)
        return _Plan(
            trace,
            model,
            self.tools.select(trace_config.tools),
            context,
            active,
            trace_config.max_iterations,
            restore,
        )

    # -- the loop -------------------------------------------------------------------------------

    async def _append(self, trace_id: str, message: NewMessage, parent: int | None) -> Message:
        stored = await self.store.append_message(trace_id, message, parent)
        self.events.publish(MessageStored(trace_id, stored))
        return stored

    async def _close_open_calls(self, trace_id: str, context: list[Message], text: str) -> list[Message]:
        closed = []
        for call_id in open_tool_calls(context + closed):
            tool_message = NewMessage(role="tool", tool_call_id=call_id, content=text)
            closed.append(await self._append(trace_id, tool_message, (context + closed)[-1].sequence))
        return closed

    async def _loop(self, plan: _Plan) -> AsyncIterator[Trace | Message]:
        trace_id = plan.trace.trace_id
        active = plan.active
        status, stop_reason, error = Status.COMPLETED, StopReason.END_TURN, None
        try:
            iterations = 0
            while True:
                pending = self._pending_calls(plan.context)
                if pending:
                    for stored in await self._run_tool_calls(plan, pending):
                        yield stored
                if active.stop_requested:
                    break
                if iterations >= plan.max_iterations:
                    stop_reason = StopReason.MAX_ITERATIONS
                    break
                response = await self._call_model(plan)
                iterations += 1
                if response is not None:
                    assistant = NewMessage(
                        role="assistant",
                        content=response.content,
                        tool_calls=response.tool_calls or None,
                        usage=response.usage,
                    )
                    stored = await self._append(trace_id, assistant, plan.context[-1].sequence)
                    plan.context.append(stored)
                    yield stored
                if active.stop_requested:
                    break
                if response is not None and not response.tool_calls:
                    break
        except ModelCallError as exc:
            status, stop_reason, error = Status.FAILED, StopReason.ERROR, str(exc)
        except anyio.get_cancelled_exc_class():
            status, stop_reason = Status.INTERRUPTED, StopReason.INTERRUPTED
            raise
        except GeneratorExit:
            status, stop_reason = Status.STOPPED, StopReason.STOPPED
            raise
        except Exception as exc:
            log.exception("run of trace %s failed", trace_id)
            status, stop_reason = Status.FAILED, StopReason.ERROR
            error = f"The run failed with an internal error ({type(exc).__name__}); the server log has the details."
        finally:
            with anyio.CancelScope(shield=True):
                if active.stop_requested and status is Status.COMPLETED:
                    status, stop_reason = Status.STOPPED, StopReason.STOPPED
                final = await self._finish(plan, status, stop_reason, error)
        yield final

    async def _finish(self, plan: _Plan, status: Status, stop_reason: StopReason, error: str | None) -> Trace:
        trace_id = plan.trace.trace_id
        plan.outcome = (status, stop_reason, error)
        try:
            if open_tool_calls(plan.context):
                text = CANCELLED_TOOL_RESULT if status is Status.STOPPED else UNFINISHED_TOOL_RESULT
                plan.context += await self._close_open_calls(trace_id, plan.context, text)
            if plan.restore is not None:
                old = plan.restore
                final = await self.store.update_trace(
                    trace_id,
                    status=old.status,
                    stop_reason=old.stop_reason,
                    error=old.error,
                    head_sequence=old.head_sequence,
                )
            else:
                final = await self.store.update_trace(
                    trace_id, status=status, stop_reason=stop_reason, error=error
                )
            self.events.publish(TraceChanged(final))
            return final
        finally:
            self._release(plan.active)

    def _pending_calls(self, context: list[Message]) -> list[ToolCall]:
        open_ids = open_tool_calls(context)
        if not open_ids:
            return []
        last_assistant = next(m for m in reversed(context) if m.role == "assistant")
        return [c for c in last_assistant.tool_calls or [] if c.id in open_ids]

    async def _call_model(self, plan: _Plan) -> ModelResponse | None:
        """One model call that ``stop`` cancels; a stopped call keeps its streamed text (None if there was none)."""
        partial: list[str] = []
        messages = plan.model_messages()
        schemas = [openai_tool_schema(t) for t in plan.tools]
        with plan.active.guard():
            return await plan.model.complete(
                messages, schemas, temperature=plan.trace.config.temperature, on_text=partial.append
            )
        text = "".join(partial)
        return ModelResponse(content=text) if text else None

    async def _run_tool_calls(self, plan: _Plan, calls: list[ToolCall]) -> list[Message]:
        """Run calls concurrently; store each result as soon as all earlier ones are stored (call order)."""
        trace_id = plan.trace.trace_id
        results: list[str | None] = [None] * len(calls)
        stored: list[Message] = []
        lock = anyio.Lock()

        async def flush() -> None:
            async with lock:
                while len(stored) < len(calls) and results[len(stored)] is not None:
                    call = calls[len(stored)]
                    message = NewMessage(role="tool", tool_call_id=call.id, content=results[len(stored)])
                    saved = await self._append(trace_id, message, plan.context[-1].sequence)
                    plan.context.append(saved)
                    stored.append(saved)

        async def run_one(index: int, call: ToolCall) -> None:
            results[index] = await self._call_tool(plan, call)
            with anyio.CancelScope(shield=True):
                await flush()

        try:
            with plan.active.guard():
                async with anyio.create_task_group() as group:
                    for index, call in enumerate(calls):
                        group.start_soon(run_one, index, call)
        finally:
            with anyio.CancelScope(shield=True):
                for index in range(len(calls)):
                    if results[index] is None:
                        results[index] = CANCELLED_TOOL_RESULT
                await flush()
        return stored

    async def _call_tool(self, plan: _Plan, call: ToolCall) -> str:
        """The text the model reads back: the tool's result, or a sentence saying why there is none."""
        name = call.function.name
        tool = next((t for t in plan.tools if t.name == name), None)
        if tool is None or self.tools.get(name) is None:
            offered = ", ".join(t.name for t in plan.tools) or "none"
            return f"Error: there is no tool named '{name}' for this trace. Tools offered: {offered}."
        try:
            arguments = call.function.parsed_arguments()
        except ValueError as exc:
            return f"Error: the arguments for {name} were not a valid JSON object ({exc}); call it again with valid JSON."
        try:
            with anyio.fail_after(self._tool_timeout):
                result = await tool.call(arguments)
        except ToolCallError as exc:
            return f"Error: {exc}"
        except TimeoutError:
            return f"Error: {name} did not finish within {self._tool_timeout:g} s and was cancelled."
        except Exception as exc:
            log.warning("tool %s raised for trace %s", name, plan.trace.trace_id, exc_info=True)
            return f"Error: {name} failed: {type(exc).__name__}: {exc}"
        if len(result) > MAX_TOOL_RESULT_CHARS:
            result = result[:MAX_TOOL_RESULT_CHARS] + f"\n[truncated: {len(result)} characters in all]"
        return result
