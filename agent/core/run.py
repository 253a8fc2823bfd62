"""One run of the agent loop on a claimed trace: its state and its steps, read top to bottom.

    claimed ─► tool step (calls still open) ─► model step ─► calls made? ─yes─► tool step ─► …
                                                   │ no: an answer
                                                   ▼
                                      finish (status written, claim kept if a reflection follows)
                                                   ▼
                                      reflect on a side branch (reflect=true) ─► release the claim
                                                   ▼
                                      a continuation queued meanwhile? ─yes─► claimed again, same token

A step may also end the run early: stop (local, or asked by another process through the store) ends it
``stopped``; ``max_iterations`` ends it ``completed``/``max_iterations``; a provider error or two empty
replies end it ``failed``; cancellation (the server shutting down) ends it ``interrupted``; a bug ends it
``failed`` with a sentence. Whatever happens, the finish closes open tool calls so the stored
conversation is always one a provider accepts. Every step yields the events it stored, in order.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from agent import defaults
from agent.core.messages import open_tool_calls
from agent.errors import ModelCallError, ToolCallError
from agent.llm.base import Model, ModelResponse
from agent.tools.registry import Tool, ToolRegistry, openai_tool_schema
from agent.trace.events import MessageStored, TraceChanged, TraceEvent
from agent.trace.models import Message, NewMessage, Status, StopReason, ToolCall, Trace
from agent.trace.store import ClaimLost, TraceStore

log = logging.getLogger(__name__)

CANCELLED_TOOL_RESULT = "Cancelled: the trace was stopped before this tool call finished."
UNFINISHED_TOOL_RESULT = "Not run: the previous run ended before this tool call finished."
EMPTY_REPLY_ERROR = "The model gave an empty reply (no text and no tool calls) twice in a row."


@dataclass(frozen=True)
class Outcome:
    """How a run ended: what ``finish`` writes."""

    status: Status
    stop_reason: StopReason
    error: str | None = None

    @classmethod
    def answered(cls) -> Outcome:
        return cls(Status.COMPLETED, StopReason.END_TURN)

    @classmethod
    def failed(cls, error: str) -> Outcome:
        return cls(Status.FAILED, StopReason.ERROR, error)


ANSWERED = Outcome.answered()
STOPPED = Outcome(Status.STOPPED, StopReason.STOPPED)
INTERRUPTED = Outcome(Status.INTERRUPTED, StopReason.INTERRUPTED)
MAX_ITERATIONS = Outcome(Status.COMPLETED, StopReason.MAX_ITERATIONS)


class EmptyReply(Exception):
    """The model answered with nothing at all."""


@dataclass
class Segment:
    """What one pass of the loop works with: set when the run is claimed, again for a continuation."""

    trace: Trace
    model: Model
    tools: list[Tool]
    context: list[Message]
    max_iterations: int
    reflect: bool = False


Reflector = Callable[[Trace, int], Awaitable[list[TraceEvent]]]
"""Reflects on a trace up to a head on a side branch; returns the events it stored."""


@dataclass(eq=False)
class Run:
    """A claimed trace being run; ``stop`` is the local handle the runner (and the change feed) reach."""

    store: TraceStore
    registry: ToolRegistry
    token: str
    segment: Segment
    tool_timeout: float | None = defaults.TOOL_TIMEOUT_SECONDS
    reflector: Reflector | None = None
    state: str = "claimed"
    """claimed → running → finishing → reflecting (claim kept) → done"""
    queued: Segment | None = None
    stop_requested: bool = False
    lost: bool = False
    holding: bool = False
    outcome: Outcome | None = None
    finished: anyio.Event = field(default_factory=anyio.Event)
    """Set once the outcome is written (a continuation may then be queued behind the reflection)."""
    done: anyio.Event = field(default_factory=anyio.Event)
    _scope: anyio.CancelScope | None = None
    _wire: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def trace_id(self) -> str:
        return self.segment.trace.trace_id

    # -- the local handle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop at once: the model or tool call in flight is cancelled."""
        self.stop_requested = True
        if self._scope is not None:
            self._scope.cancel()

    def lose_claim(self) -> None:
        """Another process owns the trace now (our lease lapsed): stop without writing anything more."""
        self.lost = True
        self.stop()

    @contextmanager
    def _guard(self) -> Iterator[anyio.CancelScope]:
        """Run one model or tool step so that ``stop`` cancels it."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self.stop_requested:
                scope.cancel()
            try:
                yield scope
            finally:
                self._scope = None

    # -- the loop -----------------------------------------------------------------------------------

    async def steps(self) -> AsyncGenerator[TraceEvent, None]:
        """Drive the run to its end (and any continuation queued meanwhile), yielding what it stores."""
        while True:
            async for event in self._segment():
                yield event
            if self.lost or self.queued is None:
                break
            self.segment, self.queued = self.queued, None
            self.finished = anyio.Event()
            self._wire.clear()
        if self.holding and not self.lost:
            with anyio.CancelScope(shield=True):
                released = await self.store.release(self.trace_id, self.token)
            self.holding = False
            if released is not None:
                yield TraceChanged(released)

    async def _segment(self) -> AsyncGenerator[TraceEvent, None]:
        outcome = ANSWERED
        segment = self.segment
        self.state = "running"
        try:
            iterations = empty = 0
            while True:
                pending = pending_calls(segment.context)
                if pending:
                    for stored_event in await self._tool_step(pending):
                        yield stored_event
                if self.stop_requested:
                    break
                if iterations >= segment.max_iterations:
                    outcome = MAX_ITERATIONS
                    break
                response = await self._call_model()
                iterations += 1
                if response is None:  # stopped before the model said anything
                    break
                if not response.content and not response.tool_calls:
                    empty += 1
                    if empty >= 2:
                        raise EmptyReply()
                    iterations -= 1  # an empty reply is asked again once, not counted as a step
                    continue
                empty = 0
                assistant = NewMessage(
                    role="assistant",
                    content=response.content,
                    tool_calls=response.tool_calls or None,
                    usage=response.usage,
                )
                yield await self._append(assistant)
                if self.stop_requested or not response.tool_calls:
                    break
        except ModelCallError as exc:
            outcome = Outcome.failed(str(exc))
        except EmptyReply:
            outcome = Outcome.failed(EMPTY_REPLY_ERROR)
        except ClaimLost:
            self.lost = True
        except anyio.get_cancelled_exc_class():
            outcome = INTERRUPTED
            raise
        except GeneratorExit:
            outcome = STOPPED
            raise
        except Exception as exc:
            log.exception("run of trace %s failed", self.trace_id)
            outcome = Outcome.failed(
                f"The run failed with an internal error ({type(exc).__name__}); the server log has the details."
            )
        finally:
            if self.stop_requested and outcome == ANSWERED:
                outcome = STOPPED
            will_reflect = (
                segment.reflect
                and self.reflector is not None
                and outcome.status in (Status.COMPLETED, Status.FAILED)
            )
            finished: list[TraceEvent] = []
            if not self.lost:
                self.state = "finishing"
                with anyio.CancelScope(shield=True):
                    finished = await self._finish(outcome, keep_claim=will_reflect)
            self.state = "reflecting" if will_reflect and not self.lost else "done"
            self.finished.set()
        for finish_event in finished:
            yield finish_event
        if self.state != "reflecting" or self.reflector is None:
            return
        try:
            with self._guard():
                reflected = await self.reflector(segment.trace, self.head)
            for reflected_event in reflected:
                yield reflected_event
        except Exception:
            log.exception("the reflection on trace %s failed", self.trace_id)
        finally:
            self.state = "done"

    @property
    def head(self) -> int:
        return self.segment.context[-1].sequence

    async def _append(self, message: NewMessage) -> MessageStored:
        stored = await self.store.append(self.trace_id, message, self.head, token=self.token)
        self.segment.context.append(stored)
        return MessageStored(self.trace_id, stored)

    async def _finish(self, outcome: Outcome, *, keep_claim: bool) -> list[TraceEvent]:
        """Close open tool calls and record the outcome; keep the claim when a reflection follows."""
        events: list[TraceEvent] = []
        try:
            if open_tool_calls(self.segment.context):
                text = CANCELLED_TOOL_RESULT if outcome.status is Status.STOPPED else UNFINISHED_TOOL_RESULT
                for call_id in open_tool_calls(self.segment.context):
                    events.append(
                        await self._append(NewMessage(role="tool", tool_call_id=call_id, content=text))
                    )
            final = await self.store.finish(
                self.trace_id,
                self.token,
                status=outcome.status,
                stop_reason=outcome.stop_reason,
                error=outcome.error,
                release=not keep_claim,
            )
        except ClaimLost:
            self.lost = True
            return events
        self.holding = keep_claim
        self.outcome = outcome
        self.segment.trace = final
        events.append(TraceChanged(final))
        return events

    # -- model step ---------------------------------------------------------------------------------

    def model_messages(self) -> list[dict[str, Any]]:
        """The active path as the model receives it (each message converted once per run)."""
        wire = self._wire
        for message in self.segment.context:
            if message.sequence not in wire:
                wire[message.sequence] = message.to_openai()
        return [wire[m.sequence] for m in self.segment.context]

    async def _call_model(self) -> ModelResponse | None:
        """One model call that ``stop`` cancels; a stopped call keeps its streamed text (None if there was none)."""
        partial: list[str] = []
        segment = self.segment
        messages = self.model_messages()
        schemas = [openai_tool_schema(t) for t in segment.tools]
        with self._guard():
            return await segment.model.complete(
                messages, schemas, temperature=segment.trace.config.temperature, on_text=partial.append
            )
        text = "".join(partial)
        return ModelResponse(content=text) if text else None

    # -- tool step ----------------------------------------------------------------------------------

    async def _tool_step(self, calls: list[ToolCall]) -> list[MessageStored]:
        """Run calls concurrently; store each result as soon as every earlier one is stored (call order)."""
        results: list[str | None] = [None] * len(calls)
        stored: list[MessageStored] = []
        lock = anyio.Lock()

        async def flush() -> None:
            async with lock:
                while len(stored) < len(calls) and results[len(stored)] is not None:
                    call = calls[len(stored)]
                    message = NewMessage(role="tool", tool_call_id=call.id, content=results[len(stored)])
                    stored.append(await self._append(message))

        async def run_one(index: int, call: ToolCall) -> None:
            results[index] = await self._call_tool(call)
            with anyio.CancelScope(shield=True):
                await flush()

        try:
            with self._guard():
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

    async def _call_tool(self, call: ToolCall) -> str:
        """The text the model reads back: the tool's result, or a sentence saying why there is none."""
        name = call.function.name
        tool = next((t for t in self.segment.tools if t.name == name), None)
        if tool is None or self.registry.get(name) is None:
            offered = ", ".join(t.name for t in self.segment.tools) or "none"
            return f"Error: there is no tool named '{name}' for this trace. Tools offered: {offered}."
        try:
            arguments = call.function.parsed_arguments()
        except ValueError as exc:
            return f"Error: the arguments for {name} were not a valid JSON object ({exc}); call it again with valid JSON."
        try:
            with anyio.fail_after(self.tool_timeout):
                result = await tool.call(arguments)
        except ToolCallError as exc:
            return f"Error: {exc}"
        except TimeoutError:
            return f"Error: {name} did not finish within {self.tool_timeout:g} s and was cancelled."
        except Exception as exc:
            log.warning("tool %s raised for trace %s", name, self.trace_id, exc_info=True)
            return f"Error: {name} failed: {type(exc).__name__}: {exc}"
        if len(result) > defaults.MAX_TOOL_RESULT_CHARS:
            result = (
                result[: defaults.MAX_TOOL_RESULT_CHARS] + f"\n[truncated: {len(result)} characters in all]"
            )
        return result


def pending_calls(context: list[Message]) -> list[ToolCall]:
    """The calls of the last assistant message that have no result yet, in call order."""
    open_ids = open_tool_calls(context)
    if not open_ids:
        return []
    last_assistant = next(m for m in reversed(context) if m.role == "assistant")
    return [c for c in last_assistant.tool_calls or [] if c.id in open_ids]
