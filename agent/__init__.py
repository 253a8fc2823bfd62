"""agent-trace-mcp's engine: traces, the agent runner, model providers and tools. Knows nothing of MCP."""

from agent.core.runner import AgentRunner, RunConfig, RunResult, SystemPrompt
from agent.errors import TraceError
from agent.trace.events import EventBus, MessageStored, TraceChanged
from agent.trace.models import Message, NewMessage, Status, StopReason, Trace, TraceConfig
from agent.trace.store import SQLiteTraceStore, TraceStore, open_store

__all__ = [
    "AgentRunner",
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
    "open_store",
]
