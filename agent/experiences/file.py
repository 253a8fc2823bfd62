"""The experiences markdown file: appends that never tear, and atomic rewrites with a dated backup.

Reflections can finish at the same moment in one server, and a second server (or a CLI run) may
share the file, so every write holds an anyio Lock (tasks in this process) and an exclusive
``fcntl.flock`` (other processes). The flock is re-checked against the path's inode after it is
taken: a rewrite replaces the file with a new inode, and a writer that waited on the old one must
not append to a file nobody will read again. All file IO runs in a worker thread so a slow disk
never stalls the event loop.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio

from agent.experiences.markdown import TITLE, render_section

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: only the in-process lock protects the file
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Rewrite:
    """What a read-modify-write did: the text before and after, and the backup if one was made."""

    old_text: str
    new_text: str
    backup_path: Path | None
    changed: bool


class ExperienceFile:
    """The markdown file of lessons; the file is the source of truth, this class only guards writes."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()
        self._lock = anyio.Lock()

    async def read_text(self) -> str:
        """The whole file, or "" when it does not exist yet."""
        return await anyio.to_thread.run_sync(self._read_sync)

    async def stat_key(self) -> tuple[int, int] | None:
        """(mtime_ns, size), or None when missing: cheap change detection for the recall index."""
        return await anyio.to_thread.run_sync(self._stat_sync)

    async def append_section(self, trace_id: str, lessons: list[str], when: datetime, source: str) -> str:
        """Append one ``## <trace_id> (<date>)`` section in a single write and return its text."""
        section = render_section(trace_id, lessons, when, source)
        async with self._lock:
            await anyio.to_thread.run_sync(self._append_sync, section)
        return section

    async def replace(self, new_text: str, backup: bool = True) -> Path | None:
        """Atomically replace the file's content, first copying the old file to a dated backup."""
        result = await self.rewrite(lambda _old: new_text, backup=backup)
        return result.backup_path

    async def rewrite(self, transform: Callable[[str], str | None], *, backup: bool = True) -> Rewrite:
        """Read, transform and replace under the locks, so no append made meanwhile is lost.

        ``transform`` gets the current text and returns the new text, or None to leave the file alone.
        It runs in the worker thread while the file is locked: keep it quick and free of IO.
        """
        async with self._lock:
            return await anyio.to_thread.run_sync(self._rewrite_sync, transform, backup)

    # --- blocking helpers, run in a worker thread -------------------------------------------------

    def _stat_sync(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _read_sync(self) -> str:
        try:
            with self._flocked(exclusive=False, create=False) as fd:
                return _read_fd(fd)
        except FileNotFoundError:
            return ""

    def _append_sync(self, section: str) -> None:
        with self._flocked(exclusive=True, create=True) as fd:
            size = os.fstat(fd).st_size
            if size == 0:
                prefix = f"{TITLE}\n\n"
            else:
                os.lseek(fd, max(0, size - 2), os.SEEK_SET)
                tail = os.read(fd, 2)
                prefix = "" if tail.endswith(b"\n\n") else "\n" if tail.endswith(b"\n") else "\n\n"
            _write_all(fd, (prefix + section).encode("utf-8"))  # O_APPEND: one write at the end
            os.fsync(fd)

    def _rewrite_sync(self, transform: Callable[[str], str | None], backup: bool) -> Rewrite:
        with self._flocked(exclusive=True, create=True) as fd:
            old = _read_fd(fd)
            new = transform(old)
            if new is None or new == old:
                return Rewrite(old, old, None, False)
            backup_path = self._write_backup(old) if backup and old else None
            self._write_atomic(new, os.fstat(fd).st_mode & 0o777)
            return Rewrite(old, new, backup_path, True)

    def _write_backup(self, text: str) -> Path:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
        candidate = self.path.with_name(f"{self.path.stem}.{stamp}{self.path.suffix}")
        counter = 1
        while candidate.exists():  # two rewrites in one second keep both backups
            candidate = self.path.with_name(f"{self.path.stem}.{stamp}-{counter}{self.path.suffix}")
            counter += 1
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return candidate

    def _write_atomic(self, text: str, mode: int) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            _write_all(fd, text.encode("utf-8"))
            os.fchmod(fd, mode or 0o644)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self.path)

    @contextmanager
    def _flocked(self, *, exclusive: bool, create: bool) -> Iterator[int]:
        """An fd on the current file, flocked; retried if the file was replaced while we waited."""
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = (os.O_RDWR | os.O_APPEND | os.O_CREAT) if create else os.O_RDONLY
        while True:
            fd = os.open(self.path, flags, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                st = os.fstat(fd)
                try:
                    current = os.stat(self.path)
                    same = (current.st_ino, current.st_dev) == (st.st_ino, st.st_dev)
                except FileNotFoundError:
                    same = False
                if same:
                    yield fd
                    return
            finally:
                os.close(fd)  # closing releases the flock


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
