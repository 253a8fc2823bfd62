"""OpenAI (and any OpenAI-compatible server: vLLM, Ollama, llama.cpp, LiteLLM) through the official SDK."""

from __future__ import annotations

import uuid
from typing import Any

import httpx2  # the SDKs' HTTP client (agent.llm.common needs it too)
import openai
from openai import AsyncOpenAI

from agent import defaults
from agent.errors import ModelConfigError
from agent.llm.base import ModelResponse, TextSink, ToolChoice
from agent.llm.common import LLMSettings, call_error, error_kind, provider_error_sentence, url_origin
from agent.llm.redact import install_redaction
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
        timeout: float = defaults.LLM_TIMEOUT_SECONDS,
        max_retries: int = defaults.LLM_RETRIES,
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
        install_redaction()  # a base URL may carry credentials, and the HTTP client logs every URL
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
        tool_choice: ToolChoice = "auto",
        response_schema: dict[str, Any] | None = None,
    ) -> ModelResponse:
        """One chat completion; cancelling the caller's scope cancels the HTTP call and any retry sleep.

        ``tool_choice="none"`` sends the tools with ``tool_choice: "none"`` (the API refuses a
        ``tool_choice`` without tools, so with none it sends neither); a ``response_schema`` goes as a
        non-strict ``json_schema`` response format, which accepts any schema.
        """
        request = build_request(self.model, messages, tools, temperature=temperature, tool_choice=tool_choice)
        request["timeout"] = self.timeout
        if response_schema is not None:
            request["response_format"] = response_format(response_schema)
        try:
            if self.stream:
                response = await self._complete_streamed(request, on_text)
            else:
                response = _from_completion(await self._client.chat.completions.create(**request))
                if response.content and on_text is not None:
                    on_text(response.content)  # one delta: the sink sees the same text in both modes
        except (openai.OpenAIError, httpx2.HTTPError) as exc:
            sentence = provider_error_sentence(
                exc, self.name, kind=error_kind(exc, openai), base_url=self.base_url, secrets=(self._api_key,)
            )
            raise call_error(sentence, exc) from None
        if tool_choice == "none" and response.tool_calls:
            # some OpenAI-compatible servers ignore tool_choice; the contract is a text answer
            response = response.model_copy(update={"tool_calls": []})
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


def build_request(
    model: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    *,
    temperature: float,
    tool_choice: ToolChoice,
) -> dict[str, Any]:
    """The Chat Completions arguments; ``tool_choice`` only when it is not the default and tools go."""
    request: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature}
    if tools:
        request["tools"] = tools
        if tool_choice == "none":
            request["tool_choice"] = "none"
    return request


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's structured-output mode, non-strict: strict mode accepts only a subset of JSON Schema."""
    return {"type": "json_schema", "json_schema": {"name": "result", "schema": schema, "strict": False}}


class StreamAccumulator:
    """Assembles ChatCompletionChunks: content deltas in order, tool-call deltas by their index."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._calls: dict[
            int, dict[str, list[str]]
        ] = {}  # pieces, joined once: += on a dict value is quadratic
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
                slot = self._calls.setdefault(call.index, {"id": [], "name": [], "arguments": []})
                if call.id:
                    slot["id"] = [call.id]
                function = call.function
                if function is not None:
                    if function.name and function.name != "".join(slot["name"]):
                        slot["name"].append(function.name)
                    if function.arguments:
                        slot["arguments"].append(function.arguments)
        return added

    def response(self) -> ModelResponse:
        calls = [
            ToolCall(
                id="".join(slot["id"]) or f"call_{uuid.uuid4().hex[:24]}",
                function=FunctionCall(
                    name="".join(slot["name"]), arguments="".join(slot["arguments"]) or "{}"
                ),
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
