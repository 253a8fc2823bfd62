"""Helpers for driving the server as a client does."""

from __future__ import annotations

import json
from typing import Any

import anyio
from mcp import Client


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must succeed; return its structured result (the model reads the same, as text)."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content[0].text if result.content else result
    assert result.structured_content is not None
    text = result.content[0].text
    assert "\n" not in text.strip() and json.loads(text) == result.structured_content
    return result.structured_content


async def call_error(client: Client, tool: str, **arguments: Any) -> str:
    """Call a tool that must fail as a tool error; return its text."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return result.content[0].text


async def wait_done(client: Client, trace_id: str) -> dict[str, Any]:
    """The summary once the trace is no longer running."""
    with anyio.fail_after(30):
        while True:
            view = await call(client, "get_trace", trace_id=trace_id, wait_seconds=10)
            if view["trace"]["outcome"] != "running":
                return view


async def full(client: Client, trace_id: str) -> dict[str, Any]:
    """The trace and every active-path message, uncut."""
    return await call(client, "get_trace", trace_id=trace_id, view="full")
