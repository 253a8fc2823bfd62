"""A writer killed with SIGKILL in the middle of an append leaves the old file or the new one, whole.

Issue 14 item 12: a crash during a large reflection append tore ``experiences.md`` (half a section,
parsed as lessons). The child really is killed in the crash window: it pauses at a chosen point of
its write (halfway through the bytes, before the rename, after it) and tells us, and we SIGKILL it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from agent.experiences import Experiences, parse

pytestmark = [pytest.mark.slow, pytest.mark.anyio]
ROOT = Path(__file__).resolve().parents[2]

_LESSONS = """
def lessons(tag):
    return [f"{tag} lesson {j}: " + " ".join(f"w{j}x{k}" for k in range(80)) for j in range(10)]
"""

_PAUSING_CHILD = (
    _LESSONS
    + """
import os, sys, anyio
import agent.experiences.file as file_module
from agent.experiences import Experiences

path, pause_at = sys.argv[1], sys.argv[2]
real_write_all, real_replace = file_module._write_all, os.replace

def hold(word):
    print(word, flush=True)
    sys.stdin.readline()  # until killed

def write_all(fd, data):
    if pause_at == "mid-write" and len(data) > 1000:
        real_write_all(fd, data[: len(data) // 2])
        hold("paused")
    real_write_all(fd, data)

def replace(src, dst):
    if pause_at == "before-rename":
        hold("paused")
    real_replace(src, dst)
    if pause_at == "after-rename":
        hold("paused")

file_module._write_all = write_all
os.replace = replace
anyio.run(lambda: Experiences(path).append_reflection("f" * 32, "\\n".join("- " + l for l in lessons("new")), source="crash"))
print("finished", flush=True)
"""
)

_LOOPING_CHILD = (
    _LESSONS
    + """
import sys, anyio
from agent.experiences import Experiences

async def main():
    exp = Experiences(sys.argv[1])
    for i in range(10_000):
        tag = f"{sys.argv[2]}-{i}"
        await exp.append_reflection(f"{i:032x}", "\\n".join("- " + l for l in lessons(tag)), source=tag)
        print(i, flush=True)

anyio.run(main)
"""
)


def lessons(tag: str) -> list[str]:
    return [f"{tag} lesson {j}: " + " ".join(f"w{j}x{k}" for k in range(80)) for j in range(10)]


async def _seed(path: Path, sections: int) -> list[str]:
    """An ordinary file of a few hundred KB, so rewriting it takes a real while."""
    exp = Experiences(path)
    expected: list[str] = []
    for n in range(sections):
        recorded = await exp.append_reflection(
            f"{n:032x}", "\n".join("- " + l for l in lessons(f"old-{n}")), source=f"old-{n}"
        )
        assert recorded == lessons(f"old-{n}")
        expected += recorded
    exp.close()
    return expected


async def _line(stream: BufferedByteReceiveStream) -> str:
    with anyio.fail_after(30):
        return (await stream.receive_until(b"\n", 1 << 16)).decode()


async def _kill(process: Process) -> None:
    process.send_signal(signal.SIGKILL)
    with anyio.fail_after(30):
        await process.wait()
    assert process.returncode == -signal.SIGKILL


def _texts(path: Path) -> list[str]:
    return [l.text for l in parse(path.read_text(encoding="utf-8")).lessons()]


@pytest.mark.parametrize("pause_at", ["mid-write", "before-rename", "after-rename"])
async def test_sigkill_during_a_large_append_leaves_a_whole_file(tmp_path: Path, pause_at: str) -> None:
    path = tmp_path / "experiences.md"
    old = await _seed(path, 60)
    assert path.stat().st_size > 250_000
    process = await anyio.open_process(
        [sys.executable, "-c", _PAUSING_CHILD, str(path), pause_at],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert await _line(BufferedByteReceiveStream(process.stdout)) == "paused"  # inside the crash window
    await _kill(process)

    expected = old + lessons("new") if pause_at == "after-rename" else old
    assert _texts(path) == expected  # the old file, or old + new: never half a section

    exp = Experiences(path)  # the next writer works on, and sweeps what the dead one left once stale
    leftovers = list(tmp_path.glob(".experiences.md.*.tmp"))
    assert len(leftovers) == (0 if pause_at == "after-rename" else 1)
    for leftover in leftovers:
        stale = time.time() - 3600
        os.utime(leftover, (stale, stale))
    await exp.append_reflection("a" * 32, "- after the crash", source="next")
    assert _texts(path) == [*expected, "after the crash"]
    assert not list(tmp_path.glob(".experiences.md.*.tmp"))
    exp.close()


async def test_sigkill_at_arbitrary_moments_never_tears_a_section(tmp_path: Path) -> None:
    """Unpaused writers killed wherever they happen to be: every section is whole, every time."""
    path = tmp_path / "experiences.md"
    old = await _seed(path, 20)
    rounds, rng = 8, random.Random(14)
    for round_ in range(rounds):
        process = await anyio.open_process(
            [sys.executable, "-c", _LOOPING_CHILD, str(path), f"r{round_}"], cwd=ROOT, stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        stream = BufferedByteReceiveStream(process.stdout)
        for _ in range(rng.randint(1, 4)):
            await _line(stream)
        await anyio.sleep(rng.random() * 0.05)  # somewhere in the next append(s)
        await _kill(process)

        sections = parse(path.read_text(encoding="utf-8")).sections
        assert [l.text for s in sections[:20] for l in s.lessons] == old
        for section in sections[20:]:
            assert section.source and [l.text for l in section.lessons] == lessons(section.source)
        assert len({s.source for s in sections}) == len(sections)  # no section twice
