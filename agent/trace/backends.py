"""Opening the configured TraceStore: a SQLite file by default, PostgreSQL for a ``postgresql://`` URL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from agent import defaults

if TYPE_CHECKING:  # the relay reads is_postgres_url and must not load the models
    from agent.trace.store import TraceStore


def is_postgres_url(db: str | Path) -> bool:
    return str(db).startswith(("postgresql://", "postgres://"))


async def open_store(
    db: str | Path, *, lease_seconds: float = defaults.LEASE_SECONDS, pool_size: int | None = None
) -> TraceStore:
    """Open (creating and migrating) the store; claims left by dead processes are swept on the way.

    ``pool_size``: most connections to PostgreSQL (None: ``agent.trace.postgres.POOL_SIZE``); SQLite has two.
    """
    if is_postgres_url(db):
        from importlib import import_module

        postgres = import_module("agent.trace.postgres")
        size = postgres.POOL_SIZE if pool_size is None else pool_size
        store: TraceStore = await postgres.PostgresTraceStore.open(
            str(db), lease_seconds=lease_seconds, pool_size=size
        )
        return store
    from agent.trace.sqlite import SQLiteTraceStore

    return await SQLiteTraceStore.open(db, lease_seconds=lease_seconds)
