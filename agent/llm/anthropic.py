"""Anthropic Messages API through the official SDK, behind the OpenAI-format Model protocol.

The conversions are pure functions (tested on their own) because Anthropic differs from OpenAI in ways
that fail at request time: the system prompt is a separate field, tool calls and results are content
blocks, and user/assistant turns must alternate.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
from anthropic import AsyncAnthropic

try:  # the HTTP client of the SDK (httpx2 in newer SDKs, httpx before)
    import httpx2
except ImportError:  # pragma: no cover
    import httpx as httpx2  # type: ignore[no-redef]

from agent.errors import ModelCallError, ModelConfigError
from agent.llm.base import ModelResponse, TextSink
from agent.llm.common import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    LLMSettings,
    error_kind,
    provider_error_sentence,
)
from agent.trace.models import FunctionCall, MessageUsage, ToolCall

DEFAULT_MAX_TOKENS = 4096
DEFAULT_BASE_URL = "https://api.anthropic.com"
_PLACEHOLDER_USER = "(conversation start)"


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """Read a field from an SDK object or a plain dict alike."""
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


# --- OpenAI -> Anthropic ----------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    """The text of OpenAI message content: a string, or a list of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return str(content)


def _content_blocks(content: Any) -> list[dict[str, Any]]:
    """User/assistant content as Anthropic blocks; blank text is dropped (Anthropic rejects it)."""
    if not isinstance(content, list):
        text = _text_of(content)
        return [{"type": "text", "text": text}] if text.strip() else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and str(part.get("text", "")).strip():
            blocks.append({"type": "text", "text": str(part["text"])})
        elif part.get("type") == "image_url":
            url = str((part.get("image_url") or {}).get("url", ""))
            if url.startswith("data:") and ";base64," in url:
                media_type, _, data = url[5:].partition(";base64,")
                blocks.append(
                    {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
                )
            elif url:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
    return blocks


def _parse_arguments(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments as a dict; anything unparsable or not an object becomes {}."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def to_anthropic_messages(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI chat messages -> (system text, alternating Anthropic messages with block content)."""
    system_parts: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "system":
            text = _text_of(message.get("content"))
            if text.strip():
                system_parts.append(text)
            continue
        if role == "tool":
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": str(message.get("tool_call_id") or ""),
            }
            text = _text_of(message.get("content"))
            if text:
                result["content"] = text
            turns.append({"role": "user", "content": [result]})
            continue
        blocks = _content_blocks(message.get("content"))
        if role == "assistant":
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": str(call.get("id") or ""),
                        "name": str(function.get("name") or ""),
                        "input": _parse_arguments(function.get("arguments")),
                    }
                )
        elif role != "user":
            continue
        if blocks:
            turns.append({"role": role, "content": blocks})
    merged: list[dict[str, Any]] = []
    for turn in turns:
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1]["content"].extend(turn["content"])
        else:
            merged.append({"role": turn["role"], "content": list(turn["content"])})
    if not merged or merged[0]["role"] != "user":
        merged.insert(0, {"role": "user", "content": [{"type": "text", "text": _PLACEHOLDER_USER}]})
    return "\n\n".join(system_parts), merged


def to_anthropic_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI function tool schemas -> Anthropic tools (name, description, input_schema)."""
    out: list[dict[str, Any]] = []
    for tool in tools:
        function = tool.get("function", tool)
        converted: dict[str, Any] = {
            "name": function["name"],
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            converted["description"] = function["description"]
        out.append(converted)
    return out


# --- Anthropic -> ModelResponse ---------------------------------------------------------------------


def _usage(usage: Any) -> MessageUsage | None:
    """Anthropic splits prompt tokens into fresh and cached; all of them were read as prompt."""
    if usage is None:
        return None
    prompt = sum(
        int(_get(usage, key) or 0)
        for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    return MessageUsage(prompt_tokens=prompt, completion_tokens=int(_get(usage, "output_tokens") or 0))


def from_anthropic_message(message: Any) -> ModelResponse:
    """An Anthropic Message (SDK object or dict) as a ModelResponse."""
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in _get(message, "content") or []:
        kind = _get(block, "type")
        if kind == "text":
            texts.append(str(_get(block, "text") or ""))
        elif kind == "tool_use":
            arguments = json.dumps(_get(block, "input") or {}, ensure_ascii=False)
            calls.append(
                ToolCall(
                    id=str(_get(block, "id")),
                    function=FunctionCall(name=_get(block, "name"), arguments=arguments),
                )
            )
    return ModelResponse(
        content="".join(texts) or None, tool_calls=calls, usage=_usage(_get(message, "usage"))
    )


class StreamAccumulator:
    """Assembles raw Anthropic stream events (SDK objects or dicts) into a ModelResponse."""

    def __init__(self) -> None:
        self._blocks: dict[int, dict[str, Any]] = {}
        self._prompt_usage: Any = None
        self._output_tokens = 0

    def add(self, event: Any) -> str:
        """Take one event; returns the text it added (for ``on_text``)."""
        kind = _get(event, "type")
        if kind == "message_start":
            usage = _get(_get(event, "message"), "usage")
            self._prompt_usage = usage
            self._output_tokens = int(_get(usage, "output_tokens") or 0)
        elif kind == "content_block_start":
            block = _get(event, "content_block")
            self._blocks[int(_get(event, "index"))] = {
                "type": _get(block, "type"),
                "text": str(_get(block, "text") or ""),
                "id": _get(block, "id"),
                "name": _get(block, "name"),
                "json": "",
            }
        elif kind == "content_block_delta":
            slot = self._blocks.setdefault(
                int(_get(event, "index")), {"type": "text", "text": "", "json": ""}
            )
            delta = _get(event, "delta")
            if _get(delta, "type") == "text_delta":
                text = str(_get(delta, "text") or "")
                slot["text"] += text
                return text
            if _get(delta, "type") == "input_json_delta":
                slot["json"] += str(_get(delta, "partial_json") or "")
        elif kind == "message_delta":
            usage = _get(event, "usage")
            if usage is not None:
                self._output_tokens = int(_get(usage, "output_tokens") or self._output_tokens)
                if _get(usage, "input_tokens") is not None:
                    self._prompt_usage = usage
        return ""

    def response(self) -> ModelResponse:
        content: list[dict[str, Any]] = []
        for _, slot in sorted(self._blocks.items()):
            if slot["type"] == "text":
                content.append({"type": "text", "text": slot["text"]})
            elif slot["type"] == "tool_use":
                content.append(
                    {
                        "type": "tool_use",
                        "id": slot["id"],
                        "name": slot["name"],
                        "input": _parse_arguments(slot["json"]),
                    }
                )
        result = from_anthropic_message({"content": content})
        if self._prompt_usage is not None:
            prompt = _usage(self._prompt_usage)
            result.usage = MessageUsage(
                prompt_tokens=prompt.prompt_tokens if prompt else 0, completion_tokens=self._output_tokens
            )
        return result


# --- the model ----------------------------------------------------------------------------------------


class AnthropicModel:
    """A Claude model via ``AsyncAnthropic``; one SDK client per instance."""

    def __init__(
        self,
        model: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_RETRIES,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stream: bool = True,
        client: AsyncAnthropic | None = None,
    ) -> None:
        self.model = model
        self.name = f"anthropic:{model}"
        self.base_url = base_url or DEFAULT_BASE_URL
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.stream = stream
        self._api_key = api_key
        self._client = client or AsyncAnthropic(
            api_key=api_key, base_url=self.base_url, timeout=timeout, max_retries=max_retries
        )

    def __repr__(self) -> str:  # never show the key
        return f"AnthropicModel({self.name!r})"

    @classmethod
    def from_env(cls, name: str, env: dict[str, str]) -> AnthropicModel:
        """Build from ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL, AGENT_TRACE_MAX_TOKENS and AGENT_TRACE_LLM_*."""
        key = (env.get("ANTHROPIC_API_KEY") or "").strip()
        if not key:
            raise ModelConfigError(
                f"Model 'anthropic:{name}' needs ANTHROPIC_API_KEY; set it, or use model 'offline' to try "
                "agent-trace-mcp without a key."
            )
        raw_max = (env.get("AGENT_TRACE_MAX_TOKENS") or "").strip()
        try:
            max_tokens = int(raw_max) if raw_max else DEFAULT_MAX_TOKENS
        except ValueError:
            max_tokens = 0
        if max_tokens < 1:
            raise ModelConfigError(
                f"AGENT_TRACE_MAX_TOKENS={raw_max!r} is not valid; set it to a positive integer."
            )
        settings = LLMSettings.from_env(env)
        return cls(
            name,
            api_key=key,
            base_url=(env.get("ANTHROPIC_BASE_URL") or "").strip() or None,
            timeout=settings.timeout,
            max_retries=settings.max_retries,
            max_tokens=max_tokens,
            stream=settings.stream,
        )

    async def aclose(self) -> None:
        """Release the HTTP connections (optional)."""
        await self._client.close()

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        temperature: float,
        on_text: TextSink | None = None,
    ) -> ModelResponse:
        """One Messages API call; cancelling the caller's scope cancels the HTTP call and any retry sleep.

        ``temperature`` is not sent: the Messages API of anthropic SDK 2.x no longer takes one.
        """
        system, converted = to_anthropic_messages(messages)
        request: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": converted,
            "timeout": self.timeout,
        }
        if system:
            request["system"] = system
        if tools:
            request["tools"] = to_anthropic_tools(tools)
        try:
            if not self.stream:
                return from_anthropic_message(await self._client.messages.create(**request))
            acc = StreamAccumulator()
            stream = await self._client.messages.create(**request, stream=True)
            async with stream:
                async for event in stream:
                    text = acc.add(event)
                    if text and on_text is not None:
                        on_text(text)
            return acc.response()
        except (anthropic.AnthropicError, httpx2.HTTPError) as exc:  # mid-stream transport errors are raw
            sentence = provider_error_sentence(
                exc,
                self.name,
                kind=error_kind(exc, anthropic),
                base_url=self.base_url,
                secrets=(self._api_key,),
            )
            raise ModelCallError(sentence) from None
