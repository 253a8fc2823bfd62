"""Helpers for the workspace attacks: flipping a path in a real thread, finding our own open fds, a watchdog."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.errors import ToolCallError
from agent.tools.registry import Tool


def tools_by_name(root: Path) -> dict[str, Tool]:
    from agent.tools.files import workspace_tools

    return {t.name: t for t in workspace_tools(root)}


async def outcome(tools: dict[str, Tool], name: str, **arguments: Any) -> tuple[bool, str]:
    """(True, text) for an answer, (False, sentence) for a refusal: both are what the model would read."""
    try:
        return True, await tools[name].call(arguments)
    except ToolCallError as exc:
        return False, str(exc)


class Flipper:
    """A thread that keeps swapping one path between two states until stopped; counts its flips."""

    def __init__(self, *states: Callable[[], None]):
        self.states = states
        self.flips = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flipper", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for state in self.states:
                state()
                self.flips += 1

    def __enter__(self) -> Flipper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def replace_with_symlink(path: Path, target: Path, *, directory: bool = False) -> Callable[[], None]:
    """Atomically (rename) put a symlink to target at path."""
    spare = path.with_name(f".{path.name}.link")

    def flip() -> None:
        with contextlib.suppress(FileNotFoundError):
            spare.unlink()
        spare.symlink_to(target, target_is_directory=directory)
        os.replace(spare, path)

    return flip


def replace_with_file(path: Path, content: str) -> Callable[[], None]:
    """Atomically (rename) put a regular file with content at path."""
    spare = path.with_name(f".{path.name}.file")

    def flip() -> None:
        spare.write_text(content)
        os.replace(spare, path)

    return flip


def replace_with_fifo(path: Path, fifo: Path) -> Callable[[], None]:
    """Atomically (rename) put a hard link to one FIFO with no writer at path: opening it to read blocks.

    Always the same FIFO, so a reader stuck on one that was swapped out again can still be released.
    """
    spare = path.with_name(f".{path.name}.fifo")

    def flip() -> None:
        with contextlib.suppress(FileNotFoundError):
            spare.unlink()
        os.link(fifo, spare)
        os.replace(spare, path)

    return flip


def swap_entries(path: Path, first: Path, second: Path) -> list[Callable[[], None]]:
    """Two flips that move first, then second, into path (a directory cannot be renamed over a link)."""

    def put(entry: Path, other: Path) -> Callable[[], None]:
        def flip() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, other)
            os.rename(entry, path)

        return flip

    return [put(first, second), put(second, first)]


def open_fds_to(path: Path) -> int:
    """How many of this process's fds are open on path (Linux /proc)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                count += 1
    return count


@contextlib.contextmanager
def watchdog(seconds: float, rescue: Callable[[], None]) -> Iterator[threading.Event]:
    """Run rescue (which unsticks hung workers) again and again once the block has run for seconds.

    A hang guard, not a timing assertion: the returned event says whether it fired, and a test that
    needed it fails.
    """
    fired = threading.Event()
    done = threading.Event()

    def guard() -> None:
        if done.wait(seconds):
            return
        fired.set()
        while not done.wait(0.05):
            rescue()

    thread = threading.Thread(target=guard, name="watchdog", daemon=True)
    thread.start()
    try:
        yield fired
    finally:
        done.set()
        thread.join()


def unblock_fifo_readers(fifo: Path) -> Callable[[], None]:
    """A rescue: open the FIFO for writing and close it, so readers blocked opening it see EOF."""

    def rescue() -> None:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    return rescue
