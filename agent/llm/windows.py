"""How many tokens a request to a known model may hold, so compaction can budget without a setting.

A small table by name prefix for common OpenAI and Anthropic models; anything else (local servers,
new names) is unknown and the caller falls back to ``agent.defaults.CONTEXT_TOKENS``. The figure is the
context window, except where the provider caps the input below it (gpt-5: 400k window, 272k input).
"""

from __future__ import annotations

from agent.errors import ModelConfigError
from agent.llm.base import split_model_spec

# (prefix, tokens), the longest matching prefix wins; dated snapshots share their family's window
_OPENAI: tuple[tuple[str, int], ...] = (
    ("gpt-5-chat", 128_000),
    ("gpt-5", 272_000),
    ("gpt-4.1", 1_047_576),
    ("gpt-4o", 128_000),
    ("chatgpt-4o", 128_000),
    ("gpt-4.5", 128_000),
    ("gpt-4-turbo", 128_000),
    ("gpt-4-1106", 128_000),
    ("gpt-4-0125", 128_000),
    ("gpt-4-32k", 32_768),
    ("gpt-4", 8_192),
    ("gpt-3.5-turbo", 16_385),
    ("o1-mini", 128_000),
    ("o1-preview", 128_000),
    ("o1", 200_000),
    ("o3", 200_000),
    ("o4-mini", 200_000),
)
_ANTHROPIC: tuple[tuple[str, int], ...] = (
    ("claude-instant", 100_000),
    ("claude-2.0", 100_000),
    ("claude-", 200_000),  # claude-2.1, every claude-3/3.5/3.7 and claude-*-4/4.5 (opus, sonnet, haiku)
)


def context_window(spec: str) -> int | None:
    """The token window of the model ``spec`` names (``openai:gpt-4o``, ``claude-sonnet-4-5``, …), or None.

    A vendor path some gateways put before the name (``openai/gpt-4o``) is ignored.
    """
    try:
        provider, name = split_model_spec(spec)
    except ModelConfigError:
        return None
    name = name.strip().lower().rpartition("/")[2]
    if provider == "anthropic" or name.startswith("claude-"):
        table = _ANTHROPIC
    elif provider == "openai":
        table = _OPENAI
    else:
        return None
    matches = [(len(prefix), tokens) for prefix, tokens in table if name.startswith(prefix)]
    return max(matches)[1] if matches else None
