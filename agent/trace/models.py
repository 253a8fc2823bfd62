"""Trace, Message and their parts: the vocabulary of product.md, as pydantic models.

Messages are OpenAI chat format throughout, so a stored path can be sent to a model as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from agent import defaults


def utc_now() -> str:
    """Timestamps are ISO 8601 strings in UTC, to the microsecond, so they sort as text."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


class Status(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    NEEDS_INPUT = "needs_input"


class StopReason(StrEnum):
    END_TURN = "end_turn"
    MAX_ITERATIONS = "max_iterations"
    TOKEN_BUDGET = "token_budget"
    TIMEOUT = "timeout"
    STOPPED = "stopped"
    ERROR = "error"
    INTERRUPTED = "interrupted"
    NEEDS_INPUT = "needs_input"


class Outcome(StrEnum):
    """What a host reads first: how the trace stands, from its status and stop reason."""

    RUNNING = "running"
    ANSWERED = "answered"
    HIT_LIMIT = "hit_limit"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    NEEDS_INPUT = "needs_input"


LIMIT_REASONS = frozenset({StopReason.MAX_ITERATIONS, StopReason.TOKEN_BUDGET, StopReason.TIMEOUT})


def outcome_of(status: Status, stop_reason: StopReason | None) -> Outcome:
    if status is Status.COMPLETED and stop_reason not in LIMIT_REASONS:
        return Outcome.ANSWERED
    if stop_reason in LIMIT_REASONS and status in (Status.COMPLETED, Status.STOPPED):
        return Outcome.HIT_LIMIT
    return {
        Status.RUNNING: Outcome.RUNNING,
        Status.STOPPED: Outcome.STOPPED,
        Status.FAILED: Outcome.FAILED,
        Status.INTERRUPTED: Outcome.INTERRUPTED,
        Status.NEEDS_INPUT: Outcome.NEEDS_INPUT,
    }.get(status, Outcome.FAILED)


Role = Literal["system", "user", "assistant", "tool"]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field("{}", description="JSON-encoded arguments, as the model produced them")

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as a dict; raises ValueError when the model produced something else."""
        try:
            value = json.loads(self.arguments or "{}")
        except RecursionError:  # a model may nest brackets past the parser's depth
            raise ValueError("tool arguments are nested too deeply to read") from None
        if not isinstance(value, dict):
            raise ValueError("tool arguments must be a JSON object")
        return value


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class MessageUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TraceUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_calls: int = 0
    tool_calls: int = 0
    compactions: int = 0
    tokens_saved: int = Field(0, description="prompt tokens compaction kept out of requests (estimated)")


class NewMessage(BaseModel):
    """A message before it is stored: what callers send and what the runner produces."""

    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    usage: MessageUsage | None = None
    meta: dict[str, Any] | None = Field(None, description="engine records, e.g. a context compaction")


class Message(NewMessage):
    """A stored message: a node of the trace's tree."""

    sequence: int
    parent_sequence: int | None
    created_at: str
    side: bool = Field(False, description="on a side branch (a reflection): never part of the active path")

    def to_openai(self) -> dict[str, Any]:
        """The message as an OpenAI chat message (only the fields a model reads)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role != "tool":
            out["name"] = self.name
        return out


class TraceConfig(BaseModel):
    """How a trace runs; stored with it so a continued run behaves the same."""

    temperature: float = defaults.TEMPERATURE
    max_iterations: int = defaults.MAX_ITERATIONS
    system_prompt: str | None = None
    tools: list[str] | None = None
    recall: int | None = None
    reflect: bool = False
    max_tokens: int | None = Field(None, description="prompt + completion tokens one run may use")
    timeout_seconds: float | None = Field(None, description="wall-clock seconds one run may take")
    output_schema: dict[str, Any] | None = Field(
        None, description="JSON Schema the final answer must satisfy"
    )
    ask_host: bool = Field(True, description="the agent may ask the host a question (the ask_host tool)")
    confirm_tools: list[str] | None = Field(
        None, description="tools or servers whose calls wait for approval"
    )


class ForkPoint(BaseModel):
    trace_id: str
    sequence: int


class Trace(BaseModel):
    trace_id: str
    name: str | None = None
    uid: str | None = None
    tags: list[str] = Field(default_factory=list)
    model: str
    config: TraceConfig = Field(default_factory=TraceConfig)
    status: Status = Status.RUNNING
    stop_reason: StopReason | None = None
    head_sequence: int | None = None
    created_at: str = Field(default_factory=utc_now)
    updated_at: str = Field(default_factory=utc_now)
    started_at: str | None = Field(None, description="when the latest run started")
    error: str | None = None
    question: str | None = Field(None, description="what the agent asks, when it needs input")
    result: Any = Field(None, description="the answer as JSON valid for output_schema, when one was given")
    forked_from: ForkPoint | None = None
    usage: TraceUsage = Field(default_factory=TraceUsage)
    lessons: list[str] = Field(
        default_factory=list, description="experience lessons recalled into its prompt"
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def outcome(self) -> Outcome:
        return outcome_of(self.status, self.stop_reason)


@dataclass(frozen=True)
class RunHandle:
    """A handle a server gave out for a run (an MCP task), kept so it reads the same after a restart;
    ``final`` is the view it ended with, stored once a later run of its trace superseded it."""

    handle_id: str
    trace_id: str
    created_at: str
    final: dict[str, Any] | None = None
    held_by: str | None = None
    """The process doing the handle's work itself (a reflection), which only it can end; None for a run's
    handle, which follows its trace's claim."""


def message_uri(trace_id: str, sequence: int) -> str:
    """The resource that holds one stored message whole (named wherever a view or the model's context cuts it)."""
    return f"trace://{trace_id}/messages/{sequence}"
