"""Opening things inside a workspace root by file descriptor, never by a path checked beforehand.

Why: checking a path (``Path.resolve``) and then opening it lets a symlink swapped in between lead
outside the root. Here every component is opened with ``O_NOFOLLOW`` relative to the directory fd it
lives in; a symlink is read with ``readlink`` and expanded by us, its containment checked at every hop
(an absolute target must lie under the root, ``..`` may never climb above it); ``..`` drops the last
name of our own record of where we are and reopens that from the root, so ``..`` is never opened on
disk; and what was opened is ``fstat``-ed, so what is read is what was checked. Files are opened
``O_NONBLOCK``: a FIFO or device swapped in is refused after ``fstat``, never waited on. Directory
walks list directories through fds too, iteratively, with a few fds open at any depth.

What no path check can see: a hard link inside the root to a file outside it is the same inode as the
outside file, so it is read like any file of the root; and a directory moved out of the root while a
walk holds it open is read where it now is. Both need write access inside the root and outside it on
the same filesystem; a root on a filesystem (or mount) of its own rules both out.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

MAX_DEPTH = 64
"""Directories below the root the tools go; deeper ones are refused, and skipped (with a count) in walks."""
MAX_HOPS = 40
"""Symlinks followed while resolving one path, as Linux's own limit: more is taken for a loop."""
MAX_PATH_CHARS = 4096

_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_IS_SYMLINK = frozenset({errno.ELOOP, errno.EMLINK})  # what O_NOFOLLOW on a symlink gives (EMLINK: BSD)
_VANISHED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
_SCAN_CHECK_EVERY = 1024


class PathRefused(Exception):
    """A path the tools will not open; the subclass says why (the caller words the sentence)."""


class OutsideRoot(PathRefused):
    pass


class Missing(PathRefused):
    pass


class SymlinkLoop(PathRefused):
    pass


class TooDeep(PathRefused):
    pass


@dataclass(frozen=True)
class Found:
    """What a path led to: where it really is (names below the root), its fstat, and an fd on it.

    ``fd`` is None for a directory (the session keeps it open as its current directory) and for what
    cannot be opened at all (a socket); otherwise the session closes it at the end unless closed before.
    """

    parts: tuple[str, ...]
    st: os.stat_result
    fd: int | None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.st.st_mode) and self.fd is not None


@dataclass(frozen=True)
class Entry:
    """One entry of a walk: its names below the root (a symlink's own place) and whether it is a directory."""

    parts: tuple[str, ...]
    is_dir: bool


@dataclass
class _Frame:
    parts: tuple[str, ...]
    entries: list[tuple[str, int]] | None = None
    next: int = 0


_LINK, _DIR, _OTHER = range(3)


class WorkspaceRoot:
    """The root directory the tools are confined to, resolved once (a symlinked root is fine)."""

    def __init__(self, root: Path | str):
        given = Path(root).absolute()
        self.path = given.resolve()
        # An absolute symlink target may name the root either way: as configured, or as it really is.
        self._prefixes = {_names(str(self.path)), _names(str(given))}

    def session(self, check: Callable[[], None]) -> Session:
        """One tool call's view of the root; ``check`` raises when the call is abandoned."""
        return Session(self, check)

    def inside(self, target: str) -> list[str] | None:
        """The names below the root an absolute symlink target stands for, or None when it is outside."""
        names = _names(target)
        for prefix in self._prefixes:
            if names[: len(prefix)] == prefix:
                return list(names[len(prefix) :])
        return None


def _names(path: str) -> tuple[str, ...]:
    """A path's components without the empty and '.' ones (``..`` is kept: only we may interpret it)."""
    return tuple(name for name in path.split("/") if name not in ("", "."))


@dataclass
class Session:
    """The root fd, the one directory currently open, and the fds handed out; all closed on exit."""

    root: WorkspaceRoot
    check: Callable[[], None]
    skipped_deep: int = 0
    _root_fd: int = -1
    _current: tuple[tuple[str, ...], int] | None = None
    _handed_out: set[int] = field(default_factory=set)

    def __enter__(self) -> Session:
        self._root_fd = os.open(self.root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for fd in self._handed_out:
            os.close(fd)
        self._handed_out.clear()
        self._set_current(None)
        os.close(self._root_fd)

    def close(self, found: Found) -> None:
        """Close a Found's fd before the session ends (walks open many files, one at a time)."""
        if found.fd is not None and found.fd in self._handed_out:
            self._handed_out.discard(found.fd)
            os.close(found.fd)

    # -- resolving ------------------------------------------------------------------------------------

    def resolve(self, components: Sequence[str], base: tuple[str, ...] = ()) -> Found:
        """Open what ``components`` (relative to the directory ``base``) lead to, without leaving the root."""
        pending = list(reversed(_names("/".join(components))))
        names = list(base)
        hops = 0
        while pending:
            self.check()
            name = pending.pop()
            if name == "..":
                if not names:
                    raise OutsideRoot
                names.pop()
                continue
            parent = self._dir_fd(tuple(names))
            try:
                fd = os.open(name, _FILE_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno in _IS_SYMLINK:
                    hops += 1
                    if hops > MAX_HOPS:
                        raise SymlinkLoop from exc
                    try:
                        target = os.readlink(name, dir_fd=parent)
                    except OSError as again:
                        if again.errno == errno.EINVAL:  # no longer a link: look at it again
                            pending.append(name)
                            continue
                        if again.errno in _VANISHED:
                            raise Missing from again
                        raise
                    names = self._follow(target, names, pending)
                    continue
                if exc.errno in (errno.ENOENT, errno.ENOTDIR) or (exc.errno == errno.ENXIO and pending):
                    raise Missing from exc
                if exc.errno == errno.ENXIO:  # a socket: there, but not something to open
                    return Found((*names, name), os.stat(name, dir_fd=parent, follow_symlinks=False), None)
                raise
            try:
                st = os.fstat(fd)
            except OSError:
                os.close(fd)
                raise
            if stat.S_ISDIR(st.st_mode):
                names.append(name)
                if len(names) > MAX_DEPTH:
                    os.close(fd)
                    raise TooDeep
                self._set_current((tuple(names), fd))
                continue
            if pending:  # a file named as if it were a directory
                os.close(fd)
                raise Missing
            self._handed_out.add(fd)
            return Found((*names, name), st, fd)
        parts = tuple(names)
        return Found(parts, os.fstat(self._dir_fd(parts)), None)

    def _follow(self, target: str, names: list[str], pending: list[str]) -> list[str]:
        """Queue a symlink's target in place of the link; returns the directory it is relative to."""
        if target.startswith("/"):
            below = self.root.inside(target)
            if below is None:
                raise OutsideRoot
            pending.extend(reversed(below))
            return []
        pending.extend(reversed(_names(target)))
        return names

    # -- the current directory ------------------------------------------------------------------------

    def _dir_fd(self, parts: tuple[str, ...]) -> int:
        """An fd on the directory at ``parts``, reopened from the root by name when it is not the current one.

        Each name is opened ``O_NOFOLLOW | O_DIRECTORY``, so a directory swapped for a link since it was
        checked fails here (Missing) instead of being followed.
        """
        if not parts:
            return self._root_fd
        if self._current is not None:
            held, fd = self._current
            if held == parts:
                return fd
            start, rest = (fd, parts[-1:]) if held == parts[:-1] else (self._root_fd, parts)
        else:
            start, rest = self._root_fd, parts
        fd = start
        try:
            for name in rest:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                if fd not in (start, self._root_fd):
                    os.close(fd)
                fd = child
        except OSError as exc:
            if fd not in (start, self._root_fd):
                os.close(fd)
            if exc.errno in _VANISHED:
                raise Missing from exc
            raise
        self._set_current((parts, fd))
        return fd

    def _set_current(self, current: tuple[tuple[str, ...], int] | None) -> None:
        if self._current is not None:
            os.close(self._current[1])
        self._current = current

    # -- walking --------------------------------------------------------------------------------------

    def walk(self, top: tuple[str, ...], *, recursive: bool, skip: frozenset[str]) -> Iterator[Entry]:
        """The entries below directory ``top``, depth-first in name order, with an explicit stack.

        Symlinks are resolved (those leading outside or nowhere are dropped) but never descended, so
        there are no loops or duplicates. Directories named in ``skip`` are not entered when recursing;
        directories deeper than MAX_DEPTH are not listed or entered but counted in ``skipped_deep``.
        """
        stack = [_Frame(top)]
        while stack:
            self.check()
            frame = stack[-1]
            if frame.entries is None:
                try:
                    frame.entries = self._scan(frame.parts)
                except (PathRefused, OSError):  # gone or unreadable since it was listed: skip it
                    stack.pop()
                    continue
            if frame.next == len(frame.entries):
                stack.pop()
                continue
            name, kind = frame.entries[frame.next]
            frame.next += 1
            parts = (*frame.parts, name)
            if kind == _LINK:
                try:
                    target = self.resolve([name], base=frame.parts)
                except (PathRefused, OSError):
                    continue
                self.close(target)
                yield Entry(parts, target.is_dir)
            elif kind == _DIR:
                if recursive and name in skip:
                    continue
                if len(parts) > MAX_DEPTH:
                    self.skipped_deep += 1
                    continue
                yield Entry(parts, True)
                if recursive:
                    stack.append(_Frame(parts))
            else:
                yield Entry(parts, False)

    def _scan(self, parts: tuple[str, ...]) -> list[tuple[str, int]]:
        """A directory's entries as (name, kind), sorted by name, read through its fd."""
        entries = []
        with os.scandir(self._dir_fd(parts)) as it:
            for count, entry in enumerate(it):
                if count % _SCAN_CHECK_EVERY == 0:
                    self.check()
                try:
                    kind = (
                        _LINK
                        if entry.is_symlink()
                        else _DIR
                        if entry.is_dir(follow_symlinks=False)
                        else _OTHER
                    )
                except OSError:
                    continue
                entries.append((entry.name, kind))
        entries.sort()
        return entries

    def open_entry(self, entry: Entry) -> Found:
        """Open a walk's entry through its directory's fd; anything but a plain file is resolved afresh."""
        parent, name = entry.parts[:-1], entry.parts[-1]
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=self._dir_fd(parent))
        except OSError:  # a symlink (or swapped for one since it was listed), a socket, gone: the long way
            return self.resolve([name], base=parent)
        self._handed_out.add(fd)
        found = Found(entry.parts, os.fstat(fd), fd)
        return found
