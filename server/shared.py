"""The shared server: one engine per data directory, serving every host's relay over a Unix socket.

The MCPServer lifespan (engine, runs, notifier) is entered once for the whole process, as the SDK's
streamable-HTTP session manager does, and each socket connection is one MCP session on it in the era its
client opens. A connection may begin with control lines (hello, status, drain, stop) before, or instead of,
a session. The server exits after ``idle_exit`` seconds with no local run and no connection, at once when
its socket file is removed (its runs end ``stopped``), and when told to: drain, stop, SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketListener, SocketStream, TaskGroup
from mcp.server.mcpserver import MCPServer

from agent.engine import Engine
from agent.errors import TraceError
from server.relay import (
    CONTROL_KEY,
    ServerAddress,
    ServerUnavailable,
    ask_once,
    differing,
    read_record,
    settings_digests,
    stop_command,
    try_lock,
    write_json,
)
from server.relay_session import closing_note
from server.settings import Settings
from server.state import ServerState
from server.stream_transport import FrameTooLarge, LineReader, lowlevel, serve_session
from server.version import running_version

log = logging.getLogger("agent-trace-mcp.shared")

WATCH_SECONDS = 0.2
"""How often the server looks at its socket file and at whether it is idle."""
FIRST_LINE_SECONDS = 30.0
STOP_RUNS_SECONDS = 15.0
"""A stop waits this long for the runs to end ``stopped``; the rest end ``interrupted`` as the engine closes."""
BIND_WAIT_SECONDS = 10.0
"""How long a new server waits for the lock of one that no longer answers (it is exiting)."""
CLOSE_SECONDS = 5.0
ANSWER_GRACE_SECONDS = 10.0
"""Winding down, host sessions get this long to answer what they were asked (a wait on a run that just
ended answers within a second) before their connections are closed."""
ACCEPT_RETRY_SECONDS = 0.1
"""After a failed accept (EMFILE): the connections already open go on meanwhile."""
DRAINED, STOP_NOW = "drained", "stop-server --now"  # shutdown reasons a control request gives
UPGRADE = "drained for a relay of another version"
"""A drain a newer relay asked for: the relays still connected take their hosts to the next server."""


class AlreadyRunning(Exception):
    """Another shared server listens for this data directory."""


class Mode(StrEnum):
    SERVING = "serving"
    DRAINING = "draining"  # no new sessions; exits once its runs have finished
    STOPPING = "stopping"


@dataclass
class ProcessInfo:
    """This server process as ``status`` shows it."""

    pid: int
    version: str
    started_at: float
    data_dir: Path
    socket: Path
    log: Path


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _control_request(line: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) and CONTROL_KEY in data else None


class SharedServer:
    def __init__(self, mcp: MCPServer, settings: Settings):
        self._server = lowlevel(mcp)
        self.settings = settings
        self.address = ServerAddress.of(settings.data_dir)
        self.version = running_version()
        self.digests = settings_digests(settings)
        self.info = ProcessInfo(
            os.getpid(),
            self.version,
            time.time(),
            self.address.data_dir,
            self.address.socket,
            self.address.log,
        )
        self.mode = Mode.SERVING
        self.reason = ""
        self._stop_runs_asked = False
        self._state: ServerState | None = None
        self._connections: set[anyio.CancelScope] = set()
        self._sessions = 0
        self._sock: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._lock_fd: int | None = None
        self._group: TaskGroup | None = None
        self._notes: dict[str, int] = {}  # settings-mismatch note -> connected hosts it concerns: for status

    def _enter_loop(self) -> None:
        # anyio primitives exist only inside the event loop
        self._ready = anyio.Event()
        self._shutdown = anyio.Event()
        self._closing = anyio.Event()

    # -- the socket ----------------------------------------------------------------------------------

    def bind(self) -> None:
        """Take the listening lock and bind the socket (0600, under a 0077 umask); raises AlreadyRunning."""
        self.address.prepare()
        deadline = time.monotonic() + BIND_WAIT_SECONDS
        while (fd := try_lock(self.address.lock)) is None:
            pid = read_record(self.address).get("pid", "?")
            if ask_once(self.address, {CONTROL_KEY: "status"}) is not None:
                raise AlreadyRunning(
                    f"A shared server is already running for {self.address.data_dir} (pid {pid})."
                )
            if time.monotonic() > deadline:
                raise AlreadyRunning(
                    f"Another shared server (pid {pid}) holds {self.address.lock} but does not answer; "
                    "stop that process and start again."
                )
            time.sleep(0.05)
        self._lock_fd = fd
        path = os.fsencode(self.address.socket)
        with suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket: we hold the lock, so nobody listens on it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o077)
        try:
            sock.bind(path)
        finally:
            os.umask(umask)
        os.chmod(path, 0o600)
        sock.listen(128)
        info = os.stat(path)
        self._sock, self._socket_id = sock, (info.st_dev, info.st_ino)
        self._write_record()

    def _record(self) -> dict[str, Any]:
        return {
            "pid": self.info.pid,
            "version": self.version,
            "state": self.mode.value,
            "socket": str(self.address.socket),
            "data_dir": str(self.address.data_dir),
            "log": str(self.address.log),
            "started_at": _iso(self.info.started_at),
        }

    def _write_record(self) -> None:
        write_json(self.address.record, self._record())

    def _socket_is_ours(self) -> bool:
        try:
            info = os.stat(os.fsencode(self.address.socket))
        except FileNotFoundError:
            return False
        return (info.st_dev, info.st_ino) == self._socket_id

    def _stop_listening(self) -> None:
        """No new connections: the socket file goes (so the next relay starts a new server) and the lock with it.

        Connections already in the listen backlog are still accepted and told the server is on its way out
        (a relay would otherwise wait its whole hello timeout on them)."""
        if self._socket_is_ours():
            os.unlink(os.fsencode(self.address.socket))
        if read_record(self.address).get("pid") == self.info.pid:
            self.address.record.unlink(missing_ok=True)
        if self.mode is Mode.DRAINING and self._lock_fd is not None:  # until it exits, stop-server finds it
            write_json(self.address.draining_record(self.info.pid), self._record())
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- running ---------------------------------------------------------------------------------------

    async def run(self) -> int:
        assert self._sock is not None, "bind() first"
        self._enter_loop()
        listener = await SocketListener.from_socket(self._sock)
        log.info(
            "agent-trace-mcp %s shared server (pid %d) for %s listening on %s",
            self.version, self.info.pid, self.address.data_dir, self.address.socket,
        )  # fmt: skip
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(self._accept, listener)
                group.start_soon(self._signals)
                async with self._server.lifespan(self._server) as state:
                    if not isinstance(state, ServerState):
                        raise TypeError("the server's lifespan must yield a ServerState")
                    self._state = state  # one state, one engine: every session shares it
                    self._ready.set()
                    group.start_soon(self._watch, self._state.engine)
                    await self._shutdown.wait()
                    await self._wind_down(self._state.engine)
                group.cancel_scope.cancel()
        finally:
            self._stop_listening()
            self.address.draining_record(self.info.pid).unlink(missing_ok=True)
            await listener.aclose()
        log.info("shared server (pid %d) stopped: %s", self.info.pid, self.reason)
        return 0

    async def _accept(self, listener: SocketListener) -> None:
        assert self._group is not None
        failing = False
        while True:  # until the server exits: see _stop_listening
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as exc:  # out of descriptors: the open ones go on
                level = logging.DEBUG if failing else logging.WARNING  # once per spell, not every retry
                log.log(level, "could not accept a connection (%s); retrying", exc.__cause__ or exc)
                failing = True
                await anyio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            failing = False
            self._group.start_soon(self._connection, stream)

    async def _connection(self, stream: SocketStream) -> None:
        scope = anyio.CancelScope()
        self._connections.add(scope)
        try:
            with scope:
                async with stream:
                    await self._converse(stream)
        except Exception:
            log.exception("a connection failed")
        finally:
            self._connections.discard(scope)

    @staticmethod
    async def _next_line(reader: LineReader) -> bytes | None:
        """The next line; None at the end, for an oversized one, or after FIRST_LINE_SECONDS of silence."""
        with anyio.move_on_after(FIRST_LINE_SECONDS):
            try:
                return await reader.next_line()
            except FrameTooLarge:
                return None
        return None

    async def _converse(self, stream: SocketStream) -> None:
        reader = LineReader(stream)
        differ: list[str] = []  # the settings in which this host differs from the server, once a session
        relayed = False  # a relay asked for this session (a client may also speak MCP to the socket at once)
        while (line := await self._next_line(reader)) is not None:
            request = _control_request(line)
            if request is None:  # MCP from the first line: a client that speaks to the socket directly
                reader.push_back(line)
                break
            reply, then = await self._control(request)
            if (
                "shutdown" in reply
            ):  # the socket file goes first: whoever reads the reply cannot reach us again
                self.begin_shutdown(reply["shutdown"], stop_runs=reply["shutdown"] == STOP_NOW)
            with anyio.CancelScope(shield=True):  # winding down closes connections: not before this reply
                await stream.send(json.dumps(reply).encode() + b"\n")
            if then == "session":
                differ = list(reply.get("differ") or [])
                relayed = True
                break
            if then == "close":
                return
            if then == "hold":  # closed when the server exits: the caller waits for that
                await anyio.sleep_forever()
        else:
            return
        if self.mode is not Mode.SERVING:
            return
        await self._ready.wait()
        assert self._state is not None
        state = self._state
        note = self._note_settings(differ) if differ else None
        if note is not None:  # this host's agent_info says so; the others' do not
            state = dataclasses.replace(state, notes=[*state.notes, note])
        self._sessions += 1
        log.info("a host connected (%d session(s))", self._sessions)
        try:
            await serve_session(self._server, reader, stream, lifespan_state=state, closing=self._closing)
        finally:
            if relayed and self._closing.is_set():  # why, so the relay knows whether to take its host on
                with anyio.CancelScope(shield=True), anyio.move_on_after(1), suppress(Exception):
                    await stream.send(closing_note(reconnect=self.reason == UPGRADE, reason=self.reason))
            self._sessions -= 1
            if note is not None:
                self._notes[note] -= 1
            log.info("a host left (%d session(s))", self._sessions)

    # -- control requests --------------------------------------------------------------------------------

    async def _control(self, request: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The reply, and what the connection does next: more (requests), session, close or hold."""
        op = request.get(CONTROL_KEY)
        reply: dict[str, Any] = {"ok": True, "pid": self.info.pid, "version": self.version}
        if op == "hello":
            theirs = request.get("settings")
            differ = differing(self.digests, theirs) if isinstance(theirs, dict) else []
            same_version = request.get("version") == self.version or bool(request.get("any_version"))
            grant = bool(request.get("session")) and same_version and self.mode is Mode.SERVING
            reply |= {"state": self.mode.value, "session": grant, "differ": differ}
            return reply, "session" if grant else "more"
        if op == "status":
            return reply | await self._status(), "more"
        if op in ("drain", "stop"):
            running = self._state.engine.local_runs() if self._state else []
            now = op == "stop" and bool(request.get("now"))
            reply |= {
                "state": (Mode.STOPPING if now else Mode.DRAINING).value,
                "running": running,
                "shutdown": STOP_NOW if now else DRAINED if op == "stop" else UPGRADE,
            }
            return reply, "hold" if request.get("wait") else "close"
        return {"ok": False, "error": f"Unknown control request {str(op)[:40]!r}."}, "more"

    async def _status(self) -> dict[str, Any]:
        running: list[dict[str, Any]] = []
        engine = self._state.engine if self._state else None
        here = set(engine.local_runs()) if engine else set()
        every = await engine.running() if engine else []  # other processes' runs on the store too
        for trace_id in [*here, *(t for t in every if t not in here)]:
            try:
                name = (await engine.get(trace_id)).name if engine else None
            except Exception:
                name = None
            running.append(
                {"trace_id": trace_id, "name": name} | ({} if trace_id in here else {"elsewhere": True})
            )
        return {
            "state": self.mode.value,
            "uptime_seconds": round(time.time() - self.info.started_at, 1),
            "started_at": _iso(self.info.started_at),
            "data_dir": str(self.address.data_dir),
            "socket": str(self.address.socket),
            "log": str(self.address.log),
            "sessions": self._sessions,
            "idle_exit_seconds": self.settings.idle_exit,
            "running": running,
            "notes": [note for note, hosts in self._notes.items() if hosts],
        }

    def _note_settings(self, differ: list[str]) -> str:
        """The sentence for that host's ``agent_info``; logged once per kind, in ``status`` while such a host
        is connected."""
        note = (
            f"This host's settings differ from the shared server's ({', '.join(differ)}); it is served with "
            f"the ones the server started with. Run `{stop_command(self.address.data_dir)}` to restart the "
            "server with new settings."
        )
        if note not in self._notes:
            self._notes[note] = 0
            log.warning(
                "a host connected with settings that differ from this server's (%s)", ", ".join(differ)
            )
        self._notes[note] += 1
        return note

    # -- ending ----------------------------------------------------------------------------------------

    def begin_shutdown(self, reason: str, *, stop_runs: bool) -> None:
        """Stop taking sessions; then either let the runs finish (drain) or stop them (they end ``stopped``)."""
        if self._shutdown.is_set():
            if (
                stop_runs
                and not self._stop_runs_asked
                and self._state is not None
                and self._group is not None
            ):
                self._stop_runs_asked, self.mode, self.reason = True, Mode.STOPPING, reason
                self._group.start_soon(self._stop_runs, self._state.engine)
            return
        if reason in (DRAINED, UPGRADE):
            log.info("draining (%s): taking no new hosts, exiting once the runs have finished", reason)
        else:
            log.info("shutting down: %s", reason)
        self.reason, self._stop_runs_asked = reason, stop_runs
        self.mode = Mode.DRAINING if reason in (DRAINED, UPGRADE) else Mode.STOPPING
        self._stop_listening()
        if reason == UPGRADE:  # its relays move their hosts to the new server once they are answered
            self._closing.set()
        self._shutdown.set()

    async def _stop_runs(self, engine: Engine) -> None:
        with anyio.move_on_after(STOP_RUNS_SECONDS) as waited:
            await engine.stop_local_runs()
        if waited.cancelled_caught:
            log.warning("some runs did not stop within %g s; they end interrupted", STOP_RUNS_SECONDS)

    async def _wind_down(self, engine: Engine) -> None:
        if self._stop_runs_asked:
            await self._stop_runs(engine)
        elif engine.local_runs():
            log.info("draining: waiting for %d run(s) to finish", len(engine.local_runs()))
            await engine.wait_local_idle()  # a stop --now meanwhile stops them
        await self._close_connections()
        if engine.local_runs():  # started by a session just before it closed
            await engine.wait_local_idle()

    async def _close_connections(self) -> None:
        self._closing.set()  # each session ends once it has answered what it was asked
        with anyio.move_on_after(ANSWER_GRACE_SECONDS):
            while self._sessions:
                await anyio.sleep(0.01)
        for scope in list(self._connections):
            scope.cancel()
        with anyio.move_on_after(CLOSE_SECONDS):
            while self._connections:
                await anyio.sleep(0.01)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self._shutdown.is_set() and self._stop_runs_asked:
                    log.warning("%s again: exiting now (runs still going end interrupted)", name)
                    assert self._group is not None
                    self._group.cancel_scope.cancel()
                    return
                self.begin_shutdown(name, stop_runs=True)

    async def _watch(self, engine: Engine) -> None:
        """Exit when the socket file goes (or the data directory), or after idle_exit seconds of nothing."""
        idle_since: float | None = time.monotonic()
        while self.mode is Mode.SERVING:
            await anyio.sleep(WATCH_SECONDS)
            if self.mode is not Mode.SERVING:
                return
            if not self._socket_is_ours() or not self.address.data_dir.is_dir():
                log.warning("the socket %s was removed: stopping", self.address.socket)
                self.begin_shutdown("socket removed", stop_runs=True)
                return
            if self._connections or engine.local_runs():
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif 0 < self.settings.idle_exit <= time.monotonic() - idle_since:
                self.begin_shutdown(f"idle for {self.settings.idle_exit:g} s", stop_runs=False)
                return


def serve_shared(settings: Settings) -> int:
    """``agent-trace-mcp server``: run the data directory's shared server in this process until it ends."""
    from server.app import build_server

    server = SharedServer(build_server(settings), settings)
    try:
        server.bind()
    except (AlreadyRunning, ServerUnavailable) as exc:
        print(f"agent-trace-mcp: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"agent-trace-mcp: cannot listen on {server.address.socket}: {exc.strerror}.", file=sys.stderr)
        return 1
    try:
        return anyio.run(server.run)
    except Exception as exc:
        cause = first_cause(exc)
        if isinstance(cause, TraceError):  # a refusal with its sentence (an unreachable database…)
            log.error("the shared server could not start: %s", cause)  # the log's last line, for the relay
            return 1
        log.exception("the shared server failed")
        log.error("the shared server stopped on an error: %s: %s", type(cause).__name__, cause)
        return 1


def first_cause(exc: BaseException) -> BaseException:
    """The first exception inside anyio's task-group wrappers: the one that says what went wrong."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
