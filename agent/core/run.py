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
``stopped``; ``max_tokens`` and ``timeout_seconds`` end it ``stopped`` with stop_reason ``token_budget`` /
``timeout``; ``max_iterations`` ends it ``completed``/``max_iterations``; ``ask_host`` or a call needing
approval ends it ``needs_input``; a provider error, two empty replies or an answer still invalid for
``output_schema`` end it ``failed``; a lost claim stops its writes; cancellation (the server shutting down)
ends it ``interrupted``; a bug ends it ``failed`` with a sentence. Whatever happens, the finish closes open tool calls so the stored
conversation is always one a provider accepts. Every step yields the events it stored, in order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from agent import defaults
from agent.core.messages import MAX_TOOL_CALLS, bounded_calls, open_tool_calls
from agent.core.patterns import MATCH_BUDGET_SECONDS, PatternTimeout
from agent.core.typed import MAX_REASKS, parse_result, reask
from agent.errors import (
    ContextTooLong,
    ModelCallError,
    ToolCallError,
    TraceError,
    TraceNotFound,
    storage_trouble,
)
from agent.llm.base import Model, ModelResponse
from agent.text import one_line
from agent.tools.ask import ASK_HOST, call_shown, question_of
from agent.tools.registry import Tool, ToolRegistry, openai_tool_schema
from agent.trace import compaction
from agent.trace.events import MessageStored, TraceChanged, TraceEvent
from agent.trace.models import Message, MessageUsage, NewMessage, Status, StopReason, ToolCall, Trace
from agent.trace.store import ClaimLost, TraceStore

log = logging.getLogger(__name__)

CANCELLED_TOOL_RESULT = "Cancelled: the trace was stopped before this tool call finished."
TIMED_OUT_TOOL_RESULT = (
    "Cancelled: the run's time limit (timeout_seconds) ran out before this tool call finished."
)
BUDGET_TOOL_RESULT = "Not run: the run's token budget (max_tokens) was spent before this tool call ran."
UNFINISHED_TOOL_RESULT = "Not run: the previous run ended before this tool call finished."
WAITING_TOOL_RESULT = "Not answered yet: the run is waiting for the host to reply to this call."
EMPTY_REPLY_ERROR = "The model gave an empty reply (no text and no tool calls) twice in a row."


def cut_off_result(*, stopped: bool, reason: StopReason | None = None) -> str:
    """The result a tool call left without one gets: cancelled (by a stop, the time limit, the token
    budget: ``reason`` says which), or not run (the run ended some other way: a crash, new messages sent
    past it)."""
    if not stopped:
        return UNFINISHED_TOOL_RESULT
    if reason is StopReason.TIMEOUT:
        return TIMED_OUT_TOOL_RESULT
    return BUDGET_TOOL_RESULT if reason is StopReason.TOKEN_BUDGET else CANCELLED_TOOL_RESULT


@dataclass(frozen=True)
class Outcome:
    """How a run ended: what ``finish`` writes."""

    status: Status
    stop_reason: StopReason
    error: str | None = None
    question: str | None = None
    result: Any = None

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
TOKEN_BUDGET = Outcome(Status.STOPPED, StopReason.TOKEN_BUDGET)
TIMEOUT = Outcome(Status.STOPPED, StopReason.TIMEOUT)
MAX_PARALLEL_TOOL_CALLS = 16
"""Tool calls of one reply that run at the same time; the rest wait their turn, results in call order."""
MAX_OVERFLOW_RETRIES = 3
"""Requests a step may have refused as too long (each time counted more carefully) before the run fails."""


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
    confirm: frozenset[str] = frozenset()
    """Tool names and server names whose calls wait for the host's approval."""
    approved: frozenset[str] = frozenset()
    """Ids of pending calls the host approved (run them this time)."""
    max_tokens: int | None = None
    timeout_seconds: float | None = None
    deadline: float | None = None
    """anyio time at which the run ends ``timeout`` (set when the segment starts)."""
    output_schema: dict[str, Any] | None = None
    context_tokens: int = defaults.CONTEXT_TOKENS
    """The prompt budget of this segment's model (see ``agent.trace.compaction.budget_for``)."""

    def needs_approval(self, call: ToolCall) -> bool:
        if call.id in self.approved:
            return False
        tool = next((t for t in self.tools if t.name == call.function.name), None)
        return call.function.name in self.confirm or (
            tool is not None and tool.group is not None and tool.group in self.confirm
        )


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
    handover: anyio.Lock = field(default_factory=anyio.Lock)
    """Held while a continuation is queued behind this run, and while the run decides whether to end."""
    closing: bool = False
    """Set (under ``handover``) once the run will take no more continuations: a late one runs on its own."""
    stop_requested: bool = False
    timed_out: bool = False
    lost: bool = False
    holding: bool = False
    outcome: Outcome | None = None
    finished: anyio.Event = field(default_factory=anyio.Event)
    """Set once the outcome is written (a continuation may then be queued behind the reflection)."""
    done: anyio.Event = field(default_factory=anyio.Event)
    reflected: anyio.Event = field(default_factory=anyio.Event)
    """Set when the latest reflection ends (a new one is armed each time the run starts reflecting)."""
    tokens_per_char: float = compaction.INITIAL_TOKENS_PER_CHAR
    _scope: anyio.CancelScope | None = None
    _wire: dict[int, dict[str, Any]] = field(default_factory=dict)
    _sizes: dict[int, int] = field(default_factory=dict)
    _sent_chars: int = 0
    _sent: list[dict[str, Any]] | None = None
    _anchor: tuple[list[dict[str, Any]], int, int] | None = None
    """The last request the provider counted: its messages, their characters, its prompt_tokens."""
    _ready: list[dict[str, Any]] | None = None
    _built: tuple[int, list[dict[str, Any]]] | None = None
    _built_chars: tuple[list[dict[str, Any]] | None, int] = (None, 0)
    _tool_schemas: tuple[Segment, list[dict[str, Any]], int] | None = None
    _unstored_tokens: int = 0
    """Spent on a model call with nothing to store (an empty summary): counted against max_tokens."""

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
    def _guard(self, *, timed: bool = True) -> Iterator[anyio.CancelScope]:
        """Run one model or tool step so that ``stop`` (or, when ``timed``, the run's deadline) cancels it."""
        deadline = self.segment.deadline if timed and self.segment.deadline is not None else math.inf
        with anyio.CancelScope(deadline=deadline) as scope:
            self._scope = scope
            if self.stop_requested:
                scope.cancel()
            try:
                yield scope
            finally:
                self._scope = None
        if anyio.current_time() >= deadline:
            self.timed_out = True

    # -- the loop -----------------------------------------------------------------------------------

    async def steps(self) -> AsyncGenerator[TraceEvent, None]:
        """Drive the run to its end (and any continuation queued meanwhile), yielding what it stores."""
        while True:
            async for event in self._segment():
                yield event
            async with self.handover:  # a continuation being claimed behind this run lands first
                if self.lost or self.queued is None:
                    self.closing = True
                    break
                self.segment, self.queued = self.queued, None
            self.finished = anyio.Event()
            self.timed_out = False  # the deadline was the last segment's; the queued one brings its own
            self._wire.clear()
            self._sizes.clear()
            self._built = None
            self._sent = self._anchor = None  # the next segment may run on another model: count afresh
        if self.holding and not self.lost:
            with anyio.CancelScope(shield=True):
                released = await self.store.release(self.trace_id, self.token)
            self.holding = False
            if released is not None:
                yield TraceChanged(released)
        if self.lost:
            # whoever took the trace (a sweep, a takeover) wrote a change under our token, which this
            # process's feed takes for its own and skips: announce the trace as it stands now
            with anyio.CancelScope(shield=True):
                try:
                    current = await self.store.get_trace(self.trace_id)
                except TraceNotFound:
                    return
            yield TraceChanged(current)

    def _ending(self, tokens: int) -> Outcome | None:
        """A limit reached between steps: stopped, timed out, or over the token budget."""
        if self.timed_out or (
            self.segment.deadline is not None and anyio.current_time() >= self.segment.deadline
        ):
            self.timed_out = True
            return TIMEOUT
        if self.segment.max_tokens is not None and tokens >= self.segment.max_tokens:
            return TOKEN_BUDGET
        if self.stop_requested:
            return STOPPED
        return None

    async def _segment(self) -> AsyncGenerator[TraceEvent, None]:
        outcome = ANSWERED
        segment = self.segment
        self.state = "running"
        if segment.timeout_seconds is not None:
            segment.deadline = anyio.current_time() + segment.timeout_seconds
        try:
            iterations = empty = reasks = tokens = overflows = 0
            while True:
                pending = pending_calls(segment.context)
                if pending:
                    runnable = [c for c in pending if not self._waits_for_host(c)]
                    for stored_event in await self._tool_step(runnable):
                        yield stored_event
                    waiting = [c for c in pending if self._waits_for_host(c)]
                    if waiting and self._ending(tokens) is None:
                        outcome = Outcome(
                            Status.NEEDS_INPUT, StopReason.NEEDS_INPUT, question=self._question(waiting)
                        )
                        break
                if (ending := self._ending(tokens)) is not None:
                    outcome = ending
                    break
                if iterations >= segment.max_iterations:
                    outcome = MAX_ITERATIONS
                    break
                for compacted in await self._fit_context():
                    if (used := compacted.message.usage) is not None:  # a summary call spends the budget too
                        tokens += used.prompt_tokens + used.completion_tokens
                    yield compacted
                tokens, self._unstored_tokens = tokens + self._unstored_tokens, 0
                if (ending := self._ending(tokens)) is not None:
                    outcome = ending
                    break
                try:
                    response = await self._call_model()
                except ContextTooLong:
                    if overflows >= MAX_OVERFLOW_RETRIES:
                        raise
                    overflows += 1
                    self._recount()
                    continue  # compact (and cut) again, counting more carefully
                overflows = 0
                cut_short = self.timed_out or self.stop_requested  # what came is partial streamed text
                iterations += 1
                if response is None:  # stopped (or out of time) before the model said anything
                    outcome = self._ending(tokens) or STOPPED
                    break
                if response.usage is not None:
                    tokens += response.usage.prompt_tokens + response.usage.completion_tokens
                    self._calibrate(response.usage.prompt_tokens)
                if not response.content and not response.tool_calls:
                    if (ending := self._ending(tokens)) is not None:
                        outcome = ending  # cut short by a limit: nothing to store
                        break
                    empty += 1
                    if empty >= 2:
                        raise EmptyReply()
                    iterations -= 1  # an empty reply is asked again once, not counted as a step
                    continue
                empty = 0
                if len(response.tool_calls or []) > MAX_TOOL_CALLS:
                    log.warning(
                        "trace %s: the model made %d tool calls in one reply; the first %d are kept",
                        self.trace_id,
                        len(response.tool_calls or []),
                        MAX_TOOL_CALLS,
                    )
                assistant = NewMessage(
                    role="assistant",
                    content=response.content,
                    tool_calls=bounded_calls(response.tool_calls) or None,
                    usage=response.usage or MessageUsage(),  # a model reply, counted as a step
                )
                yield await self._append(assistant)
                ending = self._ending(tokens)
                if ending is not None and (response.tool_calls or cut_short):
                    outcome = ending
                    break
                if response.tool_calls:
                    continue
                if segment.output_schema is None:
                    break  # answered, even if this last call used up the budget or the time
                try:
                    value, problem = await anyio.to_thread.run_sync(
                        parse_result, response.content, segment.output_schema
                    )
                except PatternTimeout as slow:
                    outcome = Outcome.failed(
                        f"The answer could not be checked: output_schema's pattern {slow.pattern!r} took "
                        f"over {MATCH_BUDGET_SECONDS:g} s to match it."
                    )
                    break
                if problem is None:
                    outcome = Outcome(Status.COMPLETED, StopReason.END_TURN, result=value)
                    break
                if ending is not None:  # no budget or time left to ask again
                    outcome = ending
                    break
                if reasks >= MAX_REASKS:
                    outcome = Outcome.failed(
                        f"The answer was not JSON valid for output_schema after {reasks + 1} tries ({problem})."
                    )
                    break
                reasks += 1
                yield await self._append(
                    NewMessage(role="user", content=reask(problem, segment.output_schema))
                )
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
            trouble = storage_trouble(exc) or (str(exc) if isinstance(exc, TraceError) else None)
            outcome = Outcome.failed(
                f"The run stopped: {trouble}"
                if trouble
                else f"The run failed with an internal error ({type(exc).__name__}); the server log has the details."
            )
        finally:
            if self.stop_requested and outcome.status is Status.COMPLETED:
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
            if will_reflect and not self.lost:
                self.reflected = anyio.Event()
                self.state = "reflecting"
            else:
                self.state = "done"
            self.finished.set()
        for finish_event in finished:
            yield finish_event
        if self.state != "reflecting" or self.reflector is None:
            return
        reflected: list[TraceEvent] = []  # stays empty when stop cancels the reflection
        try:
            with self._guard(timed=False):  # the answer is in: the run's time limit no longer applies
                reflected = await self.reflector(segment.trace, self.head)
            for reflected_event in reflected:
                yield reflected_event
        except Exception:
            log.exception("the reflection on trace %s failed", self.trace_id)
        finally:
            self.state = "done"
            self.reflected.set()

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
            if open_tool_calls(self.segment.context) and outcome.status is not Status.NEEDS_INPUT:
                text = cut_off_result(stopped=outcome.status is Status.STOPPED, reason=outcome.stop_reason)
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
                question=outcome.question,
                result=outcome.result,
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

    def _convert(self, message: Message) -> dict[str, Any]:
        """A message in OpenAI form, converted (and measured) once per run."""
        item = self._wire.get(message.sequence)
        if item is None:
            item = self._wire[message.sequence] = message.to_openai()
            self._sizes[id(item)] = compaction.chars_of(item)
        return item

    def _size(self, item: dict[str, Any]) -> int:
        size = self._sizes.get(id(item))
        return size if size is not None else compaction.chars_of(item)

    def model_messages(
        self, extra_elided: Iterable[int] = (), *, clamp: bool = False
    ) -> list[dict[str, Any]]:
        """The active path as the model receives it: compactions applied (``clamp``: cut to fit, as sent).

        The plain case grows with the path: messages appended since the last build (none of them a
        compaction record) extend it, so a step costs what it adds, not the path's length.
        """
        context = self.segment.context
        extra = list(extra_elided)
        if not extra and not clamp and self._built is not None:
            count, built = self._built
            added = context[count:]
            if count <= len(context) and all(compaction.compaction_of(m) is None for m in added):
                extra_items = [self._convert(m) for m in added]
                wire = [*built, *extra_items]
                self._built = (len(context), wire)
                self._built_chars = (wire, self._built_chars[1] + sum(self._size(m) for m in extra_items))
                return wire
        wire = compaction.build_context(
            context,
            convert=self._convert,
            extra_elided=extra,
            clamp_to=self._room() if clamp else None,
            trace_id=self.trace_id,
            tokens_per_char=self.tokens_per_char,
        )
        if not extra and not clamp:
            self._built = (len(context), wire)
            self._built_chars = (wire, sum(self._size(m) for m in wire))
        return wire

    def _schemas(self) -> list[dict[str, Any]]:
        """The segment's tools as the provider receives them (built once per segment)."""
        if self._tool_schemas is None or self._tool_schemas[0] is not self.segment:
            schemas = [openai_tool_schema(t) for t in self.segment.tools]
            self._tool_schemas = (self.segment, schemas, compaction.chars_of(schemas))
        return self._tool_schemas[1]

    def _room(self) -> int:
        """Tokens the messages may take: the budget less the reply's room and the tool schemas."""
        self._schemas()
        assert self._tool_schemas is not None
        tools = math.ceil(self._tool_schemas[2] * self.tokens_per_char)
        return compaction.room(self.segment.context_tokens, self.segment.model, tools)

    def _chars(self, wire: list[dict[str, Any]]) -> int:
        if wire is self._built_chars[0]:
            return self._built_chars[1]
        return sum(self._size(m) for m in wire)

    def _estimate(self, wire: list[dict[str, Any]]) -> int:
        """Tokens the messages take: what the provider counted for the last request when ``wire`` only
        adds to it (plus an estimate of what was added), else the calibrated characters-per-token guess."""
        if self._anchor is not None and _extends(wire, self._anchor[0]):
            _, sent_chars, prompt_tokens = self._anchor
            tools = math.ceil((self._tool_schemas[2] if self._tool_schemas else 0) * self.tokens_per_char)
            added = math.ceil((self._chars(wire) - sent_chars) * self.tokens_per_char)
            return max(0, prompt_tokens - tools) + added  # with _room's tools: prompt_tokens + added
        return self._guess(wire)

    def _guess(self, wire: list[dict[str, Any]]) -> int:
        return math.ceil(self._chars(wire) * self.tokens_per_char)

    async def _fit_context(self) -> list[MessageStored]:
        """Before a model call that would pass the budget: elide old tool results, then summarise old turns."""
        room = self._room()
        wire = self.model_messages()
        before = self._estimate(wire)
        if before <= room:
            self._ready = wire  # the common case: sent as it is, built once per step
            return []
        events: list[MessageStored] = []
        target = room * compaction.LOW_WATER
        plan = compaction.plan_elision(
            self.segment.context, lambda elided: self._estimate(self.model_messages(elided)) <= target
        )
        if plan is not None:
            after = self._estimate(self.model_messages(plan.elided))
            saved = max(0, self._guess(wire) - after)  # both guessed alike: what elision took out
            events.append(await self._append(compaction.record(plan, trace_id=self.trace_id, saved=saved)))
            before = after
        summary_plan = compaction.plan_summary(self.segment.context) if before > room else None
        if summary_plan is not None and self._summary_in_vain(summary_plan, room):
            summary_plan = None
        if summary_plan is not None:
            request = compaction.summary_request(
                self.segment.context, summary_plan, room, self.tokens_per_char, convert=self._convert
            )
            response: ModelResponse | None = None  # stays None when stop or the deadline cancels the call
            try:
                with self._guard():
                    response = await self.segment.model.complete(
                        request, self._schemas(), temperature=0, tool_choice="none"
                    )
            except ModelCallError:
                log.warning("summarising trace %s to fit its context failed; cutting instead", self.trace_id)
                return events
            if response is not None and not response.content:
                log.warning("summarising trace %s gave an empty summary; cutting instead", self.trace_id)
                if response.usage is not None:  # nothing to store it on, but the budget paid for it
                    self._unstored_tokens += response.usage.prompt_tokens + response.usage.completion_tokens
            if response is not None and response.content:
                summary = compaction.record(
                    summary_plan, trace_id=self.trace_id, saved=0, summary=response.content
                )
                summary.usage = response.usage
                would_be = Message(**summary.model_dump(), sequence=0, parent_sequence=None, created_at="")
                after = self._estimate(
                    compaction.build_context(
                        [*self.segment.context, would_be], convert=self._convert, trace_id=self.trace_id
                    )
                )
                assert summary.meta is not None
                summary.meta["compaction"]["tokens_saved"] = max(0, before - after)
                events.append(await self._append(summary))
        return events

    def _recount(self) -> None:
        """The provider refused a request the estimate let through: its window is smaller than the budget
        (a wrong --context-tokens) or its tokenizer dearer than the estimate (a script it splits finely).
        Either way: a budget below what that request was thought to take, bytes counted dearer, and no
        anchor (the count that misled us)."""
        sent = self._estimate(self._sent) if self._sent is not None else self.segment.context_tokens
        budget = self.segment.context_tokens
        # the request as the budget counts it: its messages, the reply's room and the tool schemas
        thought = sent + budget - self._room()
        self.segment.context_tokens = max(1000, min(budget, int(thought * 0.85)))
        self.tokens_per_char = min(1.0, self.tokens_per_char * 1.25)
        self._anchor = None
        self._ready = None
        log.warning(
            "the provider refused trace %s's request as too long (about %d tokens by our count): fitting it "
            "into %d tokens and trying again",
            self.trace_id,
            thought,
            self.segment.context_tokens,
        )

    def _summary_in_vain(self, plan: compaction.Plan, room: int) -> bool:
        """Whether a new summary would be asked for in vain: one is on the path already, and the turns a new
        one would fold in weigh less than RESUMMARY_SHARE of the room as they are sent now (results elided
        or cut), so the call would buy next to nothing. (Latest turns over the room by themselves are cut to
        fit instead.) Past that share, folding in the residue of old turns is what keeps a long run under
        a small window."""
        view = compaction.View.of(self.segment.context)
        if view.covers is None:
            return False
        assert plan.covers is not None
        done, last = view.covers[1], plan.covers[1]
        new = [
            m
            for m in self.segment.context
            if done < m.sequence <= last and compaction.compaction_of(m) is None
        ]
        wire = compaction.build_context(
            new, convert=self._convert, extra_elided=view.elided, trace_id=self.trace_id
        )
        return self._guess(wire) < compaction.RESUMMARY_SHARE * room

    def _calibrate(self, prompt_tokens: int) -> None:
        """Learn the provider's tokens-per-character from what it reported (only ever more careful), and
        keep its count of the request as the base of the next estimate."""
        if self._sent_chars > 0 and prompt_tokens > 0:
            observed = prompt_tokens / self._sent_chars * 1.05
            self.tokens_per_char = min(1.0, max(self.tokens_per_char, observed))
            if self._sent is not None:
                self._anchor = (self._sent, self._chars(self._sent), prompt_tokens)

    def _waits_for_host(self, call: ToolCall) -> bool:
        """An ask_host call, or a call the host must approve first."""
        asks = call.function.name == ASK_HOST and any(t.name == ASK_HOST for t in self.segment.tools)
        return asks or self.segment.needs_approval(call)

    def _question(self, waiting: list[ToolCall]) -> str:
        """What the paused run asks the host: the agent's questions, then the approvals it needs."""
        asked = [question_of(c.function.arguments) for c in waiting if c.function.name == ASK_HOST]
        approvals = [c for c in waiting if c.function.name != ASK_HOST]
        parts = list(asked)
        if approvals:
            listed = "; ".join(call_shown(c.function.name, c.function.arguments) for c in approvals)
            parts.append(
                f"The agent wants to call {listed}. Approve with run_trace(approve=true), or decline with "
                "approve=false and answer='why'."
            )
        return " ".join(parts)

    async def _call_model(self) -> ModelResponse | None:
        """One model call that ``stop`` cancels; a stopped call keeps its streamed text (None if there was none)."""
        partial: list[str] = []
        segment = self.segment
        messages, self._ready = self._ready, None
        if messages is None:
            messages = self.model_messages()
            if self._estimate(messages) > self._room():
                messages = self.model_messages(clamp=True)
        schemas = self._schemas()
        self._sent_chars = self._chars(messages) + (self._tool_schemas[2] if self._tool_schemas else 0)
        self._sent = messages
        with self._guard():
            return await segment.model.complete(
                messages,
                schemas,
                temperature=segment.trace.config.temperature,
                on_text=partial.append,
                response_schema=segment.output_schema,
            )
        text = "".join(partial)
        return ModelResponse(content=text) if text else None

    # -- tool step ----------------------------------------------------------------------------------

    async def _tool_step(self, calls: list[ToolCall]) -> list[MessageStored]:
        """Run calls concurrently; store each result as soon as every earlier one is stored (call order)."""
        results: list[str | None] = [None] * len(calls)
        stored: list[MessageStored] = []
        lock = anyio.Lock(fast_acquire=True)
        at_once = anyio.CapacityLimiter(MAX_PARALLEL_TOOL_CALLS)

        async def flush() -> None:
            async with lock:
                while len(stored) < len(calls) and results[len(stored)] is not None:
                    call = calls[len(stored)]
                    message = NewMessage(role="tool", tool_call_id=call.id, content=results[len(stored)])
                    stored.append(await self._append(message))

        async def run_one(index: int, call: ToolCall) -> None:
            async with at_once:  # a reply of 5,000 calls must not start 5,000 downstream calls at once
                results[index] = await self._call_tool(call)
            with anyio.CancelScope(shield=True):
                await flush()

        try:
            with self._guard():
                if len(calls) == 1:  # the common case needs no task of its own
                    await run_one(0, calls[0])
                else:
                    async with anyio.create_task_group() as group:
                        for index, call in enumerate(calls):
                            group.start_soon(run_one, index, call)
        finally:
            with anyio.CancelScope(shield=True):
                for index in range(len(calls)):
                    if results[index] is None:
                        results[index] = cut_off_result(
                            stopped=True, reason=StopReason.TIMEOUT if self.timed_out else None
                        )
                await flush()
        return stored

    async def _call_tool(self, call: ToolCall) -> str:
        """The text the model reads back: the tool's result, or a sentence saying why there is none."""
        name = call.function.name
        tool = next((t for t in self.segment.tools if t.name == name), None)
        if tool is None or self.registry.get(name) is None:
            offered = ", ".join(t.name for t in self.segment.tools) or "none"
            return f"Error: there is no tool named '{one_line(name, 100)}' for this trace. Tools offered: {offered}."
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


def _extends(wire: list[dict[str, Any]], sent: list[dict[str, Any]]) -> bool:
    """``wire`` is ``sent`` with messages added at the end (the same converted items, nothing elided)."""
    return len(wire) >= len(sent) and all(a is b for a, b in zip(wire, sent, strict=False))


def pending_calls(context: list[Message]) -> list[ToolCall]:
    """The calls of the last assistant message that have no result yet, in call order."""
    open_ids = open_tool_calls(context)
    if not open_ids:
        return []
    last_assistant = next(m for m in reversed(context) if m.role == "assistant")
    return [c for c in last_assistant.tool_calls or [] if c.id in open_ids]
