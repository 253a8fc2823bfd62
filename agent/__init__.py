"""agent-trace-mcp's engine: traces, the agent runner, model providers and tools. Knows nothing of MCP.

Names are imported on first use (PEP 562), so ``from agent import defaults`` — what the relay and the CLI
need — does not load the engine, the providers and the MCP client.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.core.requests import RunConfig, SystemPrompt
    from agent.core.runner import AgentRunner, RunResult
    from agent.engine import Engine, open_engine
    from agent.errors import TraceError
    from agent.settings import EngineSettings
    from agent.trace.backends import open_store
    from agent.trace.events import EventBus, MessageStored, TraceChanged
    from agent.trace.models import Message, NewMessage, Status, StopReason, Trace, TraceConfig
    from agent.trace.sqlite import SQLiteTraceStore
    from agent.trace.store import TraceStore

_WHERE = {
    "AgentRunner": "agent.core.runner",
    "RunConfig": "agent.core.requests",
    "RunResult": "agent.core.runner",
    "SystemPrompt": "agent.core.requests",
    "Engine": "agent.engine",
    "open_engine": "agent.engine",
    "EngineSettings": "agent.settings",
    "TraceError": "agent.errors",
    "open_store": "agent.trace.backends",
    "EventBus": "agent.trace.events",
    "MessageStored": "agent.trace.events",
    "TraceChanged": "agent.trace.events",
    "Message": "agent.trace.models",
    "NewMessage": "agent.trace.models",
    "Status": "agent.trace.models",
    "StopReason": "agent.trace.models",
    "Trace": "agent.trace.models",
    "TraceConfig": "agent.trace.models",
    "SQLiteTraceStore": "agent.trace.sqlite",
    "TraceStore": "agent.trace.store",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AgentRunner",
    "Engine",
    "EngineSettings",
    "EventBus",
    "Message",
    "MessageStored",
    "NewMessage",
    "RunConfig",
    "RunResult",
    "SQLiteTraceStore",
    "Status",
    "StopReason",
    "SystemPrompt",
    "Trace",
    "TraceChanged",
    "TraceConfig",
    "TraceError",
    "TraceStore",
    "open_engine",
    "open_store",
]
