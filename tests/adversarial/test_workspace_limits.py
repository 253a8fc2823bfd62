"""Workspace tools against trees and files built to hurt: a 1,500-deep tree, a terabyte to skip through,
and enough stuck calls to exhaust a shared thread pool."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from agent.errors import ToolCallError
from agent.tools import files
from tests.adversarial.workspace import open_fds_to, tools_by_name, watchdog

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

DEEP = 1500
needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="watches fds through /proc")


@pytest.fixture
def deep_root(tmp_path: Path):
    """work/ with a chain d/d/…/d 1,500 deep, a file near the top and one at the bottom; removed bottom-up."""
    root = tmp_path / "work"
    root.mkdir()
    for level in range(1, DEEP + 1):
        os.mkdir(root / ("d/" * level))  # recursive removal would overflow Python's stack, so by hand below
    (root / ("d/" * 5) / "near.txt").write_text("needle near the top\n")
    bottom = root / ("d/" * DEEP) / "bottom.txt"
    bottom.write_text("needle at the bottom\n")
    yield root
    bottom.unlink()
    (root / ("d/" * 5) / "near.txt").unlink()
    for level in range(DEEP, 0, -1):
        os.rmdir(root / ("d/" * level))


async def test_a_tree_1500_deep_is_walked_to_the_depth_bound(deep_root: Path) -> None:
    tools = tools_by_name(deep_root)
    out = await tools["search_files"].call({"pattern": "needle"})
    note = f"[Skipped 1 directory nested deeper than {files.MAX_DEPTH} levels.]"
    assert out.splitlines() == [
        "1 match(es) in 1 file(s) for 'needle' under '.':",
        "d/d/d/d/d/near.txt:1: needle near the top",
        note,
    ]
    listing = (await tools["list_files"].call({"recursive": True, "max_entries": 1000})).splitlines()
    assert listing[-1] == note and len(listing) == files.MAX_DEPTH + 2  # the chain, near.txt, the note
    deep_path = "d/" * DEEP + "bottom.txt"
    for name in ("read_file", "list_files", "search_files"):
        arguments = (
            {"path": deep_path, "pattern": "needle"} if name == "search_files" else {"path": deep_path}
        )
        with pytest.raises(ToolCallError, match="nested deeper than"):
            await tools[name].call(arguments)
    print(f"\n{DEEP}-deep tree: search, list and 3 deep paths answered with sentences")


@pytest.fixture
def terabyte(tmp_path: Path) -> Path:
    """work/huge.txt: 1,000 text lines, then a sparse terabyte without a newline (hours to skip through)."""
    (tmp_path / "work").mkdir()
    huge = tmp_path / "work" / "huge.txt"
    with open(huge, "wb") as f:
        f.write(b"a line of text\n" * 1000)
        f.truncate(2**40)
    return huge


@needs_proc
async def test_a_cancelled_long_read_returns_and_its_worker_lets_go(terabyte: Path) -> None:
    tools = tools_by_name(terabyte.parent)
    with watchdog(30, lambda: os.truncate(terabyte, 0)) as fired:  # EOF ends a worker nothing else stops
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_once_reading() -> None:
                    while not open_fds_to(terabyte):
                        await anyio.sleep(0.005)
                    scope.cancel()

                tg.start_soon(cancel_once_reading)
                await tools["read_file"].call({"path": "huge.txt", "offset": 10**11})
        assert scope.cancelled_caught
        while open_fds_to(terabyte):  # the worker noticed and closed the file
            await anyio.sleep(0.005)
    assert not fired.is_set(), "the read ran on until the watchdog truncated the file"


@needs_proc
async def test_stuck_reads_leave_the_default_thread_limiter_free(terabyte: Path) -> None:
    tools = tools_by_name(terabyte.parent)
    stuck_calls = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
    with watchdog(30, lambda: os.truncate(terabyte, 0)) as fired:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                for _ in range(stuck_calls):
                    tg.start_soon(tools["read_file"].call, {"path": "huge.txt", "offset": 10**11})
                while not open_fds_to(terabyte):
                    await anyio.sleep(0.005)
                assert await anyio.to_thread.run_sync(lambda: "free") == "free"
                reading = open_fds_to(terabyte)
                scope.cancel()
        while open_fds_to(terabyte):
            await anyio.sleep(0.005)
    assert not fired.is_set(), "the default limiter had no thread until the watchdog ended the reads"
    assert 0 < reading <= files.FILE_TOOL_THREADS
    print(
        f"\n{stuck_calls} stuck reads: the default limiter stayed free, {reading} read at once, all stopped"
    )
