"""Swapping paths under the workspace tools while they run: nothing from outside the root comes back,
and a FIFO swapped in never hangs a call."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.adversarial.workspace import (
    Flipper,
    outcome,
    replace_with_fifo,
    replace_with_file,
    replace_with_symlink,
    swap_entries,
    tools_by_name,
    unblock_fifo_readers,
    watchdog,
)

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

SECRET = "TOPSECRET-7f3a"
CALLS = 1800
CONCURRENT = 4


@pytest.fixture
def root(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(f"{SECRET} file\n")
    (outside / "outside-only.txt").write_text(f"{SECRET} directory\n")
    (work / "plain.txt").write_text("inside plain\n")
    return work


async def hammer(calls: list[tuple[str, dict[str, Any]]], tools: dict, judge: Any, flipper: Flipper) -> int:
    """Make at least CALLS calls, round robin from CONCURRENT tasks, judging each; returns how many."""
    made = 0

    async def worker(start: int) -> None:
        nonlocal made
        i = start
        while made < CALLS:
            name, arguments = calls[i % len(calls)]
            judge(name, arguments, *await outcome(tools, name, **arguments))
            made += 1
            i += CONCURRENT

    async with anyio.create_task_group() as tg:
        for start in range(CONCURRENT):
            tg.start_soon(worker, start)
    assert flipper.flips > 0
    return made


async def test_a_file_flipped_to_an_outside_symlink_never_leaks(root: Path) -> None:
    swap = root / "swap"
    swap.write_text("inside content\n")
    secret = root.parent / "outside" / "secret.txt"
    tools = tools_by_name(root)
    calls: list[tuple[str, dict[str, Any]]] = [
        ("read_file", {"path": "swap"}),
        ("search_files", {"pattern": "e", "path": "swap"}),
        ("search_files", {"pattern": "e"}),
        ("list_files", {"recursive": True}),
    ]
    seen: Counter[str] = Counter()

    def judge(name: str, arguments: dict, answered: bool, text: str) -> None:
        assert SECRET not in text
        seen["inside" if "inside content" in text else "answered" if answered else "refused"] += 1

    with Flipper(replace_with_symlink(swap, secret), replace_with_file(swap, "inside content\n")) as flipper:
        made = await hammer(calls, tools, judge, flipper)
    print(f"\n{made} calls during {flipper.flips} file/symlink flips: 0 escapes; {dict(seen)}")
    assert seen["inside"] > 0  # the fence: the race really served the inside file at times


async def test_a_directory_flipped_to_an_outside_symlink_never_leaks(root: Path) -> None:
    dswap = root / "dswap"
    real, link = root / ".dswap.real", root / ".dswap.link"
    dswap.mkdir()
    (dswap / "inside.txt").write_text("inside content of the directory\n")
    link.symlink_to(root.parent / "outside", target_is_directory=True)
    tools = tools_by_name(root)
    calls: list[tuple[str, dict[str, Any]]] = [
        ("read_file", {"path": "dswap/inside.txt"}),
        ("read_file", {"path": "dswap/outside-only.txt"}),
        ("read_file", {"path": "dswap/secret.txt"}),
        ("list_files", {"path": "dswap"}),
        ("search_files", {"pattern": "e", "path": "dswap"}),
        ("search_files", {"pattern": "e"}),
        ("list_files", {"recursive": True}),
    ]
    seen: Counter[str] = Counter()

    def judge(name: str, arguments: dict, answered: bool, text: str) -> None:
        assert SECRET not in text
        if answered:
            assert "outside-only" not in text and "secret.txt" not in text
        seen["inside" if "inside content" in text else "answered" if answered else "refused"] += 1

    with Flipper(*swap_entries(dswap, link, real)) as flipper:
        made = await hammer(calls, tools, judge, flipper)
    print(f"\n{made} calls during {flipper.flips} directory/symlink flips: 0 escapes; {dict(seen)}")
    assert seen["inside"] > 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
async def test_a_fifo_flipped_in_never_hangs_a_call(root: Path) -> None:
    pipe = root / "pipe"
    pipe.write_text("inside content\n")
    fifo = root.parent / "fifo"  # outside the root; only its links are swapped in
    os.mkfifo(fifo)
    tools = tools_by_name(root)
    calls: list[tuple[str, dict[str, Any]]] = [
        ("read_file", {"path": "pipe"}),
        ("search_files", {"pattern": "inside", "path": "pipe"}),
        ("search_files", {"pattern": "inside"}),
    ]
    seen: Counter[str] = Counter()

    def judge(name: str, arguments: dict, answered: bool, text: str) -> None:
        seen["inside" if "inside content" in text else "answered" if answered else "refused"] += 1

    with watchdog(60, unblock_fifo_readers(fifo)) as fired:
        with Flipper(replace_with_fifo(pipe, fifo), replace_with_file(pipe, "inside content\n")) as flipper:
            made = await hammer(calls, tools, judge, flipper)
    print(f"\n{made} calls during {flipper.flips} file/FIFO flips: 0 hangs; {dict(seen)}")
    assert not fired.is_set(), "a call blocked opening the FIFO until the watchdog wrote to it"
    assert seen["inside"] > 0
