"""Outside clients the slow tests drive: Node 22 and the MCP Inspector CLI, found or installed from npm.

Each is taken from an environment variable, else PATH, else installed once with npm (the npm registry
is reachable wherever the tests run) into ``$AGENT_TRACE_NPM_CACHE`` or the user's cache folder. None
means it cannot be had; tests then skip with one line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

INSTALL_SECONDS = 600
INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"


def cache() -> Path:
    if folder := os.environ.get("AGENT_TRACE_NPM_CACHE"):
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agent-trace-mcp" / "npm"


def node_major(node: str) -> int | None:
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.match(r"v(\d+)\.", version.strip())
    return int(found.group(1)) if found else None


def npm_install(folder: Path, package: str, binary: str) -> str | None:
    """``binary`` of ``package`` installed into ``folder`` (the first time), or None."""
    path = folder / "node_modules" / ".bin" / binary
    if path.exists():
        return str(path)
    npm = shutil.which("npm")
    if npm is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    argv = [npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund", "--loglevel=error", package]
    try:
        subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_SECONDS)
    except (OSError, subprocess.SubprocessError):
        return None
    return str(path) if path.exists() else None


def node22() -> str | None:
    """A node binary of version 22 or later: $AGENT_TRACE_CONFORMANCE_NODE, PATH, or npm's node@22."""
    for node in (os.environ.get("AGENT_TRACE_CONFORMANCE_NODE"), shutil.which("node")):
        if node and (node_major(node) or 0) >= 22:
            return node
    installed = npm_install(cache() / "node22", "node@22", "node")
    return installed if installed and (node_major(installed) or 0) >= 22 else None


def inspector() -> str | None:
    """The Inspector CLI: $AGENT_TRACE_INSPECTOR, ``mcp-inspector`` on PATH, or installed with npm."""
    given = os.environ.get("AGENT_TRACE_INSPECTOR") or shutil.which("mcp-inspector")
    if given and os.path.exists(given):
        return given
    if shutil.which("node") is None:
        return None
    return npm_install(cache() / "inspector", INSPECTOR, "mcp-inspector")
