"""The relay's cost (run from the set-up venv: .venv/bin/python bench/bench_relay.py): tools/list and ping round trips through it vs --in-process, both sessions open at once
and asked in turn (so machine noise hits both alike); raw JSON-RPC over the host's pipes; prints JSON."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = str(Path(sys.executable).parent / "agent-trace-mcp")
N, WARMUP = int(os.environ.get("N", "1000")), 100


class Session:
    def __init__(self, args: list[str]):
        self.p = subprocess.Popen(
            [SCRIPT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self.p.stdin is not None and self.p.stdout is not None
        self.stdin, self.stdout = self.p.stdin, self.p.stdout
        self.next_id = 0
        self.call(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        )
        self.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        self.stdin.flush()

    def call(self, method: str, params: dict | None = None) -> float:
        self.next_id += 1
        frame = {
            "jsonrpc": "2.0",
            "id": self.next_id,
            "method": method,
            **({"params": params} if params is not None else {}),
        }
        start = time.perf_counter()
        self.stdin.write(json.dumps(frame).encode() + b"\n")
        self.stdin.flush()
        reply = json.loads(self.stdout.readline())
        elapsed = (time.perf_counter() - start) * 1000
        assert reply.get("id") == self.next_id and "result" in reply, reply
        return elapsed

    def close(self) -> None:
        self.stdin.close()
        self.p.wait(10)


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "median_ms": round(statistics.median(values), 3),
        "p90_ms": round(values[int(len(values) * 0.9)], 3),
    }


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    (home / "ws").mkdir()
    base = ["--data-dir", str(home / "data"), "--model", "offline", "--workspace", str(home / "ws")]
    inproc, relay = Session([*base, "--in-process"]), Session(base)
    out: dict = {"n": N, "command": f"{sys.executable} {__file__}"}
    try:
        for method, params in (("tools/list", {}), ("ping", None)):
            a: list[float] = []
            b: list[float] = []
            for i in range(WARMUP + N):
                first, second = (inproc, relay) if i % 2 else (relay, inproc)
                t1, t2 = first.call(method, params), second.call(method, params)
                if i >= WARMUP:
                    (a, b)[first is relay].append(t1)
                    (a, b)[second is relay].append(t2)
            diffs = [y - x for x, y in zip(a, b, strict=True)]
            out[method] = {
                "in_process": summary(a),
                "relay": summary(b),
                "overhead_median_ms": round(statistics.median(diffs), 3),
            }
    finally:
        inproc.close()
        relay.close()
        subprocess.run([SCRIPT, "stop-server", "--now", *base[:2]], capture_output=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
