"""The Engine: the one object the MCP server talks to (create, continue, stop, view, wait, reflect, list,
delete, agent info, experiences), wired once over the store, the runner, the tools and the experiences file.

``open_engine`` opens everything in order and closes it in reverse; runs still going when it closes end
``interrupted``. The server never reaches past this facade into the store, runner or event bus.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from anyio.abc import TaskGroup

from agent import defaults
from agent.core.requests import RunConfig, SystemPrompt, SystemPromptBuilder
from agent.core.runner import HANDOVER_WAIT_SECONDS, AgentRunner
from agent.errors import TraceError, TraceNotFound
from agent.experiences import ConsolidationResult, Experiences, Lesson, format_lessons_block
from agent.experiences.backends import open_experiences
from agent.llm.base import Model, resolve_model
from agent.reflection import Reflection, reflect_on_trace
from agent.settings import EngineSettings
from agent.skills import LoadSkillTool, read_skills, skills_system_prompt
from agent.tools.ask import AskHostTool
from agent.tools.files import workspace_tools
from agent.tools.mcp import McpServers, load_mcp_config
from agent.tools.registry import ToolRegistry
from agent.trace.backends import open_store
from agent.trace.events import (
    EventBus,
    ExperiencesChanged,
    MessageStored,
    TraceChanged,
    TraceDeleted,
    TraceEvent,
)
from agent.trace.models import Message, RunHandle, Status, Trace
from agent.trace.store import TracePage, TraceStore, owner_alive

log = logging.getLogger(__name__)


OnMessage = Callable[[Message], Awaitable[None]]
OnIdle = Callable[[], Awaitable[None]]
OnTraceMessage = Callable[[str, Message], Awaitable[None]]


class _Heartbeat:
    """A wait's heartbeat: ``on_idle`` once ``every`` seconds pass in which its client heard nothing (events
    of other traces do not count: the client hears nothing of them)."""

    def __init__(self, on_idle: OnIdle | None, every: float):
        self._on_idle, self._every = on_idle, every if on_idle is not None else math.inf
        self.heard()

    def heard(self) -> None:
        """The client was just told something: the next beat is due a whole interval from now."""
        self._due = anyio.current_time() + self._every

    async def next(self, events: AsyncIterator[TraceEvent]) -> TraceEvent | None:
        """The next event, or None once a beat was sent because none came in time."""
        with anyio.move_on_after(max(0.0, self._due - anyio.current_time())):
            return await anext(aiter(events))
        assert self._on_idle is not None
        await self._on_idle()
        self.heard()
        return None


@dataclass
class ToolInfo:
    name: str
    description: str
    server: str | None
    read_only: bool


@dataclass
class AgentInfo:
    """What the background agent can use, for the ``agent_info`` tool."""

    tools: list[ToolInfo]
    servers: list[dict[str, Any]]
    default_model: str
    providers: dict[str, bool]
    workspace: str
    skills: list[dict[str, str]]


def providers_configured(env: dict[str, str] | None = None) -> dict[str, bool]:
    """Which providers have what they need (never the keys themselves)."""
    import os
    from importlib.util import find_spec

    env = dict(os.environ) if env is None else env
    has_extra = find_spec("anthropic") is not None  # found, not imported: importing it takes seconds
    return {
        "openai": bool(env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL")),
        "anthropic": bool(env.get("ANTHROPIC_API_KEY")) and has_extra,
        "offline": True,
    }


class Engine:
    def __init__(
        self,
        settings: EngineSettings,
        store: TraceStore,
        runner: AgentRunner,
        experiences: Experiences,
        tools: ToolRegistry,
        task_group: TaskGroup,
        downstream: McpServers | None = None,
    ):
        self.settings = settings
        self._store = store
        self._runner = runner
        self._events = runner.events
        self.experiences = experiences
        self.tools = tools
        self._group = task_group
        self.downstream = downstream

    # -- runs -------------------------------------------------------------------------------------------

    async def create(self, messages: Sequence[Any], config: RunConfig) -> Trace:
        """Store a new trace and run it in the background; returns at once."""
        return await self._runner.start(messages, config.model_copy(update={"trace_id": None}))

    async def continue_(self, trace_id: str, messages: Sequence[Any], config: RunConfig) -> Trace:
        """Continue, rewind (``config.insert_after``) or regenerate a trace that is not running."""
        return await self._runner.start(messages, config.model_copy(update={"trace_id": trace_id}))

    async def stop(self, trace_id: str) -> bool:
        """Stop a running trace wherever it runs; False when it is not running."""
        if self._runner.stop(trace_id):
            return True
        if await self._runner.stop_unattended(trace_id):
            return True
        return await self._store.request_stop(trace_id)

    async def reflect(self, trace_id: str, focus: str | None = None) -> Reflection:
        reflection = await reflect_on_trace(self._runner, self.experiences, trace_id, focus)
        self._group.start_soon(self._consolidate_if_over_budget)
        return reflection

    def model(self, spec: str | None = None) -> Model:
        return self._runner.model(spec)

    # -- this process's runs (for the shared server: idle exit, drain, stop --now) ------------------------

    def local_runs(self) -> list[str]:
        """The traces this process is running (or reflecting on) now."""
        return self._runner.owned()

    async def stop_local_runs(self) -> None:
        """Stop every run of this process and wait until each has ended ``stopped``."""
        self._runner.stop_all()
        await self._runner.wait_idle()

    async def wait_local_idle(self) -> None:
        """Return once this process runs nothing (a draining server waits here)."""
        await self._runner.wait_idle()

    # -- views ------------------------------------------------------------------------------------------

    async def get(self, trace_id: str) -> Trace:
        return await self._store.get_trace(trace_id)

    async def path(self, trace_id: str) -> list[Message]:
        return await self._store.get_path(trace_id)

    async def tree(self, trace_id: str) -> list[Message]:
        return await self._store.get_tree(trace_id)

    async def message(self, trace_id: str, sequence: int) -> Message | None:
        return await self._store.get_message(trace_id, sequence)

    async def list_traces(
        self,
        *,
        status: str | None = None,
        uid: str | None = None,
        tag: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> TracePage:
        return await self._store.list_traces(status=status, uid=uid, tag=tag, limit=limit, cursor=cursor)

    async def running(self) -> list[str]:
        """Every trace running now, in any process that shares the store."""
        return await self._store.running_ids()

    async def tail(self, trace_id: str, count: int) -> list[Message]:
        """The last ``count`` messages of the active path (cheap on a long trace)."""
        return await self._store.get_tail(trace_id, count)

    async def last_text(self, trace_id: str, tail: list[Message]) -> Message | None:
        """The latest assistant message with text on the active path, however far back: found in ``tail``
        (the path's last messages) when it is there, else by reading the whole path (a turn of many tool
        calls can push it out of any fixed tail)."""
        messages = tail
        if not any(m.role == "assistant" and m.content for m in tail) and tail and tail[0].sequence > 1:
            messages = await self._store.get_path(trace_id, tail[-1].sequence)
        return next((m for m in reversed(messages) if m.role == "assistant" and m.content), None)

    # -- run handles: what a server gave out for runs (MCP tasks), durable like the trace ----------------

    async def add_handle(self, handle_id: str, trace_id: str, *, held: bool = False) -> RunHandle:
        return await self._store.add_handle(handle_id, trace_id, held=held)

    @staticmethod
    def holder_gone(handle: RunHandle) -> bool:
        """A held handle whose process has ended (on this host; elsewhere only time can tell)."""
        return handle.held_by is not None and handle.final is None and not owner_alive(handle.held_by)

    async def end_handle(self, handle_id: str, final: dict[str, Any]) -> None:
        await self._store.end_handle(handle_id, final)

    async def handle(self, handle_id: str) -> RunHandle | None:
        return await self._store.get_handle(handle_id)

    async def open_handle(self, trace_id: str) -> RunHandle | None:
        return await self._store.open_handle(trace_id)

    async def wait(
        self,
        trace_id: str,
        seconds: float,
        on_message: OnMessage | None = None,
        *,
        after_sequence: int | None = None,
        on_idle: OnIdle | None = None,
        idle_every: float | None = None,
    ) -> Trace:
        """Return when the trace is not running, or after ``seconds``.

        ``on_message`` hears each active-path message after ``after_sequence`` — those stored before the
        wait began first, then each one stored meanwhile by any process; ``on_idle`` is called whenever
        ``idle_every`` seconds pass without one (a heartbeat for clients that time out without progress).
        """
        trace = await self._store.get_trace(trace_id)
        if seconds <= 0 or trace.status is not Status.RUNNING:
            return trace
        async with self._events.subscribe() as events:
            trace = await self._store.get_trace(trace_id)  # after subscribing: no wake-up can be missed
            # messages stored before the wait began are not news (the feed may still deliver some late)
            floor = trace.head_sequence or 0
            if on_message is not None and after_sequence is not None:
                floor = after_sequence
                for message in await self._store.get_path(trace_id):
                    if message.sequence > after_sequence:
                        floor = max(floor, message.sequence)
                        await on_message(message)
            if trace.status is Status.RUNNING:
                every = defaults.PROGRESS_INTERVAL_SECONDS if idle_every is None else idle_every
                with anyio.move_on_after(seconds):
                    await self._follow(trace_id, events, floor, on_message, on_idle, every)
        return await self._store.get_trace(trace_id)

    async def _follow(
        self,
        trace_id: str,
        events: AsyncIterator[TraceEvent],
        floor: int,
        on_message: OnMessage | None,
        on_idle: OnIdle | None,
        idle_every: float,
    ) -> None:
        beat = _Heartbeat(on_idle, idle_every)
        while True:
            event = await beat.next(events)
            if event is None or event.trace_id != trace_id:
                continue
            if isinstance(event, MessageStored) and not event.message.side:
                if on_message is not None and event.message.sequence > floor:
                    floor = event.message.sequence  # main-path sequences only grow
                    await on_message(event.message)
                    beat.heard()
            elif isinstance(event, TraceChanged) and event.trace.status is not Status.RUNNING:
                return

    async def await_traces(
        self,
        trace_ids: Sequence[str],
        *,
        every: bool,
        seconds: float,
        on_message: OnTraceMessage | None = None,
        on_idle: OnIdle | None = None,
    ) -> list[Trace]:
        """Wait until one (``every=False``) or all of the traces are not running, or ``seconds`` pass;
        ``on_message`` hears their main-path messages stored meanwhile, ``on_idle`` fills the silences.
        A trace deleted meanwhile (by a host, or pruned) is left out of the answer: the rest still count."""
        wanted = list(dict.fromkeys(trace_ids))
        async with self._events.subscribe() as events:
            traces: list[Trace | None] = [await self._store.get_trace(tid) for tid in wanted]

            def settled() -> bool:
                done = [t is None or t.status is not Status.RUNNING for t in traces]
                return all(done) if every else any(done)

            if seconds > 0 and not settled():
                beat = _Heartbeat(on_idle, defaults.PROGRESS_INTERVAL_SECONDS)
                with anyio.move_on_after(seconds):
                    while not settled():
                        event = await beat.next(events)
                        if event is None or event.trace_id not in wanted:
                            continue
                        if isinstance(event, TraceChanged):
                            traces[wanted.index(event.trace_id)] = event.trace
                        elif isinstance(event, TraceDeleted):
                            traces[wanted.index(event.trace_id)] = None
                        elif isinstance(event, MessageStored) and not event.message.side and on_message:
                            await on_message(event.trace_id, event.message)
                            beat.heard()
        final: list[Trace] = []
        for trace_id in wanted:
            with contextlib.suppress(TraceNotFound):
                final.append(await self._store.get_trace(trace_id))
        return final

    async def delete(self, trace_id: str) -> bool:
        """Remove a trace that is not running, with its messages; False when it runs.

        A trace that has answered but is still held by its reflection (``reflect=true``) reads as not
        running: the delete waits for the reflection to let it go, as a continuation does."""
        with anyio.move_on_after(HANDOVER_WAIT_SECONDS):
            while not await self._store.delete(trace_id):
                if (await self._store.get_trace(trace_id)).status is Status.RUNNING:
                    return False
                await self._runner.wait_for_release(trace_id)
            return True
        return False

    async def agent_info(self) -> AgentInfo:
        tools = [
            ToolInfo(t.name, " ".join(t.description.split()), t.group, bool(getattr(t, "read_only", False)))
            for t in [*self.tools.select(None), AskHostTool()]
        ]
        servers: list[dict[str, Any]] = []
        if self.downstream is not None and hasattr(self.downstream, "describe"):
            servers = [
                s.model_dump() if hasattr(s, "model_dump") else dict(s) for s in self.downstream.describe()
            ]
        skills = [
            {"name": s.name, "description": s.description}
            for s in await read_skills(self.settings.skills_dir)
        ]
        return AgentInfo(
            tools=tools,
            servers=servers,
            default_model=self.settings.model,
            providers=providers_configured(),
            workspace=str(self.settings.workspace),
            skills=skills,
        )

    def agent_is_read_only(self) -> bool:
        """Whether every tool the agent could call only reads (then a run changes nothing outside)."""
        return all(bool(getattr(t, "read_only", False)) for t in self.tools.select(None))

    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[TraceEvent]]:
        """Every event of every trace, this process's and (through the change feed) the others'."""
        return self._events.subscribe()

    # -- experiences --------------------------------------------------------------------------------------

    async def settle_reflections(self, seconds: float | None = None) -> bool:
        """Wait, ``seconds`` at most (default: 15 s, within --max-wait), for this process's automatic
        reflections under way; True if none is left.

        A ``reflect=true`` run shows its answer before it reflects, so a host that asks for the lessons right
        after reading the answer would otherwise miss them. Reflections of other processes on the store
        (replicas, a second server on the data directory) are waited for through the store: a run that
        reflects keeps its claim until its lessons are written."""
        limit = (
            min(defaults.REFLECTION_SETTLE_SECONDS, self.settings.max_wait) if seconds is None else seconds
        )
        with anyio.move_on_after(limit):
            await self._runner.wait_reflections()
            async with self._events.subscribe() as events:
                held = set(await self._store.reflecting_ids())  # those under way now, not later ones
                while held := held & set(await self._store.reflecting_ids()):
                    with anyio.move_on_after(0.5):  # a missed wake-up costs half a second, not the wait
                        async for event in events:
                            if isinstance(event, TraceChanged) and event.trace_id in held:
                                break
            return True
        return False

    async def recall(self, query: str, limit: int) -> list[Lesson]:
        return await self.experiences.recall(query, limit)

    async def experiences_text(self) -> tuple[str, bool]:
        """The experiences markdown, bounded (newest sections first); True when some were left out."""
        return await self.experiences.read_bounded()

    async def consolidate(self, model: str | None = None) -> ConsolidationResult:
        result = await self.experiences.consolidate(
            self.model(model), self.settings.experience_budget, force=True
        )
        return result

    async def _prune_finished(self, days: float) -> None:
        """``--retain-days``: delete finished traces not updated for that long, now and every so often
        (a tenth of the retention, at most an hour)."""
        every = min(3600.0, days * 86400 / 10)
        while True:
            cut = (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="microseconds")
            try:
                removed = await self._store.prune(cut)
                if removed:
                    log.info("deleted %d finished trace(s) older than %g days", removed, days)
            except Exception:
                log.exception("pruning old traces failed")
            await anyio.sleep(every)

    async def _consolidate_if_over_budget(self) -> None:
        budget = self.settings.experience_budget
        try:
            if budget > 0 and await self.experiences.lesson_count() > budget:
                result = await self.experiences.consolidate(self.model(), budget)
                log.info("consolidated experiences: %s", result.model_dump_json())
        except Exception:
            log.exception("background consolidation of %s failed", self.experiences.path)


def system_prompt_builder(settings: EngineSettings, experiences: Experiences) -> SystemPromptBuilder:
    """A new trace's prompt when the caller gives none: the skills, plus the lessons most relevant to its task."""

    async def build(task: str, config: RunConfig) -> SystemPrompt:
        text = await skills_system_prompt(settings.skills_dir)
        limit = settings.experience_recall if config.recall is None else config.recall
        try:
            lessons = await experiences.recall(task, limit) if limit > 0 else []
        except OSError as exc:  # an unreadable experiences file costs the lessons, not the trace
            log.warning("no lessons recalled for a new trace: %s", exc)
            lessons = []
        if lessons:
            text = f"{text}\n\n{format_lessons_block(lessons)}"
        return SystemPrompt(text, [lesson.text for lesson in lessons])

    return build


@asynccontextmanager
async def open_engine(
    settings: EngineSettings, models: Callable[[str], Model] = resolve_model
) -> AsyncIterator[Engine]:
    """Open everything; on exit, running traces are cancelled (and marked interrupted) before closing."""
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        store = await open_store(
            settings.db, lease_seconds=settings.lease_seconds, pool_size=settings.db_pool_size
        )
        stack.push_async_callback(store.close)
        experiences = open_experiences(settings.db, settings.experiences, store)
        stack.callback(experiences.close)
        tools = ToolRegistry([*workspace_tools(settings.workspace), LoadSkillTool(settings.skills_dir)])
        downstream = None
        if settings.mcp_config is not None:
            specs = load_mcp_config(settings.mcp_config)
            downstream = await stack.enter_async_context(
                McpServers(specs, tools, call_timeout=settings.tool_timeout)
            )
        runner = AgentRunner(
            store,
            tools=tools,
            events=EventBus(),
            models=models,
            default_model=settings.model,
            system_prompt=system_prompt_builder(settings, experiences),
            tool_timeout=settings.tool_timeout,
            context_tokens=settings.context_tokens,
        )
        group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(group.cancel_scope.cancel)  # runs first on exit: background housekeeping stops
        engine = Engine(settings, store, runner, experiences, tools, group, downstream)

        async def reflect_in_run(trace: Trace, head: int) -> list[TraceEvent]:
            reflection = await reflect_on_trace(runner, experiences, trace.trace_id, head=head)
            group.start_soon(engine._consolidate_if_over_budget)
            return reflection.events

        runner.reflector = reflect_in_run
        if not experiences.changes_in_store:  # a file: watched, so hand edits and other processes' count too

            async def announce() -> None:
                runner.events.publish(ExperiencesChanged())

            await group.start(experiences.watch, announce)
        await stack.enter_async_context(runner)
        if settings.retain_days is not None:
            group.start_soon(engine._prune_finished, settings.retain_days)
        yield engine


__all__ = ["Engine", "EngineSettings", "TraceError", "open_engine"]
