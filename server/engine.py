"""The engine a server process runs: store, runner, tools, experiences and notifications, wired once.

Opened by the MCP server's lifespan (and by the demo); everything here is closed in reverse on exit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup
from mcp.server.subscriptions import InMemorySubscriptionBus, SubscriptionBus

from agent import AgentRunner, EventBus, RunConfig, Status, SystemPrompt, Trace
from agent.core.runner import SystemPromptBuilder
from agent.experiences import Experiences, format_lessons_block
from agent.llm.base import Model, resolve_model
from agent.reflection import Reflection, reflect_on_trace
from agent.skills import LoadSkillTool, skills_system_prompt
from agent.tools.files import workspace_tools
from agent.tools.mcp import McpServers, load_mcp_config
from agent.tools.registry import ToolRegistry
from agent.trace.store import TraceStore, open_store
from server.notify import Notifier
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Engine:
    settings: Settings
    store: TraceStore
    runner: AgentRunner
    events: EventBus
    experiences: Experiences
    notifier: Notifier
    tools: ToolRegistry
    task_group: TaskGroup
    downstream: Any = None  # McpServers, when --mcp-config is set

    async def start(self, messages: Sequence[Any], config: RunConfig) -> Trace:
        """Store the trace and run it in the background; reflects afterwards when the trace asks to."""
        return await self.runner.start(messages, config, self.task_group, after=self._after_run)

    async def reflect(self, trace_id: str, focus: str | None = None) -> Reflection:
        reflection = await reflect_on_trace(self.runner, self.experiences, trace_id, focus)
        self.task_group.start_soon(self._consolidate_if_over_budget)
        return reflection

    async def _after_run(self, trace: Trace) -> None:
        if trace.config.reflect and trace.status in (Status.COMPLETED, Status.FAILED):
            await self.reflect(trace.trace_id)

    async def _consolidate_if_over_budget(self) -> None:
        budget = self.settings.experience_budget
        try:
            if budget > 0 and await self.experiences.lesson_count() > budget:
                result = await self.experiences.consolidate(self.runner.model(), budget)
                log.info("consolidated experiences: %s", result.model_dump_json())
        except Exception:
            log.exception("background consolidation of %s failed", self.experiences.path)


def system_prompt_builder(settings: Settings, experiences: Experiences) -> SystemPromptBuilder:
    """A new trace's prompt when the caller gives none: the skills, plus the lessons most relevant to its task."""

    async def build(task: str, config: RunConfig) -> SystemPrompt:
        text = await skills_system_prompt(settings.skills_dir)
        limit = settings.experience_recall if config.recall is None else config.recall
        lessons = await experiences.recall(task, limit) if limit > 0 else []
        if lessons:
            text = f"{text}\n\n{format_lessons_block(lessons)}"
        return SystemPrompt(text, [lesson.text for lesson in lessons])

    return build


@asynccontextmanager
async def open_engine(
    settings: Settings, bus: SubscriptionBus | None = None, models: Callable[[str], Model] = resolve_model
) -> AsyncIterator[Engine]:
    """Open everything; on exit, running traces are cancelled (and marked interrupted) before closing."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        store = await open_store(settings.db)
        stack.push_async_callback(store.close)
        experiences = Experiences(settings.experiences)
        stack.callback(experiences.close)
        tools = ToolRegistry([*workspace_tools(settings.workspace), LoadSkillTool(settings.skills_dir)])
        downstream = None
        if settings.mcp_config is not None:
            specs = load_mcp_config(settings.mcp_config)
            downstream = await stack.enter_async_context(
                McpServers(specs, tools, call_timeout=settings.tool_timeout)
            )
        events = EventBus()
        notifier = Notifier(bus if bus is not None else InMemorySubscriptionBus())
        task_group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(task_group.cancel_scope.cancel)  # runs first on exit: stop runs, then close
        runner = AgentRunner(
            store,
            tools=tools,
            events=events,
            models=models,
            default_model=settings.model,
            system_prompt=system_prompt_builder(settings, experiences),
            tool_timeout=settings.tool_timeout,
        )
        await task_group.start(notifier.pump, events)
        yield Engine(settings, store, runner, events, experiences, notifier, tools, task_group, downstream)
