"""Settings: every option of product.md as a flag and an environment variable, with its default."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from agent import defaults
from agent.llm.base import canonical_model_spec
from agent.settings import EngineSettings
from agent.trace.backends import is_postgres_url, redact_url

T = TypeVar("T")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_data_dir(env: Mapping[str, str]) -> Path:
    xdg = env.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path(env.get("HOME", str(Path.home()))) / ".local" / "share"
    return base / "agent-trace-mcp"


@dataclass
class Settings(EngineSettings):
    """The engine's settings plus how this process serves them."""

    transport: str = "stdio"
    host: str = "127.0.0.1"
    port: int = 8765
    allowed_hosts: list[str] = field(default_factory=list)
    auth_token: str | None = None
    idle_exit: float = defaults.IDLE_EXIT_SECONDS
    in_process: bool = False

    @classmethod
    def for_data_dir(cls, data_dir: Path | str, **overrides) -> Settings:
        """Settings rooted in one folder (what the demo and the tests use)."""
        data_dir = Path(data_dir)
        values: dict[str, Any] = dict(
            data_dir=data_dir,
            db=data_dir / "traces.db",
            experiences=data_dir / "experiences.md",
            skills_dir=data_dir / "skills",
            workspace=Path.cwd(),
        )
        values.update(overrides)
        return cls(**values)


# (flag, variable, type, help); defaults are resolved in ``resolve`` because some depend on others.
OPTIONS: list[tuple[str, str, type, str]] = [
    (
        "--data-dir",
        "AGENT_TRACE_HOME",
        str,
        "data directory (default $XDG_DATA_HOME/agent-trace-mcp, else ~/.local/share/agent-trace-mcp)",
    ),
    ("--db", "AGENT_TRACE_DB", str, "SQLite file or postgresql:// URL (default <data-dir>/traces.db)"),
    (
        "--experiences",
        "AGENT_TRACE_EXPERIENCES",
        str,
        "experiences markdown (default <data-dir>/experiences.md)",
    ),
    ("--model", "AGENT_TRACE_MODEL", str, f"default model, 'provider:name' (default {defaults.MODEL})"),
    ("--mcp-config", "AGENT_TRACE_MCP_CONFIG", str, "JSON file of MCP servers whose tools the agent gets"),
    ("--skills-dir", "AGENT_TRACE_SKILLS", str, "skills folder (default <data-dir>/skills)"),
    (
        "--workspace",
        "AGENT_TRACE_WORKSPACE",
        str,
        "root of the built-in file tools (default: working directory)",
    ),
    (
        "--experience-recall",
        "AGENT_TRACE_EXPERIENCE_RECALL",
        int,
        f"lessons recalled into a new trace (default {defaults.EXPERIENCE_RECALL}; 0 off)",
    ),
    (
        "--experience-budget",
        "AGENT_TRACE_EXPERIENCE_BUDGET",
        int,
        f"lessons kept before consolidation (default {defaults.EXPERIENCE_BUDGET})",
    ),
    (
        "--tool-timeout",
        "AGENT_TRACE_TOOL_TIMEOUT",
        float,
        f"seconds a tool call may take (default {defaults.TOOL_TIMEOUT_SECONDS:g})",
    ),
    ("--auth-token", "AGENT_TRACE_TOKEN", str, "HTTP requires 'Authorization: Bearer <token>'"),
    (
        "--idle-exit",
        "AGENT_TRACE_IDLE_EXIT",
        float,
        f"seconds the shared server waits with no run and no host before it exits "
        f"(default {defaults.IDLE_EXIT_SECONDS:g}; 0 never)",
    ),
    (
        "--max-wait",
        "AGENT_TRACE_MAX_WAIT",
        float,
        f"the longest a call blocks, in seconds (default {defaults.MAX_WAIT_SECONDS:g})",
    ),
    (
        "--context-tokens",
        "AGENT_TRACE_CONTEXT_TOKENS",
        int,
        f"the model's prompt budget in tokens (default: its known window, else {defaults.CONTEXT_TOKENS:,})",
    ),
    (
        "--lease-seconds",
        "AGENT_TRACE_LEASE_SECONDS",
        float,
        f"a run's claim lapses this long after its owner last renewed it (default {defaults.LEASE_SECONDS:g}; "
        f"at least {3 * defaults.LEASE_RENEW_SECONDS:g})",
    ),
    (
        "--db-pool-size",
        "AGENT_TRACE_DB_POOL_SIZE",
        int,
        f"PostgreSQL connections per process (default {defaults.PG_POOL_SIZE})",
    ),
    (
        "--retain-days",
        "AGENT_TRACE_RETAIN_DAYS",
        float,
        "delete finished traces this many days after they ended (default: keep them)",
    ),
]

LOWEST: dict[str, float] = {
    "--max-wait": 0.001,
    "--tool-timeout": 0.001,
    "--idle-exit": 0,
    "--experience-recall": 0,
    "--experience-budget": 1,
    "--context-tokens": 1000,
    "--retain-days": 0.0001,
    "--lease-seconds": 3 * defaults.LEASE_RENEW_SECONDS,
    "--db-pool-size": 1,
}
"""The smallest value each numeric setting takes; below it the process refuses to start, with one line."""

IN_PROCESS_VARIABLE = "AGENT_TRACE_IN_PROCESS"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, variable, kind, help_text in OPTIONS:
        parser.add_argument(flag, type=kind, default=None, help=f"{help_text} [env {variable}]")
    parser.add_argument(
        "--transport", choices=["stdio", "http"], default="stdio", help="stdio (default) or http"
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765)")
    parser.add_argument(
        "--allowed-host", action="append", default=[], dest="allowed_hosts",
        help="a Host name the HTTP server answers to (repeatable); needed behind a real hostname",
    )  # fmt: skip
    parser.add_argument(
        "--in-process", action=argparse.BooleanOptionalAction, default=None,
        help="serve stdio in this process instead of relaying to the shared server; runs then end when "
        f"the host closes it (--no-in-process: relay, whatever the variable says) [env {IN_PROCESS_VARIABLE}=1]",
    )  # fmt: skip


_URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")
"""A scheme and a slash: a database URL (a drive letter, one character, is a path)."""


def db_problem(db: str) -> str | None:
    """Why ``--db`` names no store: a URL of another scheme (it would silently become a file path) or a
    PostgreSQL URL that does not parse."""
    if is_postgres_url(db):
        try:
            parts = urlsplit(db)
            if "," not in parts.netloc:  # several hosts (h1:5432,h2:5433) are for the driver to read
                parts.port  # noqa: B018  (parsing the port is the check)
        except ValueError:  # its text may quote part of a password: never shown
            return "is not a valid PostgreSQL URL (its host or port cannot be read)"
        return None
    if _URL_LIKE.match(db):
        shown = redact_url(db)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return f"must be a SQLite file path or a postgresql://… URL; got {shown!r}"
    return None


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Flags win over environment variables, which win over defaults."""
    env = os.environ if env is None else env

    def pick(flag: str, variable: str, kind: type):
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is None and env.get(variable):
            try:
                value = kind(env[variable])
            except ValueError:
                raise SystemExit(
                    f"agent-trace-mcp: {variable}={env[variable]!r} is not a valid {kind.__name__}."
                ) from None
        return value

    values = {flag: pick(flag, variable, kind) for flag, variable, kind, _ in OPTIONS}
    data_dir = Path(values["--data-dir"]).expanduser() if values["--data-dir"] else default_data_dir(env)

    def path_or(flag: str, default: Path) -> Path:
        return Path(values[flag]).expanduser() if values[flag] else default

    variables = {flag: variable for flag, variable, _, _ in OPTIONS}
    db: Path | str = (
        values["--db"] if is_postgres_url(values["--db"] or "") else path_or("--db", data_dir / "traces.db")
    )
    if problem := db_problem(values["--db"] or ""):
        named = "--db" if getattr(args, "db", None) is not None else variables["--db"]
        raise SystemExit(f"agent-trace-mcp: {named} {problem}.")
    for flag, low in LOWEST.items():
        if values[flag] is not None and values[flag] < low:
            given = getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None
            named = flag if given else variables[flag]  # the setting as the user wrote it
            raise SystemExit(f"agent-trace-mcp: {named} must be at least {low:g}; got {values[flag]:g}.")
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"agent-trace-mcp: --port must be 0 to 65535; got {args.port}.")

    in_process = getattr(args, "in_process", None)
    if in_process is None:
        flag = env.get(IN_PROCESS_VARIABLE, "").strip().lower()
        if flag not in _TRUE + _FALSE:
            raise SystemExit(
                f"agent-trace-mcp: {IN_PROCESS_VARIABLE}={env[IN_PROCESS_VARIABLE]!r} is not 1 or 0."
            )
        in_process = flag in _TRUE

    return Settings(
        data_dir=data_dir,
        db=db,
        experiences=path_or("--experiences", data_dir / "experiences.md"),
        model=canonical_model_spec(values["--model"] or defaults.MODEL),
        mcp_config=Path(values["--mcp-config"]).expanduser() if values["--mcp-config"] else None,
        skills_dir=path_or("--skills-dir", data_dir / "skills"),
        workspace=path_or("--workspace", Path.cwd()),
        experience_recall=_or(values["--experience-recall"], defaults.EXPERIENCE_RECALL),
        experience_budget=_or(values["--experience-budget"], defaults.EXPERIENCE_BUDGET),
        tool_timeout=_or(values["--tool-timeout"], defaults.TOOL_TIMEOUT_SECONDS),
        transport=args.transport,
        host=args.host,
        port=args.port,
        allowed_hosts=list(args.allowed_hosts),
        auth_token=values["--auth-token"] or None,
        idle_exit=_or(values["--idle-exit"], defaults.IDLE_EXIT_SECONDS),
        in_process=in_process,
        max_wait=_or(values["--max-wait"], defaults.MAX_WAIT_SECONDS),
        context_tokens=values["--context-tokens"],
        retain_days=values["--retain-days"],
        lease_seconds=_or(values["--lease-seconds"], defaults.LEASE_SECONDS),
        db_pool_size=values["--db-pool-size"],
    )
