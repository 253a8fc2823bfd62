"""OpenAI (and any OpenAI-compatible server: vLLM, Ollama, llama.cpp, LiteLLM) through the official SDK."""

from __future__ import annotations

import uuid
from typing import Any

import openai
from openai import AsyncOpenAI

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
    url_origin,
)
from agent.trace.models import FunctionCall, MessageUsage, ToolCall

LOCAL_PLACEHOLDER_KEY = "not-needed"  # local OpenAI-compatible servers accept any key


class OpenAIModel:
    """A chat model behind the OpenAI Chat Completions API; one SDK client per instance."""

    def __init__(
        self,
        model: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_RETRIES,
        stream: bool = True,
        client: AsyncOpenAI | None = None,
    ) -> None:
        self.model = model
        self.name = f"openai:{model}"
        self.base_url = base_url or "https://api.openai.com/v1"
        self.timeout = timeout
        self.max_retries = max_retries
        self.stream = stream
        self._api_key = api_key
        self._client = client or AsyncOpenAI(
            api_key=api_key, base_url=self.base_url, timeout=timeout, max_retries=max_retries
        )

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIModel({self.name!r}, base_url={url_origin(self.base_url)!r})"

    @classmethod
    def from_env(cls, name: str, env: dict[str, str]) -> OpenAIModel:
        """Build from OPENAI_API_KEY / OPENAI_BASE_URL plus the AGENT_TRACE_LLM_* settings."""
        key = (env.get("OPENAI_API_KEY") or "").strip()
        base_url = (env.get("OPENAI_BASE_URL") or "").strip() or None
        if not key and not base_url:
            raise ModelConfigError(
                f"Model 'openai:{name}' needs OPENAI_API_KEY (or OPENAI_BASE_URL for an OpenAI-compatible "
                "server); set it, or use model 'offline' to try agent-trace-mcp without a key."
            )
        settings = LLMSettings.from_env(env)
        return cls(
            name,
            api_key=key or LOCAL_PLACEHOLDER_KEY,
            base_url=base_url,
            timeout=settings.timeout,
            max_retries=settings.max_retries,
            stream=settings.stream,
        )

    async def aclose(self) -> None:
        """Release the HTTP connections (optional; the runner may simply drop the model)."""
        await self._client.close()

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        temperature: float,
        on_text: TextSink | None = None,
    ) -> ModelResponse:
        """One chat completion; cancelling the caller's scope cancels the HTTP call and any retry sleep."""
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "timeout": self.timeout,
        }
        if tools:
            request["tools"] = tools
        try:
            if self.stream:
                return await self._complete_streamed(request, on_text)
            completion = await self._client.chat.completions.create(**request)
        except (openai.OpenAIError, httpx2.HTTPError) as exc:
            sentence = provider_error_sentence(
                exc, self.name, kind=error_kind(exc, openai), base_url=self.base_url, secrets=(self._api_key,)
            )
            raise ModelCallError(sentence) from None
        response = _from_completion(completion)
        if response.content and on_text is not None:
            on_text(response.content)  # one delta: the sink sees the same text in both modes
        return response

    async def _complete_streamed(self, request: dict[str, Any], on_text: TextSink | None) -> ModelResponse:
        stream = await self._client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
        acc = StreamAccumulator()
        async with stream:  # closes the response on cancellation or error
            async for chunk in stream:
                delta_text = acc.add(chunk)
                if delta_text and on_text is not None:
                    on_text(delta_text)
        return acc.response()


class StreamAccumulator:
    """Assembles ChatCompletionChunks: content deltas in order, tool-call deltas by their index."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._calls: dict[int, dict[str, str]] = {}
        self._usage: MessageUsage | None = None

    def add(self, chunk: Any) -> str:
        """Take one chunk; returns the text it added (for ``on_text``)."""
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self._usage = MessageUsage(
                prompt_tokens=usage.prompt_tokens or 0, completion_tokens=usage.completion_tokens or 0
            )
        added = ""
        for choice in chunk.choices or []:
            delta = choice.delta
            if delta is None:
                continue
            text = delta.content or ""
            if text:
                self._parts.append(text)
                added += text
            for call in delta.tool_calls or []:
                slot = self._calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                if call.id:
                    slot["id"] = call.id
                function = call.function
                if function is not None:
                    if function.name and function.name != slot["name"]:
                        slot["name"] += function.name
                    if function.arguments:
                        slot["arguments"] += function.arguments
        return added

    def response(self) -> ModelResponse:
        calls = [
            ToolCall(
                id=slot["id"] or f"call_{uuid.uuid4().hex[:24]}",
                function=FunctionCall(name=slot["name"], arguments=slot["arguments"] or "{}"),
            )
            for _, slot in sorted(self._calls.items())
        ]
        content = "".join(self._parts) or None
        return ModelResponse(content=content, tool_calls=calls, usage=self._usage)


def _from_completion(completion: Any) -> ModelResponse:
    """A non-streamed ChatCompletion as a ModelResponse."""
    usage = None
    if getattr(completion, "usage", None) is not None:
        usage = MessageUsage(
            prompt_tokens=completion.usage.prompt_tokens or 0,
            completion_tokens=completion.usage.completion_tokens or 0,
        )
    if not completion.choices:
        return ModelResponse(content=None, usage=usage)
    message = completion.choices[0].message
    calls = [
        ToolCall(
            id=call.id or f"call_{uuid.uuid4().hex[:24]}",
            function=FunctionCall(name=call.function.name, arguments=call.function.arguments or "{}"),
        )
        for call in message.tool_calls or []
        if getattr(call, "function", None) is not None
    ]
    content = message.content if message.content else (getattr(message, "refusal", None) or None)
    return ModelResponse(content=content, tool_calls=calls, usage=usage)
