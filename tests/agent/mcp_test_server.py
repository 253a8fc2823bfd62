"""A small MCP server the agent's MCP-tool tests talk to over a real transport.

Run as ``python tests/agent/mcp_test_server.py`` (stdio) or
``python tests/agent/mcp_test_server.py --http PORT`` (streamable HTTP at http://127.0.0.1:PORT/mcp).
Its tools cover what the client side must handle: a plain result, a slow call to cancel, a tool error,
binary content, a tool list that changes, and a server that dies mid-call.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import anyio
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

mcp = MCPServer("calc", version="0.1")

# A 1x1 transparent PNG: enough bytes for the client to describe without showing them.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


@mcp.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@mcp.tool()
async def slow(seconds: float) -> str:
    """Sleep for the given number of seconds, then say so."""
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


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--http":
        mcp.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]), streamable_http_path="/mcp")
    else:
        mcp.run()
