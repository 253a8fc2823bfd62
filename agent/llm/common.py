"""What every SDK-backed provider shares: per-call settings from the environment, and turning an SDK
error into a sentence that names the problem and never carries the API key."""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx2

from agent import defaults
from agent.errors import ContextTooLong, ModelCallError, ModelConfigError
from agent.llm.redact import redact
from agent.text import one_line

_MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class LLMSettings:
    """Per-call limits shared by the SDK providers (the SDK defaults are a 10-minute timeout)."""

    timeout: float = defaults.LLM_TIMEOUT_SECONDS
    max_retries: int = defaults.LLM_RETRIES
    stream: bool = True

    @classmethod
    def from_env(cls, env: dict[str, str]) -> LLMSettings:
        """Read AGENT_TRACE_LLM_TIMEOUT, AGENT_TRACE_LLM_RETRIES and AGENT_TRACE_LLM_STREAM."""
        return cls(
            timeout=_env_number(
                env, "AGENT_TRACE_LLM_TIMEOUT", defaults.LLM_TIMEOUT_SECONDS, float, minimum=0.001
            ),
            max_retries=_env_number(env, "AGENT_TRACE_LLM_RETRIES", defaults.LLM_RETRIES, int, minimum=0),
            stream=_env_flag(env, "AGENT_TRACE_LLM_STREAM", True),
        )


def _env_number(env: dict[str, str], key: str, default: Any, kind: type, *, minimum: float) -> Any:
    raw = (env.get(key) or "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ModelConfigError(f"{key}={raw!r} is not valid; set it to a number of at least {minimum:g}.")
    return value


def _env_flag(env: dict[str, str], key: str, default: bool) -> bool:
    raw = (env.get(key) or "").strip().lower()
    if not raw:
        return default
    return raw not in ("0", "false", "no", "off")


def _scrub(text: str, secrets: tuple[str | None, ...]) -> str:
    """The known secrets, URL credentials and secret-looking query values replaced by ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return redact(text)


def _provider_message(exc: Exception) -> str:
    """The provider's own short message: the error body's ``message`` when there is one."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error")
        inner: dict[str, Any] = error if isinstance(error, dict) else body
        message = inner.get("message")
        if isinstance(message, str) and message.strip():
            return message
    return str(getattr(exc, "message", None) or exc)


_OVERFLOW = re.compile(
    r"context[_ ]length|context window|maximum context|context limit|prompt is too long|too many (input )?tokens",
    re.IGNORECASE,
)


def call_error(sentence: str, exc: Exception) -> ModelCallError:
    """The error a provider's failure raises: ContextTooLong when it refused the request's length (the run
    can compact harder and try again), else ModelCallError."""
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    overflow = getattr(exc, "status_code", None) in (400, 413) and (
        code == "context_length_exceeded" or _OVERFLOW.search(_provider_message(exc)) is not None
    )
    return (ContextTooLong if overflow else ModelCallError)(sentence)


def _retries_taken(exc: Exception) -> int | None:
    """The SDKs stamp each attempt with ``x-stainless-retry-count``; the last request tells how many ran."""
    response = getattr(exc, "response", None)
    request = getattr(response, "request", None) if response is not None else getattr(exc, "request", None)
    try:
        return int(request.headers.get("x-stainless-retry-count"))  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return None


def url_origin(base_url: str | None) -> str:
    """scheme://host[:port] only, so credentials or paths in a base URL are never repeated."""
    if not base_url:
        return "the provider"
    parts = urlsplit(str(base_url))
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def provider_error_sentence(
    exc: Exception,
    model_name: str,
    *,
    kind: str,
    base_url: str | None = None,
    secrets: tuple[str | None, ...] = (),
) -> str:
    """A plain sentence for an SDK error; ``kind`` is "status", "timeout", "connection" or "other"."""
    retries = _retries_taken(exc)
    after = f" after {retries} {'retry' if retries == 1 else 'retries'}" if retries else ""
    detail = one_line(_scrub(_provider_message(exc), secrets), _MESSAGE_LIMIT)
    status = getattr(exc, "status_code", None)
    if kind == "status" and isinstance(status, int) and status < 400:
        sentence = (
            f"The model provider reported an error in the middle of its answer for {model_name}: {detail}"
        )
    elif kind == "status":
        sentence = f"The model provider returned HTTP {status} for {model_name}{after}: {detail}"
    elif kind == "timeout":
        sentence = (
            f"The model provider at {url_origin(base_url)} did not answer in time for {model_name}{after}."
        )
    elif kind == "connection":
        sentence = (
            f"Could not reach the model provider at {url_origin(base_url)} for {model_name}{after}: {detail}"
        )
    else:
        sentence = f"The model provider failed for {model_name}: {detail}"
    return _scrub(sentence, secrets)


def error_kind(exc: Exception, sdk: ModuleType) -> str:
    """ "status", "timeout", "connection" or "other", for an exception of ``sdk`` (openai or anthropic)."""
    if isinstance(exc, httpx2.TimeoutException | sdk.APITimeoutError):
        return "timeout"
    if isinstance(exc, sdk.APIStatusError):
        return "status"
    if isinstance(exc, httpx2.HTTPError | sdk.APIConnectionError):
        return "connection"
    return "other"
