"""What a host's model reads: bytes and tokens (characters / 4) of the answers, through a real MCP client.

Run from the repository root:  python bench/bench_host_view.py
Prints one JSON object: the default get_trace answer for a 20-step and a 200-step trace that read 7 KB
source files, view=messages and view=full beside it, a fan-out of 5 traces (calls and bytes), and the size
of tools/list and initialize. The model is a local stand-in (no network); the server is the real one.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.llm.base import ModelResponse, TextSink, ToolChoice
from agent.trace.models import FunctionCall, MessageUsage, ToolCall
from server.app import build_server
from server.settings import Settings

SOURCE = "def handler(event, context):\n    return {'status': 200, 'body': event.get('body')}\n" * 80


class Reader:
    """Reads src/mod{i}.py per step until the prompt's step count, then answers in a paragraph."""

    name = "reader"

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        temperature: float,
        on_text: TextSink | None = None,
        tool_choice: ToolChoice = "auto",
        response_schema: dict[str, Any] | None = None,
    ) -> ModelResponse:
        task = next(m["content"] for m in messages if m["role"] == "user")
        steps = int(task.split()[1])
        done = sum(1 for m in messages if m.get("role") == "tool")
        usage = MessageUsage(prompt_tokens=len(json.dumps(messages)) // 4, completion_tokens=40)
        if done >= steps or tool_choice == "none":
            return ModelResponse(
                content=f"Read {done} modules: every handler returns status 200. " * 3, usage=usage
            )
        call = ToolCall(
            id=f"r{done}",
            function=FunctionCall(name="read_file", arguments=json.dumps({"path": f"src/mod{done}.py"})),
        )
        return ModelResponse(tool_calls=[call], usage=usage)


def size(result: Any) -> dict[str, int]:
    text = "".join(block.text for block in result.content if hasattr(block, "text"))
    return {"bytes": len(text.encode()), "tokens": len(text) // 4}


async def main() -> dict[str, Any]:
    reader = Reader()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "ws" / "src").mkdir(parents=True)
        for i in range(200):
            (root / "ws" / "src" / f"mod{i}.py").write_text(SOURCE, encoding="utf-8")
        settings = Settings.for_data_dir(root / "data", model="reader", workspace=root / "ws")
        async with Client(build_server(settings, models=lambda spec: reader), mode="legacy") as client:
            listed = await client.list_tools()
            out["tools_list_bytes"] = len(listed.model_dump_json(by_alias=True, exclude_none=True))
            out["tools"] = len(listed.tools)
            for steps in (20, 200):
                created = await client.call_tool(
                    "create_trace", {"prompt": f"Read {steps} modules in src/.", "max_iterations": 300}
                )
                tid = created.structured_content["trace_id"]
                while (
                    await client.call_tool("get_trace", {"trace_id": tid, "wait_seconds": 30})
                ).structured_content["trace"]["outcome"] == "running":
                    pass
                default = await client.call_tool("get_trace", {"trace_id": tid})
                messages = await client.call_tool("get_trace", {"trace_id": tid, "view": "messages"})
                full = await client.call_tool("get_trace", {"trace_id": tid, "view": "full"})
                out[f"get_trace_{steps}_steps"] = {
                    "default_summary": size(default),
                    "view_messages_first_page": size(messages),
                    "view_full_first_page": size(full),
                }
            calls = 0
            ids = []
            for i in range(5):
                result = await client.call_tool(
                    "create_trace", {"prompt": f"Read {3 + i} modules in src/.", "tags": ["fan"]}
                )
                ids.append(result.structured_content["trace_id"])
                calls += 1
            fan_bytes = 0
            while True:
                result = await client.call_tool(
                    "await_traces", {"tag": "fan", "mode": "all", "wait_seconds": 30}
                )
                calls += 1
                fan_bytes += size(result)["bytes"]
                if not result.structured_content["running"]:
                    break
            out["fan_out_of_5"] = {
                "calls": calls,
                "model_turns": 2,  # the 5 create_trace calls fit in one turn (parallel tool calls), then one await
                "await_bytes": fan_bytes,
                "await_tokens": fan_bytes // 4,
                "answers": len(result.structured_content["done"]),
            }
    return out


if __name__ == "__main__":
    print(json.dumps(anyio.run(main), indent=2))
