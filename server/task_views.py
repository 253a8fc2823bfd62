"""A trace as an SEP-2663 task: its status, its pending question or approval as elicitation-shaped input
requests, the host's elicitation answers read back, and the ``CallToolResult`` a host gets at the end.

Pure functions over a trace and the tail of its active path: the store is the truth, so a task polled
after a restart reads exactly what it read before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from agent.tools.ask import ASK_HOST, call_shown, question_of
from agent.trace.models import Message, Outcome, Status, Trace, utc_now
from server.views import one_line, open_calls, summary

TaskStatus = Literal["working", "input_required", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
WORKING_POLL_MS = 1000
"""How often a host should poll a running trace: a step of an agent takes about this long at best."""
WAITING_POLL_MS = 2000
STATUS_MESSAGE_CHARS = 300
ERROR_OUTCOMES = frozenset({Outcome.FAILED, Outcome.INTERRUPTED})
"""Outcomes whose final tool result is an error (still a ``completed`` task: ``failed`` is for JSON-RPC errors)."""

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "title": "Answer", "description": "Your answer to the agent's question"}
    },
    "required": ["answer"],
}
APPROVAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "approve": {
            "type": "boolean",
            "title": "Approve",
            "description": "true runs the call; false declines it",
        },
        "reason": {"type": "string", "title": "Reason", "description": "Told to the agent when you decline"},
    },
    "required": ["approve"],
}
DECLINED_ANSWER = "The host declined to answer this question."


@dataclass(frozen=True)
class InputRequest:
    """One thing a paused trace waits for; ``key`` is unique over the trace's life (it names the assistant
    message that asked, and sequences are never reused)."""

    key: str
    kind: Literal["question", "approval"]
    message: str

    def wire(self) -> dict[str, Any]:
        schema = ANSWER_SCHEMA if self.kind == "question" else APPROVAL_SCHEMA
        return {
            "method": "elicitation/create",
            "params": {"mode": "form", "message": self.message, "requestedSchema": schema},
        }


@dataclass(frozen=True)
class Reply:
    """A host's elicitation answer, as ``run_trace`` takes it."""

    answer: str | None = None
    approve: bool | None = None


def task_status(trace: Trace) -> TaskStatus:
    if trace.status is Status.RUNNING:
        return "working"
    if trace.status is Status.NEEDS_INPUT:
        return "input_required"
    if trace.outcome is Outcome.STOPPED:
        return "cancelled"
    return "completed"


def pending_requests(trace: Trace, tail: Sequence[Message]) -> list[InputRequest]:
    """What a ``needs_input`` trace waits for: its questions (one answer serves them all, as run_trace does)
    and its tool approvals (approved or declined together)."""
    if trace.status is not Status.NEEDS_INPUT:
        return []
    asking, calls = open_calls(tail)
    asks = [c for c in calls if c.function.name == ASK_HOST]
    approvals = [c for c in calls if c.function.name != ASK_HOST]
    requests: list[InputRequest] = []
    if asking is not None and asks:
        text = "\n".join(question_of(c.function.arguments) for c in asks)
        requests.append(InputRequest(f"question-{asking.sequence}", "question", text))
    if asking is not None and approvals:
        listed = "; ".join(call_shown(c.function.name, c.function.arguments) for c in approvals)
        requests.append(
            InputRequest(
                f"approval-{asking.sequence}", "approval", f"The agent wants to call {listed}. Approve?"
            )
        )
    if not requests:  # the asking message is beyond the tail: ask the stored question as it stands
        text = trace.question or "The agent is waiting for your input."
        requests.append(InputRequest(f"question-{trace.head_sequence or 0}", "question", text))
    return requests


def reply_to(request: InputRequest, response: Any) -> Reply | None:
    """The host's elicitation result as a reply; None when it is not an elicitation result at all."""
    if not isinstance(response, Mapping) or response.get("action") not in ("accept", "decline", "cancel"):
        return None
    raw = response.get("content")
    content: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    accepted = response["action"] == "accept"
    if request.kind == "question":
        answer = content.get("answer") if accepted else None
        return Reply(answer=str(answer) if answer not in (None, "") else DECLINED_ANSWER)
    reason = content.get("reason")
    approve = accepted and _truthy(content.get("approve"))
    if approve:
        return Reply(approve=True)
    return Reply(approve=False, answer=str(reason) if reason else "declined by the host")


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "y")
    return value is True or value == 1


def detailed_task(
    trace: Trace,
    tail: Sequence[Message],
    last_text: Message | None,
    retain_ms: int | None,
    *,
    elicits: bool = True,
    task_id: str | None = None,
    created_at: str | None = None,
) -> dict[str, Any]:
    """The DetailedTask of SEP-2663 for a trace: what ``tasks/get`` and ``notifications/tasks`` carry
    (``tail``: the path's last messages; ``last_text``: the latest assistant text, however far back;
    ``task_id``/``created_at``: a run's own task, else the trace's).

    A client that cannot elicit cannot answer ``inputRequests``: for it a question completes the task, its
    result the summary with the question and how to answer it (run_trace)."""
    status = task_status(trace)
    if status == "input_required" and not elicits:
        status = "completed"
    created = created_at or trace.created_at
    kept = trace.status in (Status.RUNNING, Status.NEEDS_INPUT)  # retention spares it: no TTL yet
    task = task_fields(
        task_id or trace.trace_id,
        status,
        created,
        max(trace.updated_at, created),  # a run's task is made just after its claim stamped the trace
        None if kept else retain_ms,
    )
    if status == "working":
        names: dict[str, str] = {}
        lines = [one_line(m, names) for m in tail]
        task["statusMessage"] = lines[-1] if lines else "started"
        task["pollIntervalMs"] = WORKING_POLL_MS
    elif status == "input_required":
        requests = pending_requests(trace, tail)
        task["statusMessage"] = _cut(
            "Waiting for you: " + " ".join(r.message for r in requests), STATUS_MESSAGE_CHARS
        )
        task["inputRequests"] = {r.key: r.wire() for r in requests}
        task["pollIntervalMs"] = WAITING_POLL_MS
    elif status == "cancelled":
        task["statusMessage"] = "Stopped; run_trace continues it."
    else:
        task["statusMessage"] = _ending(trace)
        task["result"] = final_result(trace, tail, last_text)
    return task


def task_fields(
    task_id: str, status: TaskStatus, created_at: str, updated_at: str, retain_ms: int | None
) -> dict[str, Any]:
    """The fields every Task carries. ``ttlMs`` (from creation, as SEP-2663 counts it) is always present:
    null until the task ends (``--retain-days`` counts from a trace's end, and a paused one is kept), then
    how long after its creation retention may delete it."""
    return {
        "taskId": task_id,
        "status": status,
        "createdAt": created_at,
        "lastUpdatedAt": updated_at,
        "ttlMs": ttl_ms(created_at, updated_at, retain_ms) if status in TERMINAL else None,
    }


def ttl_ms(created_at: str, ended_at: str, retain_ms: int | None) -> int | None:
    if retain_ms is None:
        return None
    try:
        lived = datetime.fromisoformat(ended_at) - datetime.fromisoformat(created_at)
    except ValueError:
        return None
    return max(0, int(lived.total_seconds() * 1000)) + retain_ms


def superseded(detailed: Mapping[str, Any]) -> dict[str, Any]:
    """How a task a later run superseded before it ended (paused for input, or racing) stays: cancelled."""
    task = task_fields(
        detailed["taskId"], "cancelled", detailed["createdAt"], utc_now(), None
    )  # trace goes on
    return task | {
        "statusMessage": "Superseded: run_trace started a new run of the trace before this one ended."
    }


def task_handle(detailed: Mapping[str, Any]) -> dict[str, Any]:
    """A ``CreateTaskResult``: the Task fields only (never a result or input requests), ``resultType: task``."""
    keys = ("taskId", "status", "statusMessage", "createdAt", "lastUpdatedAt", "ttlMs", "pollIntervalMs")
    return {"resultType": "task", **{k: detailed[k] for k in keys if k in detailed}}


def final_result(trace: Trace, tail: Sequence[Message], last_text: Message | None) -> dict[str, Any]:
    """What the host gets at the end: the compact summary (answer, result, question, recent steps).

    It also carries ``trace_id`` and ``message`` so it satisfies the output schema of create_trace and
    run_trace, which hosts validate the final result against."""
    body = summary(trace, tail, last_text)
    structured = {"trace_id": trace.trace_id, "message": body["next"], **body}
    text = json.dumps(structured, ensure_ascii=False, separators=(",", ":"))
    return {
        "content": [{"type": "text", "text": text}],
        "structuredContent": structured,
        "isError": trace.outcome in ERROR_OUTCOMES,
    }


def _ending(trace: Trace) -> str:
    outcome = trace.outcome
    if outcome is Outcome.ANSWERED:
        return "Answered."
    if outcome is Outcome.HIT_LIMIT:
        reason = trace.stop_reason.value if trace.stop_reason else "a limit"
        return f"Stopped at {reason} before answering; run_trace continues it."
    if outcome is Outcome.FAILED:
        return _cut(f"Failed: {trace.error or 'no reason recorded'}", STATUS_MESSAGE_CHARS)
    if outcome is Outcome.INTERRUPTED:
        return "Interrupted: the process running it ended; run_trace continues it."
    return f"Ended {outcome.value}."


def reflection_status(result: Mapping[str, Any]) -> str:
    """The statusMessage of a finished reflection task: what failed when its result is an error."""
    if not result.get("isError"):
        return "Reflected."
    text = " ".join(str(part.get("text", "")) for part in result.get("content") or [])
    return _cut(f"Failed: {text or 'no reason recorded'}", STATUS_MESSAGE_CHARS)


def _cut(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
