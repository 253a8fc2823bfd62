"""An orchestrating agent's view of agent-trace-mcp, as a short Python MCP client.

Starts the server over stdio (as Claude Desktop or an IDE would), creates a trace, waits on it with
progress, rewinds it to ask something else, and reflects on it. Runs on the offline model as it is:

    python examples/orchestrator.py            # or: python examples/orchestrator.py --model openai:gpt-4o
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import anyio
from mcp import Client, StdioServerParameters


async def call(client: Client, tool: str, **arguments):
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise SystemExit(f"{tool}: {result.content[0].text}")
    return result.structured_content


async def wait(client: Client, trace_id: str) -> dict:
    async def progress(value, total, message):
        print(f"  · {message}")

    while True:
        result = await client.call_tool(
            "get_trace", {"trace_id": trace_id, "wait_seconds": 30}, progress_callback=progress
        )
        view = result.structured_content
        if view["trace"]["status"] != "running":
            return view


async def main(model: str, workspace: str) -> None:
    data_dir = tempfile.mkdtemp(prefix="orchestrator-")
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "server.cli", "--model", model, "--data-dir", data_dir, "--workspace", workspace],
        env=dict(os.environ),
    )
    async with Client(server) as client:
        started = await call(client, "create_trace", prompt="Use list_files to see what is in this project.")
        trace_id = started["trace_id"]
        print(f"created {trace_id}")
        view = await wait(client, trace_id)
        print(f"{view['trace']['status']}: {view['answer'][:300]}\n")

        call_at = next(m["sequence"] for m in view["messages"] if m.get("tool_calls"))
        print(f"rewinding to message {call_at} and asking for README.md instead")
        await call(
            client, "run_trace", trace_id=trace_id, insert_after=call_at,
            messages=[{"role": "user", "content": "Actually, use read_file to read README.md."}],
        )  # fmt: skip
        view = await wait(client, trace_id)
        print(f"{view['trace']['status']}: {view['answer'][:300]}\n")

        reflection = await call(client, "reflect_trace", trace_id=trace_id)
        print("reflection:\n" + reflection["reflection"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--workspace", default=os.getcwd())
    args = parser.parse_args()
    anyio.run(main, args.model, args.workspace)
