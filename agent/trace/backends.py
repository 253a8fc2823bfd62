"""Opening the configured TraceStore: a SQLite file by default, PostgreSQL for a ``postgresql://`` URL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from agent import defaults

if TYPE_CHECKING:  # the relay reads is_postgres_url and must not load the models
    from agent.trace.store import TraceStore


def is_postgres_url(db: str | Path) -> bool:
    return str(db).startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """The URL as given, its password (in the user part or a ``password`` parameter) replaced by ``***``:
    only the secret changes (rebuilding it would drop an empty host's ``//`` and re-quote the rest)."""
    base, mark, query = url.partition("?")
    netloc = urlsplit(base).netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        base = base.replace(netloc, f"{userinfo.partition(':')[0]}:***@{hosts}", 1)
    query = "&".join(
        f"{key}=***" if "password" in key.lower() and eq else f"{key}{eq}{value}"
        for key, eq, value in (item.partition("=") for item in query.split("&"))
    )
    return base + mark + query


def store_name(db: str | Path) -> str:
    """The store as logs may name it: a database URL without its password, or the SQLite file."""
    return redact_url(str(db)) if is_postgres_url(db) else str(db)


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
