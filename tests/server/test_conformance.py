"""The MCP conformance suite (``@modelcontextprotocol/conformance`` 0.1.16, server scenarios) against our
streamable-HTTP server: every scenario that applies to us passes. The fixture scenarios that do not apply
are listed, with why, in ``conformance_inapplicable.md`` beside this file.

Node: ``$AGENT_TRACE_CONFORMANCE_NODE`` (a node ≥ 22 binary), else ``node`` on PATH if it is ≥ 22; the test
is skipped with one line without one. The suite is installed once with npm into a cache folder
(``$AGENT_TRACE_CONFORMANCE_DIR``, else ``~/.cache/agent-trace-mcp``) and run from there by that node, so a run needs
the npm registry only the first time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.npm_tools import node22
from tests.processes import HttpServer

pytestmark = pytest.mark.slow

SUITE = "@modelcontextprotocol/conformance"
VERSION = "0.1.16"
APPLICABLE = (
    "server-initialize",
    "logging-set-level",
    "ping",
    "completion-complete",
    "tools-list",
    "server-sse-multiple-streams",
    "resources-list",
    "resources-subscribe",
    "resources-unsubscribe",
    "prompts-list",
    "dns-rebinding-protection",
)
INAPPLICABLE_LIST = Path(__file__).with_name("conformance_inapplicable.md")
INSTALL_SECONDS = 600
RUN_SECONDS = 600


def install_suite(cache: Path, node: str) -> Path:
    """The suite's entry point, installed with npm into ``cache`` the first time."""
    entry = cache / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
    if entry.exists():
        return entry
    npm = shutil.which("npm", path=str(Path(node).parent)) or shutil.which("npm")
    if npm is None:
        pytest.skip(f"{SUITE}@{VERSION} is not installed in {cache} and there is no npm to install it")
    cache.mkdir(parents=True, exist_ok=True)
    argv = [
        npm,
        "install",
        "--prefix",
        str(cache),
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
        f"{SUITE}@{VERSION}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_SECONDS)
    if done.returncode != 0 or not entry.exists():
        pytest.skip(f"could not install {SUITE}@{VERSION} with npm: {done.stderr.strip()[-200:]}")
    return entry


def cache_folder() -> Path:
    """Where the suite is installed: ``$AGENT_TRACE_CONFORMANCE_DIR``, else the user's cache folder."""
    if folder := os.environ.get("AGENT_TRACE_CONFORMANCE_DIR"):
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agent-trace-mcp" / f"conformance-{VERSION}"


@pytest.fixture
def suite() -> tuple[str, Path]:
    node = node22()
    if node is None:
        pytest.skip("conformance needs Node >= 22: put it on PATH or set AGENT_TRACE_CONFORMANCE_NODE")
    return node, install_suite(cache_folder(), node)


@pytest.fixture
def http_server(tmp_path, workspace) -> Iterator[HttpServer]:
    server = HttpServer(tmp_path, workspace)
    yield server
    server.close()


def inapplicable() -> set[str]:
    return set(
        re.findall(r"^\| `([a-z0-9-]+)` \|", INAPPLICABLE_LIST.read_text(encoding="utf-8"), re.MULTILINE)
    )


def scenario_of(folder: Path) -> str:
    """``server-<scenario>-<timestamp>`` → ``<scenario>`` (as the suite names its result folders)."""
    return re.sub(r"-\d{4}-\d{2}-\d{2}T.*$", "", folder.name.removeprefix("server-"))


def test_every_applicable_conformance_scenario_passes(suite, http_server, tmp_path):
    node, entry = suite
    out = tmp_path / "results"
    argv = [node, str(entry), "server", "--url", http_server.url, "-o", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_SECONDS, cwd=entry.parent)
    checks: dict[str, list[dict]] = {}
    for file in out.glob("*/checks.json"):
        checks.setdefault(scenario_of(file.parent), []).extend(json.loads(file.read_text()))
    assert checks, f"the suite wrote no results: {done.stdout[-1000:]} {done.stderr[-1000:]}"
    failed = {
        scenario: [f"{c['name']}: {c.get('errorMessage', '')}" for c in got if c["status"] == "FAILURE"]
        for scenario, got in checks.items()
        if scenario in APPLICABLE
    }
    assert {s: f for s, f in failed.items() if f} == {}
    assert set(APPLICABLE) <= set(checks), f"not run: {set(APPLICABLE) - set(checks)}"
    for scenario in APPLICABLE:
        assert any(c["status"] == "SUCCESS" for c in checks[scenario]), scenario
    unlisted = set(checks) - set(APPLICABLE) - inapplicable()
    assert not unlisted, f"scenarios in neither APPLICABLE nor {INAPPLICABLE_LIST.name}: {sorted(unlisted)}"
