"""agent-trace-mcp's engine: traces, the agent runner, model providers and tools. Knows nothing of MCP."""

from agent.core.runner import AgentRunner, RunConfig, RunResult, SystemPrompt
from agent.engine import Engine, EngineSettings, open_engine
from agent.errors import TraceError
from agent.trace.backends import open_store
from agent.trace.events import EventBus, MessageStored, TraceChanged
from agent.trace.models import Message, NewMessage, Status, StopReason, Trace, TraceConfig
from agent.trace.sqlite import SQLiteTraceStore
from agent.trace.store import TraceStore

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
