"""A tiny MCP server to give agent-trace-mcp's agents as a tool source (see mcp_servers.json).

Run by agent-trace-mcp itself over stdio; its tools reach the agent as ``calc__add`` and ``calc__multiply``.
"""

from mcp.server.mcpserver import MCPServer

mcp = MCPServer("calc")


@mcp.tool()
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@mcp.tool()
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


if __name__ == "__main__":
    mcp.run()
