"""Read-only workspace tools (list_files, read_file, search_files) confined to one root directory.

Every path a model gives is untrusted. It is joined to the root, resolved (following symlinks and ``..``)
and must land inside the resolved root by ``Path.is_relative_to`` -- never a string prefix, so a sibling
``/x/work_extra`` is not inside ``/x/work``. While walking a tree, symlinks whose target lies outside
the root are skipped, and symlinked directories are never descended into (no loops, no duplicates: a
target inside the root is walked on its own). Everything is pure Python (no command line is built) and
all filesystem work runs in a worker thread so the event loop never blocks.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread

from agent.errors import ToolCallError
from agent.tools.registry import Tool

SKIPPED_DIRS = frozenset({".git", "__pycache__", "node_modules", ".venv"})
READ_CAP_BYTES = 256 * 1024
SEARCH_MAX_FILE_BYTES = 1024 * 1024
SEARCH_LINE_CHARS = 300
_SNIFF_BYTES = 8192


def _prop(type_: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"type": type_, "description": description, **extra}


def _schema(properties: dict[str, dict[str, Any]], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


_PATH_HELP = "relative to the workspace root"

LIST_SCHEMA = _schema(
    {
        "path": _prop(
            "string", f"Directory to list, {_PATH_HELP}; '.' (the default) is the root.", default="."
        ),
        "recursive": _prop(
            "boolean",
            "List the whole tree below path instead of only its direct entries; .git, __pycache__, "
            "node_modules and .venv are skipped. Default false.",
            default=False,
        ),
        "max_entries": _prop(
            "integer", "Most entries to return (1-1000, default 200).", default=200, minimum=1, maximum=1000
        ),
    }
)
READ_SCHEMA = _schema(
    {
        "path": _prop("string", f"File to read, {_PATH_HELP}, e.g. 'src/main.py'."),
        "offset": _prop("integer", "Line number to start at, 1-based (default 1).", default=1, minimum=1),
        "limit": _prop("integer", "Most lines to return (default 2000).", default=2000, minimum=1),
    },
    required=("path",),
)
SEARCH_SCHEMA = _schema(
    {
        "pattern": _prop(
            "string",
            "Plain text to find (not a regular expression); matched within single lines.",
            minLength=1,
        ),
        "path": _prop(
            "string",
            f"File or directory to search, {_PATH_HELP}; '.' (the default) is the whole workspace.",
            default=".",
        ),
        "case_sensitive": _prop("boolean", "Match letter case exactly (default false).", default=False),
        "max_results": _prop(
            "integer",
            "Most matching lines to return (1-500, default 100).",
            default=100,
            minimum=1,
            maximum=500,
        ),
    },
    required=("pattern",),
)


def _parse_arguments(tool: str, schema: dict[str, Any], arguments: dict[str, Any] | None) -> dict[str, Any]:
    """Check arguments against our own small schemas and fill defaults.

    The runner may pass model output straight through, so this refuses unknown names and wrong types with
    a sentence the model can act on. Integers above a maximum are clamped (the limit is in the
    description), below a minimum refused.
    """
    arguments = arguments or {}
    if not isinstance(arguments, dict):
        raise ToolCallError(f"{tool} takes a JSON object of arguments.")
    props: dict[str, dict[str, Any]] = schema["properties"]
    unknown = sorted(set(arguments) - set(props))
    if unknown:
        raise ToolCallError(
            f"Unknown argument(s) {', '.join(map(repr, unknown))} for {tool}; it accepts: {', '.join(props)}."
        )
    for name in schema.get("required", []):
        if arguments.get(name) is None:
            raise ToolCallError(f"{tool} needs the '{name}' argument.")
    parsed: dict[str, Any] = {}
    for name, prop in props.items():
        value = arguments.get(name)
        if value is None:
            parsed[name] = prop.get("default")
            continue
        kind = prop["type"]
        if kind == "integer" and isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = {
            "string": isinstance(value, str),
            "boolean": isinstance(value, bool),
            "integer": isinstance(value, int) and not isinstance(value, bool),
        }[kind]
        if not ok:
            raise ToolCallError(f"Argument '{name}' of {tool} must be a {kind}, not {value!r}.")
        if kind == "integer":
            if value < prop.get("minimum", value):
                raise ToolCallError(f"Argument '{name}' of {tool} must be at least {prop['minimum']}.")
            value = min(value, prop.get("maximum", value))
        if kind == "string" and len(value) < prop.get("minLength", 0):
            raise ToolCallError(f"Argument '{name}' of {tool} must not be empty.")
        parsed[name] = value
    return parsed


def _show(path: PurePosixPath | str) -> str:
    """A path as the model sees it: POSIX form, undecodable bytes replaced so the text is valid UTF-8."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _check_cancelled() -> None:
    """Stop a long walk in the worker thread once the calling task is cancelled (stop must be prompt)."""
    anyio.from_thread.check_cancelled()


class Workspace:
    """The synchronous, contained filesystem operations behind the tools; each runs in a worker thread."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    def _inside(self, path: Path) -> bool:
        return path.is_relative_to(self.root)

    def resolve(self, raw: str) -> tuple[Path, PurePosixPath]:
        """The real path for a model-given relative path, and its display form relative to the root.

        Refuses absolute paths and anything resolving outside the root (``..``, symlinks) before looking
        at existence, so nothing is revealed about files outside the workspace.
        """
        raw = raw or "."
        if "\0" in raw:
            raise ToolCallError(f"Path {raw!r} contains a NUL character; give a plain relative path.")
        if Path(raw).is_absolute():
            raise ToolCallError(
                f"Path '{raw}' is absolute; give a path relative to the workspace root, "
                "such as 'src/main.py'."
            )
        try:
            real = (self.root / raw).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop (Python 3.11)
            msg = f"Path '{raw}' cannot be resolved (a symlink loop?); try another path."
            raise ToolCallError(msg) from exc
        if not self._inside(real):
            raise ToolCallError(
                f"Path '{raw}' is outside the workspace; only paths inside the workspace root can be used."
            )
        if not real.exists():
            raise ToolCallError(
                f"There is no file or directory '{raw}' in the workspace; use list_files to see what exists."
            )
        return real, PurePosixPath(real.relative_to(self.root).as_posix())

    def _children(self, directory: Path) -> list[tuple[str, Path, bool, bool]]:
        """Entries of a directory as (name, path, is_dir, descend), sorted by name, outside links dropped."""
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return []  # unreadable subdirectory: skip it rather than fail the whole walk
        children = []
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    target = path.resolve()
                    if self._inside(target):
                        children.append((entry.name, path, target.is_dir(), False))
                else:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    children.append((entry.name, path, is_dir, is_dir))
            except (OSError, RuntimeError):
                continue
        return children

    def _walk(
        self, directory: Path, rel: PurePosixPath, recursive: bool
    ) -> Iterator[tuple[PurePosixPath, Path, bool]]:
        """(relative path, path, is_dir) depth-first in name order; skips noise directories when recursing."""
        for name, path, is_dir, descend in self._children(directory):
            _check_cancelled()
            if recursive and is_dir and name in SKIPPED_DIRS:
                continue
            yield rel / name, path, is_dir
            if recursive and descend:
                yield from self._walk(path, rel / name, recursive)

    def list_files(self, args: dict[str, Any]) -> str:
        real, rel = self.resolve(args["path"])
        if not real.is_dir():
            raise ToolCallError(f"'{_show(rel)}' is a file, not a directory; use read_file to read it.")
        limit: int = args["max_entries"]
        lines: list[str] = []
        truncated = False
        for child_rel, _, is_dir in self._walk(real, rel, args["recursive"]):
            if len(lines) == limit:
                truncated = True
                break
            lines.append(_show(child_rel) + ("/" if is_dir else ""))
        if not lines:
            return f"Directory '{_show(rel)}' is empty."
        if truncated:
            lines.append(
                f"[List truncated at {limit} entries; list a subdirectory or raise max_entries "
                "(at most 1000).]"
            )
        return "\n".join(lines)

    def read_file(self, args: dict[str, Any]) -> str:
        real, rel = self.resolve(args["path"])
        shown = _show(rel)
        if real.is_dir():
            raise ToolCallError(f"'{shown}' is a directory; use list_files to see its contents.")
        if not stat.S_ISREG(real.stat().st_mode):
            raise ToolCallError(f"'{shown}' is not a regular file and cannot be read.")
        offset: int = args["offset"]
        with open(real, "rb") as f:
            if b"\0" in f.read(_SNIFF_BYTES):
                raise ToolCallError(
                    f"'{shown}' looks like a binary file (it contains NUL bytes); "
                    "read_file only reads text files."
                )
            f.seek(0)
            line_no, partial = 1, False
            while line_no < offset:  # skip in bounded pieces so one huge line cannot exhaust memory
                piece = f.readline(64 * 1024)
                if not piece:
                    break
                partial = not piece.endswith(b"\n")
                line_no += not partial
            out = bytearray()
            count, note = 0, ""
            while count < args["limit"]:
                line = f.readline(READ_CAP_BYTES - len(out) + 1)
                if not line:
                    break
                if len(out) + len(line) > READ_CAP_BYTES:
                    if count == 0:
                        out += line[:READ_CAP_BYTES]
                        note = (
                            f"[Line {offset} is longer than the 256 KiB read cap; only its start is shown.]"
                        )
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
        if b"\0" in out:
            raise ToolCallError(f"'{shown}' contains NUL bytes (binary data); read_file only reads text.")
        text = out.decode("utf-8", "replace")
        if not text and not note:
            if offset == 1:
                return f"File '{shown}' is empty."
            lines = line_no - 1 + partial
            raise ToolCallError(f"'{shown}' has only {lines} line(s); offset {offset} is past its end.")
        if note:
            text += ("" if text.endswith("\n") or not text else "\n") + note
        return text

    def search_files(self, args: dict[str, Any]) -> str:
        pattern: str = args["pattern"]
        if "\n" in pattern or "\r" in pattern:
            raise ToolCallError("The search pattern must be a single line; matches are found within lines.")
        real, rel = self.resolve(args["path"])
        fold: Callable[[str], str] = (lambda s: s) if args["case_sensitive"] else str.casefold
        needle = fold(pattern)
        files: Iterator[tuple[PurePosixPath, Path]] = (
            iter([(rel, real)])
            if not real.is_dir()
            else ((r, p) for r, p, is_dir in self._walk(real, rel, recursive=True) if not is_dir)
        )
        limit: int = args["max_results"]
        results: list[str] = []
        matched_files = too_big = 0
        truncated = False
        for file_rel, path in files:
            _check_cancelled()
            try:
                info = path.stat()
                if not stat.S_ISREG(info.st_mode):
                    continue
                if info.st_size > SEARCH_MAX_FILE_BYTES:
                    too_big += 1
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            if b"\0" in data:
                continue
            hit = False
            for number, line in enumerate(data.decode("utf-8", "replace").split("\n"), start=1):
                if needle not in fold(line):
                    continue
                if len(results) == limit:
                    truncated = True
                    break
                hit = True
                results.append(f"{_show(file_rel)}:{number}: {_excerpt(line.strip(), fold, needle)}")
            matched_files += hit
            if truncated:
                break
        where = _show(rel)
        skipped = f"\n[Skipped {too_big} file(s) over 1 MiB.]" if too_big else ""
        if not results:
            return f"No matches for '{pattern}' under '{where}'.{skipped}"
        if truncated:
            head = (
                f"First {limit} matches for '{pattern}' under '{where}' (truncated: there are more; "
                "narrow path or pattern, or raise max_results up to 500):"
            )
        else:
            head = f"{len(results)} match(es) in {matched_files} file(s) for '{pattern}' under '{where}':"
        return head + "\n" + "\n".join(results) + skipped


def _excerpt(line: str, fold: Callable[[str], str], needle: str) -> str:
    """A line cut to SEARCH_LINE_CHARS, keeping the match in view when the line is long."""
    if len(line) <= SEARCH_LINE_CHARS:
        return line
    folded = fold(line)  # casefold may change the length (ß -> ss); then we cannot locate the match
    at = folded.find(needle) if len(folded) == len(line) else 0
    start = max(0, min(at - 100, len(line) - SEARCH_LINE_CHARS))
    return ("…" if start else "") + line[start : start + SEARCH_LINE_CHARS] + "…"


@dataclass(eq=False)
class _WorkspaceTool:
    """A Tool whose work is a synchronous Workspace method, run off the event loop."""

    name: str
    description: str
    input_schema: dict[str, Any]
    run: Callable[[dict[str, Any]], str]
    group: str | None = None

    async def call(self, arguments: dict[str, Any]) -> str:
        args = _parse_arguments(self.name, self.input_schema, arguments)
        try:
            return await anyio.to_thread.run_sync(self.run, args)
        except OSError as exc:  # e.g. permission denied; str(exc) would show absolute paths
            raise ToolCallError(
                f"{self.name} could not read '{args.get('path', '.')}': {exc.strerror or 'I/O error'}."
            ) from exc


def workspace_tools(root: Path | str) -> list[Tool]:
    """The three read-only tools over ``root``, resolved once here (symlinked roots work)."""
    ws = Workspace(root)
    return [
        _WorkspaceTool(
            "list_files",
            "List files and directories in the workspace (directories end with '/'), optionally recursively; "
            "returns at most max_entries paths (up to 1000), relative to the workspace root.",
            LIST_SCHEMA,
            ws.list_files,
        ),
        _WorkspaceTool(
            "read_file",
            "Read a UTF-8 text file from the workspace, from line offset for up to limit lines; output is "
            "capped at 256 KiB and binary files are refused.",
            READ_SCHEMA,
            ws.read_file,
        ),
        _WorkspaceTool(
            "search_files",
            "Find lines containing a plain-text pattern in workspace files, returned as "
            "'path:LINE: text'; at most max_results (up to 500), skipping binary files, files over 1 MiB, "
            ".git, node_modules, .venv and __pycache__.",
            SEARCH_SCHEMA,
            ws.search_files,
        ),
    ]
