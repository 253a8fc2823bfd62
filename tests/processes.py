"""Our console script as hosts run it: stdio subprocesses and HTTP servers on 127.0.0.1, for slow tests."""

from __future__ import annotations

import os
import shutil
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
    command, *prefix = console_script()
    args = [*prefix, *server_args(tmp_path, workspace), *extra]
    return StdioServerParameters(command=command, args=args, env={**os.environ, **env})
