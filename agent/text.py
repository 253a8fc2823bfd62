"""Text cut for a sentence: one line, bounded (tool names, arguments and provider messages quoted in errors
and questions)."""

from __future__ import annotations


def one_line(text: object, limit: int) -> str:
    """``text`` with its whitespace runs made single spaces, cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
