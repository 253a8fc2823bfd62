"""Builds the MCP server: the engine in the lifespan, tools, resources, prompts and the middleware."""

from __future__ import annotations

import difflib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.types import INVALID_PARAMS, CallToolResult, GetPromptResult, InputRequiredResult
from pydantic import ValidationError

from agent import defaults
from agent.engine import open_engine
from agent.llm.base import Model, resolve_model
from agent.trace.backends import store_name
from server.arguments import bool_as_number, validation_sentence
from server.completions import completion_middleware
from server.notify import Notifier, subscriptions_middleware
from server.prompts import register_prompts
from server.protocol_logging import ProtocolLog
from server.resources import register_resources, resource_list_middleware
from server.settings import Settings
from server.state import ServerState, state_of
from server.tasks import TasksExtension
from server.tools import patch_tools_list, register_tools
from server.version import running_version
from server.views import elide, suggested_wait

log = logging.getLogger(__name__)


def instructions(max_wait: float = defaults.MAX_WAIT_SECONDS) -> str:
    """What initialize tells the host, with this server's own --max-wait."""
    return INSTRUCTIONS.replace("{wait}", f"{suggested_wait(max_wait):g}")


INSTRUCTIONS = """\
agent-trace-mcp runs LLM agents in the background as traces. create_trace starts one and returns its id at
once. get_trace(trace_id) answers with a compact summary (answer, question, latest steps); add
wait_seconds={wait} to long-poll with progress, view='messages' for the steps.
await_traces waits on several at once. run_trace continues, rewinds (insert_after) or regenerates a trace;
stop_trace stops it; reflect_trace turns it into lessons later traces recall. agent_info lists what the
background agent can use (tools, servers, models, workspace, skills). Traces are resources too:
trace://<id>, trace://<id>/tree and trace://<id>/messages/<sequence> (one message, uncut)."""


class TraceServer(MCPServer):
    """MCPServer whose refusals are one sentence naming the argument, never a validator dump."""

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        tool = self._tool_manager.get_tool(name)
        if tool is None:
            raise ToolError(
                f"There is no tool {elide(name, 40)}; tools/list shows this server's tools "
                "(agent_info shows what the background agent can use)."
            )
        known = list((tool.parameters or {}).get("properties") or {})
        unknown = [key for key in arguments or {} if key not in known]
        if unknown:  # a misspelt argument would otherwise be dropped, and its default used unseen
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            close = difflib.get_close_matches(unknown[0][:100], known, n=1, cutoff=0.75)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            takes = f"its arguments are {', '.join(known)}" if known else "it takes no arguments"
            raise ToolError(f"{name} has no argument {elide(unknown[0], 40)}{hint}{more}; {takes}.")
        if problem := bool_as_number(arguments or {}, tool.parameters or {}, name):
            raise ToolError(problem)
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                raise ToolError(validation_sentence(exc.__cause__, name)) from None
            prefix = f"Error executing tool {name}: "
            text = str(exc)
            if text.startswith(prefix):
                raise ToolError(text[len(prefix) :]) from None
            raise

    async def get_prompt(
        self, name: str, arguments: dict[str, Any] | None = None, context: Context[Any, Any] | None = None
    ) -> GetPromptResult | InputRequiredResult:
        prompt = self._prompt_manager.get_prompt(name)
        if prompt is None:
            raise MCPError(
                code=INVALID_PARAMS, message=f"There is no prompt {elide(name, 40)}; prompts/list shows them."
            )
        known = [a.name for a in prompt.arguments or []]
        unknown = [key for key in arguments or {} if key not in known]
        if unknown:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"The prompt {name} has no argument {elide(unknown[0], 40)}; "
                f"its arguments are {', '.join(known) or 'none'}.",
            )
        try:
            return await super().get_prompt(name, arguments, context)
        except ValueError as exc:
            cause: BaseException = exc
            while isinstance(cause.__cause__, ValueError):  # the SDK wraps what the prompt itself said
                cause = cause.__cause__
            raise MCPError(
                code=INVALID_PARAMS, message=f"The prompt {name} could not be rendered: {cause}"
            ) from None


async def tools_list_middleware(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """tools/list: honest destructive hints, from what the background agent could call right now, and
    concise schemas."""
    result = await call_next(ctx)
    state = state_of(ctx.lifespan_context)
    if ctx.method == "tools/list" and state is not None:
        result = await patch_tools_list(result, state)
    return result


def start_notes(settings: Settings) -> list[str]:
    """What agent_info (and the log) should tell about how the server was started."""
    workspace = settings.workspace.resolve()
    if workspace == Path(workspace.anchor):
        return [
            f"The workspace is {workspace} (hosts start servers there when no --workspace is given): the "
            "agent's file tools can read any file this user can. Set --workspace (AGENT_TRACE_WORKSPACE)."
        ]
    return []


def build_server(settings: Settings, models: Callable[[str], Model] = resolve_model) -> MCPServer:
    """``models`` resolves 'provider:name' strings; tests pass one serving a scripted model."""
    bus = InMemorySubscriptionBus()  # ours, so background runs can publish to 2026-07-28 listeners
    opened: list[ServerState] = []  # the lifespan's state, for the one resource that gets no context
    tasks = TasksExtension(bus)
    protocol_log = ProtocolLog()

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[ServerState]:
        async with open_engine(settings, models) as engine, anyio.create_task_group() as group:
            notifier = Notifier(bus)
            await group.start(notifier.pump, engine)
            await group.start(protocol_log.pump, engine)
            await group.start(tasks.serve, engine)
            state = ServerState(settings, engine, notifier, notes=start_notes(settings))
            log.info(
                "serving: model %s, workspace %s, store %s",
                settings.model,
                settings.workspace,
                store_name(settings.db),
            )
            for note in state.notes:
                log.warning("%s", note)
            opened.append(state)
            try:
                yield state
            finally:
                opened.remove(state)
                group.cancel_scope.cancel()

    mcp = TraceServer(
        "agent-trace-mcp",
        title="Agent traces",
        version=running_version(),
        instructions=instructions(settings.max_wait),
        lifespan=lifespan,
        subscriptions=bus,
        extensions=[tasks],
        middleware=[
            subscriptions_middleware,
            resource_list_middleware,
            tools_list_middleware,
            protocol_log.middleware,
            completion_middleware,
            tasks.listen_middleware,
        ],
    )
    register_tools(mcp)
    register_resources(mcp, settings, lambda: opened[-1] if opened else None)
    register_prompts(mcp, settings.max_wait)
    return mcp
