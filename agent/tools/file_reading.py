"""Reading text out of an open regular file: a range of lines after a fast offset skip, or a small whole file.

Works on fds the safe resolver opened, never on paths. Skipping counts newlines in large chunks (a
readline per line took 19 s for an offset past a 200 M-line file) and checks for cancellation at every
chunk; an offset the file's size cannot reach is refused before anything is read.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

from agent.errors import ToolCallError

READ_CAP_BYTES = 256 * 1024
SNIFF_BYTES = 8192
SKIP_CHUNK_BYTES = 1024 * 1024
EXACT_COUNT_MAX_BYTES = 64 * 1024 * 1024
"""Past this size an offset beyond the file's byte count is refused at once instead of counting its lines."""
_NEWLINE = ord("\n")


def read_lines(fd: int, size: int, shown: str, offset: int, limit: int, check: Callable[[], None]) -> str:
    """Lines offset.. of the text file on fd, at most limit of them and READ_CAP_BYTES, with a note on the rest."""
    if b"\0" in os.pread(fd, SNIFF_BYTES, 0):
        raise ToolCallError(
            f"'{shown}' looks like a binary file (it contains NUL bytes); read_file only reads text files."
        )
    if offset - 1 > size > EXACT_COUNT_MAX_BYTES:  # more newlines wanted than the file has bytes
        raise ToolCallError(
            f"'{shown}' has fewer than {offset} lines (it is {_size(size)}); offset {offset} is past its end."
        )
    with io.FileIO(fd, closefd=False) as raw:
        start, lines = _skip_lines(raw, offset - 1, check)
        if start is None:
            raise ToolCallError(f"'{shown}' has only {lines} line(s); offset {offset} is past its end.")
        raw.seek(start)
        out, note = _take_lines(io.BufferedReader(raw), offset, limit)
    if b"\0" in out:
        raise ToolCallError(f"'{shown}' contains NUL bytes (binary data); read_file only reads text.")
    text = out.decode("utf-8", "replace")
    if not text and not note:
        if offset == 1:
            return f"File '{shown}' is empty."
        raise ToolCallError(f"'{shown}' has only {offset - 1} line(s); offset {offset} is past its end.")
    if note:
        text += ("" if text.endswith("\n") or not text else "\n") + note
    return text


def _take_lines(f: io.BufferedReader, offset: int, limit: int) -> tuple[bytearray, str]:
    """Up to limit lines and READ_CAP_BYTES from f, and a note telling how to read on if there is more."""
    out = bytearray()
    count, note = 0, ""
    while count < limit:
        line = f.readline(READ_CAP_BYTES - len(out) + 1)
        if not line:
            break
        if len(out) + len(line) > READ_CAP_BYTES:
            if count == 0:
                out += _whole_characters(line[:READ_CAP_BYTES])
                note = f"[Line {offset} is longer than the 256 KiB read cap; only its start is shown.]"
            else:
                note = (
                    f"[Stopped at the 256 KiB read cap after line {offset + count - 1}; call "
                    f"read_file with offset={offset + count} to continue.]"
                )
            break
        out += line
        count += 1
    else:
        if f.read(1):
            note = (
                f"[Showing lines {offset}-{offset + count - 1}; the file continues. Call "
                f"read_file with offset={offset + count} to read more.]"
            )
    return out, note


def _skip_lines(raw: io.FileIO, newlines: int, check: Callable[[], None]) -> tuple[int | None, int]:
    """(position just after the given number of newlines, newlines), or (None, lines in the file) at EOF."""
    if newlines == 0:
        return 0, 0
    buffer = bytearray(SKIP_CHUNK_BYTES)
    position, need, last = 0, newlines, _NEWLINE  # so an empty file has no partial last line
    raw.seek(0)
    while True:
        check()
        got = raw.readinto(buffer)
        if not got:
            return None, newlines - need + (last != _NEWLINE)  # a last line without a newline still counts
        found = buffer.count(b"\n", 0, got)
        if found >= need:
            return position + _nth_newline(buffer, need, got) + 1, newlines
        need -= found
        position += got
        last = buffer[got - 1]


def _nth_newline(buffer: bytearray, n: int, end: int) -> int:
    """Index of the n-th newline (1-based) in buffer[:end]; halves the range by counting, then finds."""
    lo, hi = 0, end
    while n > 32:
        mid = (lo + hi) // 2
        below = buffer.count(b"\n", lo, mid)
        if below >= n:
            hi = mid
        else:
            n -= below
            lo = mid
    at = lo - 1
    for _ in range(n):
        at = buffer.index(b"\n", at + 1, hi)
    return at


def read_small(fd: int, size: int, most: int) -> bytes | None:
    """The whole file on fd (size from its fstat), or None when it holds more than most bytes."""
    if size > most:
        return None
    want = size + 1  # one byte more than expected shows a file that grew since fstat
    data = os.pread(fd, want, 0)
    if len(data) == want and want <= most:  # it grew: read on up to the cap
        data += os.pread(fd, most + 1 - want, want)
    return None if len(data) > most else data


def _size(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _whole_characters(data: bytes) -> bytes:
    """``data`` without the first bytes of a UTF-8 character its cut left unfinished (no U+FFFD at the end)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: nothing is unfinished
            return data
        if byte >= 0xC0:  # a lead byte: whole if its sequence fits in what is left
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= needed else data[:-back]
    return data
