"""Read-only workspace tools (list_files, read_file, search_files) confined to one root directory.

Every path a model gives is untrusted, and the tree may change while a tool reads it. Paths are
relative to the root and are opened through ``safe_fs`` one component at a time from the root's fd,
never by a path checked beforehand, so a symlink swapped in mid-call cannot lead outside (its docstring
also says what no path check can see: hard links). Symlinks whose target lies inside the root work;
those leading outside are refused, and skipped while walking; symlinked directories are never
descended. Only regular files are read: a FIFO or device is refused, never waited on. Everything is
pure Python (no command line is built). The work runs in worker threads on the tools' own small
limiter, is abandoned when its call is cancelled and then stops at its next check, so slow file work
can neither hold up a stopped trace nor take the threads the rest of the server needs.
"""

from __future__ import annotations

import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.to_thread

from agent.errors import ToolCallError
from agent.tools.file_reading import READ_CAP_BYTES, read_lines, read_small
from agent.tools.registry import Tool
from agent.tools.safe_fs import (
    MAX_DEPTH,
    MAX_PATH_CHARS,
    Found,
    Missing,
    OutsideRoot,
    PathRefused,
    Session,
    SymlinkLoop,
    TooDeep,
    WorkspaceRoot,
)

__all__ = ["FILE_TOOL_THREADS", "MAX_DEPTH", "READ_CAP_BYTES", "Workspace", "workspace_tools"]

SKIPPED_DIRS = frozenset({".git", "__pycache__", "node_modules", ".venv"})
SEARCH_MAX_FILE_BYTES = 1024 * 1024
SEARCH_LINE_CHARS = 300
FILE_TOOL_THREADS = 4
"""Worker threads the file tools use at once, on a limiter of their own (never the server's default one)."""
_SEARCH_CHECK_EVERY_LINES = 4096
_SHOWN_PATH_CHARS = 200


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
        value: Any = arguments.get(name)
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


def _show(path: str) -> str:
    """A path as the model sees it: undecodable bytes replaced so the text is valid UTF-8."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _elide(text: str) -> str:
    """A model-given value fit to quote back in a sentence: valid UTF-8, long ones cut in the middle."""
    if len(text) > _SHOWN_PATH_CHARS:
        text = text[: _SHOWN_PATH_CHARS * 2 // 3] + "…" + text[-_SHOWN_PATH_CHARS // 4 :]
    return _show(text)


def _rel(parts: tuple[str, ...]) -> str:
    """Names below the root as the model sees them, '.' for the root itself."""
    return _show("/".join(parts) or ".")


def _deep_note(skipped: int) -> str:
    directories = "directory" if skipped == 1 else "directories"
    return f"[Skipped {skipped} {directories} nested deeper than {MAX_DEPTH} levels.]"


Check = Callable[[], None]
"""Raises in a worker thread once its call has been abandoned, so the work stops instead of running on."""


class Workspace:
    """The synchronous, contained filesystem operations behind the tools; each runs in a worker thread."""

    def __init__(self, root: Path | str):
        self.root = WorkspaceRoot(root)

    def _open(self, fs: Session, raw: str) -> Found:
        """What a model-given path leads to inside the root, or a sentence saying why it cannot be used.

        Only ever relative to the root; an outside path is refused without looking at what is there,
        so nothing is revealed about files outside the workspace.
        """
        raw = raw or "."
        shown = _elide(raw)
        if "\0" in raw:
            raise ToolCallError(f"Path {shown!r} contains a NUL character; give a plain relative path.")
        if len(raw) > MAX_PATH_CHARS:
            raise ToolCallError(
                f"Path '{shown}' is too long ({len(raw)} characters); paths have at most {MAX_PATH_CHARS}."
            )
        if Path(raw).is_absolute():
            raise ToolCallError(
                f"Path '{shown}' is absolute; give a path relative to the workspace root, "
                "such as 'src/main.py'."
            )
        try:
            return fs.resolve([raw])
        except OutsideRoot:
            raise ToolCallError(
                f"Path '{shown}' is outside the workspace; only paths inside the workspace root can be used."
            ) from None
        except Missing:
            raise ToolCallError(
                f"There is no file or directory '{shown}' in the workspace; use list_files to see what exists."
            ) from None
        except SymlinkLoop:
            raise ToolCallError(
                f"Path '{shown}' cannot be resolved (a symlink loop?); try another path."
            ) from None
        except TooDeep:
            raise ToolCallError(
                f"Path '{shown}' is nested deeper than {MAX_DEPTH} directories; the file tools go no deeper."
            ) from None

    def list_files(self, args: dict[str, Any], check: Check) -> str:
        with self.root.session(check) as fs:
            found = self._open(fs, args["path"])
            shown = _rel(found.parts)
            if stat.S_ISREG(found.st.st_mode):
                raise ToolCallError(f"'{shown}' is a file, not a directory; use read_file to read it.")
            if not found.is_dir:
                raise ToolCallError(f"'{shown}' is not a directory; list_files lists directories.")
            limit: int = args["max_entries"]
            lines: list[str] = []
            notes: list[str] = []
            for entry in fs.walk(found.parts, recursive=args["recursive"], skip=SKIPPED_DIRS):
                if len(lines) == limit:
                    notes.append(
                        f"[List truncated at {limit} entries; list a subdirectory or raise max_entries "
                        "(at most 1000).]"
                    )
                    break
                lines.append(_rel(entry.parts) + ("/" if entry.is_dir else ""))
            if fs.skipped_deep:
                notes.append(_deep_note(fs.skipped_deep))
        if not lines and not notes:
            return f"Directory '{shown}' is empty."
        return "\n".join(lines + notes)

    def read_file(self, args: dict[str, Any], check: Check) -> str:
        with self.root.session(check) as fs:
            found = self._open(fs, args["path"])
            shown = _rel(found.parts)
            if found.is_dir:
                raise ToolCallError(f"'{shown}' is a directory; use list_files to see its contents.")
            if not found.is_file or found.fd is None:
                raise ToolCallError(f"'{shown}' is not a regular file and cannot be read.")
            return read_lines(found.fd, found.st.st_size, shown, args["offset"], args["limit"], check)

    def search_files(self, args: dict[str, Any], check: Check) -> str:
        pattern: str = args["pattern"]
        if "\n" in pattern or "\r" in pattern:
            raise ToolCallError("The search pattern must be a single line; matches are found within lines.")
        fold: Callable[[str], str] = (lambda s: s) if args["case_sensitive"] else str.casefold
        needle = fold(pattern)
        limit: int = args["max_results"]
        results: list[str] = []
        matched_files = too_big = 0
        truncated = False
        with self.root.session(check) as fs:
            found = self._open(fs, args["path"])
            where = _rel(found.parts)
            if not found.is_dir and not found.is_file:
                raise ToolCallError(f"'{where}' is not a regular file and cannot be searched.")
            for parts, data in self._contents(fs, found):
                if data is None:
                    too_big += 1
                    continue
                hits = 0
                for number, line in _matching_lines(data, fold, needle, check):
                    if len(results) == limit:
                        truncated = True
                        break
                    hits = 1
                    results.append(f"{_rel(parts)}:{number}: {_excerpt(line.strip(), fold, needle)}")
                matched_files += hits
                if truncated:
                    break
            notes = [f"[Skipped {too_big} file(s) over 1 MiB.]"] if too_big else []
            if fs.skipped_deep:
                notes.append(_deep_note(fs.skipped_deep))
        shown = _elide(pattern)
        if not results:
            return "\n".join([f"No matches for '{shown}' under '{where}'.", *notes])
        if truncated:
            head = (
                f"First {limit} matches for '{shown}' under '{where}' (truncated: there are more; "
                "narrow path or pattern, or raise max_results up to 500):"
            )
        else:
            head = f"{len(results)} match(es) in {matched_files} file(s) for '{shown}' under '{where}':"
        return "\n".join([head, *results, *notes])

    def _contents(self, fs: Session, found: Found) -> Iterator[tuple[tuple[str, ...], bytes | None]]:
        """(names, content) of each regular file to search, found or those below it; None: over 1 MiB."""
        for file in [found] if found.is_file else self._files_below(fs, found.parts):
            fs.check()
            assert file.fd is not None  # only regular files, opened, come here
            try:
                data = read_small(file.fd, file.st.st_size, SEARCH_MAX_FILE_BYTES)
            except OSError:
                continue
            finally:
                fs.close(file)
            yield file.parts, data

    @staticmethod
    def _files_below(fs: Session, top: tuple[str, ...]) -> Iterator[Found]:
        """The regular files of the tree below top, each opened through its directory's fd.

        A file found through a symlink keeps the link's place as its name (``alias.py``), as listed.
        """
        for entry in fs.walk(top, recursive=True, skip=SKIPPED_DIRS):
            if entry.is_dir:
                continue
            try:
                opened = fs.open_entry(entry)
            except (PathRefused, OSError):
                continue
            if not opened.is_file:
                fs.close(opened)
                continue
            yield Found(entry.parts, opened.st, opened.fd)


def _matching_lines(
    data: bytes, fold: Callable[[str], str], needle: str, check: Check
) -> Iterator[tuple[int, str]]:
    """(line number, line) of each line of a text file that contains needle; nothing for binary data."""
    if b"\0" in data:
        return
    text = data.decode("utf-8", "replace")
    if needle not in fold(text):  # folding goes character by character, so no single line matches either
        return
    for number, line in enumerate(text.split("\n"), start=1):
        if number % _SEARCH_CHECK_EVERY_LINES == 0:
            check()
        if needle in fold(line):
            yield number, line


def _excerpt(line: str, fold: Callable[[str], str], needle: str) -> str:
    """A line cut to SEARCH_LINE_CHARS, keeping the match in view when the line is long."""
    if len(line) <= SEARCH_LINE_CHARS:
        return line
    folded = fold(line)  # casefold may change the length (ß -> ss); then we cannot locate the match
    at = folded.find(needle) if len(folded) == len(line) else 0
    start = max(0, min(at - 100, len(line) - SEARCH_LINE_CHARS))
    return ("…" if start else "") + line[start : start + SEARCH_LINE_CHARS] + "…"


class _Abandoned(Exception):
    """Raised inside a worker whose call was cancelled: nobody waits for its answer any more."""


@dataclass(eq=False)
class _WorkspaceTool:
    """A Tool whose work is a synchronous Workspace method, run off the event loop on the tools' limiter."""

    name: str
    description: str
    input_schema: dict[str, Any]
    run: Callable[[dict[str, Any], Check], str]
    limiter: anyio.CapacityLimiter
    group: str | None = None
    read_only: ClassVar[bool] = True

    async def call(self, arguments: dict[str, Any]) -> str:
        args = _parse_arguments(self.name, self.input_schema, arguments)
        abandoned = threading.Event()

        def check() -> None:
            if abandoned.is_set():
                raise _Abandoned

        try:
            # Abandoned on cancel, so a stop or timeout returns at once; `check` then stops the worker.
            return await anyio.to_thread.run_sync(
                self.run, args, check, abandon_on_cancel=True, limiter=self.limiter
            )
        except OSError as exc:  # e.g. permission denied; str(exc) would show absolute paths
            path = _elide(args.get("path") or ".")
            raise ToolCallError(
                f"{self.name} could not read '{path}': {exc.strerror or 'I/O error'}."
            ) from exc
        finally:
            abandoned.set()


def workspace_tools(root: Path | str) -> list[Tool]:
    """The three read-only tools over ``root``, resolved once here (symlinked roots work).

    They share one small thread limiter of their own, so however many are stuck on slow storage, the
    server's other ``to_thread`` work (database, experiences file) keeps the default limiter's threads.
    """
    ws = Workspace(root)
    limiter = anyio.CapacityLimiter(FILE_TOOL_THREADS)
    return [
        _WorkspaceTool(
            name="list_files",
            description="List files and directories in the workspace (directories end with '/'), optionally "
            "recursively; returns at most max_entries paths (up to 1000), relative to the workspace root.",
            input_schema=LIST_SCHEMA,
            run=ws.list_files,
            limiter=limiter,
        ),
        _WorkspaceTool(
            name="read_file",
            description="Read a UTF-8 text file from the workspace, from line offset for up to limit lines; "
            "output is capped at 256 KiB and binary files are refused.",
            input_schema=READ_SCHEMA,
            run=ws.read_file,
            limiter=limiter,
        ),
        _WorkspaceTool(
            name="search_files",
            description="Find lines containing a plain-text pattern in workspace files, returned as "
            "'path:LINE: text'; at most max_results (up to 500), skipping binary files, files over 1 MiB, "
            ".git, node_modules, .venv and __pycache__.",
            input_schema=SEARCH_SCHEMA,
            run=ws.search_files,
            limiter=limiter,
        ),
    ]
