"""The store backends the contract suite runs on: SQLite always; PostgreSQL when one answers.

PostgreSQL: ``AGENT_TRACE_TEST_PG`` (then it must answer), else the local default if it answers within a
second. Each test gets a schema of its own (``search_path`` in the URL; the store creates and migrates
it); the schemas are dropped when the test process exits, and those of dead test processes at the next
start. With no server the contract suite runs on SQLite alone and the PostgreSQL-only module skips
with the one line of ``PG_SKIP_REASON``.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from agent.pids import pid_alive
from agent.trace.backends import open_store
from agent.trace.store import TraceStore

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_ENV = "AGENT_TRACE_TEST_PG"
SCHEMA_PREFIX = "agent_trace_test_"
PG_SKIP_REASON = f"PostgreSQL store tests skipped: no server answered; set {PG_ENV}=postgresql://USER@HOST:PORT/DB to run them"


def _run(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine to completion on a loop of its own, in a thread (a test's loop may be running)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


async def _drop_schemas(url: str, only_pid: int | None) -> None:
    """Drop the test schemas of this process (``only_pid``) or of test processes no longer alive."""
    import asyncpg

    db = await asyncpg.connect(url, timeout=5)
    try:
        rows = await db.fetch(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", SCHEMA_PREFIX
        )
        for (name,) in rows:
            pid_text = name[len(SCHEMA_PREFIX) :].partition("_")[0]
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if pid == only_pid or (only_pid is None and pid != os.getpid() and not pid_alive(pid)):
                await db.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await db.close()


def _find_postgres() -> str | None:
    """The server URL to test against, or None; an explicit ``AGENT_TRACE_TEST_PG`` is always used."""
    explicit = os.environ.get(PG_ENV)
    try:
        import asyncpg
    except ImportError:
        if explicit:
            raise RuntimeError(
                f"{PG_ENV} is set but asyncpg is not installed: pip install -e '.[postgres]'"
            ) from None
        return None
    url = explicit or DEFAULT_PG

    async def probe() -> None:
        db = await asyncpg.connect(url, timeout=1)
        await db.close()

    if not explicit:
        try:
            _run(probe)
        except Exception:
            return None
    _run(lambda: _drop_schemas(url, None))
    atexit.register(lambda: asyncio.run(_drop_schemas(url, os.getpid())))
    return url


PG_URL = _find_postgres()
BACKENDS = ["sqlite", "postgres"] if PG_URL else ["sqlite"]
"""With no server the contract suite runs on SQLite alone; test_postgres_store.py skips, in one line."""
_schemas = itertools.count(1)


def require_postgres() -> str:
    """The server URL, or skip the test."""
    if PG_URL is None:
        pytest.skip(PG_SKIP_REASON)
    return PG_URL


def fresh_pg_url() -> str:
    """A URL whose ``search_path`` is a schema no store used yet (created by the first store opened)."""
    base = require_postgres()
    parts = urlsplit(base)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", f"{SCHEMA_PREFIX}{os.getpid()}_{next(_schemas)}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


def store_url_for(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return str(tmp_path / "traces.db")
    if backend == "postgres":
        return fresh_pg_url()
    raise ValueError(backend)


async def open_test_store(url: str, **kwargs: float) -> TraceStore:
    return await open_store(url, **kwargs)
