"""The MCP config file (Claude Desktop's format): which downstream servers to connect, and how.

Errors are ValueErrors whose text names the file and the server, because the person reading them is
editing that file. Relative paths inside resolve against the file's folder, not wherever we happen to
be started (a host may start us in ``/``): a relative ``cwd``, the default ``cwd`` of a stdio server,
and a ``command`` written as a path (``./srv.py``, ``bin/tool``). A bare command name is still looked
up on PATH, and arguments are left alone: they are the server's to read, from its ``cwd``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.tools.names import sanitize_name

logger = logging.getLogger(__name__)


class StdioServerSpec(BaseModel):
    """A server we start as a subprocess and talk to over its stdin/stdout."""

    model_config = ConfigDict(extra="ignore")
    command: str
    args: list[str] = []
    env: dict[str, str] = {}
    cwd: str | None = None
    timeout: float | None = Field(default=None, gt=0)  # seconds per tool call; None: the McpServers default


class HttpServerSpec(BaseModel):
    """A server reached over streamable HTTP."""

    model_config = ConfigDict(extra="ignore")
    url: str
    headers: dict[str, str] = {}
    timeout: float | None = Field(default=None, gt=0)


ServerSpec = StdioServerSpec | HttpServerSpec


def load_mcp_config(path: str | Path) -> dict[str, ServerSpec]:
    """Read a Claude-Desktop-style ``{"mcpServers": {...}}`` file; raise ValueError with a sentence on errors.

    Server names become the prefix of tool names and the group a whitelist names, so characters
    providers refuse in tool names are replaced with ``_`` (with a warning), and names that collide
    after that are refused.
    """
    path = Path(path)
    folder = Path(os.path.abspath(path)).parent  # the folder as named, symlinks not followed
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"MCP config file {path} does not exist.") from None
    except OSError as exc:
        raise ValueError(f"MCP config file {path} cannot be read: {exc.strerror or exc}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"MCP config file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ValueError(
            f'MCP config file {path} must be a JSON object with an "mcpServers" object mapping server names '
            'to {"command", "args", "env", "cwd"} or {"url", "headers"}.'
        )
    specs: dict[str, ServerSpec] = {}
    for raw_name, entry in servers.items():
        if isinstance(entry, dict) and entry.get("disabled") is True:  # as other MCP hosts honour it
            logger.info("MCP server %r in %s is disabled; skipping it.", raw_name, path)
            continue
        name = _server_name(path, raw_name, specs)
        specs[name] = _anchored(_server_spec(path, raw_name, entry), folder)
    return specs


def _anchored(spec: ServerSpec, folder: Path) -> ServerSpec:
    """The spec with its relative paths made absolute against the config file's folder."""
    if not isinstance(spec, StdioServerSpec):
        return spec
    cwd = str(folder / spec.cwd) if spec.cwd else str(folder)  # an absolute cwd stays as it is
    command = spec.command
    if not os.path.isabs(command) and (os.sep in command or (os.altsep is not None and os.altsep in command)):
        command = os.path.normpath(folder / command)  # a path, not a name to look up on PATH
    return spec.model_copy(update={"cwd": os.path.normpath(cwd), "command": command})


def _server_name(path: Path, raw: str, taken: Mapping[str, object]) -> str:
    name = sanitize_name(raw.strip())
    if not name:
        raise ValueError(f"MCP config file {path} has a server with an empty name; give every server a name.")
    if name != raw:
        logger.warning(
            "MCP server %r in %s is called %r in tool names (only A-Z a-z 0-9 _ - allowed).", raw, path, name
        )
    if name in taken:
        raise ValueError(
            f"MCP config file {path} has two servers named {name!r} (after replacing characters tool names "
            "cannot hold); rename one."
        )
    return name


def _server_spec(path: Path, name: str, entry: Any) -> ServerSpec:
    where = f"Server {name!r} in MCP config file {path}"
    if not isinstance(entry, dict):
        raise ValueError(f'{where} must be a JSON object with a "command" or a "url".')
    if "command" in entry and "url" in entry:
        raise ValueError(f'{where} has both "command" and "url"; give "command" for a stdio server or "url".')
    if "command" not in entry and "url" not in entry:
        raise ValueError(
            f'{where} has neither "command" (a server started as a subprocess) nor "url" (a streamable HTTP '
            "server)."
        )
    kind = entry.get("type")
    if kind == "sse":
        raise ValueError(
            f"{where} uses the old SSE transport, which is not supported; use its streamable HTTP URL."
        )
    try:
        spec: ServerSpec = (
            StdioServerSpec.model_validate(entry)
            if "command" in entry
            else HttpServerSpec.model_validate(entry)
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field_path = ".".join(str(p) for p in first["loc"]) or "entry"
        raise ValueError(f"{where} is invalid: {field_path}: {first['msg']}.") from None
    if isinstance(spec, HttpServerSpec) and not spec.url.startswith(("http://", "https://")):
        raise ValueError(f"{where} has url {spec.url!r}; it must start with http:// or https://.")
    if isinstance(spec, StdioServerSpec) and not spec.command.strip():
        raise ValueError(f'{where} has an empty "command".')
    return spec
