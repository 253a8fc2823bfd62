"""Transport helpers for the MCP client side: noticing a lost HTTP connection, and naming failures in a sentence.

A JSON-RPC error with code -32000 may be a server's own "Server error" or the SDK's "Connection
closed": the code cannot tell a lost connection from an error reply. The transports can, so they
report losses themselves, before the session hears of them: stdio in ``mcp_stdio``, HTTP here by
wrapping httpx's transport, whose network errors are the only real sign of a server gone away.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx2
from mcp import MCPError
from mcp_types.jsonrpc import CONNECTION_CLOSED
from pydantic import ValidationError

from agent.tools.mcp_stdio import CannotStart

# What a lost server looks like to httpx: not a timeout on a quiet stream, not an HTTP error status.
_LOSSES = (httpx2.NetworkError, httpx2.RemoteProtocolError, httpx2.ConnectTimeout)


class LossWatchingTransport(httpx2.AsyncBaseTransport):
    """httpx's transport, calling ``lost(reason)`` on a network failure before anyone sees the error."""

    def __init__(self, lost: Callable[[str], None], inner: httpx2.AsyncBaseTransport | None = None):
        self._lost = lost
        self._inner = inner or httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            response = await self._inner.handle_async_request(request)
        except _LOSSES as exc:
            self._lost(f"its HTTP connection failed ({describe_error(exc)})")
            raise
        if isinstance(response.stream, httpx2.AsyncByteStream):
            response.stream = _LossWatchingStream(response.stream, self._lost)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class _LossWatchingStream(httpx2.AsyncByteStream):
    """A response body (an SSE stream, often) whose network failure is reported as a lost connection."""

    def __init__(self, inner: httpx2.AsyncByteStream, lost: Callable[[str], None]):
        self._inner = inner
        self._lost = lost

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._inner:
                yield part
        except _LOSSES as exc:
            self._lost(f"its HTTP connection failed mid-stream ({describe_error(exc)})")
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, which task groups wrap errors in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe_error(exc: BaseException, command: str | None = None) -> str:
    """A short sentence (no trailing period) for a connection or call failure, for logs and status()."""
    leaf = _leaf(exc)
    if isinstance(leaf, CannotStart):
        return str(leaf)
    if isinstance(leaf, (FileNotFoundError, PermissionError)) and command is not None:
        return f"its command {command!r} could not be started ({leaf.strerror or type(leaf).__name__})"
    if isinstance(leaf, MCPError):
        if leaf.code == CONNECTION_CLOSED:
            return "it closed the connection" + (" (did its process exit? see its stderr)" if command else "")
        return f"it answered with error {leaf.code}: {leaf.message}"
    if isinstance(leaf, ValidationError):  # never a validator dump: a model reads this
        return "its reply is not a valid MCP message"
    if isinstance(leaf, TimeoutError):
        return "it did not answer in time"
    if isinstance(leaf, OSError) and leaf.strerror:
        return f"{type(leaf).__name__}: {leaf.strerror}"
    text = str(leaf).strip().rstrip(".")
    return f"{type(leaf).__name__}: {text}" if text else type(leaf).__name__
