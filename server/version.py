"""The one place the version is written: pyproject reads it, and the relay compares it without importing the
MCP stack (a relay starts in milliseconds, not the second and a half that importing ``server.app`` costs)."""

from __future__ import annotations

import os

VERSION = "0.2.0"
TEST_VERSION_VARIABLE = "AGENT_TRACE_TEST_VERSION"
"""Read only to let tests play a relay or server of another version."""


def running_version() -> str:
    """This process's version: ``VERSION``, unless a test plays another."""
    return os.environ.get(TEST_VERSION_VARIABLE) or VERSION
