"""Builds the MCPServer: the engine in the lifespan, tools, resources, notification middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.subscriptions import InMemorySubscriptionBus

from agent.engine import open_engine
from agent.llm.base import Model, resolve_model
from server.notify import Notifier, subscriptions_middleware
from server.resources import register_resources, resource_list_middleware
from server.settings import Settings
from server.state import ServerState
from server.tools import register_tools

VERSION = "0.1.0"
INSTRUCTIONS = """\
agent-trace-mcp runs LLM agents in the background as traces. create_trace starts one and returns its id at
once; get_trace(trace_id, wait_seconds=60) waits for it with progress; run_trace continues, rewinds
(insert_after) or regenerates it; stop_trace stops it; reflect_trace turns it into lessons that later traces
recall. Traces are also resources: trace://<id> (active path) and trace://<id>/tree (every branch)."""


def build_server(settings: Settings, models: Callable[[str], Model] = resolve_model) -> MCPServer:
    """``models`` resolves 'provider:name' strings; tests pass one serving a scripted model."""
    bus = InMemorySubscriptionBus()  # ours, so background runs can publish to 2026-07-28 listeners

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[ServerState]:
        async with open_engine(settings, models) as engine, anyio.create_task_group() as group:
            notifier = Notifier(bus)
            await group.start(notifier.pump, engine)
            yield ServerState(settings, engine, notifier)
            group.cancel_scope.cancel()

    mcp = MCPServer(
        "agent-trace-mcp",
        title="Agent traces",
        version=VERSION,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        subscriptions=bus,
        middleware=[subscriptions_middleware, resource_list_middleware],
    )
    register_tools(mcp)
    register_resources(mcp, settings)
    return mcp
