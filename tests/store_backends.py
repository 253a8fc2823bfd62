"""The store backends the contract suite runs on: SQLite always; PostgreSQL when one answers."""

from __future__ import annotations

from pathlib import Path

from agent.trace.backends import open_store
from agent.trace.store import TraceStore

BACKENDS = ["sqlite"]


def store_url_for(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return str(tmp_path / "traces.db")
    raise ValueError(backend)


async def open_test_store(url: str, **kwargs: float) -> TraceStore:
    return await open_store(url, **kwargs)
