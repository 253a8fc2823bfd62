"""Test doubles for the only thing tests may fake: the LLM (and trivial tools for the runner)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from agent.errors import ModelCallError, ToolCallError
from agent.llm.base import ModelResponse, TextSink
from agent.trace.models import FunctionCall, MessageUsage, ToolCall


def call(tool: str, call_id: str = "c1", /, **arguments: Any) -> ToolCall:
    return ToolCall(id=call_id, function=FunctionCall(name=tool, arguments=json.dumps(arguments)))


def reply(text: str | None = None, *calls: ToolCall) -> ModelResponse:
    return ModelResponse(
        content=text, tool_calls=list(calls), usage=MessageUsage(prompt_tokens=10, completion_tokens=5)
    )


Step = ModelResponse | Exception | Callable[[list[dict], list[dict]], ModelResponse]


@dataclass
class ScriptedModel:
    """Answers from a script, one step per call; the last step repeats. Records what it was sent.

    ``stream`` chunks content through ``on_text`` with ``chunk_delay`` between chunks; ``delay`` sleeps
    before answering (a slow provider to stop).
    """

    steps: list[Step]
    name: str = "scripted"
    delay: float = 0.0
    stream: bool = False
    chunk_delay: float = 0.0
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def complete(
        self,
        messages: list[dict],
        tools: list[dict],
        *,
        temperature: float,
        on_text: TextSink | None = None,
        tool_choice: str = "auto",
        response_schema: dict[str, Any] | None = None,
    ) -> ModelResponse:
        self.calls.append(
            {
                "messages": messages,
                "tools": tools,
                "temperature": temperature,
                "tool_choice": tool_choice,
                "response_schema": response_schema,
            }
        )
        step = self.steps[min(len(self.calls) - 1, len(self.steps) - 1)]
        if self.delay:
            await anyio.sleep(self.delay)
        if isinstance(step, Exception):
            raise step
        response = step(messages, tools) if callable(step) else step
        if inspect.isawaitable(response):
            response = await response
        if tool_choice == "none" and response.tool_calls:  # as the providers do: no calls when forbidden
            response = response.model_copy(update={"tool_calls": []})
        if self.stream and on_text and response.content:
            for word in response.content.split(" "):
                on_text(word + " ")
                await anyio.sleep(self.chunk_delay)
        return response


REFLECTION_REPLY = "- Read the file with read_file before answering questions about it."


def turn_script(
    *steps: ModelResponse, reflection: str = REFLECTION_REPLY
) -> Callable[[list[dict], list[dict]], ModelResponse]:
    """A step for ScriptedModel that plays ``steps`` afresh for every user turn of every trace: the
    reply is chosen by how many assistant messages follow the latest user message (the last repeats).
    A reflection request (the reflection prompt) is answered with ``reflection``."""

    def step(messages: list[dict], tools: list[dict]) -> ModelResponse:
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        if last_user >= 0 and "reflect on the conversation" in (messages[last_user].get("content") or ""):
            return reply(reflection)
        done = sum(1 for m in messages[last_user + 1 :] if m.get("role") == "assistant")
        return steps[min(done, len(steps) - 1)]

    return step


def slow_reflection(
    answer: str, lesson: str, seconds: float, started: anyio.Event | None = None
) -> Callable[[list[dict], list[dict]], Any]:
    """A step that answers ``answer`` at once but takes ``seconds`` over its reflection (``started`` is set
    as the reflection call begins): for what hosts see between an answer and its lessons."""

    def step(messages: list[dict], tools: list[dict]) -> Any:
        if "reflect on the conversation" not in (messages[-1].get("content") or ""):
            return reply(answer)

        async def later() -> ModelResponse:
            if started is not None:
                started.set()
            await anyio.sleep(seconds)
            return reply(lesson)

        return later()

    return step


def models_for(**by_spec: Any) -> Callable[[str], Any]:
    """A model factory for AgentRunner(models=...) serving the given specs, else the real resolver."""
    from agent.llm.base import resolve_model

    def factory(spec: str):
        return by_spec[spec] if spec in by_spec else resolve_model(spec, env={})

    return factory


@dataclass
class FuncTool:
    """A tool made from an async function, for runner tests."""

    name: str
    func: Callable[..., Any]
    description: str = "a test tool"
    input_schema: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    group: str | None = None

    async def call(self, arguments: dict[str, Any]) -> str:
        return str(await self.func(**arguments))


async def _add(a: int = 0, b: int = 0) -> int:
    return a + b


async def _fail(**_: Any) -> str:
    raise ToolCallError("the disk is on fire")


def add_tool(group: str | None = None, name: str = "add") -> FuncTool:
    return FuncTool(name, _add, group=group)


def fail_tool() -> FuncTool:
    return FuncTool("fail", _fail)


def slow_tool(started: anyio.Event | None = None, seconds: float = 3600) -> FuncTool:
    async def slow(**_: Any) -> str:
        if started is not None:
            started.set()
        await anyio.sleep(seconds)
        return "slow done"

    return FuncTool("slow", slow)


__all__ = ["FuncTool", "ModelCallError", "ScriptedModel", "call", "models_for", "reply"]
