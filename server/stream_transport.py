"""JSON-RPC over a byte stream, one frame a line: the MCP session transport of stdio (``--in-process``) and
of every shared-server socket connection.

Unlike the SDK's stdio transport, every frame with an id gets an answer, an invalid one included (bad JSON,
a batch, a wrong ``params`` type): a 1.x client otherwise waits forever. Frames go out as soon as they exist,
and requests sent before the client's end of input are still answered before the session ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import anyio.lowlevel
import mcp_types as types
from anyio.abc import ByteReceiveStream, ByteSendStream
from mcp.server.lowlevel.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.server.runner import serve_dual_era_loop
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from agent import defaults

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 32 * 1024 * 1024
"""A longer line is skipped (and answered -32600): it would otherwise grow the buffer without bound."""
READ_CHUNK = 64 * 1024
ENDLESS_METHODS = frozenset({"subscriptions/listen"})
"""Requests answered only when the client goes: never waited for at its end of input."""
CANCELLED = "notifications/cancelled"
HAND_ON_SECONDS = 5.0
"""How long handing a read message to the session may hold off a cancellation (it takes a moment)."""

PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS = -32700, -32600, -32602
NOT_AN_OBJECT = "Invalid request: a frame must be one JSON-RPC message object."
BATCH = "Invalid request: batches are not supported; send one JSON-RPC message at a time."
BAD_ID = "Invalid request: 'id' must be a string or an integer."
NESTED_TOO_DEEP = "Parse error: the frame nests brackets too deeply to read."


def lowlevel(mcp: MCPServer) -> Server[Any]:
    """The SDK's low-level server behind an MCPServer: what runs sessions over one entered lifespan.

    MCPServer has no public accessor for it; the streamable-HTTP session manager reaches it the same way.
    """
    return mcp._lowlevel_server


# -- frames in ----------------------------------------------------------------------------------------


class FrameTooLarge(Exception):
    """A line over MAX_FRAME_BYTES was skipped."""


class LineReader:
    """Newline-delimited frames from a byte stream, without copying the buffer once per frame."""

    def __init__(self, stream: ByteReceiveStream, limit: int = MAX_FRAME_BYTES):
        self._stream = stream
        self._limit = limit
        self._buffer = bytearray()
        self._start = 0  # the unread part of the buffer begins here
        self._scanned = 0  # no newline before this offset
        self._skipping = False  # inside an oversized line: drop bytes up to its newline
        self._eof = False
        self._pushed: list[bytes] = []

    def push_back(self, line: bytes) -> None:
        """Make ``line`` the next frame again (a connection's first line, once it turns out to be MCP)."""
        self._pushed.append(line)

    async def next_line(self) -> bytes | None:
        """The next frame without its newline; None at the end of the stream.

        Raises FrameTooLarge once an oversized line has been skipped up to its newline.
        """
        if self._pushed:
            return self._pushed.pop()
        while True:
            newline = self._buffer.find(b"\n", max(self._scanned, self._start))
            if newline >= 0:
                line = bytes(self._buffer[self._start : newline])
                self._start = self._scanned = newline + 1
                if self._start > READ_CHUNK and self._start * 2 > len(self._buffer):
                    del self._buffer[: self._start]
                    self._start = self._scanned = 0
                if self._skipping:
                    self._skipping = False
                    raise FrameTooLarge
                return line
            self._scanned = len(self._buffer)
            if self._scanned - self._start > self._limit:
                self._skipping = True
                self._buffer.clear()
                self._start = self._scanned = 0
            if self._eof:
                rest = bytes(self._buffer[self._start :])
                self._buffer.clear()
                self._start = self._scanned = 0
                if self._skipping:
                    self._skipping = False
                    raise FrameTooLarge
                return rest or None  # a last line without its newline still counts
            try:
                self._buffer += await self._stream.receive(READ_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._eof = True


def error_frame(request_id: str | int | None, code: int, message: str) -> bytes:
    error = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    return json.dumps(error, separators=(",", ":")).encode() + b"\n"


def _readable_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


_ID_MEMBER = re.compile(rb'^\s*\{[^{}\[\]]*?"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\\x00-\x1f]|\\.){0,200}")\s*[,}]')
"""An ``"id"`` member before any nested object or array: the request's own id, not a tool call's."""


def _salvaged_id(text: bytes) -> types.RequestId | None:
    """The id of a frame that is not valid JSON, when it can still be read (a truncated or mis-encoded
    request): its client waits on that id, and an error with ``id: null`` would leave it waiting."""
    found = _ID_MEMBER.match(text)
    if found is None:
        return None
    try:
        value = json.loads(found.group(1))
    except ValueError:
        return None
    return value if _readable_id(value) else None


def parse_frame(line: bytes) -> tuple[types.JSONRPCMessage | None, bytes | None]:
    """The message a frame carries, or the error reply it deserves (neither for a blank line, a broken
    response or a broken notification, which never get replies)."""
    text = line.strip()
    if not text:
        return None, None
    try:
        data = json.loads(text)
    except ValueError:  # UnicodeDecodeError included
        return None, error_frame(_salvaged_id(text), PARSE_ERROR, "Parse error: the frame is not valid JSON.")
    except RecursionError:
        return None, error_frame(_salvaged_id(text), PARSE_ERROR, NESTED_TOO_DEEP)
    if isinstance(data, list):
        ids = [item.get("id") for item in data if isinstance(item, dict) and _readable_id(item.get("id"))]
        return None, b"".join(error_frame(i, INVALID_REQUEST, BATCH) for i in ids or [None])
    if not isinstance(data, dict):
        return None, error_frame(None, INVALID_REQUEST, NOT_AN_OBJECT)
    is_response = "method" not in data and ("result" in data or "error" in data)
    if "id" in data and not _readable_id(data["id"]):
        # the SDK would read {"id": null, "method": …} as a notification and never answer it
        return None, None if is_response else error_frame(None, INVALID_REQUEST, BAD_ID)
    try:
        return types.jsonrpc_message_adapter.validate_python(data, by_name=False), None
    except ValidationError:
        pass
    request_id = data.get("id")
    if is_response:
        log.debug("dropping a malformed response frame (id %r)", request_id)
        return None, None
    if request_id is None and isinstance(data.get("method"), str):
        log.debug("dropping a malformed notification %r", data["method"][:100])
        return None, None
    if data.get("jsonrpc") != "2.0":
        return None, error_frame(request_id, INVALID_REQUEST, "Invalid request: 'jsonrpc' must be \"2.0\".")
    if "method" not in data:
        return None, error_frame(request_id, INVALID_REQUEST, "Invalid request: a request needs a 'method'.")
    if not isinstance(data["method"], str):
        return None, error_frame(request_id, INVALID_REQUEST, "Invalid request: 'method' must be a string.")
    if not isinstance(data.get("params", {}), dict):
        return None, error_frame(request_id, INVALID_PARAMS, "Invalid params: 'params' must be an object.")
    return None, error_frame(request_id, INVALID_REQUEST, "Invalid request: not a JSON-RPC 2.0 message.")


# -- one session ---------------------------------------------------------------------------------------


async def serve_session(
    server: Server[Any],
    reader: LineReader,
    stream: ByteSendStream,
    *,
    lifespan_state: Any,
    closing: anyio.Event | None = None,
) -> None:
    """Serve one MCP session (the client's first request picks its protocol era) on an entered lifespan.

    Once ``closing`` is set (the server winds down), the session reads no more and ends as soon as every
    request it read is answered: a host waiting on a run the server let finish (or stopped) gets its
    answer, and a request it sent meanwhile is known not to have been read."""
    to_server, from_client = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    to_client, from_server = anyio.create_memory_object_stream[SessionMessage](0)
    sending = anyio.Lock()
    gone = False
    unanswered: set[str] = set()  # ids as text: a cancellation may name 3 as "3"
    answered = anyio.Event()

    def settled(request_id: object) -> None:
        """An id that needs no more waiting for at the end of input: answered, or cancelled by the client
        (the SDK never answers a request its client cancelled)."""
        nonlocal answered
        unanswered.discard(str(request_id))
        answered.set()
        answered = anyio.Event()

    async def write(frame: bytes) -> None:
        nonlocal gone
        if gone:
            return  # the client left: what it would have read goes nowhere
        async with sending:
            try:
                await stream.send(frame)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                gone = True
                answered.set()  # no one to answer any more

    intake = anyio.CancelScope()  # cancelled as the server winds down: nothing more is read

    async def read_frames() -> None:
        async with to_server:
            with intake:
                while True:
                    try:
                        line = await reader.next_line()
                    except FrameTooLarge:
                        await write(
                            error_frame(None, INVALID_REQUEST, "Invalid request: the frame is too large.")
                        )
                        continue
                    if line is None:
                        break
                    message, reply = parse_frame(line)
                    if reply is not None:
                        await write(reply)
                    # a request read is one the session answers: noted and handed on together, or neither
                    with anyio.CancelScope(shield=True, deadline=anyio.current_time() + HAND_ON_SECONDS):
                        if (
                            isinstance(message, types.JSONRPCRequest)
                            and message.method not in ENDLESS_METHODS
                        ):
                            unanswered.add(str(message.id))
                        elif isinstance(message, types.JSONRPCNotification) and message.method == CANCELLED:
                            settled((message.params or {}).get("requestId"))
                        if message is not None:
                            try:
                                await to_server.send(SessionMessage(message))
                            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                                return  # the session ended first
            with anyio.move_on_after(defaults.EOF_DRAIN_SECONDS):  # the end of input, or of intake
                while unanswered and not gone:
                    await answered.wait()

    async def write_frames() -> None:
        async with from_server:
            async for item in from_server:
                wire = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                await write(wire.encode() + b"\n")
                if isinstance(item.message, types.JSONRPCResponse | types.JSONRPCError):
                    settled(item.message.id)

    async def stop_reading() -> None:
        """Once closing: read nothing more; what was read is answered as at the end of input, then the
        session ends. Whatever the client sent and gets no answer for was never read (a relay may send it
        again elsewhere)."""
        assert closing is not None
        await closing.wait()
        intake.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(write_frames)
        async with anyio.create_task_group() as reading:
            reading.start_soon(read_frames)
            if closing is not None:
                reading.start_soon(stop_reading)
            await serve_dual_era_loop(
                server,
                from_client,
                to_client,
                lifespan_state=lifespan_state,
                init_options=server.create_initialization_options(),
            )
            reading.cancel_scope.cancel()  # the loop ended without the client's EOF (it was closed)


# -- stdio ---------------------------------------------------------------------------------------------


def _pollable(fd: int) -> bool:
    """Pipes, sockets and terminals can be waited on; regular files and /dev/null cannot."""
    mode = os.fstat(fd).st_mode
    return sys.platform != "win32" and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd))


class FdReceiveStream(ByteReceiveStream):
    """Reads a file descriptor without blocking the event loop."""

    def __init__(self, fd: int):
        self._fd = fd
        self._pollable = _pollable(fd)

    async def receive(self, max_bytes: int = READ_CHUNK) -> bytes:
        if self._pollable:
            await anyio.wait_readable(self._fd)  # then read() returns what is there, at once
            data = os.read(self._fd, max_bytes)
        else:
            data = await anyio.to_thread.run_sync(os.read, self._fd, max_bytes, abandon_on_cancel=True)
        if not data:
            raise anyio.EndOfStream
        return data

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()


class FdSendStream(ByteSendStream):
    """Writes a file descriptor without blocking the event loop: non-blocking writes on a pipe or socket
    (that end is ours alone once stdout is diverted), a worker thread for anything else."""

    def __init__(self, fd: int):
        self._fd = fd
        self._nonblocking = _pollable(fd) and not os.isatty(fd)  # a terminal is shared with the shell
        if self._nonblocking:
            os.set_blocking(fd, False)

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            if not self._nonblocking:
                written = await anyio.to_thread.run_sync(os.write, self._fd, view)
            else:
                try:
                    written = os.write(self._fd, view)
                except BlockingIOError:
                    await anyio.wait_writable(self._fd)
                    continue
            view = view[written:]
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._nonblocking:
            with suppress(OSError):
                os.set_blocking(self._fd, True)
        await anyio.lowlevel.checkpoint()


def _private_copy(fd: int) -> int:
    if sys.platform == "win32":
        return os.dup(fd)
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)


@asynccontextmanager
async def stdio_streams() -> AsyncIterator[tuple[LineReader, FdSendStream]]:
    """The process's stdin and stdout as the protocol's wire. Meanwhile fd 0 reads /dev/null and fd 1
    writes to stderr, so child processes (downstream MCP servers) and stray prints never touch the wire."""
    sys.stdout.flush()
    wire_in, wire_out = _private_copy(0), _private_copy(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sender = FdSendStream(wire_out)
    try:
        yield LineReader(FdReceiveStream(wire_in)), sender
    finally:
        await sender.aclose()
        with suppress(OSError):
            os.dup2(wire_in, 0)
            os.dup2(wire_out, 1)
        os.close(wire_in)
        os.close(wire_out)


async def serve_stdio(mcp: MCPServer) -> None:
    """One session on stdin/stdout with its own lifespan: ``--in-process``, as hosts ran us before."""
    server = lowlevel(mcp)
    async with stdio_streams() as (reader, writer), server.lifespan(server) as state:
        await serve_session(server, reader, writer, lifespan_state=state)
