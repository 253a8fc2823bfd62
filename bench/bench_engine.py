"""Engine benchmark: what the runner and the SQLite trace store cost per step, per rewind, per path read.

Run from the repository root:  python bench/bench_engine.py
Prints one JSON object. The model answers at once (no network, no sleeps) and the tool returns "ok",
so every number is pure engine overhead: pydantic, message conversion, aiosqlite, SQLite on disk (WAL).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, ClassVar

import anyio

# Run from anywhere: the installed editable finder may map `agent` to a namespace package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import AgentRunner, NewMessage, RunConfig, Trace, TraceConfig, open_store
from agent.llm.base import ModelResponse, TextSink, ToolChoice
from agent.tools.registry import ToolRegistry
from agent.trace.models import FunctionCall, ToolCall
from agent.trace.store import new_token

STEP_TRACE_STEPS, STEP_TRACES, WARMUP_TRACES = 50, 7, 2
CONCURRENT_TRACES, CONCURRENT_STEPS = 100, 20
BIG_MESSAGES, SHORT_PATH, REWIND_TO, REPEATS = 10_000, 10, 5, 15
TARGETS = {"step_overhead_us_target": 1000, "rewind_ms_target": 5}
PROMPT = [{"role": "user", "content": "benchmark"}]


class BenchModel:
    """Zero-latency, stateless, O(1): calls the tool for steps 0..N-2 (step k's call id is "c{k}"), then answers."""

    def __init__(self, steps: int):
        self.name = f"bench:{steps}"
        self.steps = steps

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
        last = messages[-1]
        done = int(last["tool_call_id"][1:]) + 1 if last["role"] == "tool" else 0
        if done >= self.steps - 1:
            return ModelResponse(content="done")
        return ModelResponse(
            tool_calls=[ToolCall(id=f"c{done}", function=FunctionCall(name="ok", arguments="{}"))]
        )


RESULT_BYTES = int(os.environ.get("BENCH_RESULT_BYTES", "500"))


class OkTool:
    """Returns RESULT_BYTES of text (500 by default: a small file listing or a short read)."""

    name, description, group = "ok", "returns a fixed text", None
    input_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}}

    async def call(self, args: dict[str, Any]) -> str:
        return "x" * RESULT_BYTES


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


async def bench_steps(runner: AgentRunner) -> dict:
    """Wall time of whole 50-step runs (trace creation and finish included) divided by model calls."""
    config = RunConfig(model=f"bench:{STEP_TRACE_STEPS}", max_iterations=STEP_TRACE_STEPS * 2)
    per_step, stored = [], 0
    for i in range(WARMUP_TRACES + STEP_TRACES):
        start = time.perf_counter()
        result = await runner.run_result(PROMPT, config)
        elapsed = time.perf_counter() - start
        assert result.answer == "done", result
        if i >= WARMUP_TRACES:
            per_step.append(elapsed / STEP_TRACE_STEPS * 1e6)
            stored = len(await runner.store.get_path(result.trace.trace_id))
    return {
        "step_overhead_us": round(statistics.median(per_step), 1),
        "step_overhead_us_p90": round(p90(per_step), 1),
        "steps_per_trace": STEP_TRACE_STEPS,
        "messages_stored_per_trace": stored,  # system + user + 50 assistant + 49 tool
    }


async def run_concurrent(runner: AgentRunner) -> float:
    config = RunConfig(model=f"bench:{CONCURRENT_STEPS}", max_iterations=CONCURRENT_STEPS * 2)
    start = time.perf_counter()
    async with anyio.create_task_group() as group:  # the starts overlap too, so all 100 traces run together
        for _ in range(CONCURRENT_TRACES):
            group.start_soon(runner.start, PROMPT, config, group)
    return time.perf_counter() - start


async def bench_concurrent(runner: AgentRunner) -> dict:
    wall = await run_concurrent(runner)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    tracemalloc.start()  # a second, identical run: tracemalloc slows Python down, so it is not timed
    await run_concurrent(runner)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "concurrent_traces": CONCURRENT_TRACES,
        "concurrent_steps_per_trace": CONCURRENT_STEPS,
        "concurrent_wall_s": round(wall, 3),
        "concurrent_steps_per_second": round(CONCURRENT_TRACES * CONCURRENT_STEPS / wall, 1),
        "peak_rss_mb": round(rss_mb, 1),
        "tracemalloc_peak_mb": round(peak / 2**20, 1),
    }


async def build_trace(store, n: int, branches: tuple[int, ...] = ()) -> str:
    """A linear chain of ``n`` messages (system, user, then assistant tool call / tool result pairs),
    plus 5-message side branches forking off each sequence in ``branches``; the head ends on the chain's end."""
    tid = os.urandom(16).hex()
    token = new_token()
    await store.create(Trace(trace_id=tid, model="bench:1"), [], token)

    def message(seq: int) -> NewMessage:
        if seq <= 2:
            return NewMessage(role="system" if seq == 1 else "user", content="benchmark")
        if seq % 2:
            call = ToolCall(id=f"c{seq}", function=FunctionCall(name="ok", arguments="{}"))
            return NewMessage(role="assistant", tool_calls=[call])
        return NewMessage(role="tool", tool_call_id=f"c{seq - 1}", content="ok")

    for seq in range(1, n + 1):
        await store.append(tid, message(seq), seq - 1 or None, token=token)
    for fork in branches:
        parent = fork
        for _ in range(5):
            parent = (
                await store.append(tid, NewMessage(role="user", content="side"), parent, token=token)
            ).sequence
    await claim_at(store, tid, token, n)
    return tid


async def claim_at(store, tid: str, token: str, head: int) -> None:
    """What a rewind writes: the claim moves the head (then the run would append after it)."""
    await store.claim(tid, token, head=head, model="bench:1", config=TraceConfig())


async def timed(repeats: int, func, *args, reset=None) -> float:
    """Median milliseconds of ``func(*args)``, after one warm-up call; ``reset`` runs untimed after each."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        await func(*args)
        if i:
            times.append(time.perf_counter() - start)
        if reset is not None:
            await reset()
    return ms(statistics.median(times))


async def bench_rewind(store) -> dict:
    start = time.perf_counter()
    big = await build_trace(store, BIG_MESSAGES, branches=(3, 101, 2_001, 5_001, 9_001))
    build_s = time.perf_counter() - start
    small = await build_trace(store, SHORT_PATH)
    token = new_token()  # the bench holds every claim under one token, as one run would
    for tid in (big, small):
        trace = await store.get_trace(tid)
        await store.finish(tid, (await store.renew())[tid], status=trace.status, stop_reason=None, error=None)
        await claim_at(store, tid, token, trace.head_sequence)

    async def rewind(tid: str) -> None:  # the store work of a run with insert_after=REWIND_TO
        await claim_at(store, tid, token, REWIND_TO)
        path = await store.get_path(tid, REWIND_TO)
        assert len(path) == REWIND_TO

    def restore(tid: str, head: int):
        return lambda: claim_at(store, tid, token, head)

    assert len(await store.get_path(big)) == BIG_MESSAGES
    return {
        "big_trace_messages": len(await store.get_tree(big)),  # the chain plus 5 side branches of 5
        "big_trace_build_s": round(build_s, 2),
        "append_us": round(build_s / (BIG_MESSAGES + 25) * 1e6, 1),
        "rewind_ms": await timed(REPEATS, rewind, big, reset=restore(big, BIG_MESSAGES)),
        "rewind_ms_small": await timed(REPEATS, rewind, small, reset=restore(small, SHORT_PATH)),
        "path_read_ms_10k": await timed(5, store.get_path, big, BIG_MESSAGES),
        "path_read_ms_short": await timed(REPEATS, store.get_path, big, SHORT_PATH),
        "path_read_ms_short_small_trace": await timed(REPEATS, store.get_path, small, SHORT_PATH),
    }


async def main() -> dict:
    result: dict[str, Any] = {
        "tool_result_bytes": RESULT_BYTES,
        "python": platform.python_version(),
        "sqlite_version": sqlite3.sqlite_version,
        "cpu_count": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = await open_store(Path(tmp) / "bench.db")
        try:
            runner = AgentRunner(
                store,
                tools=ToolRegistry([OkTool()]),
                models=lambda spec: BenchModel(int(spec.partition(":")[2])),
                default_model=f"bench:{STEP_TRACE_STEPS}",
            )
            result |= await bench_steps(runner)
            result |= await bench_concurrent(runner)
            result |= await bench_rewind(store)
        finally:
            await store.close()
    return result | TARGETS


if __name__ == "__main__":
    started = time.perf_counter()
    output = anyio.run(main)
    output["bench_total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(output, indent=2))
