"""Anthropic Messages API through the official SDK, behind the OpenAI-format Model protocol.

The conversions are pure functions (tested on their own) because Anthropic differs from OpenAI in ways
that fail at request time: the system prompt is a separate field, tool calls and results are content
blocks, user/assistant turns must alternate, and a history with tool blocks needs ``tools`` defined.
"""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
import httpx2  # the SDKs' HTTP client (agent.llm.common needs it too)
from anthropic import AsyncAnthropic, transform_schema

from agent import defaults
from agent.errors import ModelConfigError
from agent.llm.base import ModelResponse, TextSink, ToolChoice
from agent.llm.common import LLMSettings, call_error, error_kind, provider_error_sentence
from agent.llm.redact import install_redaction
from agent.trace.models import FunctionCall, MessageUsage, ToolCall

DEFAULT_BASE_URL = "https://api.anthropic.com"
_PLACEHOLDER_USER = "(conversation start)"
_FLAT_ARGUMENTS_LIMIT = 2_000
# Claude models from before structured outputs (the API answers 400 to ``output_config.format``)
_NO_NATIVE_SCHEMA = re.compile(r"^claude-(instant|2|3)|^claude-(opus|sonnet)-4(-0)?(-\d{8})?$")


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
    except (TypeError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _flat_call(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = json.dumps(_parse_arguments(function.get("arguments")), ensure_ascii=False)
    if len(arguments) > _FLAT_ARGUMENTS_LIMIT:
        arguments = arguments[: _FLAT_ARGUMENTS_LIMIT - 1] + "…"
    return f"[called tool {function.get('name') or '?'} (id {call.get('id') or '?'}) with {arguments}]"


def _flatten_tool_blocks(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls and results rewritten as plain text, for a request that sends no ``tools``."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            for call in calls:
                names[str(call.get("id") or "")] = str((call.get("function") or {}).get("name") or "?")
            text = "\n".join(t for t in [_text_of(message.get("content")), *map(_flat_call, calls)] if t)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            call_id = str(message.get("tool_call_id") or "")
            label = f"[result of tool {names.get(call_id, '?')} (id {call_id or '?'})]"
            out.append({"role": "user", "content": f"{label}\n{_text_of(message.get('content'))}"})
        else:
            out.append(message)
    return out


def has_tool_blocks(messages: list[dict[str, Any]]) -> bool:
    """Whether the conversation holds tool calls or results (Anthropic then requires ``tools``)."""
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def to_anthropic_messages(
    messages: list[dict[str, Any]], *, flatten_tools: bool = False
) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI chat messages -> (system text, alternating Anthropic messages with block content).

    ``flatten_tools`` writes tool calls and results as text, for a request without ``tools``.
    """
    if flatten_tools:
        messages = _flatten_tool_blocks(messages)
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


def native_schema(model: str, schema: dict[str, Any]) -> dict[str, Any] | None:
    """``output_config`` for structured outputs, or None where it would hurt more than help.

    The API takes a subset of JSON Schema; the SDK's ``transform_schema`` maps a schema onto it (the
    unsupported constraints move into descriptions, which the caller's validation still enforces). Not
    sent for models older than structured outputs, for schemas it cannot map, or for free-form objects,
    which the mapping would close to ``{}``.
    """
    if _NO_NATIVE_SCHEMA.search(model) or _has_open_object(schema):
        return None
    try:
        transformed = transform_schema(schema)
    except (ValueError, TypeError, AttributeError, RecursionError):  # not a schema it can map
        return None
    return {"format": {"type": "json_schema", "schema": transformed}}


def _has_open_object(schema: Any) -> bool:
    """An object schema with no properties that allows others: structured outputs cannot express it."""
    if isinstance(schema, list):
        return any(_has_open_object(item) for item in schema)
    if not isinstance(schema, dict):
        return False
    if (
        schema.get("type") == "object"
        and not schema.get("properties")
        and schema.get("additionalProperties", True) is not False
    ):
        return True
    return any(_has_open_object(value) for value in schema.values() if isinstance(value, dict | list))


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
                "text": [str(_get(block, "text") or "")],  # pieces, joined once: += here is quadratic
                "id": _get(block, "id"),
                "name": _get(block, "name"),
                "json": [],
            }
        elif kind == "content_block_delta":
            slot = self._blocks.setdefault(
                int(_get(event, "index")), {"type": "text", "text": [], "json": []}
            )
            delta = _get(event, "delta")
            if _get(delta, "type") == "text_delta":
                text = str(_get(delta, "text") or "")
                slot["text"].append(text)
                return text
            if _get(delta, "type") == "input_json_delta":
                slot["json"].append(str(_get(delta, "partial_json") or ""))
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
                content.append({"type": "text", "text": "".join(slot["text"])})
            elif slot["type"] == "tool_use":
                content.append(
                    {
                        "type": "tool_use",
                        "id": slot["id"],
                        "name": slot["name"],
                        "input": _parse_arguments("".join(slot["json"])),
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
        timeout: float = defaults.LLM_TIMEOUT_SECONDS,
        max_retries: int = defaults.LLM_RETRIES,
        max_tokens: int = defaults.ANTHROPIC_MAX_TOKENS,
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
        install_redaction()  # a base URL may carry credentials, and the HTTP client logs every URL
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
            max_tokens = int(raw_max) if raw_max else defaults.ANTHROPIC_MAX_TOKENS
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

    def build_request(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        tool_choice: ToolChoice = "auto",
        response_schema: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The Messages API arguments for one call.

        With ``tool_choice="none"`` the tools still go, with ``{"type": "none"}``: the history keeps its
        native tool blocks, so the model reads what it did exactly as it did it (no lossy rewrite, the
        tool definitions at hand). Only with no tools to send are tool blocks written as text, since the
        API refuses tool blocks without ``tools``.
        """
        flatten = not tools and has_tool_blocks(messages)
        system, converted = to_anthropic_messages(messages, flatten_tools=flatten)
        request: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": converted,
        }
        if system:
            request["system"] = system
        if tools:
            request["tools"] = to_anthropic_tools(tools)
            if tool_choice == "none":
                request["tool_choice"] = {"type": "none"}
        if response_schema is not None:
            output_config = native_schema(self.model, response_schema)
            if output_config is not None:
                request["output_config"] = output_config
        return request

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        temperature: float,
        on_text: TextSink | None = None,
        tool_choice: ToolChoice = "auto",
        response_schema: dict[str, Any] | None = None,
    ) -> ModelResponse:
        """One Messages API call; cancelling the caller's scope cancels the HTTP call and any retry sleep.

        ``temperature`` is not sent: the Messages API of anthropic SDK 2.x no longer takes one.
        """
        request = self.build_request(
            messages, tools, tool_choice=tool_choice, response_schema=response_schema
        )
        try:
            if self.stream:
                response = await self._complete_streamed(request, on_text)
            else:
                response = from_anthropic_message(
                    await self._client.messages.create(**request, timeout=self.timeout)
                )
                if response.content and on_text is not None:
                    on_text(response.content)  # one delta: the sink sees the same text in both modes
        except (anthropic.AnthropicError, httpx2.HTTPError) as exc:  # mid-stream transport errors are raw
            sentence = provider_error_sentence(
                exc,
                self.name,
                kind=error_kind(exc, anthropic),
                base_url=self.base_url,
                secrets=(self._api_key,),
            )
            raise call_error(sentence, exc) from None
        if tool_choice == "none" and response.tool_calls:  # the contract is a text answer
            response = response.model_copy(update={"tool_calls": []})
        return response

    async def _complete_streamed(self, request: dict[str, Any], on_text: TextSink | None) -> ModelResponse:
        acc = StreamAccumulator()
        stream = await self._client.messages.create(**request, stream=True, timeout=self.timeout)
        async with stream:  # closes the response on cancellation or error
            async for event in stream:
                text = acc.add(event)
                if text and on_text is not None:
                    on_text(text)
        return acc.response()
