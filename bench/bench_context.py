"""Context benchmark: a 200-step agent that reads a 7 KB source file per step, with and without compaction.

Run from the repository root:  python bench/bench_context.py
Prints one JSON object: prompt tokens sent in all and the largest request (tokens = characters / 4, as a
provider would roughly count them), first with compaction effectively off (a budget no request reaches:
the engine as it was), then with a 128,000-token window.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import AgentRunner, RunConfig, open_store
from agent.llm.base import ModelResponse, TextSink, ToolChoice
from agent.tools.files import workspace_tools
from agent.tools.registry import ToolRegistry
from agent.trace.models import FunctionCall, MessageUsage, ToolCall

STEPS = 200
SOURCE = "def handler(event, context):\n    return {'status': 200, 'body': event.get('body')}\n" * 80


class Reader:
    """Reads src/mod{i}.py at step i, answers after STEPS reads; measures every request it gets."""

    name = "bench-reader"

    def __init__(self) -> None:
        self.sizes: list[int] = []

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
        size = (len(json.dumps(messages)) + len(json.dumps(tools))) // 4
        self.sizes.append(size)
        usage = MessageUsage(prompt_tokens=size, completion_tokens=30)
        if tool_choice == "none":
            return ModelResponse(content="Summary: read many handler files; all return 200.", usage=usage)
        done = sum(1 for m in messages if m.get("role") == "tool")
        if done >= STEPS:
            return ModelResponse(content=f"Read {done} files.", usage=usage)
        call = ToolCall(
            id=f"r{done}",
            function=FunctionCall(name="read_file", arguments=json.dumps({"path": f"src/mod{done}.py"})),
        )
        return ModelResponse(tool_calls=[call], usage=usage)


async def run(budget: int, root: Path) -> dict[str, Any]:
    model = Reader()
    store = await open_store(root / f"bench-{budget}.db")
    try:
        runner = AgentRunner(
            store,
            tools=ToolRegistry(workspace_tools(root / "ws")),
            models=lambda spec: model,
            default_model="bench-reader",
            context_tokens=budget,
        )
        started = time.perf_counter()
        result = await runner.run_result(
            [{"role": "user", "content": "Audit every module in src/."}], RunConfig(max_iterations=STEPS + 5)
        )
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
    return {
        "status": result.trace.status.value,
        "model_calls": len(model.sizes),
        "prompt_tokens_total": sum(model.sizes),
        "largest_request_tokens": max(model.sizes),
        "compactions": result.trace.usage.compactions,
        "wall_s": round(elapsed, 2),
    }


async def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "ws" / "src").mkdir(parents=True)
        for i in range(STEPS):
            (root / "ws" / "src" / f"mod{i}.py").write_text(SOURCE, encoding="utf-8")
        return {
            "steps": STEPS,
            "file_bytes": len(SOURCE),
            "before_no_compaction": await run(10**9, root),
            "after_128k_window": await run(128_000, root),
        }


if __name__ == "__main__":
    print(json.dumps(anyio.run(main), indent=2))
