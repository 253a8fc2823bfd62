"""The ``agent-trace-mcp`` console script: serve (stdio or HTTP), ``demo``, ``consolidate``."""

from __future__ import annotations

import argparse
import logging
import sys

import anyio

from server.settings import add_arguments, resolve


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agent-trace-mcp",
        description="An MCP server that starts, watches, steers and learns from background LLM agent runs.",
    )
    p.add_argument(
        "command", nargs="?", default="serve", choices=["serve", "demo", "consolidate"],
        help="serve (default): the MCP server; demo: a complete trace on the offline model; "
        "consolidate: merge and prune the experiences file now",
    )  # fmt: skip
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet = args.command != "serve"  # the demo's and consolidate's output is for people, not logs
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = resolve(args)
    if args.command == "demo":
        from server.demo import run_demo

        return anyio.run(run_demo, args)
    if args.command == "consolidate":
        from server.maintenance import consolidate_now

        return anyio.run(consolidate_now, settings)

    from server.app import build_server
    from server.http import UnsafeBind, serve_http

    if settings.mcp_config is not None:  # a bad file is a sentence now, not a traceback at start-up
        from agent.tools.mcp import load_mcp_config

        try:
            load_mcp_config(settings.mcp_config)
        except ValueError as exc:
            print(f"agent-trace-mcp: {exc}", file=sys.stderr)
            return 2
    mcp = build_server(settings)
    if settings.transport == "http":
        try:
            anyio.run(serve_http, mcp, settings)
        except UnsafeBind as exc:
            print(f"agent-trace-mcp: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            pass
        return 0
    anyio.run(mcp.run_stdio_async)
    return 0


if __name__ == "__main__":
    sys.exit(main())
