"""Downstream MCP servers that misbehave, for real: each fault is a real server process doing it.

Issue 14 items 8, 9, 11 and the orphaned child, plus the faults next to them: error responses taken for
a lost connection, bytes that are not UTF-8 or not JSON, an endless line, a closed stdout, a stderr
flood, a server that never finishes its handshake, one that ignores SIGTERM, one whose tool list
starts failing, an HTTP server killed mid-call, and our own process killed with SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from agent.errors import ToolCallError
from agent.tools.mcp import McpTool, ServerSpec, StdioServerSpec
from agent.tools.registry import ToolRegistry
from tests.agent.test_mcp_tools import CALC, call, http_test_server, process_gone, servers, wait_for_tool

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

OWNER_SCRIPT = str(Path(__file__).with_name("mcp_owner.py"))
PATIENT = 600.0  # a tool timeout no test may wait out: each fault must be noticed by itself


async def wait_for_file(path: Path) -> None:
    with anyio.fail_after(20):
        while not path.exists():
            await anyio.sleep(0.05)


async def pid_now(registry: ToolRegistry) -> int | None:
    """The pid of the calc server now, or None while it has no working connection."""
    try:
        return int(await call(registry, "calc__pid"))
    except (ToolCallError, AssertionError):  # AssertionError: the tool is not registered
        return None


async def wait_until_gone(pid: int) -> None:
    with anyio.fail_after(20):
        while not process_gone(pid):
            await anyio.sleep(0.05)


# --- item 8: an error response is a tool error, whatever its code ------------------------------------


@pytest.mark.parametrize("message", ["database busy", "Connection closed"])
async def test_error_response_minus_32000_is_a_tool_error(message: str) -> None:
    async with servers({"calc": CALC}, call_timeout=PATIENT) as (mcp_servers, registry):
        pid = await call(registry, "calc__pid")
        assert await call(registry, "calc__count") == "1"
        slow_result: list[str] = []

        async def another_trace() -> None:
            slow_result.append(await call(registry, "calc__slow", seconds=1))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(another_trace)
                with pytest.raises(ToolCallError) as info:
                    await call(registry, "calc__server_error", message=message)
        assert (
            str(info.value)
            == f"MCP server 'calc' answered the call to 'server_error' with an error: {message}."
        )
        assert slow_result == ["slept 1.0 s"]  # the other call was not cut
        assert await call(registry, "calc__count") == "2"  # same process, state kept
        assert await call(registry, "calc__pid") == pid
        assert [s.state for s in mcp_servers.describe()] == ["up"]


async def test_error_response_minus_32000_over_http_is_a_tool_error() -> None:
    async with http_test_server() as (spec, _), servers({"web": spec}) as (_, registry):
        assert await call(registry, "web__count") == "1"
        with pytest.raises(ToolCallError, match="with an error: Connection closed"):
            await call(registry, "web__server_error", message="Connection closed")
        assert await call(registry, "web__count") == "2"


async def test_failing_tool_list_keeps_the_server_and_its_tools() -> None:
    async with servers({"calc": CALC}, refresh_interval=0.05) as (mcp_servers, registry):
        pid = await call(registry, "calc__pid")
        await call(registry, "calc__break_listing")
        before = int(await call(registry, "calc__listings"))
        with anyio.fail_after(20):  # the fence: several re-reads have failed since
            while int(await call(registry, "calc__listings")) < before + 3:
                await anyio.sleep(0.05)
        assert await call(registry, "calc__pid") == pid
        assert [s.state for s in mcp_servers.describe()] == ["up"]


# --- item 9: bytes that are not UTF-8, or not JSON-RPC -------------------------------------------------


async def test_undecodable_garbage_line_is_dropped_and_the_call_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with servers({"calc": CALC}, call_timeout=PATIENT) as (_, registry):
        with anyio.fail_after(20):
            for _ in range(3):
                assert await call(registry, "calc__garbage_line") == "after garbage"
            assert await call(registry, "calc__count") == "1"
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "not JSON-RPC" in r.getMessage()]
    assert len(warned) == 1  # once per connection, not once per line: a flood must not flood our log
    assert "\\xff\\xfe\\xfd not json" in warned[0].getMessage()


async def test_latin1_text_in_a_reply_is_replaced_not_fatal() -> None:
    async with servers({"calc": CALC}, call_timeout=PATIENT) as (_, registry):
        with anyio.fail_after(20):
            assert await call(registry, "calc__latin1_reply") == "caf\ufffd"
            assert await call(registry, "calc__count") == "1"


async def test_unparseable_reply_fails_its_call_at_once() -> None:
    async with servers({"calc": CALC}, call_timeout=PATIENT) as (_, registry):
        with anyio.fail_after(20), pytest.raises(ToolCallError) as info:
            await call(registry, "calc__broken_reply")
        assert str(info.value).startswith(
            "MCP server 'calc' sent a reply to 'broken_reply' that is not JSON-RPC"
        )


async def test_endless_reply_line_is_bounded() -> None:
    async with servers({"calc": CALC}, call_timeout=PATIENT) as (_, registry):
        with anyio.fail_after(60), pytest.raises(ToolCallError, match=r"longer than 16 MiB"):
            await call(registry, "calc__long_reply", megabytes=40)
        with anyio.fail_after(20):
            assert await call(registry, "calc__count") == "1"  # the same connection goes on


async def test_closed_stdout_fails_pending_calls_at_once_and_reconnects(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    async with servers({"calc": CALC}, call_timeout=PATIENT, backoff_initial=0.05) as (mcp_servers, registry):
        pid = int(await call(registry, "calc__pid"))
        errors: list[str] = []

        async def pending_call() -> None:
            with pytest.raises(ToolCallError) as info:
                await call(registry, "calc__slow", seconds=3600, marker=str(marker))
            errors.append(str(info.value))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pending_call)
                await wait_for_file(marker)
                with pytest.raises(ToolCallError, match="lost its connection"):
                    await call(registry, "calc__close_stdout")
        assert errors and "lost its connection" in errors[0]
        await wait_for_tool(registry, "calc__pid")
        assert int(await call(registry, "calc__pid")) != pid
        await wait_until_gone(pid)
        assert [s.state for s in mcp_servers.describe()] == ["up"]


async def test_wedged_server_is_restarted_when_its_tools_cannot_be_reread(tmp_path: Path) -> None:
    marker = tmp_path / "blocked"
    async with servers({"calc": CALC}, call_timeout=1, refresh_interval=0.2, backoff_initial=0.05) as (
        mcp_servers,
        registry,
    ):
        pid = int(await call(registry, "calc__pid"))
        block = registry.get("calc__block")
        assert isinstance(block, McpTool)
        block.timeout = 0.5  # the call gives up; the process stays stuck
        with pytest.raises(ToolCallError, match="timed out"):
            await block.call({"seconds": 3600, "marker": str(marker)})
        assert marker.exists()
        with anyio.fail_after(30):
            while await pid_now(registry) in (None, pid):  # None: not back yet, or the wedged one timing out
                await anyio.sleep(0.05)
        await wait_until_gone(pid)
        assert [s.state for s in mcp_servers.describe()] == ["up"]


# --- item 11: a stderr flood ----------------------------------------------------------------------------


def open_regular_file_sizes() -> list[int]:
    """Sizes of the regular files this process holds open (deleted temp files included)."""
    sizes = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            info = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            sizes.append(info.st_size)
    return sizes


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_stderr_flood_is_bounded_as_it_is_written(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent.tools.mcp")
    async with servers({"calc": CALC}, backoff_initial=0.05) as (mcp_servers, registry):
        flooded = int(
            await call(registry, "calc__stderr_flood", megabytes=32, last_line="last words: disk full")
        )
        assert flooded >= 32 << 20
        assert max(open_regular_file_sizes(), default=0) < 1 << 20  # nothing grows with the flood
        with anyio.fail_after(10):
            while mcp_servers.describe()[0].stderr_last_line != "last words: disk full":
                await anyio.sleep(0.05)
        with pytest.raises(ToolCallError, match="lost its connection"):
            await call(registry, "calc__crash")
        await wait_for_tool(registry, "calc__add")
    (warning,) = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert warning.rstrip().endswith("last words: disk full")  # the tail in the failure line is kept
    assert len(warning) < 10_000


# --- startup and shutdown -------------------------------------------------------------------------------


async def test_server_that_never_answers_the_handshake_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    hang = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(3600)"
    specs: dict[str, ServerSpec] = {
        "mute": StdioServerSpec(command=sys.executable, args=["-c", hang, str(pid_file)])
    }
    async with servers(specs, startup_timeout=1, backoff_initial=60) as (mcp_servers, _):
        (state,) = mcp_servers.describe()
        assert (state.state, state.reason) == ("failed", "it did not answer within 1 s")
        with anyio.fail_after(20):
            while not pid_file.exists() or not pid_file.read_text():
                await anyio.sleep(0.05)
        await wait_until_gone(int(pid_file.read_text()))  # the attempt's process did not leak


async def test_server_ignoring_sigterm_in_a_blocking_call_is_killed_on_exit(tmp_path: Path) -> None:
    marker = tmp_path / "blocked"
    async with servers({"calc": CALC}) as (_, registry):
        pid = int(await call(registry, "calc__pid"))
        await call(registry, "calc__ignore_sigterm")

        async def blocked_call() -> None:
            await call(registry, "calc__block", seconds=3600, marker=str(marker))

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked_call)
            await wait_for_file(marker)
            tg.cancel_scope.cancel()
    await wait_until_gone(pid)


async def test_http_server_killed_mid_call_is_a_lost_connection(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    async with http_test_server() as (spec, process):
        async with servers({"web": spec}, call_timeout=PATIENT, backoff_initial=0.05) as (
            mcp_servers,
            registry,
        ):
            errors: list[str] = []

            async def pending_call() -> None:
                with pytest.raises(ToolCallError) as info:
                    await call(registry, "web__slow", seconds=3600, marker=str(marker))
                errors.append(str(info.value))

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pending_call)
                    await wait_for_file(marker)
                    process.kill()
            assert "lost its connection" in errors[0]
            with anyio.fail_after(20):
                while mcp_servers.describe()[0].state == "up":
                    await anyio.sleep(0.05)
            assert registry.get("web__add") is None


# --- the orphaned child ---------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
async def test_downstream_dies_with_its_owner_killed_mid_call(tmp_path: Path) -> None:
    marker = tmp_path / "blocked"
    owner = await anyio.open_process(
        [sys.executable, OWNER_SCRIPT, str(marker)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    downstream: int | None = None
    try:
        assert owner.stdout is not None
        with anyio.fail_after(30):
            downstream = int((await owner.stdout.receive()).decode().strip())
        await wait_for_file(marker)
        os.kill(owner.pid, signal.SIGKILL)
        await owner.wait()
        await wait_until_gone(downstream)
    finally:
        if downstream is not None and not process_gone(downstream):
            os.kill(downstream, signal.SIGKILL)  # do not leave it behind when the test fails
        if owner.returncode is None:
            owner.kill()
        await owner.aclose()
