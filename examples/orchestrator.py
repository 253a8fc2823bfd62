"""An orchestrating agent's view of agent-trace-mcp, as a short Python MCP client on the offline model.

It starts the server over stdio, as a host would, and steers background agents end to end:

1. delegate a task that needs a decision: the agent asks (ask_host), we answer, it goes on;
2. approve a risky tool call: read_file waits for our approval (confirm_tools);
3. cap cost and time: a token budget and a wall-clock limit end runs as hit_limit;
4. get typed JSON back: output_schema makes the answer JSON, returned as result;
5. explore two alternatives at once: fork a trace twice and wait on both with await_traces.

    python examples/orchestrator.py            # or: --model openai:gpt-4o (needs OPENAI_API_KEY)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

import anyio
from mcp import Client, StdioServerParameters


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error or result.structured_content is None:
        raise SystemExit(f"{tool}: {result.content[0].text if result.content else result}")
    return result.structured_content


async def settle(client: Client, trace_id: str) -> dict[str, Any]:
    """Poll with bounded waits (a host's request times out at about 60 s) until the trace stops running."""
    while True:
        summary = await call(client, "get_trace", trace_id=trace_id, wait_seconds=30)
        if summary["trace"]["outcome"] != "running":
            return summary


def short(text: str | None, width: int = 160) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


async def main(model: str, workspace: str) -> None:
    data_dir = tempfile.mkdtemp(prefix="orchestrator-")
    server = StdioServerParameters(
        command=sys.executable,
        args=[
            "-m",
            "server.cli",
            "--in-process",
            "--model",
            model,
            "--data-dir",
            data_dir,
            "--workspace",
            workspace,
        ],
        env=dict(os.environ),
    )
    async with Client(server) as client:
        print("1. A task that needs a decision")
        tid = (
            await call(client, "create_trace", prompt="Use ask_host to ask which file I want summarised.")
        )["trace_id"]
        paused = await settle(client, tid)
        print(f"   {paused['trace']['outcome']}: the agent asks {paused['question']!r}")
        await call(client, "run_trace", trace_id=tid, answer="README.md, please")
        print(f"   answered → {short((await settle(client, tid))['answer'])}")

        print("2. A risky tool call, approved")
        tid = (
            await call(
                client, "create_trace", prompt="Use read_file to read README.md.", confirm_tools=["read_file"]
            )
        )["trace_id"]
        paused = await settle(client, tid)
        print(f"   {paused['trace']['outcome']}: {short(paused['question'])}")
        await call(client, "run_trace", trace_id=tid, approve=True)
        print(f"   approved → {short((await settle(client, tid))['answer'])}")

        print("3. Cost and time capped")
        tid = (await call(client, "create_trace", prompt="Use list_files to look around.", max_tokens=50))[
            "trace_id"
        ]
        capped = await settle(client, tid)
        print(f"   max_tokens=50 → {capped['trace']['outcome']} ({capped['trace']['stop_reason']})")
        slow = "offline:slow" if model.startswith("offline") else model
        tid = (await call(client, "create_trace", prompt="Say hello.", model=slow, timeout_seconds=0.5))[
            "trace_id"
        ]
        timed = await settle(client, tid)
        print(f"   timeout_seconds=0.5 → {timed['trace']['outcome']} ({timed['trace']['stop_reason']})")

        print("4. Typed JSON back")
        schema = {"type": "object", "properties": {"entries": {"type": "integer"}}, "required": ["entries"]}
        tid = (
            await call(
                client, "create_trace", prompt="Use list_files to count what is here.", output_schema=schema
            )
        )["trace_id"]
        typed = await settle(client, tid)
        print(f"   result = {json.dumps(typed['result'])}")

        print("5. Two alternatives at once")
        base = (await call(client, "create_trace", prompt="Use list_files to see the project."))["trace_id"]
        await settle(client, base)
        forks = [
            (await call(client, "create_trace", from_trace=base, prompt=prompt, tags=["alternatives"]))[
                "trace_id"
            ]
            for prompt in (
                'Now use search_files to search for "def".',
                "Now use read_file to read README.md.",
            )
        ]
        both = await call(client, "await_traces", tag="alternatives", mode="all", wait_seconds=30)
        for row in both["done"]:
            print(f"   fork {row['trace_id'][:8]}… of {base[:8]}…: {short(row['answer'], 100)}")
        assert {row["trace_id"] for row in both["done"]} == set(forks)
    print(f"The traces are in {data_dir} (delete it when done).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--workspace", default=os.getcwd())
    args = parser.parse_args()
    anyio.run(main, args.model, args.workspace)
