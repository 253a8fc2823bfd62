"""The ``agent-trace-mcp`` console script.

With no command it is what hosts launch: a stdio relay to the data directory's shared server (started when
none runs), or with ``--in-process`` a stdio server in this process. ``--transport http`` serves HTTP.
``server`` runs the shared server in the foreground; ``status``, ``stop-server``, ``demo``, ``consolidate``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import TYPE_CHECKING, NoReturn

import anyio

from server.settings import Settings, add_arguments, resolve

if TYPE_CHECKING:  # the relay must not pay for importing the MCP server
    from mcp.server.mcpserver import MCPServer

log = logging.getLogger("agent-trace-mcp")

COMMANDS = ["serve", "server", "status", "stop-server", "demo", "consolidate", "experiences"]
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not the whole usage: a host's log shows the problem, not 20 lines around it."""
        self.exit(2, f"agent-trace-mcp: {message} (agent-trace-mcp --help lists the options).\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="agent-trace-mcp",
        description="An MCP server that starts, watches, steers and learns from background LLM agent runs.",
    )
    p.add_argument(
        "command", nargs="?", default="serve", choices=COMMANDS,
        help="serve (default): stdio for a host, relayed to the shared server (or HTTP with --transport "
        "http); server: run the shared server in the foreground; status: show the shared server; "
        "stop-server: drain and stop it; demo: a complete trace on the offline model; consolidate: merge "
        "and prune the experiences now; experiences export|import FILE: write the lessons as markdown, "
        "or load an experiences.md",
    )  # fmt: skip
    p.add_argument("action", nargs="?", choices=["export", "import"], help="experiences: export or import")
    p.add_argument("file", nargs="?", help="experiences: the markdown file to write or read")
    add_arguments(p)
    p.add_argument(
        "--now", action="store_true",
        help="stop-server: stop the running traces (they end 'stopped') instead of letting them finish",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="status: print it as JSON")
    p.add_argument(
        "--as-of", type=int, metavar="VERSION", dest="as_of",
        help="experiences export, PostgreSQL: write the lessons as of this version (each consolidation or "
        "import keeps the one before it)",
    )  # fmt: skip
    p.add_argument("--spawned", action="store_true", help=argparse.SUPPRESS)  # started by a relay
    return p


LOG_RECORD_CHARS = 8_000
"""A log line past this is cut: the SDK logs what clients send (a 1 MB resource URI made 2 MB lines)."""


class ClippedFormatter(logging.Formatter):
    """Cuts a record's message, never its traceback (the end of one names the error)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if len(record.message) > LOG_RECORD_CHARS:
            record.message = (
                f"{record.message[:LOG_RECORD_CHARS]}… [log line cut: {len(record.message):,} characters]"
            )
        return super().formatMessage(record)


def _configure_logging(args: argparse.Namespace, settings: Settings) -> None:
    quiet = args.command not in ("serve", "server")  # these print for people, not logs
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING if quiet else logging.INFO, format=LOG_FORMAT
    )
    for root_handler in logging.getLogger().handlers:
        root_handler.setFormatter(ClippedFormatter(LOG_FORMAT))
    if args.command == "server" and not args.spawned:  # a spawned server's stderr is the log already
        from server.relay import ServerAddress, open_log

        address = ServerAddress.of(settings.data_dir)
        address.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        stream = open(open_log(address), "a", encoding="utf-8")  # noqa: SIM115 - open while we log
        handler = logging.StreamHandler(stream)
        handler.setFormatter(ClippedFormatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)


def _check_startup(settings: Settings) -> bool:
    """A bad --workspace or --mcp-config is a sentence at start-up, not a broken agent or a traceback later."""
    if not settings.workspace.is_dir():
        print(
            f"agent-trace-mcp: the workspace {settings.workspace} is not a folder (--workspace, "
            "AGENT_TRACE_WORKSPACE); the agent's file tools read inside it.",
            file=sys.stderr,
        )
        return False
    if settings.mcp_config is None:
        return True
    from agent.tools.mcp_config import load_mcp_config

    try:
        load_mcp_config(settings.mcp_config)
    except ValueError as exc:
        print(f"agent-trace-mcp: {exc}", file=sys.stderr)
        return False
    return True


async def serve_in_process(mcp: MCPServer) -> None:
    """stdio in this process until the host closes stdin; SIGTERM ends it cleanly (runs: interrupted)."""
    from server.stream_transport import serve_stdio

    async with anyio.create_task_group() as group:

        async def on_sigterm() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    group.cancel_scope.cancel()

        group.start_soon(on_sigterm)
        await serve_stdio(mcp)
        group.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C at any point, even before serving: no traceback
        return 130


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    settings = resolve(args)
    _configure_logging(args, settings)
    if args.command == "demo":
        from server.demo import run_demo

        return anyio.run(run_demo, args)
    if args.command == "consolidate":
        from server.maintenance import consolidate_now

        return anyio.run(consolidate_now, settings)
    if args.command == "experiences":
        if args.action is None or args.file is None:
            print(
                "agent-trace-mcp: use 'experiences export FILE' or 'experiences import FILE'.",
                file=sys.stderr,
            )
            return 2
        from server.maintenance import transfer

        return anyio.run(transfer, settings, args.action, args.file, args.as_of)
    if args.command == "status":
        from server.relay import show_status

        return show_status(settings, as_json=args.json)
    if args.command == "stop-server":
        from server.relay import stop_server

        return stop_server(settings, now=args.now)

    if not _check_startup(settings):
        return 2
    if args.command == "server":
        from server.shared import serve_shared

        return serve_shared(settings)
    if settings.transport == "http":
        from server.app import build_server
        from server.http import UnsafeBind, serve_http

        try:
            anyio.run(serve_http, build_server(settings), settings)
        except UnsafeBind as exc:
            print(f"agent-trace-mcp: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            pass
        except Exception as exc:
            return _refused(exc)
        return 0
    if not settings.in_process:
        from server.relay import SERVE_IN_PROCESS, relay, unix_sockets_available

        if not unix_sockets_available():
            log.warning(
                "Unix sockets are not available here: serving in this process (as --in-process), so runs end "
                "when the host closes it"
            )
        elif (code := relay(settings)) != SERVE_IN_PROCESS:
            return code
    from server.app import build_server

    try:
        anyio.run(serve_in_process, build_server(settings))
    except Exception as exc:
        return _refused(exc)
    return 0


def _refused(exc: Exception) -> int:
    """A start-up refusal (an unreachable database…) as its one sentence; anything else re-raised."""
    from agent.errors import TraceError
    from server.shared import first_cause

    cause = first_cause(exc)
    if not isinstance(cause, TraceError):
        raise exc
    print(f"agent-trace-mcp: {cause}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
