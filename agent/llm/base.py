"""The Model protocol every provider implements, and resolution of ``provider:name`` strings.

Providers receive OpenAI-format messages and tool schemas and answer with a ModelResponse, so the
runner never sees a vendor format.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from agent.errors import ModelConfigError
from agent.trace.models import MessageUsage, ToolCall

TextSink = Callable[[str], None]
"""Receives streamed text deltas as they arrive, so a stopped run keeps its partial answer."""

ToolChoice = Literal["auto", "none"]
"""``auto``: the model may call the offered tools; ``none``: it must answer in text (a side branch)."""


class ModelResponse(BaseModel):
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: MessageUsage | None = None


@runtime_checkable
class Model(Protocol):
    """A chat model with tool calling.

    ``messages`` are OpenAI chat messages (dicts), ``tools`` OpenAI function tool schemas
    (``{"type": "function", "function": {"name", "description", "parameters"}}``). Implementations raise
    ``ModelCallError`` with a readable sentence when the provider fails after its SDK's retries, and must
    be cancellable at any await (a stopped trace cancels the call in flight).

    ``tool_choice="none"`` is for side branches (reflection, compaction): the conversation may hold tool
    calls and results, yet the reply is text and calls nothing, whatever ``tools`` are given (pass the
    trace's tools: providers that need them to accept tool history get them). ``response_schema`` is a
    JSON Schema the final text answer should satisfy; providers use their native structured-output mode
    where they have one, and the caller still validates. An empty reply (no text, no calls) is returned
    as it is.
    """

    name: str

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        temperature: float,
        on_text: TextSink | None = None,
        tool_choice: ToolChoice = "auto",
        response_schema: dict[str, Any] | None = None,
    ) -> ModelResponse: ...


SLOW_OFFLINE_DELAY = 1.0
"""``offline:slow`` thinks a second before each answer: for demos of stopping and time limits."""


def split_model_spec(spec: str) -> tuple[str, str]:
    """``"openai:gpt-4o"`` -> ``("openai", "gpt-4o")``; a bare ``claude-…`` means anthropic, any other
    bare name openai; ``offline`` stands alone."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelConfigError(
            "No model was given; use a 'provider:name' string such as 'openai:gpt-4o' or 'offline'."
        )
    if spec == "offline" or spec.startswith("offline:"):
        return "offline", spec.partition(":")[2]
    provider, sep, name = spec.partition(":")
    if not sep:
        return ("anthropic" if spec.startswith("claude-") else "openai"), spec
    if not name:
        raise ModelConfigError(
            f"Model '{spec}' names no model after '{provider}:'; write e.g. '{provider}:<model-name>'."
        )
    return provider, name


def canonical_model_spec(spec: str) -> str:
    """``spec`` as traces store it: a bare name gets its provider (``claude-x`` -> ``anthropic:claude-x``,
    ``gpt-4o`` -> ``openai:gpt-4o``); anything else, a bad spec included, comes back stripped."""
    spec = (spec or "").strip()
    try:
        provider, name = split_model_spec(spec)
    except ModelConfigError:
        return spec
    if provider == "offline" or ":" in spec:
        return spec
    return f"{provider}:{name}"


def resolve_model(spec: str, env: dict[str, str] | None = None) -> Model:
    """Build the Model for a spec, or raise ModelConfigError saying what to set."""
    env = dict(os.environ) if env is None else env
    provider, name = split_model_spec(spec)
    if provider == "offline":
        from agent.llm.offline import OfflineModel

        model = OfflineModel(delay=SLOW_OFFLINE_DELAY if name == "slow" else 0.0)
        model.name = "offline:slow" if name == "slow" else "offline"
        return model
    if provider == "openai":
        from agent.llm.openai import OpenAIModel

        return OpenAIModel.from_env(name, env)
    if provider == "anthropic":
        try:
            from agent.llm.anthropic import AnthropicModel
        except ImportError as exc:  # the optional extra is missing
            raise ModelConfigError(
                "The 'anthropic' provider needs the anthropic extra: pip install 'agent-trace-mcp[anthropic]'."
            ) from exc
        return AnthropicModel.from_env(name, env)
    raise ModelConfigError(
        f"Unknown model provider '{provider}' in '{spec}'; use 'openai:<model>', 'anthropic:<model>' or 'offline'."
    )
