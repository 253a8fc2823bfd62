"""Names as providers accept them (``^[a-zA-Z0-9_-]{1,64}$``): shared by the MCP config reader, which must
stay light enough for the relay to import, and the tool conversions."""

from __future__ import annotations

import re

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")


def sanitize_name(raw: str) -> str:
    """Replace every character providers refuse in a tool name with ``_``."""
    return _INVALID_NAME_CHARS.sub("_", raw)
