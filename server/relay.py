"""The stdio relay hosts launch, and the client side of the shared server: where it listens, how it is
started exactly once, and its control requests (hello, status, drain, stop).

Synchronous and standard library only: the relay copies frames between the host's pipes and the socket with
one blocking thread per direction, so nothing waits behind an event loop; it reads them only enough to
take the host's session to a new server should this one go away (``server.relay_session``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from agent import defaults
from agent.pids import pid_alive
from server.relay_session import HostSession, Lines
from server.settings import IN_PROCESS_VARIABLE, OPTIONS, Settings
from server.version import running_version

log = logging.getLogger("agent-trace-mcp")

SOCKET_NAME = "server.sock"
MAX_SOCKET_PATH = 103
"""Bytes in an AF_UNIX path, NUL excluded: 104 on macOS and 108 on Linux with it."""
CONTROL_KEY = "agent_trace"
"""A connection's first line holding this key is a control request; anything else starts MCP at once."""
HELLO_SECONDS = 10.0
RECONNECTS_PER_WINDOW = 3
RECONNECT_WINDOW_SECONDS = 60.0
"""A relay takes its host's session to a new shared server at most this often (a server that keeps
crashing at start is given up on)."""
STUCK_TERM_SECONDS = 5.0
"""stop-server --now gives a server that does not answer this long to exit on SIGTERM before SIGKILL."""
START_SECONDS = 30.0
EOF_GRACE_SECONDS = defaults.EOF_DRAIN_SECONDS + 5
"""After the host closes stdin, how long the relay waits for the server to answer what it was sent and end
the session (a host that also sends SIGTERM ends the relay at once)."""
LOG_ROTATE_BYTES = 8 * 1024 * 1024
CHUNK = 64 * 1024

# Settings that say how one process serves, not what the server does: never a mismatch.
_NOT_SERVER_SETTINGS = {
    "data_dir", "transport", "host", "port", "allowed_hosts", "auth_token", "in_process",
}  # fmt: skip
_PROVIDER_VARIABLES = ("OPENAI_", "ANTHROPIC_", "AGENT_TRACE_LLM_", "AGENT_TRACE_MAX_TOKENS")


class ServerUnavailable(Exception):
    """The shared server could not be reached or started; the message is a sentence for the user."""


class ServerStuck(ServerUnavailable):
    """A shared server listens but does not answer (stuck, or paused with SIGSTOP): no other can start on
    its data directory while it holds the lock, so the host is served in its own process meanwhile."""


SERVE_IN_PROCESS = -1
"""What ``relay`` returns when the host is best served in its own process (the shared server is stuck)."""


def unix_sockets_available() -> bool:
    return hasattr(socket, "AF_UNIX") and sys.platform != "win32"


# -- where it lives ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerAddress:
    """The shared server of one data directory: its socket, its locks, its record and its log."""

    data_dir: Path
    socket: Path

    @classmethod
    def of(cls, data_dir: Path) -> ServerAddress:
        data_dir = data_dir.expanduser().resolve()
        path = data_dir / SOCKET_NAME
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            path = _short_socket_folder() / f"{hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:24]}.sock"
        return cls(data_dir, path)

    @property
    def lock(self) -> Path:
        """Held by the server listening on the socket (so two never bind it); released when it drains."""
        return self.data_dir / "server.lock"

    @property
    def start_lock(self) -> Path:
        """Held by a relay while it starts a server, so hosts launched at once start one."""
        return self.data_dir / "start.lock"

    @property
    def record(self) -> Path:
        """Pid, version and socket of the server listening now (the socket may live in the temp folder)."""
        return self.data_dir / "server.json"

    @property
    def log(self) -> Path:
        return self.data_dir / "server.log"

    def draining_record(self, pid: int) -> Path:
        """A server that stopped listening to drain keeps this record until it exits (``stop-server`` finds it)."""
        return self.data_dir / f"draining-{pid}.json"

    def draining(self) -> list[dict[str, Any]]:
        """The records of servers still draining; records of dead ones are removed on the way."""
        found = []
        for path in sorted(self.data_dir.glob("draining-*.json")):
            record = _read_json(path)
            pid = record.get("pid")
            if isinstance(pid, int) and pid_alive(pid):
                found.append(record)
            else:
                path.unlink(missing_ok=True)
        return found

    def prepare(self) -> None:
        """Create the data directory (0700 when new) and check the socket's folder is this user's alone."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.socket.parent != self.data_dir:
            _private_folder(self.socket.parent)


def _short_socket_folder() -> Path:
    base = Path(tempfile.gettempdir())
    if len(os.fsencode(base)) > 40:
        base = Path("/tmp")
    return base / f"agent-trace-mcp-{os.getuid()}"


def _private_folder(folder: Path) -> None:
    """Another user must not be able to put a socket where our relays connect."""
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if folder.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ServerUnavailable(
            f"{folder} is not a private folder of this user (it must be a 0700 directory you own); "
            "remove it, or use a shorter --data-dir so the socket fits inside it."
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_record(address: ServerAddress) -> dict[str, Any]:
    return _read_json(address.record)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Written whole or not at all (0600)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(data, out)
    os.replace(temporary, path)


def try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``path``, or None when another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def _locked(path: Path, seconds: float) -> Iterator[None]:
    deadline = time.monotonic() + seconds
    while (fd := try_lock(path)) is None:
        if time.monotonic() > deadline:
            raise ServerUnavailable(
                f"Another agent-trace-mcp has been starting the shared server for {seconds:g} s "
                f"(it holds {path}); see {path.parent / 'server.log'}."
            )
        time.sleep(0.01)
    try:
        yield
    finally:
        os.close(fd)


# -- settings the server started with --------------------------------------------------------------------


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def settings_digests(settings: Settings, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A digest of each start-up setting that changes what the server does, named as the user sets it
    (a flag, or a provider's variable); digests, so no secret travels or lands in a log."""
    env = os.environ if env is None else env
    digests: dict[str, str] = {}
    for item in dataclasses.fields(settings):
        if item.name in _NOT_SERVER_SETTINGS:
            continue
        value = getattr(settings, item.name)
        text = str(value.resolve() if isinstance(value, Path) else value)  # a symlinked path is the same
        if item.name == "mcp_config" and isinstance(value, Path):
            with suppress(OSError):  # an edited file is another setting, though its path is the same
                text += ":" + hashlib.sha256(value.read_bytes()).hexdigest()
        digests["--" + item.name.replace("_", "-")] = _digest(text)
    for name, value in env.items():
        if name.startswith(_PROVIDER_VARIABLES):
            digests[name] = _digest(value)
    return digests


def differing(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    return sorted(name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name))


def server_environment(settings: Settings) -> dict[str, str]:
    """The relay's environment with every setting spelled as its variable: the server starts with exactly
    the relay's settings, and nothing secret (a PostgreSQL URL) shows in its command line."""
    env = dict(os.environ)
    env.pop(IN_PROCESS_VARIABLE, None)
    for flag, variable, _kind, _help in OPTIONS:
        name = flag.lstrip("-").replace("-", "_")
        if name == "auth_token" or not hasattr(settings, name):
            continue  # HTTP only, or not a setting of its own: left as the relay's environment has it
        value = getattr(settings, name)
        if value is None:
            env.pop(variable, None)
        else:
            env[variable] = str(value.absolute() if isinstance(value, Path) else value)
    return env


# -- control requests -----------------------------------------------------------------------------------


class Channel:
    """One connection to the shared server: control requests, one JSON line each way, then maybe MCP."""

    def __init__(self, sock: socket.socket, data_dir: Path):
        self.sock = sock
        self.data_dir = data_dir
        self.pending = b""  # bytes after the last reply: the start of the MCP stream, if any
        self.server: subprocess.Popen[bytes] | None = None  # the server, when this relay started it

    def ask(self, request: Mapping[str, Any], seconds: float = HELLO_SECONDS) -> dict[str, Any]:
        self.sock.settimeout(seconds)
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while b"\n" not in self.pending:
            chunk = self.sock.recv(CHUNK)
            if not chunk:
                raise ConnectionError("the shared server closed the connection")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ConnectionError("the shared server answered something else than a control reply")
        self.sock.settimeout(None)
        return reply

    def wait_closed(self) -> None:
        """Until the server closes this connection (a stop request's connection stays open until it exits)."""
        self.sock.settimeout(None)
        with suppress(OSError):
            while self.sock.recv(CHUNK):
                pass

    def close(self) -> None:
        self.sock.close()


def open_channel(address: ServerAddress) -> Channel | None:
    """A connection to the server at ``address``; None when none listens (no socket, or a stale one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fsencode(address.socket))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        raise ServerUnavailable(
            f"Cannot connect to the shared server at {address.socket}: {exc.strerror}."
        ) from exc
    return Channel(sock, address.data_dir)


def ask_once(address: ServerAddress, request: Mapping[str, Any]) -> dict[str, Any] | None:
    """One control request on its own connection; None when no server answers."""
    channel = open_channel(address)
    if channel is None:
        return None
    try:
        return channel.ask(request)
    except (OSError, ValueError):
        return None
    finally:
        channel.close()


# -- the relay ----------------------------------------------------------------------------------------


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _greet(address: ServerAddress, version: str, digests: dict[str, str]) -> Channel | None:
    """A connection already turned into an MCP session, or None when no server will take one (none
    listens, it is on its way out, or it was older than this relay and has been asked to drain)."""
    channel = open_channel(address)
    if channel is None:
        return None
    hello = {CONTROL_KEY: "hello", "version": version, "settings": digests, "session": True}
    try:
        reply = channel.ask(hello)
        theirs = str(reply.get("version"))
        if not reply.get("session") and reply.get("state") == "serving" and theirs != version:
            if _version_key(theirs) > _version_key(version):
                log.warning(
                    "the shared server (pid %s) runs version %s, newer than this relay's %s: using it",
                    reply.get("pid"), theirs, version,
                )  # fmt: skip
                reply = channel.ask({**hello, "any_version": True})
            else:
                log.warning(
                    "the shared server (pid %s) runs version %s and this relay %s: asking it to drain "
                    "(finish its runs, then exit) and starting a new one",
                    reply.get("pid"), theirs, version,
                )  # fmt: skip
                channel.ask({CONTROL_KEY: "drain"})
                channel.close()
                return None
        if not reply.get("session"):
            channel.close()
            return None
    except TimeoutError:  # it listens (the kernel queued us) but does not answer
        channel.close()
        pid = read_record(address).get("pid")
        raise ServerStuck(
            f"The shared server (pid {pid}) for {address.data_dir} does not answer (stuck or paused); "
            f"`{stop_command(address.data_dir)} --now` ends it"
        ) from None
    except (OSError, ValueError):  # it went away while we spoke (an idle exit, a crash)
        channel.close()
        return None
    if reply.get("differ"):
        log.warning(
            "the shared server (pid %s) started with other settings (%s differ from this host's): it serves "
            "this host with its own. To apply this host's, run `%s` and reconnect.",
            reply.get("pid"), ", ".join(reply["differ"]), stop_command(address.data_dir),
        )  # fmt: skip
    log.info(
        "relaying to the shared server (pid %s, version %s) at %s; its log: %s",
        reply.get("pid"), reply.get("version"), address.socket, address.log,
    )  # fmt: skip
    return channel


def open_log(address: ServerAddress) -> int:
    """The server log for appending (0600), the old one set aside as ``server.log.1`` once it is large."""
    with suppress(OSError):
        if address.log.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(address.log, address.log.with_name("server.log.1"))
    return os.open(address.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def spawn_server(address: ServerAddress, settings: Settings) -> subprocess.Popen[bytes]:
    """``agent-trace-mcp server``, detached: its own session, no terminal, output to the log.

    ``-P``: the host's working directory (which may hold a ``server`` package) is not on its import path.
    """
    log_fd = open_log(address)
    try:
        return subprocess.Popen(
            [sys.executable, "-P", "-m", "server.cli", "server", "--spawned"],
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=server_environment(settings),
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    finally:
        os.close(log_fd)


def _log_tail(address: ServerAddress, lines: int = 12) -> str:
    try:
        text = address.log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def connect(settings: Settings) -> Channel:
    """A session on the data directory's shared server, started first when none answers."""
    address = ServerAddress.of(settings.data_dir)
    address.prepare()
    version, digests = running_version(), settings_digests(settings)
    if (channel := _greet(address, version, digests)) is not None:
        return channel
    with _locked(address.start_lock, START_SECONDS):
        if (channel := _greet(address, version, digests)) is not None:
            return channel  # another relay started it while we waited for the lock
        child = spawn_server(address, settings)
        deadline = time.monotonic() + START_SECONDS
        while (channel := _greet(address, version, digests)) is None:
            if child.poll() is not None:
                raise ServerUnavailable(
                    f"The shared server exited at start-up (status {child.returncode}); the end of "
                    f"{address.log}:\n{_log_tail(address)}"
                )
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"The shared server (pid {child.pid}) did not answer within {START_SECONDS:g} s; "
                    f"see {address.log}."
                )
            time.sleep(0.02)
    threading.Thread(target=child.wait, daemon=True).start()  # reap it should it exit while we relay
    channel.server = child
    return channel


class _Terminated(Exception):
    pass


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise _Terminated


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def pump(channel: Channel, settings: Settings | None = None, stdin: int = 0, stdout: int = 1) -> int:
    """Relay the host's frames to the server and the server's to the host, until the host closes. When
    the server goes away under the host (an upgrade drained it, or it crashed) and ``settings`` are given,
    connect to the next one and replay the session there (``server.relay_session``)."""
    session = HostSession()
    link = _Link(channel)
    finished = threading.Event()
    host_closed = threading.Event()
    answered = threading.Event()

    def upstream() -> None:
        lines = Lines()
        try:
            while data := os.read(stdin, CHUNK):
                for line in lines.feed(data):
                    link.send(line, session)
            host_closed.set()
            link.close_writing()  # the server ends the session; it may still answer meanwhile
            link.server_gone.wait(EOF_GRACE_SECONDS)
        except OSError:
            pass
        finally:
            finished.set()

    def downstream() -> None:
        try:
            while True:
                link.relay_from_server(session, stdout, answered)
                if host_closed.is_set() or settings is None or not answered.is_set():
                    return
                if not session.reconnect or not link.reconnect(settings, session, stdout):
                    return
        except OSError:
            pass
        finally:
            link.server_gone.set()
            finished.set()

    previous = signal.getsignal(signal.SIGTERM)
    try:  # the handler goes in inside the try: a SIGTERM while the threads start is a clean exit too
        signal.signal(signal.SIGTERM, _on_sigterm)
        threading.Thread(target=upstream, name="relay host→server", daemon=True).start()
        threading.Thread(target=downstream, name="relay server→host", daemon=True).start()
        finished.wait()
    except _Terminated:
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        link.close()
    if host_closed.is_set():
        return 0
    if link.channel.server is not None:  # it died: reap it, or its pid looks alive to the next server's sweep
        with suppress(subprocess.TimeoutExpired):
            link.channel.server.wait(0.5)
    if not answered.is_set():  # it never got going: say why
        address = ServerAddress.of(link.channel.data_dir)
        log.error(
            "the shared server closed this session at once; the end of %s:\n%s",
            address.log,
            _log_tail(address),
        )
        return 1
    log.warning(
        "the shared server ended this session (%s; see its log); the host should restart this MCP server",
        "it was stopped" if not session.reconnect else "it went away and no new one could take over",
    )
    return 1


class _Link:
    """The relay's connection to the shared server, replaced under the host when that server goes away."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.sending = threading.Lock()  # a frame goes whole to one server; a reconnection waits for it
        self.server_gone = threading.Event()
        self.writing_closed = False
        self.reconnects: list[float] = []

    def send(self, line: bytes, session: HostSession) -> None:
        with self.sending:
            session.from_host(line)
            with suppress(OSError):  # the server went away: the reconnection answers this with an error
                self.channel.sock.sendall(line)

    def close_writing(self) -> None:
        with self.sending:
            self.writing_closed = True
            with suppress(OSError):
                self.channel.sock.shutdown(socket.SHUT_WR)

    def relay_from_server(self, session: HostSession, stdout: int, answered: threading.Event) -> None:
        """Server frames to the host (those for the relay alone kept back), until the server closes."""
        lines = Lines()
        if self.channel.pending:
            data, self.channel.pending = self.channel.pending, b""
            self._forward(lines.feed(data), session, stdout, answered)
        while True:
            try:
                data = self.channel.sock.recv(CHUNK)
            except OSError:  # a reset: it died with frames of ours unread (the same as its end, for us)
                return
            if not data:
                return
            self._forward(lines.feed(data), session, stdout, answered)  # a broken stdout: the host left

    @staticmethod
    def _forward(lines: list[bytes], session: HostSession, stdout: int, answered: threading.Event) -> None:
        shown = [line for line in lines if session.from_server(line)]
        if lines:
            answered.set()
        if shown:
            _write_all(stdout, b"".join(shown))

    def reconnect(self, settings: Settings, session: HostSession, stdout: int) -> bool:
        """Take the session to the next shared server (started if none answers); False when none can."""
        now = time.monotonic()
        self.reconnects = [t for t in self.reconnects if now - t < RECONNECT_WINDOW_SECONDS] + [now]
        if len(self.reconnects) > RECONNECTS_PER_WINDOW:
            log.error("the shared server keeps going away: giving up on it")
            return False
        with self.sending:
            if self.writing_closed:
                return False
            old = self.channel
            log.warning("the shared server went away under this host; taking the session to the next one")
            try:
                channel = connect(settings)
            except (ServerUnavailable, OSError) as exc:
                log.error("no shared server could take this session over: %s", exc)
                return False
            with suppress(OSError):
                old.sock.close()
            self.channel = channel
            graceful = session.noted
            unread = session.unread() if graceful else []
            try:
                channel.sock.sendall(b"".join([*session.replay(), *unread]))
            except OSError:
                return False
            orphans = [] if graceful else session.orphans()
        if orphans:
            _write_all(stdout, b"".join(orphans))
        return True

    def close(self) -> None:
        with suppress(OSError):
            self.channel.sock.close()


def relay(settings: Settings) -> int:
    """What hosts launch: relay stdio to the shared server. Exit status 1 with a sentence when it fails;
    SERVE_IN_PROCESS when a stuck server holds the data directory (the caller serves the host itself)."""
    try:
        channel = connect(settings)
    except ServerStuck as exc:
        log.warning("%s; serving this host in its own process meanwhile (its runs end when it closes)", exc)
        return SERVE_IN_PROCESS
    except ServerUnavailable as exc:
        print(f"agent-trace-mcp: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the data directory cannot be made or read
        print(
            f"agent-trace-mcp: cannot use {exc.filename or settings.data_dir}: {exc.strerror}.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    return pump(channel, settings)


# -- status and stop-server -------------------------------------------------------------------------------


def console_script() -> str:
    """This install's ``agent-trace-mcp`` by its absolute path (a venv's is rarely on PATH, and hosts need
    absolute paths), else the bare name."""
    script = Path(sys.executable).parent / "agent-trace-mcp"
    return str(script) if script.is_file() else "agent-trace-mcp"


def stop_command(data_dir: Path) -> str:
    """``stop-server`` as a user can paste it, for this data directory (the default is rarely the one)."""
    return shlex.join([console_script(), "stop-server", "--data-dir", str(data_dir)])


def _stuck_pid(address: ServerAddress) -> int | None:
    """The pid of the server the record names while that process is alive and a server holds the lock
    (so a pid the system has since given to another program is never taken for it)."""
    pid = read_record(address).get("pid")
    if not isinstance(pid, int) or not pid_alive(pid) or not address.lock.exists():
        return None
    fd = try_lock(address.lock)
    if fd is not None:  # no server holds it: that pid is not one
        os.close(fd)
        return None
    return pid


def _no_server(address: ServerAddress) -> str:
    pid = _stuck_pid(address)
    if pid is None:
        return f"No shared server is running for {address.data_dir}."
    return (
        f"The shared server for {address.data_dir} (pid {pid}) runs but does not answer (stuck or "
        f"paused); `{stop_command(address.data_dir)} --now` ends it."
    )


def _end_stuck(pid: int) -> None:
    """End a server that answers nothing: SIGTERM (it stops its runs, if its loop still turns; SIGCONT
    wakes a paused one), then SIGKILL (its runs read interrupted, and can be resumed)."""
    print(f"The shared server (pid {pid}) does not answer: ending it…", flush=True)
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + STUCK_TERM_SECONDS
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.05)
        print(f"The shared server (pid {pid}) was killed; its running traces read interrupted.")
    else:
        print(f"The shared server (pid {pid}) has stopped.")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def format_status(reply: Mapping[str, Any]) -> str:
    running = reply.get("running") or []
    lines = [
        f"Shared server for {reply.get('data_dir')}: pid {reply.get('pid')}, version {reply.get('version')}, "
        f"up {_duration(float(reply.get('uptime_seconds') or 0))}, {reply.get('state')}, "
        f"{reply.get('sessions', 0)} host session(s).",
        f"Socket: {reply.get('socket')}",
        f"Log: {reply.get('log')}",
        f"Running traces: {len(running)}",
    ]
    for run in running:
        parts = [
            str(run.get("trace_id")),
            run.get("name") or "",
            "(run by another process)" if run.get("elsewhere") else "",
        ]
        lines.append("  " + "  ".join(part for part in parts if part))
    lines += [f"Note: {note}" for note in reply.get("notes") or []]
    return "\n".join(lines)


NO_UNIX_SOCKETS = (
    "There is no shared server on this platform (it needs Unix sockets): hosts serve in-process."
)


def show_status(settings: Settings, as_json: bool = False) -> int:
    if not unix_sockets_available():
        print(NO_UNIX_SOCKETS)
        return 1
    address = ServerAddress.of(settings.data_dir)
    reply = ask_once(address, {CONTROL_KEY: "status"}) if address.socket.exists() else None
    draining = address.draining()
    if reply is None and as_json:
        answer = {"state": "not running", "data_dir": str(address.data_dir), "message": _no_server(address)}
        print(json.dumps({**answer, "draining_servers": draining}, indent=2))
        return 1
    if reply is None:
        print(_no_server(address))
    elif as_json:
        print(json.dumps({**reply, "draining_servers": draining}, indent=2))
    else:
        print(format_status(reply))
    if not as_json or reply is None:
        for record in draining:
            print(f"Draining: the server of version {record.get('version')} (pid {record.get('pid')}) "
                  "takes no hosts and exits when its runs finish.")  # fmt: skip
    return 1 if reply is None else 0


def stop_server(settings: Settings, now: bool = False) -> int:
    """Drain (or with ``now``, stop the runs of) the shared server, and any server still draining, and wait
    until their processes have exited."""
    if not unix_sockets_available():
        print(NO_UNIX_SOCKETS)
        return 0
    address = ServerAddress.of(settings.data_dir)
    if address.start_lock.exists():  # a relay may be starting the server right now: stop that one
        try:
            with _locked(address.start_lock, START_SECONDS):
                pass
        except ServerUnavailable as exc:
            print(exc)
            return 1
    draining = [record["pid"] for record in address.draining()]
    channel = open_channel(address) if address.socket.exists() else None
    code = 0 if channel is None else _stop_listening_server(address, channel, now)
    stuck = _stuck_pid(address) if channel is None or code else None
    if stuck is not None and now:
        _end_stuck(stuck)
        code = 0
    elif channel is None and not draining:
        print(_no_server(address))
        code = 1 if stuck is not None else code
    for pid in draining:
        if now:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # a server's SIGTERM stops its runs: they end stopped
            print(f"Stopping the draining server (pid {pid})…", flush=True)
        else:
            print(f"Waiting for the draining server (pid {pid}) to finish its runs…", flush=True)
        try:
            while pid_alive(pid):
                time.sleep(0.05)
        except KeyboardInterrupt:
            print("\nIt goes on draining.")
            return 130
        print(f"The draining server (pid {pid}) has stopped.")
    return code


def _stop_listening_server(address: ServerAddress, channel: Channel, now: bool) -> int:
    pid: Any = None
    try:
        reply = channel.ask({CONTROL_KEY: "stop", "now": now, "wait": True})
        pid, running = reply.get("pid"), len(reply.get("running") or [])
        if now:
            print(f"Stopping the shared server (pid {pid}) and its {running} running trace(s)…", flush=True)
        elif running:
            print(
                f"Draining the shared server (pid {pid}): it exits when its {running} running trace(s) "
                f"finish. Ctrl-C leaves it draining; `{stop_command(address.data_dir)} --now` stops them.",
                flush=True,
            )
        channel.wait_closed()
    except (OSError, ValueError):
        print(_no_server(address))
        return 1
    except KeyboardInterrupt:
        print("\nThe shared server goes on draining.")
        return 130
    finally:
        channel.close()
    deadline = time.monotonic() + 10
    while isinstance(pid, int) and pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    print(f"The shared server (pid {pid}) has stopped.")
    return 0
