"""A fake Anthropic Messages API on 127.0.0.1: the stand-in for Claude over HTTP, strict like the real one.

It speaks POST /v1/messages with plain JSON or SSE streams in the real event format, follows a script of
replies and records every request. Unlike a mock it refuses, with the API's 400 and wording, what the real
API refuses: a conversation that does not start with the user or alternate, empty text, tool blocks with
no ``tools``, a ``tool_use`` not answered in the next message, a bad ``tool_choice``. Never the internet.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fake_openai import FAST_RETRY, serving

_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


class Invalid(Exception):
    """A request the real API would refuse with ``invalid_request_error``."""


# --- replies ---------------------------------------------------------------------------------------


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def tool_use(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def message(*blocks: dict[str, Any], usage: tuple[int, int] = (11, 7)) -> dict[str, Any]:
    """A Messages API response holding ``blocks``; its stop reason follows from them."""
    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    return {
        "id": "msg_fake_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": list(blocks),
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
    }


def events(reply: dict[str, Any], *, pieces: int = 3) -> list[dict[str, Any]]:
    """The SSE events the real API streams for ``reply``: text and tool input split into ``pieces``."""
    usage = reply["usage"]
    start = {**reply, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    out: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    for index, block in enumerate(reply["content"]):
        if block["type"] == "text":
            out.append({"type": "content_block_start", "index": index, "content_block": text("")})
            deltas = [{"type": "text_delta", "text": part} for part in _split(block["text"], pieces)]
        else:
            empty = {**block, "input": {}}
            out.append({"type": "content_block_start", "index": index, "content_block": empty})
            raw = json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": part} for part in _split(raw, pieces)]
        out += [{"type": "content_block_delta", "index": index, "delta": delta} for delta in deltas]
        out.append({"type": "content_block_stop", "index": index})
    out.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": reply["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        }
    )
    out.append({"type": "message_stop"})
    return out


def _split(value: str, pieces: int) -> list[str]:
    size = max(1, -(-len(value) // pieces))
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]


# --- the rules the real API enforces -----------------------------------------------------------------


def validate(body: Any) -> None:
    """Raise ``Invalid`` with the API's sentence for a request the Messages API refuses."""
    if not isinstance(body, dict):
        raise Invalid("Request body must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise Invalid("model: Field required")
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        raise Invalid("max_tokens: Field required and must be at least 1")
    tools = _validate_tools(body.get("tools"))
    _validate_tool_choice(body.get("tool_choice"), tools, "tools" in body)
    _validate_system(body.get("system"))
    _validate_output_config(body.get("output_config"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages: at least one message is required")
    blocks = [_blocks(i, m) for i, m in enumerate(messages)]
    if messages[0]["role"] != "user":
        raise Invalid('messages: first message must use the "user" role')
    for i in range(1, len(messages)):
        if messages[i]["role"] == messages[i - 1]["role"]:
            raise Invalid(
                f'messages: roles must alternate between "user" and "assistant", but found multiple '
                f'"{messages[i]["role"]}" roles in a row'
            )
    uses_tools = any(b["type"] in ("tool_use", "tool_result") for content in blocks for b in content)
    if uses_tools and tools is None:
        raise Invalid("Requests which include `tool_use` or `tool_result` blocks must define tools.")
    _validate_tool_pairs(messages, blocks)
    final = blocks[-1][-1]
    if (
        messages[-1]["role"] == "assistant"
        and final["type"] == "text"
        and final["text"] != final["text"].rstrip()
    ):
        raise Invalid("messages: final assistant content cannot end with trailing whitespace")


def _validate_tools(tools: Any) -> list[str] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise Invalid("tools: Input should be a valid list")
    names: list[str] = []
    for i, tool in enumerate(tools):
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise Invalid(f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise Invalid(f"tools.{i}.custom.input_schema.type: Input should be 'object'")
        if name in names:
            raise Invalid("tools: Tool names must be unique.")
        names.append(name)
    return names


def _validate_tool_choice(choice: Any, tools: list[str] | None, has_tools: bool) -> None:
    if choice is None:
        return
    if not has_tools:
        raise Invalid("tool_choice may only be specified while providing tools.")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise Invalid(
            "tool_choice: Input tag does not match any of the expected tags: 'auto', 'any', 'tool', 'none'"
        )
    if kind == "tool" and choice.get("name") not in (tools or []):
        raise Invalid(f"tool_choice.tool.name: Tool '{choice.get('name')}' not found in tools.")


def _validate_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise Invalid("system: Input should be a valid string or list of text blocks")
    for i, block in enumerate(system):
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not str(block.get("text", "")).strip()
        ):
            raise Invalid(f"system.{i}: text content blocks must contain non-whitespace text")


def _validate_output_config(config: Any) -> None:
    if config is None:
        return
    form = config.get("format") if isinstance(config, dict) else None
    if form is not None and (
        not isinstance(form, dict)
        or form.get("type") != "json_schema"
        or not isinstance(form.get("schema"), dict)
    ):
        raise Invalid("output_config.format: expected {'type': 'json_schema', 'schema': {...}}")


def _blocks(index: int, msg: Any) -> list[dict[str, Any]]:
    """The message's content as blocks, refusing bad roles, empty content and misplaced block types."""
    if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
        raise Invalid(f"messages.{index}.role: Input should be 'user' or 'assistant'")
    role, content = msg["role"], msg.get("content")
    if isinstance(content, str):
        if not content:
            raise Invalid(f"messages.{index}: {role} messages must have non-empty content")
        content = [text(content)]
    if not isinstance(content, list) or not content:
        raise Invalid(f"messages.{index}: {role} messages must have non-empty content")
    for j, block in enumerate(content):
        where = f"messages.{index}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str) or not block["text"]:
                raise Invalid(f"{where}.text: text content blocks must be non-empty")
            if not block["text"].strip():
                raise Invalid(f"{where}.text: text content blocks must contain non-whitespace text")
        elif kind == "tool_use":
            if role != "assistant":
                raise Invalid(f"{where}: `tool_use` blocks can only be in `assistant` messages")
            if not block.get("id") or not isinstance(block.get("input"), dict) or not block.get("name"):
                raise Invalid(f"{where}: `tool_use` blocks need an `id`, a `name` and an object `input`")
        elif kind == "tool_result":
            if role != "user":
                raise Invalid(f"{where}: `tool_result` blocks can only be in `user` messages")
            if not block.get("tool_use_id"):
                raise Invalid(f"{where}.tool_use_id: Field required")
        elif kind != "image":
            raise Invalid(f"{where}: Input tag '{kind}' does not match any of the expected tags")
    return content


def _validate_tool_pairs(messages: list[dict[str, Any]], blocks: list[list[dict[str, Any]]]) -> None:
    seen: set[str] = set()
    for i, content in enumerate(blocks):
        if messages[i]["role"] == "user":
            results = [b for b in content if b["type"] == "tool_result"]
            if results and any(b["type"] != "tool_result" for b in content[: len(results)]):
                raise Invalid(f"messages.{i}: `tool_result` blocks must come first in the message content")
            previous = blocks[i - 1] if i else []
            asked = {b["id"] for b in previous if b["type"] == "tool_use"}
            for j, result in enumerate(results):
                if result["tool_use_id"] not in asked:
                    raise Invalid(
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{result['tool_use_id']}. Each `tool_result` block must have a corresponding "
                        "`tool_use` block in the previous message."
                    )
            continue
        ids = [b["id"] for b in content if b["type"] == "tool_use"]
        if len(set(ids)) != len(ids) or seen & set(ids):
            raise Invalid(f"messages.{i}: `tool_use` ids must be unique")
        seen.update(ids)
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        answered = {b["tool_use_id"] for b in following or [] if b["type"] == "tool_result"}
        missing = [call_id for call_id in ids if call_id not in answered]
        if missing and following is not None:
            raise Invalid(
                f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block "
                "in the next message."
            )


# --- the server -------------------------------------------------------------------------------------


def _error(status: int, kind: str, text_: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"type": "error", "error": {"type": kind, "message": text_}, "request_id": "req_fake"}
    return JSONResponse(body, status, headers=headers)


class FakeAnthropic:
    """Replies from ``script`` in order (the last one repeats) and records each request.

    Script entries: ``("json", message)``, ``("sse", (events, hang_after))``, ``("error", (status,
    type, message))``, ``("hang", None)``. A request the real API would refuse gets its 400 instead and
    does not consume the script; ``requests[i]["refused"]`` holds the reason.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[tuple[str, Any]] = []
        self.release = threading.Event()  # set at teardown so hanging handlers end
        self.port = 0
        self.base_url = ""
        self.app = Starlette(routes=[Route("/v1/messages", self.endpoint, methods=["POST"])])

    async def _hang(self) -> None:
        while not self.release.is_set():
            await asyncio.sleep(0.02)

    async def endpoint(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        entry: dict[str, Any] = {"body": body, "headers": dict(request.headers), "refused": None}
        self.requests.append(entry)
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not (request.headers.get("x-api-key") or bearer):  # SDK 2.x sends the key as a bearer token
            entry["refused"] = "no key"
            return _error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            entry["refused"] = "no version"
            return _error(400, "invalid_request_error", "anthropic-version: header is required")
        try:
            validate(body)
        except Invalid as exc:
            entry["refused"] = str(exc)
            return _error(400, "invalid_request_error", str(exc))
        kind, payload = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if kind == "error":
            status, error_type, text_ = payload
            return _error(status, error_type, text_, headers=FAST_RETRY)
        if kind == "hang":
            await self._hang()
            return JSONResponse(message(text("too late")))
        if kind == "json":
            if body.get("stream"):  # a script written for plain JSON serves a stream too
                return self._stream(events(payload), hang_after=False)
            return JSONResponse(payload)
        if kind == "sse":
            stream_events, hang_after = payload
            return self._stream(stream_events, hang_after=hang_after)
        raise AssertionError(kind)

    def _stream(self, stream_events: list[dict[str, Any]], *, hang_after: bool) -> Response:
        async def body() -> AsyncIterator[str]:
            for event in stream_events:
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
            if hang_after:
                await self._hang()

        return StreamingResponse(body(), media_type="text/event-stream")


@contextmanager
def serving_anthropic(fake: FakeAnthropic) -> Iterator[FakeAnthropic]:
    """Run ``fake`` on a free loopback port; ``fake.base_url`` is what ``ANTHROPIC_BASE_URL`` takes."""
    with serving(fake):  # type: ignore[arg-type]  # the same shape as FakeOpenAI; it sets fake.port
        fake.base_url = f"http://127.0.0.1:{fake.port}"
        yield fake
