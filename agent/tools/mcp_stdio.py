"""Our stdio transport to a downstream MCP server: bounded, forgiving of bad bytes, honest about losses.

Why not the SDK's ``stdio_client``: it joins partial lines by string concatenation with no bound (a
20 MB line stalled our event loop for 14 s; an endless one takes all memory), its reader dies at the
first byte that is not UTF-8 and then every call waits out its timeout, it offers stderr only as a
file (a flooding child grew one to 1.2 GB), and it never says whether a connection ended because the
server went away. Here:

- lines are framed in one pass over a byte buffer and capped at ``MAX_LINE``;
- undecodable bytes become U+FFFD; a line that is still not JSON-RPC but names the id of a reply is
  answered for the server with an error, so its call fails at once instead of waiting;
- stderr goes through a pipe into a ring buffer of the last ``STDERR_KEEP`` bytes (``StderrTail``),
  read no faster than ``STDERR_RATE``;
- ``lost(reason)`` is called when stdout ends, stdin breaks or the process exits — always before the
  session sees the end of the stream, so a caller can tell a lost connection from an error reply;
- on Linux the server runs under ``die_with_parent.py``, so it dies with us even after SIGKILL;
- closing follows the spec (close stdin, wait, SIGTERM the process group, wait, SIGKILL), bounded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import mcp_types as types
from anyio.abc import ByteReceiveStream, Process
from mcp.client._transport import TransportStreams
from mcp.shared.message import SessionMessage
from mcp_types.jsonrpc import INTERNAL_ERROR, PARSE_ERROR

logger = logging.getLogger(__name__)

MAX_LINE = 16 << 20  # one JSON-RPC message; larger replies are dropped and their call failed
STDERR_KEEP = 64 << 10  # bytes of a child's stderr we hold: enough for its last words, whatever it writes
STDERR_RATE = 16 << 20  # bytes per second of a child's stderr we read at most
_STDERR_BURST = 1 << 20  # read this much before looking at the rate
_THREAD_PARSE = 1 << 20  # lines above this are parsed in a worker thread, off the event loop
_HEAD = 4096  # bytes of a bad line searched for a reply id
_EXIT_GRACE = 2.0  # seconds between closing stdin and SIGTERM, and between SIGTERM and SIGKILL
_EXIT_POLL = 0.05  # how often to look at the exit status while waiting for the process to go
_EXIT_WATCH = 0.5  # how often to look whether the process exited while something keeps its stdout open
_WRAPPER = str(Path(__file__).with_name("die_with_parent.py"))
_REPLY_ID = re.compile(rb'"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,200}")')
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
REPLY_PROBLEM = {"source": "agent-trace-mcp stdio transport"}
"""The ``data`` of errors this transport answers for a server whose reply was unreadable."""


class CannotStart(Exception):
    """The server's command or working directory is missing; the text is a sentence without a period."""


class StderrTail:
    """The last ``STDERR_KEEP`` bytes a child wrote to stderr: a flood costs reading time, never space."""

    def __init__(self, keep: int = STDERR_KEEP):
        self._keep = keep
        self._data = bytearray()

    def add(self, chunk: bytes) -> None:
        self._data += chunk
        if len(self._data) > self._keep:
            del self._data[: len(self._data) - self._keep]

    async def follow(self, stream: ByteReceiveStream) -> None:
        """Keep the tail of ``stream`` until it ends (or we are cancelled), reading at most ``STDERR_RATE``.

        Past that rate the child waits on its full pipe instead of us spending a core on its noise.
        """
        window, taken = anyio.current_time(), 0
        with suppress(anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            async for chunk in stream:
                self.add(chunk)
                taken += len(chunk)
                if taken >= _STDERR_BURST:
                    await anyio.sleep(max(0.0, taken / STDERR_RATE - (anyio.current_time() - window)))
                    window, taken = anyio.current_time(), 0

    def text(self, limit: int) -> str:
        """The last ``limit`` characters, for a log line that explains a failure."""
        return self._data.decode("utf-8", errors="replace").strip()[-limit:]

    def last_line(self, limit: int = 300) -> str | None:
        """The last non-empty line without colour codes, cut to ``limit`` characters; None when silent."""
        for line in reversed(self._data.decode("utf-8", errors="replace").splitlines()):
            line = "".join(c if c.isprintable() else " " for c in _ANSI.sub("", line)).strip()
            if line:
                return line if len(line) <= limit else line[: limit - 1] + "…"
        return None


def resolve_command(command: str, cwd: str | None, env: Mapping[str, str]) -> str:
    """The executable as the OS would find it: a path with a separator from ``cwd``, a bare name on PATH."""
    if cwd is not None and not os.path.isdir(cwd):
        raise CannotStart(f"its working directory {cwd!r} does not exist")
    if os.sep in command or (os.altsep and os.altsep in command):
        path = command if os.path.isabs(command) or cwd is None else os.path.join(cwd, command)
        if not os.path.isfile(path):
            raise CannotStart(f"its command {command!r} does not exist")
        if not os.access(path, os.X_OK):
            raise CannotStart(f"its command {command!r} is not executable")
        return os.path.abspath(path)
    search = env.get("PATH", os.defpath)
    found = shutil.which(command, path=search)
    if found is None:
        shown = search if len(search) <= 200 else search[:199] + "…"
        raise CannotStart(f"its command {command!r} was not found on its PATH ({shown})")
    return found


def _command_line(executable: str, command: str, args: list[str]) -> list[str]:
    """The argv to spawn: on Linux through the wrapper that makes the server die with us."""
    if sys.platform.startswith("linux") and sys.executable:
        return [sys.executable, "-I", "-S", _WRAPPER, str(os.getpid()), executable, command, *args]
    return [executable, *args]  # elsewhere the server notices our death by its stdin closing


@asynccontextmanager
async def stdio_transport(
    command: str,
    args: list[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    stderr: StderrTail,
    lost: Callable[[str], None],
) -> AsyncIterator[TransportStreams]:
    """Start the server and yield the session's streams; ``lost`` hears why the connection ended first."""
    executable = resolve_command(command, cwd, env)
    process = await anyio.open_process(
        _command_line(executable, command, args), env=dict(env), cwd=cwd, start_new_session=True
    )
    # No await until the task group is entered, or a cancellation in the gap would leak the process.
    to_session, from_server = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    to_server, from_session = anyio.create_memory_object_stream[SessionMessage](0)
    connection = _Connection(process, lost)
    async with anyio.create_task_group() as tg:
        assert process.stderr is not None
        tg.start_soon(connection.guard, stderr.follow, process.stderr)
        tg.start_soon(connection.guard, connection.read, to_session)
        tg.start_soon(connection.guard, connection.write, from_session)
        tg.start_soon(connection.guard, connection.watch_exit)
        try:
            yield from_server, to_server
        finally:
            with anyio.CancelScope(shield=True):  # every wait inside is bounded
                from_server.close()
                to_server.close()
                await connection.stop()
            tg.cancel_scope.cancel()


class _Connection:
    """The pipe tasks of one server process, and its shutdown."""

    def __init__(self, process: Process, lost: Callable[[str], None]):
        self._process = process
        self._report_lost = lost
        self._stopping = False  # our own shutdown ends the pipes too: that is no loss to report
        self._warned = False  # one warning per connection for unreadable lines, then debug

    def _lost(self, reason: str) -> None:
        if not self._stopping:
            self._report_lost(reason)

    async def guard(self, task: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run one pipe task; a bug in it ends this connection (reported as lost), never the caller's."""
        try:
            await task(*args)
        except Exception as exc:
            logger.exception("MCP stdio transport task failed")
            self._lost(f"our side of its connection failed ({type(exc).__name__})")

    async def read(self, to_session: anyio.abc.ObjectSendStream[SessionMessage | Exception]) -> None:
        """Frame stdout into messages for the session; at its end, say why before the session hears it."""
        assert self._process.stdout is not None
        buffer, scanned, skipping = bytearray(), 0, False
        try:
            async with to_session:
                async for chunk in self._process.stdout:
                    buffer += chunk
                    start = 0
                    while (end := buffer.find(b"\n", max(start, scanned))) != -1:
                        line, start = bytes(buffer[start:end]), end + 1
                        if skipping:
                            skipping = False  # the end of a line we already refused
                        else:
                            await self._deliver(to_session, line)
                    del buffer[:start]
                    scanned = len(buffer)
                    if len(buffer) > MAX_LINE and not skipping:
                        skipping = True
                        await self._refuse(
                            to_session, bytes(buffer[:_HEAD]), f"longer than {MAX_LINE >> 20} MiB"
                        )
                    if skipping:
                        buffer.clear()
                        scanned = 0
                self._lost(await self._why_stdout_ended())
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # The session closed its end (we are shutting down): keep the pipe drained so a server
            # flushing its last output can still read its stdin's end and exit.
            with suppress(anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                async for _ in self._process.stdout:
                    pass
        except OSError as exc:
            self._lost(f"reading its stdout failed ({exc.strerror or exc})")

    async def _why_stdout_ended(self) -> str:
        with anyio.move_on_after(_EXIT_WATCH):  # it is usually exiting: name its status if it does
            while self._process.returncode is None:
                await anyio.sleep(_EXIT_POLL)
        code = self._process.returncode
        return "it closed its stdout" if code is None else _exit_reason(code)

    async def _deliver(
        self, to_session: anyio.abc.ObjectSendStream[SessionMessage | Exception], line: bytes
    ) -> None:
        if not line.strip():
            return
        text = line.decode("utf-8", errors="replace")
        try:
            if len(line) > _THREAD_PARSE:
                message = await anyio.to_thread.run_sync(_parse, text, abandon_on_cancel=True)
            else:
                message = _parse(text)
        except ValueError:
            await self._refuse(to_session, line[:_HEAD], "that is not JSON-RPC")
            return
        await to_session.send(SessionMessage(message))

    async def _refuse(
        self, to_session: anyio.abc.ObjectSendStream[SessionMessage | Exception], head: bytes, problem: str
    ) -> None:
        """Drop an unreadable line; when it is a reply, answer its call with an error now."""
        if not self._warned:
            self._warned = True
            logger.warning("MCP server sent a line %s (dropped): %.200r", problem, head)
        else:
            logger.debug("MCP server sent a line %s (dropped): %.200r", problem, head)
        match = _REPLY_ID.search(head)
        if match is None or b'"method"' in head:  # a request or notification of the server's: nobody waits
            return
        request_id: Any = json.loads(match.group(1))
        code = INTERNAL_ERROR if problem.startswith("longer") else PARSE_ERROR
        error = types.ErrorData(code=code, message=problem, data=REPLY_PROBLEM)
        await to_session.send(SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=request_id, error=error)))

    async def write(self, from_session: anyio.abc.ObjectReceiveStream[SessionMessage]) -> None:
        """Send the session's messages as lines on stdin; a broken stdin is a lost connection."""
        assert self._process.stdin is not None
        try:
            async with from_session:
                async for message in from_session:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                    await self._process.stdin.send(data.encode())
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            self._lost("it stopped reading its stdin")

    async def watch_exit(self) -> None:
        """Notice an exit even when a process it started keeps its stdout open."""
        while self._process.returncode is None:
            await anyio.sleep(_EXIT_WATCH)
        self._lost(_exit_reason(self._process.returncode))

    async def stop(self) -> None:
        """Close stdin, give the server time to exit, then SIGTERM and SIGKILL its process group."""
        self._stopping = True
        process = self._process
        assert process.stdin is not None
        with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            with anyio.move_on_after(_EXIT_GRACE):
                await process.stdin.aclose()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if await self._exited_within(_EXIT_GRACE):
                break
            self._signal_group(sig)
        else:
            if not await self._exited_within(_EXIT_GRACE):
                logger.warning("MCP server process %d survived SIGKILL; abandoning it.", process.pid)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await stream.aclose()
        if process.returncode is not None:
            with suppress(OSError, anyio.BrokenResourceError), anyio.move_on_after(_EXIT_GRACE):
                await process.aclose()  # reaps it and closes the subprocess transport

    async def _exited_within(self, seconds: float) -> bool:
        with anyio.move_on_after(seconds):
            while self._process.returncode is None:
                await anyio.sleep(_EXIT_POLL)
        return self._process.returncode is not None

    def _signal_group(self, sig: signal.Signals) -> None:
        """Signal the server and everything it started (its own session, so its pid is the group id)."""
        with suppress(ProcessLookupError, PermissionError):  # gone already, or not ours to signal
            if sys.platform == "win32":  # no process groups: the server alone
                self._process.kill()
            else:
                os.killpg(self._process.pid, sig)


def _parse(text: str) -> types.JSONRPCMessage:
    return types.jsonrpc_message_adapter.validate_json(text, by_name=False)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"it was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"it was killed by signal {-code}"
    return f"it exited with status {code}"
