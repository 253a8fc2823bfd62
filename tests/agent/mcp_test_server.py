"""A small MCP server the agent's MCP-tool tests talk to over a real transport.

Run as ``python tests/agent/mcp_test_server.py`` (stdio) or
``python tests/agent/mcp_test_server.py --http PORT`` (streamable HTTP at http://127.0.0.1:PORT/mcp).
Its tools cover what the client side must handle: a plain result, a slow call to cancel, a tool error,
binary content, a tool list that changes, and a server that dies mid-call — and the misbehaviours of
broken servers: JSON-RPC error responses, undecodable bytes and garbage on the wire, a closed stdout,
a stderr flood, a call that blocks the whole process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import anyio
from mcp import MCPError
from mcp.server import stdio as stdio_transport
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

mcp = MCPServer("calc", version="0.1")

# A 1x1 transparent PNG: enough bytes for the client to describe without showing them.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


_calls = 0


def _request_id(ctx: Context) -> int | str:
    """The id of the request being served, as the client sent it (the SDK hands it over as a string)."""
    return int(ctx.request_id) if ctx.request_id.isdigit() else ctx.request_id


def _wire_fd() -> int:
    """The descriptor the SDK writes JSON-RPC to (it moves the wire off fd 1 while serving)."""
    claim = stdio_transport._claims.get(1)
    return claim.private_fd if claim is not None and claim.private_fd is not None else 1


@mcp.tool(annotations=ToolAnnotations(read_only_hint=True))
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@mcp.tool()
async def slow(seconds: float, marker: str = "") -> str:
    """Sleep for the given number of seconds, then say so; creates ``marker`` once the call has started."""
    if marker:
        Path(marker).write_text(str(os.getpid()))
    await anyio.sleep(seconds)
    return f"slept {seconds} s"


@mcp.tool()
def fail() -> str:
    """Always fails with a message the model should read."""
    raise ToolError("the calculator is out of paper")


@mcp.tool()
def picture() -> Image:
    """Return a tiny PNG image."""
    return Image(data=PNG_1X1, format="png")


@mcp.tool()
def env(name: str) -> str:
    """Return an environment variable of the server process (to check what the client passed)."""
    return os.environ.get(name, "<unset>")


@mcp.tool()
def pid() -> int:
    """Return the server's process id (so a test can check the process is gone afterwards)."""
    return os.getpid()


@mcp.tool()
async def grow(ctx: Context) -> str:
    """Add a tool named ``extra`` and announce that the tool list changed (both protocol eras)."""
    if "extra" not in {t.name for t in await mcp.list_tools()}:

        def extra() -> str:
            """A tool that appears at runtime."""
            return "extra!"

        mcp.add_tool(extra)
    await ctx.notify_tools_changed()  # 2026-07-28 listeners
    with warnings.catch_warnings(), contextlib.suppress(Exception):  # not sent on modern connections
        warnings.simplefilter("ignore")
        await ctx.session.send_tool_list_changed()  # handshake-era clients
    return "grown"


@mcp.tool()
def crash() -> str:
    """Exit the server process at once, as a crashing server would."""
    os._exit(3)


@mcp.tool()
def count() -> int:
    """Count the calls of this tool since the process started (its state: lost when it is restarted)."""
    global _calls
    _calls += 1
    return _calls


@mcp.tool()
def server_error(message: str) -> str:
    """Answer with a JSON-RPC error -32000 ("Server error", implementation-defined) instead of a result."""
    raise MCPError(code=-32000, message=message)


@mcp.tool()
def garbage_line() -> str:
    """Write a line that is neither UTF-8 nor JSON on the wire, then answer normally."""
    os.write(_wire_fd(), b"\xff\xfe\xfd not json \xc3\x28\n")
    return "after garbage"


@mcp.tool(structured_output=False)  # the hand-written reply has no structured part
def latin1_reply(ctx: Context) -> str:
    """Answer with a hand-written reply whose text is Latin-1, not UTF-8 (the SDK's own reply comes late)."""
    result = {"content": [{"type": "text", "text": "caf@"}], "isError": False, "resultType": "complete"}
    text = json.dumps(result).encode().replace(b"@", b"\xe9")
    head = json.dumps({"jsonrpc": "2.0", "id": _request_id(ctx)}).encode()[:-1]
    os.write(_wire_fd(), head + b', "result": ' + text + b"}\n")
    return "late SDK reply"


@mcp.tool()
def broken_reply(ctx: Context) -> str:
    """Answer with a hand-written reply that is not JSON at all (the SDK's own reply never comes)."""
    os.write(
        _wire_fd(), f'{{"jsonrpc": "2.0", "id": {json.dumps(_request_id(ctx))}, "result": {{oops\n'.encode()
    )
    time.sleep(3600)
    return "never"


@mcp.tool()
def close_stdout() -> str:
    """Close the wire to the client while the process lives on (reading stdin), as a broken server would."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, _wire_fd())
    return "unreachable"


@mcp.tool()
def stderr_flood(megabytes: int, last_line: str) -> int:
    """Write that many MiB of noise to stderr as fast as the pipe takes it, then one last line."""
    chunk = b"noise " * 10922 + b"\n"  # one line of ~64 KiB
    written = 0
    while written < megabytes << 20:
        written += os.write(2, chunk)
    os.write(2, last_line.encode() + b"\n")
    return written


@mcp.tool()
async def block(seconds: float, marker: str = "") -> str:
    """Block the whole process (its event loop, not just this call), creating ``marker`` first."""
    if marker:
        Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "unblocked"


@mcp.tool()
async def ignore_sigterm() -> str:
    """Ignore SIGTERM from now on, as a server that will not shut down politely does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return "ignoring SIGTERM"


@mcp.tool()
def cwd() -> str:
    """Return the server's working directory."""
    return os.getcwd()


@mcp.tool(structured_output=False)  # the hand-written reply has no structured part
async def long_reply(ctx: Context, megabytes: int) -> str:
    """Answer with a hand-written reply of that many MiB (the SDK's own reply comes late).

    Async on purpose: it holds the event loop while it writes, so no other reply lands inside the line.
    """
    fd = _wire_fd()
    head = json.dumps({"jsonrpc": "2.0", "id": _request_id(ctx)}).encode()[:-1]
    os.write(fd, head + b', "result": {"content": [{"type": "text", "text": "')
    chunk = b"x" * (1 << 20)
    for _ in range(megabytes):
        os.write(fd, chunk)
    os.write(fd, b'"}], "resultType": "complete"}}\n')
    return "late SDK reply"


_listings = 0
_list_error = False


@mcp.tool()
def break_listing() -> str:
    """Answer every later tools/list with a JSON-RPC error -32000."""
    global _list_error
    _list_error = True
    return "tools/list is broken now"


@mcp.tool()
def listings() -> int:
    """How many times tools/list was asked for since the process started."""
    return _listings


_list_tools = mcp.list_tools


async def _counting_list_tools() -> list[Any]:
    global _listings
    _listings += 1
    if _list_error:
        raise MCPError(code=-32000, message="tool index unavailable")
    return await _list_tools()


mcp.list_tools = _counting_list_tools  # type: ignore[method-assign]


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--http":
        mcp.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]), streamable_http_path="/mcp")
    else:
        mcp.run()
