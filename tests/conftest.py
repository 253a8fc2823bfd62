"""Shared fixtures: the anyio backend, and a guard that no aiosqlite worker thread outlives a test."""

from __future__ import annotations

import threading
import time

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _sqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


@pytest.fixture(autouse=True)
def no_sqlite_thread_left_behind():
    """aiosqlite's worker is not a daemon: a connection left open would hang the process at exit."""
    before = _sqlite_threads()
    yield
    deadline = time.monotonic() + 5
    while (left := _sqlite_threads() - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not left, f"{len(left)} SQLite connection thread(s) left open by this test"


@pytest.fixture
def workspace(tmp_path):
    """A small project folder: the root of the agent's file tools in server tests."""
    root = tmp_path / "workspace"
    root.mkdir()
    (root / "README.md").write_text("# Demo project\nThe answer is 42.\n", encoding="utf-8")
    (root / "notes.txt").write_text("remember the milk\n", encoding="utf-8")
    return root


@pytest.fixture(params=__import__("tests.store_backends", fromlist=["BACKENDS"]).BACKENDS)
def store_url(request, tmp_path) -> str:
    """Where a contract test's store lives, once per backend."""
    from tests.store_backends import store_url_for

    return store_url_for(request.param, tmp_path)


@pytest.fixture(scope="module")
def openai_server():
    """One fake OpenAI-compatible server per test module (see tests/fake_openai.py)."""
    from tests.fake_openai import FakeOpenAI, serving

    with serving(FakeOpenAI()) as fake:
        yield fake


@pytest.fixture
def fake_openai(openai_server):
    """The module's fake server with an empty script and request log."""
    openai_server.requests.clear()
    openai_server.script = []
    openai_server.release.clear()
    yield openai_server
    openai_server.release.set()
