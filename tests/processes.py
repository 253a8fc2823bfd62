"""Our console script as hosts run it: stdio subprocesses (in-process, or relays to a shared server) and
HTTP servers on 127.0.0.1, for slow tests."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mcp import StdioServerParameters


def console_script() -> list[str]:
    """The installed ``agent-trace-mcp`` next to this interpreter (what hosts launch)."""
    script = Path(sys.executable).parent / "agent-trace-mcp"
    if script.exists():
        return [str(script)]
    found = shutil.which("agent-trace-mcp")
    return [found] if found else [sys.executable, "-m", "server.cli"]


def server_args(tmp_path: Path, workspace: Path) -> list[str]:
    return ["--data-dir", str(tmp_path / "data"), "--model", "offline", "--workspace", str(workspace)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpServer:
    def __init__(self, tmp_path: Path, workspace: Path, *extra: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        argv = [*console_script(), "--transport", "http", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*argv, *server_args(tmp_path, workspace), *extra],
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start listening")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()


def stdio_params(tmp_path: Path, workspace: Path, *extra: str, **env: str) -> StdioServerParameters:
    """A stdio server serving in the launched process (``--in-process``): its runs end with it."""
    return relay_params(tmp_path, workspace, "--in-process", *extra, **env)


def relay_params(tmp_path: Path, workspace: Path, *extra: str, **env: str) -> StdioServerParameters:
    """What hosts launch: a relay to the data directory's shared server, started when none runs."""
    command, *prefix = console_script()
    args = [*prefix, *server_args(tmp_path, workspace), *extra]
    return StdioServerParameters(command=command, args=args, env={**os.environ, **env})


def run_cli(tmp_path: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """One console-script command (status, stop-server, …) on the test's data directory."""
    return subprocess.run(
        [*console_script(), *args, "--data-dir", str(tmp_path / "data")],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def server_pids(data_dir: Path) -> set[int]:
    """Every shared server ever started on ``data_dir``, from the start lines of its log."""
    try:
        text = (data_dir / "server.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {int(pid) for pid in re.findall(r"shared server \(pid (\d+)\) for ", text)}


def stop_shared_servers(tmp_path: Path, timeout: float = 20) -> None:
    """Teardown: ``stop-server --now``, then SIGKILL any shared server of this data directory still alive."""
    from agent.pids import pid_alive

    data_dir = tmp_path / "data"
    with contextlib.suppress(subprocess.TimeoutExpired):
        run_cli(tmp_path, "stop-server", "--now", timeout=timeout)
    for pid in server_pids(data_dir):
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(pid) and _is_our_server(pid):
            os.kill(pid, signal.SIGKILL)


def _is_our_server(pid: int) -> bool:
    try:
        return b"server.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the log
