"""Progress notifications of a wait: one line per stored message, numbered, kept apart from the response."""

from __future__ import annotations

import anyio
from mcp.server.mcpserver import Context

from agent import Message
from agent.engine import Engine
from server.views import one_line


class ProgressLines:
    """The progress line for each message a wait hears, a tool result named by its tool: when the wait did
    not hear the call (it was stored before the wait listened), the call is looked up, once per turn."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._names: dict[str, dict[str, str]] = {}  # per trace: tool-call id -> tool name

    async def line(self, trace_id: str, message: Message) -> str:
        names = self._names.setdefault(trace_id, {})
        call = message
        while call.role == "tool" and message.tool_call_id not in names and call.parent_sequence:
            found = await self._engine.message(trace_id, call.parent_sequence)  # past parallel results
            if found is None:
                break
            call = found
        if call is not message:
            one_line(call, names)
        return one_line(message, names)


PROGRESS_SETTLE_SECONDS = 0.05
"""Quiet between a wait's last progress notification and its response."""


class Progress:
    """A wait's numbered progress notifications. A response that follows the last one at once can reach
    the host in the same read (the relay copies what it has), and the TypeScript SDK then handles the
    response first and drops the progress as unknown: ``settle`` keeps the two apart."""

    def __init__(self, ctx: Context):
        self._ctx = ctx
        self._sent = 0
        self._at: float | None = None

    async def send(self, text: str) -> None:
        self._sent += 1
        await self._ctx.report_progress(self._sent, None, text)
        self._at = anyio.current_time()

    async def settle(self) -> None:
        if self._at is not None:
            await anyio.sleep(max(0.0, self._at + PROGRESS_SETTLE_SECONDS - anyio.current_time()))
