"""Replica benchmark: steps per second of 100 traces × 20 steps on one process and split over two
processes, on one PostgreSQL and, beside it, on one SQLite file.

Run from the repository root:  python bench/bench_replicas.py
PostgreSQL: ``AGENT_TRACE_TEST_PG``, else postgresql://postgres@127.0.0.1:5432/postgres (a fresh schema
is made and dropped); without one only the SQLite rows are printed. ``BENCH_POOL_SIZE`` sets the pool.
Prints one JSON object. Each replica is a process of its own with the engine's runner, its change feed
and lease keeper, a zero-latency model and a tool returning 500 bytes (bench_engine's), so the figures
are store and engine overhead; every process starts its traces at the same moment (a barrier on stdin)
and the rate is all steps over the span from the first start to the last finish.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engine import PROMPT, BenchModel, OkTool  # beside this script

from agent import AgentRunner, RunConfig
from agent.tools.registry import ToolRegistry
from agent.trace.backends import open_store

TRACES, STEPS, WARMUP_TRACES = 100, 20, 5
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


async def run_traces(runner: AgentRunner, count: int) -> int:
    """Run ``count`` traces at once (as bench_engine's concurrent run); returns how many answered."""
    config = RunConfig(model=f"bench:{STEPS}", max_iterations=STEPS * 2)
    answered = 0

    async def one() -> None:
        nonlocal answered
        result = await runner.run_result(PROMPT, config)
        answered += result.answer == "done" and result.trace.status.value == "completed"

    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(one)
    return answered


async def worker(db: str, traces: int) -> dict[str, Any]:
    """One replica: warm up, wait for "go" on stdin, run ``traces`` traces, report its span."""
    pool = os.environ.get("BENCH_POOL_SIZE")
    store = await open_store(db, pool_size=int(pool) if pool else None)
    try:
        runner = AgentRunner(
            store,
            tools=ToolRegistry([OkTool()]),
            models=lambda spec: BenchModel(int(spec.partition(":")[2])),
            default_model=f"bench:{STEPS}",
        )
        async with runner:
            await run_traces(runner, WARMUP_TRACES)
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)
            start, cpu = time.time(), time.process_time()
            answered = await run_traces(runner, traces)
            end, cpu = time.time(), time.process_time() - cpu
    finally:
        await store.close()
    return {"start": start, "end": end, "cpu_s": cpu, "answered": answered}


def replicas(db: str, processes: int) -> dict[str, Any]:
    """``processes`` workers on ``db`` sharing TRACES between them; all steps over the whole span."""
    share = [TRACES // processes + (1 if i < TRACES % processes else 0) for i in range(processes)]
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", db, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in share
    ]
    try:
        for proc in workers:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in workers:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        spans = []
        for proc in workers:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out
            spans.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    cpu = sum(s["cpu_s"] for s in spans)
    return {
        "processes": processes,
        "wall_s": round(wall, 3),
        "steps_per_second": round(TRACES * STEPS / wall, 1),
        "client_cpu_us_per_step": round(cpu / (TRACES * STEPS) * 1e6, 1),
        "answered": sum(s["answered"] for s in spans),
    }


def pg_url() -> str | None:
    import asyncpg

    url = os.environ.get("AGENT_TRACE_TEST_PG") or DEFAULT_PG

    async def probe() -> None:
        await (await asyncpg.connect(url, timeout=2)).close()

    try:
        asyncio.run(probe())
    except Exception:
        return None
    return url


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


def drop_schema(url: str, schema: str) -> None:
    import asyncpg

    async def drop() -> None:
        db = await asyncpg.connect(url)
        try:
            await db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await db.close()

    asyncio.run(drop())


def main() -> dict[str, Any]:
    result: dict[str, Any] = {
        "traces": TRACES,
        "steps_per_trace": STEPS,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "pool_size": int(os.environ.get("BENCH_POOL_SIZE") or 0) or "default",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            db = str(Path(tmp) / f"bench-{processes}.db")
            result[f"sqlite_{processes}_replica"] = replicas(db, processes)
    url = pg_url()
    if url is None:
        result["postgresql"] = (
            "skipped: no server answered; set AGENT_TRACE_TEST_PG=postgresql://USER@HOST:PORT/DB"
        )
        return result
    for processes in (1, 2):
        schema = f"agent_trace_bench_{secrets.token_hex(4)}"
        try:
            result[f"postgresql_{processes}_replica"] = replicas(with_schema(url, schema), processes)
        finally:
            drop_schema(url, schema)
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(anyio.run(worker, sys.argv[2], int(sys.argv[3]))))
    else:
        started = time.perf_counter()
        output = main()
        output["bench_total_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(output, indent=2))
