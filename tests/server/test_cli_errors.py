"""What the console script says when it cannot start, through real processes: one line, not a traceback."""

from __future__ import annotations

import json

import pytest

from tests.processes import run_cli

pytestmark = pytest.mark.slow

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/none"  # nothing listens on port 1


def test_a_workspace_that_is_not_a_folder_is_refused_at_start_up(tmp_path):
    done = run_cli(tmp_path, "--in-process", "--workspace", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert done.stderr == (
        f"agent-trace-mcp: the workspace {tmp_path / 'missing'} is not a folder (--workspace, "
        "AGENT_TRACE_WORKSPACE); the agent's file tools read inside it.\n"
    )


@pytest.mark.parametrize("transport", [["--in-process"], ["--transport", "http", "--port", "0"]])
def test_an_unreachable_database_is_one_sentence(tmp_path, transport):
    done = run_cli(tmp_path, *transport, "--db", UNREACHABLE)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"agent-trace-mcp: Cannot connect to the trace database {UNREACHABLE}: the connection was refused."
    )


def test_a_database_from_a_newer_version_is_one_sentence(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "traces.db") as db:
        db.execute("PRAGMA user_version = 999")
    done = run_cli(tmp_path, "--in-process", "--db", str(tmp_path / "traces.db"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "agent-trace-mcp: The trace database has schema version 999, newer than this agent-trace-mcp"
        )
    )


def test_the_relay_shows_why_the_shared_server_could_not_start(tmp_path):
    done = run_cli(tmp_path, "--db", UNREACHABLE)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"the shared server could not start: Cannot connect to the trace database {UNREACHABLE}: the "
            "connection was refused."
        )
    )


def test_consolidate_with_nothing_to_do_succeeds(tmp_path):
    done = run_cli(tmp_path, "consolidate", "--model", "offline")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["skipped_reason"] == "The experiences file has no lessons." and not result["failed"]
