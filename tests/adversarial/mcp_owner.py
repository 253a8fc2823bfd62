"""A process that owns downstream MCP servers and blocks one of them in a call, for the kill -9 test.

Run as ``python tests/adversarial/mcp_owner.py MARKER``: connects the test server, prints its pid, then
calls its ``block`` tool, which writes MARKER once the downstream is stuck. The test then kills us with
SIGKILL and watches the downstream's pid.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from agent.tools.mcp import McpServers, StdioServerSpec
from agent.tools.registry import ToolRegistry

SERVER_SCRIPT = str(Path(__file__).parent.parent / "agent" / "mcp_test_server.py")


async def main(marker: str) -> None:
    registry = ToolRegistry()
    spec = StdioServerSpec(command=sys.executable, args=[SERVER_SCRIPT])
    async with McpServers({"calc": spec}, registry, startup_timeout=30) as servers:
        assert servers.status() == {"calc": "connected"}, servers.status()
        pid, block = registry.get("calc__pid"), registry.get("calc__block")
        assert pid is not None and block is not None
        print(await pid.call({}), flush=True)
        await block.call({"seconds": 3600, "marker": marker})


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
