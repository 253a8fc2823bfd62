"""AgentRunner: claims traces in the store and runs them under a supervisor.

A request is checked completely before anything is written (``agent.core.requests``); then one
shielded step claims the trace and stores its new messages in a single transaction and hands the run to
the supervisor, so a cancelled request never leaves a trace marked running with nothing running it.
``start`` (background), ``run`` (in the caller's task), ``run_result`` and ``run_side_branch`` are thin
adapters over one drain of ``Run.steps`` (``agent.core.run``), which publishes every event it yields.
No run's failure ever reaches the task group it shares: the supervisor logs it and ends the trace
``failed``. The in-memory table of runs is only the local stop handle; who runs a trace is the store's
business (``claim``), so any number of processes may share one database.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing, suppress
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup
from pydantic import BaseModel, Field

from agent import defaults
from agent.core.messages import open_tool_calls
from agent.core.requests import (
    Request,
    Requests,
    RunConfig,
    SystemPromptBuilder,
    closing_results,
    default_system_prompt,
)
from agent.core.run import (
    WAITING_TOOL_RESULT,
    Reflector,
    Run,
    Segment,
)
from agent.errors import ModelCallError, TraceMoved, TraceReflecting, TraceRunning
from agent.llm.base import Model, resolve_model
from agent.llm.windows import context_window
from agent.tools.registry import ToolRegistry, openai_tool_schema
from agent.trace import compaction
from agent.trace.events import EventBus, MessageStored, TraceChanged, TraceEvent
from agent.trace.feed import ChangeFeed, Recent
from agent.trace.models import Message, MessageUsage, NewMessage, Status, StopReason, Trace
from agent.trace.store import ClaimLost, TraceStore, new_token

log = logging.getLogger(__name__)

HANDOVER_WAIT_SECONDS = defaults.MAX_WAIT_SECONDS
"""How long a request waits for another process to release a trace it is reflecting on."""


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


class AgentRunner:
    def __init__(
        self,
        store: TraceStore,
        *,
        tools: ToolRegistry | None = None,
        events: EventBus | None = None,
        models: Callable[[str], Model] = resolve_model,
        default_model: str = defaults.MODEL,
        system_prompt: SystemPromptBuilder = default_system_prompt,
        tool_timeout: float | None = defaults.TOOL_TIMEOUT_SECONDS,
        reflector: Reflector | None = None,
        context_tokens: int | None = None,
    ):
        self.store = store
        self.tools = tools if tools is not None else ToolRegistry()
        self.events = events if events is not None else EventBus()
        self.default_model = default_model
        self.reflector = reflector
        self._models = models
        self._model_cache: dict[str, Model] = {}
        self._tool_timeout = tool_timeout
        self._context_tokens = context_tokens
        self._requests = Requests(
            store,
            self.tools,
            self.model,
            default_model=default_model,
            system_prompt=system_prompt,
            context_tokens=context_tokens,
            queue_behind=self._local_run_to_queue_behind,
        )
        self._active: dict[str, Run] = {}
        self._own_tokens = Recent()
        self._own_messages = Recent()
        self._group: TaskGroup | None = None
        self._entered: TaskGroup | None = None

    # -- lifecycle: the supervisor's task group, the lease keeper and the change feed ---------------

    async def __aenter__(self) -> Self:
        group = anyio.create_task_group()
        await group.__aenter__()
        self._entered = group
        feed = ChangeFeed(self.store, self.events, on_stop=self._stop_asked)
        feed.own_tokens, feed.own_messages = self._own_tokens, self._own_messages
        try:
            await group.start(feed.run)
        except BaseException:  # e.g. the database refused LISTEN: leave no task group half entered
            self._entered = None
            group.cancel_scope.cancel()
            with suppress(BaseException):  # the group's copy of the error: the caller gets the original
                await group.__aexit__(None, None, None)
            raise
        group.start_soon(self._keep_leases, name="lease keeper")
        self._group = group
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        """Runs still going are cancelled: each ends ``interrupted`` (written under a shield)."""
        group, self._group, self._entered = self._entered, None, None
        assert group is not None
        group.cancel_scope.cancel()
        try:
            return await group.__aexit__(exc_type, exc, tb)
        finally:
            await self.close_models()

    async def close_models(self) -> None:
        """Close the providers' HTTP clients while the event loop still runs (else they fail at exit)."""
        models, self._model_cache = list(self._model_cache.values()), {}
        with anyio.CancelScope(shield=True):
            for model in models:
                close = getattr(model, "aclose", None)
                if close is not None:
                    try:
                        await close()
                    except Exception:
                        log.debug("closing model %s failed", getattr(model, "name", model), exc_info=True)

    async def _keep_leases(self) -> None:
        """Renew this process's claims; runs whose claim was taken stop; orphaned claims are let go."""
        while True:
            await anyio.sleep(defaults.LEASE_RENEW_SECONDS)
            try:
                before = dict(self._active)
                held = await self.store.renew()
                for trace_id, run in before.items():
                    if run.state not in ("claimed", "running", "reflecting"):
                        continue  # finishing or done: its claim may already be released, rightly
                    if held.get(trace_id) != run.token and self._active.get(trace_id) is run:
                        log.warning("trace %s: another process took over its claim; stopping here", trace_id)
                        run.lose_claim()
                for trace_id, token in held.items():
                    local = self._active.get(trace_id)
                    if local is None or local.token != token:
                        await self._let_go(trace_id, token)
                for trace_id in await self.store.stops_requested():  # in case the feed missed one
                    self._stop_asked(trace_id)
                await self.store.sweep()
            except Exception:
                log.exception("renewing run leases failed; retrying")

    async def _let_go(self, trace_id: str, token: str) -> None:
        """A claim this process holds with no run behind it (its final write failed): end it."""
        trace = await self.store.get_trace(trace_id)
        if trace.status is Status.RUNNING:
            await self.store.finish(
                trace_id, token, status=Status.INTERRUPTED, stop_reason=StopReason.INTERRUPTED, error=None
            )
        else:
            await self.store.release(trace_id, token)

    # -- local handles ------------------------------------------------------------------------------

    def running(self) -> list[str]:
        """The traces this process is running now (the store knows those of every process)."""
        return [tid for tid, run in self._active.items() if run.state in ("claimed", "running")]

    def is_running(self, trace_id: str) -> bool:
        return trace_id in self.running()

    def stop(self, trace_id: str) -> bool:
        """Stop a run of this process; False when this process is not running the trace."""
        run = self._active.get(trace_id)
        if run is None or (run.state in ("finishing", "reflecting", "done") and run.queued is None):
            return False
        run.stop()
        return True

    def owned(self) -> list[str]:
        """Every trace this process holds a run of: running, finishing or reflecting."""
        return list(self._active)

    def stop_all(self) -> None:
        """Stop every run of this process (each ends ``stopped``, its open tool calls closed)."""
        for run in list(self._active.values()):
            run.stop()

    async def wait_reflections(self) -> None:
        """Return once no run of this process is reflecting (runs still running, a continuation queued
        behind a reflection included, are not waited for)."""
        while reflecting := [run for run in self._active.values() if run.state == "reflecting"]:
            run = reflecting[0]
            async with anyio.create_task_group() as group:  # its reflection ends, or the whole run does

                async def ended(event: anyio.Event) -> None:
                    await event.wait()
                    group.cancel_scope.cancel()

                group.start_soon(ended, run.reflected)
                group.start_soon(ended, run.done)

    async def wait_idle(self) -> None:
        """Return once this process runs nothing."""
        while self._active:
            await next(iter(self._active.values())).done.wait()

    async def stop_unattended(self, trace_id: str) -> bool:
        """Stop a trace no live run attends to: one waiting for input, or one still marked running whose
        owner died (its claim is taken over at once, rather than read ``interrupted`` once its lease
        lapses). Its pending calls are closed as cancelled and it ends ``stopped``; False when a live
        owner holds it (it is asked through the store instead) or it is not running."""
        trace = await self.store.get_trace(trace_id)
        if trace.status not in (Status.NEEDS_INPUT, Status.RUNNING):
            return False
        context = await self.store.get_path(trace_id)
        closing = closing_results(context, [], stopped=True)
        token = new_token()
        self._own_tokens.add(token)
        with anyio.CancelScope(shield=True):
            try:
                _, stored = await self.store.claim(
                    trace_id,
                    token,
                    head=trace.head_sequence,
                    model=trace.model,
                    config=trace.config,
                    messages=closing,
                    read_head=trace.head_sequence,
                )
            except TraceRunning:
                return False
            # the claim is only how the closing results get written: it is not announced as a run
            for message in stored:
                self._published(MessageStored(trace_id, message))
            final = await self.store.finish(
                trace_id, token, status=Status.STOPPED, stop_reason=StopReason.STOPPED, error=None
            )
            self._published(TraceChanged(final))
        return True

    def _stop_asked(self, trace_id: str) -> None:
        """Another process asked (through the store) to stop a trace: act if it is ours."""
        self.stop(trace_id)

    async def wait(self, trace_id: str) -> None:
        """Return when this process's run of the trace has ended (at once if there is none)."""
        run = self._active.get(trace_id)
        if run is not None:
            await run.done.wait()

    def model(self, spec: str | None = None) -> Model:
        """The Model for a spec (cached), raising ModelConfigError at once when it cannot be used."""
        spec = spec or self.default_model
        if spec not in self._model_cache:
            self._model_cache[spec] = self._models(spec)
        return self._model_cache[spec]

    # -- adapters over one drain ----------------------------------------------------------------------

    async def start(
        self, messages: Sequence[Any], config: RunConfig, task_group: TaskGroup | None = None
    ) -> Trace:
        """Validate and store, then run in the background; returns the stored trace at once."""
        group = task_group or self._group
        if group is None:
            raise RuntimeError("AgentRunner.start needs a task group: pass one, or use 'async with runner'.")
        request = await self._requests.prepare(messages, config)
        with anyio.CancelScope(shield=True):  # once written, the run must be handed over, cancelled or not
            run = await self._commit(request)
            if run is not None:
                group.start_soon(self._supervise, run, name=f"trace {run.trace_id}")
        return request.segment.trace

    async def run(self, messages: Sequence[Any], config: RunConfig) -> AsyncGenerator[TraceEvent, None]:
        """Run in the caller's task: yields the claimed trace, then every event of the run as stored."""
        request = await self._requests.prepare(messages, config)
        with anyio.CancelScope(shield=True):
            committed = await self._commit(request)
        if committed is None:  # queued behind a reflection: follow that run instead
            behind = request.behind
            assert behind is not None
            await behind.done.wait()
            yield TraceChanged(await self.store.get_trace(behind.trace_id))
            return
        run = committed
        started = False
        try:
            yield TraceChanged(run.segment.trace)
            started = True
            async with aclosing(self._drain(run)) as events:
                async for event in events:
                    yield event
        finally:
            if not started:  # the caller walked away before the loop began
                with anyio.CancelScope(shield=True):
                    await self._abandon(run)
            self._forget(run)

    async def run_result(self, messages: Sequence[Any], config: RunConfig) -> RunResult:
        """Run to the end and return the final trace with the messages this run stored."""
        trace: Trace | None = None
        stored: list[Message] = []
        error: str | None = None
        async with aclosing(self.run(messages, config)) as events:
            async for event in events:
                if isinstance(event, TraceChanged):
                    trace = event.trace
                    error = trace.error
                elif isinstance(event, MessageStored) and not event.message.side:
                    stored.append(event.message)
        assert trace is not None
        return RunResult(trace=trace, messages=stored, error=error)

    async def run_side_branch(
        self,
        trace_id: str,
        prompt: str,
        *,
        head: int | None = None,
        action: str = "reflect on",
        publish: bool = True,
    ) -> RunResult:
        """Ask the trace's model one more question on a branch off ``head`` (default: the head).

        The branch's messages never move the head or the status (a crash cannot leave the trace on it);
        the trace's tools are sent with their use forbidden, so providers accept the tool calls in the
        history. Refused while the trace runs (unless ``head`` is given by the run itself, which then
        yields the branch's events itself: ``publish=False``).
        """
        trace = await self.store.get_trace(trace_id)
        if head is None:
            if trace.status is Status.RUNNING:
                raise TraceRunning(trace_id, action)
            head = trace.head_sequence
        path = await self.store.get_path(trace_id, head) if head is not None else []
        model = self.model(trace.model)
        tools = self._requests.segment(trace, model, path).tools  # as the run offers them, ask_host included
        branch: list[Message] = []
        parent = head
        for call_id in open_tool_calls(path):  # a paused trace: its pending calls get a side-branch answer
            note = NewMessage(role="tool", tool_call_id=call_id, content=WAITING_TOOL_RESULT)
            branch.append(await self.store.append(trace_id, note, parent, token=None, side=True))
            parent = branch[-1].sequence
        question = await self.store.append(
            trace_id, NewMessage(role="user", content=prompt), parent, token=None, side=True
        )
        branch.append(question)
        if publish:
            for message in branch:
                self._published(MessageStored(trace_id, message))
        stored = list(branch)
        error = None
        schemas = [openai_tool_schema(t) for t in tools]
        budget = compaction.budget_for(self._context_tokens, context_window(model.name))
        tool_tokens = compaction.estimate([], schemas, ratio=compaction.INITIAL_TOKENS_PER_CHAR)
        room = compaction.room(budget, model, tool_tokens)
        try:
            response = await model.complete(
                compaction.build_context([*path, *branch], clamp_to=room, trace_id=trace.trace_id),
                schemas,
                temperature=trace.config.temperature,
                tool_choice="none",
            )
        except ModelCallError as exc:
            error = str(exc)
        else:
            if response.content:
                answer = NewMessage(
                    role="assistant", content=response.content, usage=response.usage or MessageUsage()
                )
                saved = await self.store.append(trace_id, answer, question.sequence, token=None, side=True)
                if publish:
                    self._published(MessageStored(trace_id, saved))
                stored.append(saved)
            else:
                error = "the model gave an empty answer"
        return RunResult(trace=await self.store.get_trace(trace_id), messages=stored, error=error)

    async def _drain(self, run: Run) -> AsyncGenerator[TraceEvent, None]:
        """The one loop every adapter runs: each event the run stores is published, then yielded."""
        async with aclosing(run.steps()) as steps:
            async for event in steps:
                self._published(event)
                yield event

    async def _supervise(self, run: Run) -> None:
        """Drive a background run; its failure is logged and ends the trace, never the task group."""
        try:
            async with aclosing(self._drain(run)) as events:
                async for _ in events:
                    pass
        except Exception:
            log.exception("the run of trace %s failed outside its loop", run.trace_id)
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                try:
                    failed = await self.store.finish(
                        run.trace_id,
                        run.token,
                        status=Status.FAILED,
                        stop_reason=StopReason.ERROR,
                        error="The run failed with an internal error; the server log has the details.",
                    )
                    self._published(TraceChanged(failed))
                except Exception:
                    log.exception("could not record the failure of trace %s", run.trace_id)
        finally:
            self._forget(run)

    def _published(self, event: TraceEvent) -> None:
        if isinstance(event, MessageStored):
            self._own_messages.add((event.trace_id, event.message.sequence))
        self.events.publish(event)

    def _forget(self, run: Run) -> None:
        if self._active.get(run.trace_id) is run:
            del self._active[run.trace_id]
        run.done.set()

    async def _abandon(self, run: Run) -> None:
        """End a claimed run that never started (its caller walked away): stopped, claim released."""
        try:
            final = await self.store.finish(
                run.trace_id, run.token, status=Status.STOPPED, stop_reason=StopReason.STOPPED, error=None
            )
            self._published(TraceChanged(final))
        except ClaimLost:
            pass

    # -- preparing and committing a run -----------------------------------------------------------------

    async def _local_run_to_queue_behind(self, trace_id: str, action: str) -> Run | None:
        """A local run that has answered and is reflecting: a continuation waits behind it, not refused."""
        run = self._active.get(trace_id)
        if run is None:
            return None
        if run.state in ("claimed", "running") or run.queued is not None:
            raise TraceRunning(trace_id, action)
        await run.finished.wait()
        if run.state == "reflecting" and run.holding:
            return run
        await run.done.wait()
        return None

    async def _commit(self, request: Request) -> Run | None:
        """Write the request (one transaction) and register its run; None when queued behind a reflection."""
        segment = request.segment
        if request.new is not None:
            token = new_token()
            self._own_tokens.add(token)
            trace, stored = await self.store.create(request.new, request.messages, token)
            segment.trace, segment.context = trace, stored
            self._published(TraceChanged(trace, created=True))
        else:
            behind = request.behind
            if behind is not None:
                async with behind.handover:
                    if not behind.closing:  # still reflecting: claim under its token, run when it is done
                        trace, stored = await self._claim(segment, behind.token, request)
                        segment.trace, segment.context = trace, [*segment.context, *stored]
                        behind.queued = segment
                        self._published(TraceChanged(trace))
                        for message in stored:
                            self._published(MessageStored(trace.trace_id, message))
                        return None
                await behind.done.wait()  # it ended meanwhile: this request becomes a run of its own
            token = new_token()
            self._own_tokens.add(token)
            trace, stored = await self._claim(segment, token, request)
            segment.trace = trace
            segment.context = [*segment.context, *stored]
            self._published(TraceChanged(trace))
        for message in stored:
            self._published(MessageStored(trace.trace_id, message))
        run = Run(
            self.store, self.tools, token, segment, tool_timeout=self._tool_timeout, reflector=self.reflector
        )
        self._active[trace.trace_id] = run
        return run

    async def _claim(self, segment: Segment, token: str, request: Request) -> tuple[Trace, list[Message]]:
        """Claim in the store; a trace another process is reflecting on is waited for, briefly."""
        trace = segment.trace
        with anyio.move_on_after(HANDOVER_WAIT_SECONDS):
            while True:
                try:
                    return await self.store.claim(
                        trace.trace_id,
                        token,
                        head=request.head,
                        model=trace.model,
                        config=trace.config,
                        messages=request.messages,
                        read_head=trace.head_sequence,
                    )
                except TraceMoved:
                    raise  # another run went first: this request was made for a head that is gone
                except TraceRunning:
                    current = await self.store.get_trace(trace.trace_id)
                    if current.status is Status.RUNNING:
                        raise
                await self.wait_for_release(trace.trace_id)
        raise TraceReflecting(trace.trace_id, HANDOVER_WAIT_SECONDS)  # it reads completed: say why it is held

    async def wait_for_release(self, trace_id: str) -> None:
        """Return when the trace next changes (its claim released, say), or after a lease renewal's time."""
        async with self.events.subscribe() as events:
            with anyio.move_on_after(defaults.LEASE_RENEW_SECONDS):
                async for event in events:
                    if isinstance(event, TraceChanged) and event.trace_id == trace_id:
                        return
