"""A fake OpenAI-compatible server on 127.0.0.1: the only stand-in for a model provider over HTTP.

It speaks POST /v1/chat/completions with plain JSON or SSE streams, follows a script of replies and
records every request, so retries, streaming and cancellation are real HTTP. Never the internet.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

FAST_RETRY = {"retry-after-ms": "1"}  # the SDK honours it, so retries take a millisecond


def tool_call(name: str, call_id: str, **arguments: Any) -> dict[str, Any]:
    """One tool call as the Chat Completions API returns it."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def completion(
    content: str | None, tool_calls: list[dict] | None = None, usage: tuple[int, int] = (11, 7)
) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-test",
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if tool_calls else "stop"}
        ],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
    }


def chunk(delta: dict | None = None, usage: tuple[int, int] | None = None) -> dict:
    out: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-test",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    if usage:
        out["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return out


class FakeOpenAI:
    """Replies from ``script`` in order (the last one repeats) and records each request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[tuple[str, Any]] = []
        self.release = threading.Event()  # set at teardown so hanging handlers end
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.endpoint, methods=["POST"])])

    @property
    def env(self) -> dict[str, str]:
        """What a server process needs to use this fake: its URL, a key, no streaming."""
        return {"OPENAI_BASE_URL": self.base_url, "OPENAI_API_KEY": "sk-test", "AGENT_TRACE_LLM_STREAM": "0"}

    async def _hang(self) -> None:
        while not self.release.is_set():
            await asyncio.sleep(0.02)

    async def endpoint(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append({"body": body, "headers": dict(request.headers)})
        kind, payload = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if kind == "json":
            return JSONResponse(payload)
        if kind == "error":
            status, message = payload
            return JSONResponse(
                {"error": {"message": message, "type": "server_error", "code": None}},
                status,
                headers=FAST_RETRY,
            )
        if kind == "slow":  # answer after a pause, e.g. so a client is already waiting on the trace
            seconds, reply = payload
            await asyncio.sleep(seconds)
            return JSONResponse(reply)
        if kind == "hang":
            await self._hang()
            return JSONResponse(completion("too late"))
        if kind == "sse":
            chunks, hang_after = payload

            async def events():
                for item in chunks:
                    yield f"data: {json.dumps(item)}\n\n"
                if hang_after:
                    await self._hang()
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        raise AssertionError(kind)


@contextmanager
def serving(fake: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """Run ``fake`` with uvicorn in a thread on a free loopback port (``fake.port``, ``fake.base_url``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    fake.port = sock.getsockname()[1]
    fake.base_url = f"http://127.0.0.1:{fake.port}/v1"
    uv = uvicorn.Server(
        uvicorn.Config(fake.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    try:
        yield fake
    finally:
        fake.release.set()
        uv.should_exit = True
        thread.join(10)
        sock.close()
