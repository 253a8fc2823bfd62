"""The experiences markdown file: appends and rewrites that are all-or-nothing, and bounded reads.

Reflections can finish at the same moment in one server, and a second server (or a CLI run) may
share the file, so every write holds an anyio Lock (tasks in this process) and an exclusive
``fcntl.flock`` (other processes). Every write, an append included, puts the whole new text in a
temporary file beside the old one, fsyncs it and ``os.replace``s it in: a writer killed at any point
leaves the old file or the new one, never a torn section (an ``O_APPEND`` write cut short by a crash
left half a section behind). The flock is re-checked against the path's inode after it is taken: a
writer that waited on a replaced inode retries on the new file. All file IO runs in a worker thread
so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio

from agent.errors import ExperiencesUnreadable
from agent.experiences.limits import MAX_LABEL_CHARS, MAX_PREAMBLE_CHARS, MAX_SCAN_BYTES, MAX_VIEW_CHARS
from agent.experiences.markdown import TITLE, cut, normalize, render_section, split
from agent.experiences.view import FileKey, Window, bounded_view

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: only the in-process lock protects the file
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

STALE_TEMP_SECONDS = 60.0
"""A temporary file this old belongs to a writer that died; younger ones may still be being written."""
_COUNT_CHUNK_BYTES = 1 << 20
_SECTION_START = re.compile(rb"\n##(?=[ \t\r\n])")


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

    async def stat_key(self) -> FileKey:
        """The file's :data:`FileKey`: cheap change detection for recall and change notifications."""
        return await anyio.to_thread.run_sync(self._stat_sync)

    async def read_window(self, max_bytes: int) -> Window:
        """At most the newest ``max_bytes`` of the file, cut at a section heading when it is larger."""
        return await anyio.to_thread.run_sync(self._read_window_sync, max_bytes)

    async def read_bounded(self, max_chars: int = MAX_VIEW_CHARS) -> tuple[str, bool]:
        """The file as readers get it: at most ``max_chars``, whole sections, and whether any were left out."""
        return await anyio.to_thread.run_sync(self._read_bounded_sync, max_chars)

    async def append_section(self, trace_id: str, lessons: list[str], when: datetime, source: str) -> str:
        """Add one ``## <trace_id> (<date>)`` section, all or nothing, and return its text."""
        heading = cut(normalize(trace_id), MAX_LABEL_CHARS)
        section = render_section(heading, lessons, when, cut(normalize(source or ""), MAX_LABEL_CHARS))
        async with self._lock:
            await anyio.to_thread.run_sync(self._rewrite_sync, lambda old: _appended(old, section), False)
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

    def _stat_sync(self) -> FileKey:
        try:
            return _key(self.path.stat())
        except FileNotFoundError:
            return None

    def _read_sync(self) -> str:
        try:
            with self._flocked(exclusive=False, create=False) as fd:
                return _read_fd(fd)
        except FileNotFoundError:
            return ""

    def _read_bounded_sync(self, max_chars: int) -> tuple[str, bool]:
        return bounded_view(self._read_window_sync(MAX_SCAN_BYTES), max_chars)

    def _read_window_sync(self, max_bytes: int) -> Window:
        try:
            with self._flocked(exclusive=False, create=False) as fd:
                st = os.fstat(fd)
                if st.st_size <= max_bytes:
                    return Window(_read_fd(fd), _key(st))
                start = st.st_size - max_bytes
                tail = _pread_all(fd, start, max_bytes)
                found = _SECTION_START.search(tail)
                begin = found.start() + 1 if found else len(tail)
                head = _pread_all(fd, 0, min(start + begin, 4 * MAX_PREAMBLE_CHARS))
                preamble, _ = split(head.decode("utf-8", "replace"))
                return Window(
                    text=tail[begin:].decode("utf-8", "replace"),
                    key=_key(st),
                    complete=False,
                    preamble=preamble,
                    skipped_sections=_count_sections(fd, start + begin),
                )
        except FileNotFoundError:
            return Window("", None)

    def _rewrite_sync(self, transform: Callable[[str], str | None], backup: bool) -> Rewrite:
        with self._flocked(exclusive=True, create=True) as fd:
            raw = _read_raw(fd)
            old = raw.decode("utf-8", "replace")
            new = transform(old)
            if new is None or new == old:
                return Rewrite(old, old, None, False)
            lossy = old.encode("utf-8") != raw  # not UTF-8 (a file kept by hand in Latin-1, say)
            if lossy:
                log.warning("%s is not UTF-8: keeping a copy of it as it was before rewriting it", self.path)
            backup_path = self._write_backup(raw) if (backup and old) or lossy else None
            self._sweep_stale_temps()
            self._write_atomic(new, os.fstat(fd).st_mode & 0o777)
            return Rewrite(old, new, backup_path, True)

    def _write_backup(self, data: bytes) -> Path:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
        candidate = self.path.with_name(f"{self.path.stem}.{stamp}{self.path.suffix}")
        counter = 1
        while candidate.exists():  # two rewrites in one second keep both backups
            candidate = self.path.with_name(f"{self.path.stem}.{stamp}-{counter}{self.path.suffix}")
            counter += 1
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return candidate

    def _write_atomic(self, text: str, mode: int) -> None:
        target = self._target()  # a symlinked file stays a symlink: its target is replaced
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            _write_all(fd, text.encode("utf-8"))
            os.fchmod(fd, mode or 0o600)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def _target(self) -> Path:
        return Path(os.path.realpath(self.path))

    def _sweep_stale_temps(self) -> None:
        """Remove temporary files left by writers killed mid-write (called holding the lock)."""
        target = self._target()
        pattern = re.compile(rf"\.{re.escape(target.name)}\.[^.]+\.tmp")
        cutoff = time.time() - STALE_TEMP_SECONDS
        try:
            entries = list(os.scandir(target.parent))
        except OSError:
            return
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    log.info("removed %s, left by a writer that died mid-write", entry.name)

    def _not_a_file(self) -> ExperiencesUnreadable:
        return ExperiencesUnreadable(
            f"The experiences file {self.path} is not a regular file (--experiences names a FIFO, a device "
            "or a folder); point it at a markdown file."
        )

    @contextmanager
    def _flocked(self, *, exclusive: bool, create: bool) -> Iterator[int]:
        """An fd on the current file, flocked; retried if the file was replaced while we waited."""
        if create:  # where a symlink points, if it is one (a sync folder not made yet); else open says why
            with contextlib.suppress(OSError):
                Path(os.path.realpath(self.path)).parent.mkdir(parents=True, exist_ok=True)
        flags = (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY
        while True:
            try:
                fd = os.open(
                    self.path, flags | getattr(os, "O_NONBLOCK", 0), 0o600
                )  # a FIFO must not hang us
            except IsADirectoryError:
                raise self._not_a_file() from None
            except OSError as exc:  # a dangling link's folder we may not make, a read-only place, …
                if isinstance(exc, FileNotFoundError) and not create:
                    raise
                raise ExperiencesUnreadable(
                    f"The experiences file {self.path} cannot be opened ({exc.strerror or exc}); "
                    "check --experiences."
                ) from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise self._not_a_file()
                os.set_blocking(fd, True)
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


def _appended(old: str, section: str) -> str:
    """``old`` with ``section`` after it, a blank line between, and the title on a new file."""
    if not old:
        return f"{TITLE}\n\n{section}"
    gap = "" if old.endswith("\n\n") else "\n" if old.endswith("\n") else "\n\n"
    return old + gap + section


def _key(st: os.stat_result) -> FileKey:
    return st.st_mtime_ns, st.st_size, st.st_ino


def _count_sections(fd: int, end: int) -> int:
    """How many section headings the bytes before ``end`` hold, read a chunk at a time."""
    count = 1 if end > 2 and re.match(rb"##[ \t\r\n]", _pread_all(fd, 0, 3)) else 0
    carry, offset = b"", 0
    while offset < end:
        chunk = os.pread(fd, min(_COUNT_CHUNK_BYTES, end - offset), offset)
        if not chunk:
            break
        offset += len(chunk)
        buffer = carry + chunk
        count += len(_SECTION_START.findall(buffer))
        carry = buffer[-3:]  # shorter than a match: none is counted twice
    return count


def _pread_all(fd: int, offset: int, size: int) -> bytes:
    chunks = []
    while size > 0 and (chunk := os.pread(fd, size, offset)):
        chunks.append(chunk)
        offset += len(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; not every platform lets a directory be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_raw(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_fd(fd: int) -> str:
    return _read_raw(fd).decode("utf-8", "replace")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
