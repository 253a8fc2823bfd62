"""Transport helpers for the MCP client side: noticing a dead stdio server, and naming failures in a sentence.

The SDK's session does not tell its owner when the server's stdout reaches EOF (only pending requests
fail), so a crashed stdio server would go unnoticed until the next call. ``watch_eof`` relays the read
stream and sets an event at EOF, using only the public ``Transport`` shape the ``Client`` accepts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
from mcp import MCPError
from mcp.client._transport import TransportStreams
from mcp.shared.message import SessionMessage
from mcp_types.jsonrpc import CONNECTION_CLOSED


@asynccontextmanager
async def watch_eof(
    transport: AbstractAsyncContextManager[TransportStreams], eof: anyio.Event
) -> AsyncIterator[TransportStreams]:
    """Wrap ``transport`` so ``eof`` is set when the server side of its read stream ends.

    Our own shutdown (the session closing its end) does not set it.
    """
    async with transport as (read_stream, write_stream):
        relay_send, relay_receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)

        async def relay() -> None:
            async with relay_send:
                try:
                    async for item in read_stream:
                        await relay_send.send(item)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return  # the session closed its end: we are shutting down
            eof.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(relay)
            try:
                yield relay_receive, write_stream
            finally:
                tg.cancel_scope.cancel()
                relay_receive.close()


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, which task groups wrap errors in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe_error(exc: BaseException, command: str | None = None) -> str:
    """A short sentence (no trailing period) for a connection or call failure, for logs and status()."""
    leaf = _leaf(exc)
    if isinstance(leaf, (FileNotFoundError, PermissionError)) and command is not None:
        return f"its command {command!r} could not be started ({leaf.strerror or type(leaf).__name__})"
    if isinstance(leaf, MCPError):
        if leaf.code == CONNECTION_CLOSED:
            return "it closed the connection" + (" (did its process exit? see its stderr)" if command else "")
        return f"it answered with error {leaf.code}: {leaf.message}"
    if isinstance(leaf, TimeoutError):
        return "it did not answer in time"
    if isinstance(leaf, OSError) and leaf.strerror:
        return f"{type(leaf).__name__}: {leaf.strerror}"
    text = str(leaf).strip().rstrip(".")
    return f"{type(leaf).__name__}: {text}" if text else type(leaf).__name__
