"""Row decoding shared by the backends: the column lists both schemas select, and rows to models.

Both stores keep JSON as text (PostgreSQL's ``json``/``jsonb`` arrive as text too), so one decoder serves both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agent.trace.models import (
    ForkPoint,
    Message,
    MessageUsage,
    RunHandle,
    Status,
    StopReason,
    ToolCall,
    Trace,
    TraceConfig,
    TraceUsage,
)

TRACE_COLUMNS = (
    "trace_id, name, uid, model, config, status, stop_reason, head_sequence, created_at, updated_at, "
    "error, usage, lessons, tags, started_at, question, result, forked_from"
)
HANDLE_COLUMNS = "handle_id, trace_id, created_at, final, held_by"
MESSAGE_COLUMNS = (
    "sequence, parent_sequence, role, content, tool_calls, tool_call_id, name, usage, created_at, side, meta"
)
N_TRACE = len(TRACE_COLUMNS.split(","))
N_MESSAGE = len(MESSAGE_COLUMNS.split(","))


def prefixed(columns: str, alias: str) -> str:
    """``columns`` qualified by a table alias, for joins."""
    return ", ".join(f"{alias}.{c.strip()}" for c in columns.split(","))


def trace_from_row(row: Sequence[Any]) -> Trace:
    (
        trace_id, name, uid, model, config, status, stop_reason, head, created, updated, error, usage, lessons,
        tags, started_at, question, result, forked_from,
    ) = row  # fmt: skip
    return Trace(
        trace_id=trace_id,
        name=name,
        uid=uid,
        model=model,
        config=TraceConfig.model_validate_json(config),
        status=Status(status),
        stop_reason=StopReason(stop_reason) if stop_reason else None,
        head_sequence=head,
        created_at=created,
        updated_at=updated,
        error=error,
        usage=TraceUsage.model_validate_json(usage),
        lessons=json.loads(lessons),
        tags=json.loads(tags),
        started_at=started_at,
        question=question,
        result=json.loads(result) if result is not None else None,
        forked_from=ForkPoint.model_validate_json(forked_from) if forked_from else None,
    )


def message_from_row(row: Sequence[Any]) -> Message:
    sequence, parent, role, content, tool_calls, tool_call_id, name, usage, created, side, meta = row
    return Message(
        sequence=sequence,
        parent_sequence=parent,
        role=role,
        content=content,
        tool_calls=[ToolCall.model_validate(c) for c in json.loads(tool_calls)] if tool_calls else None,
        tool_call_id=tool_call_id,
        name=name,
        usage=MessageUsage.model_validate_json(usage) if usage else None,
        created_at=created,
        side=bool(side),
        meta=json.loads(meta) if meta else None,
    )


def handle_from_row(row: Sequence[Any]) -> RunHandle:
    handle_id, trace_id, created_at, final, held_by = row
    return RunHandle(
        handle_id, trace_id, created_at, json.loads(final) if final is not None else None, held_by
    )
