"""Typed results: a final answer must be JSON valid for the trace's ``output_schema`` (checked with
``jsonschema``); otherwise the agent is told what is wrong, in one message, and asked again."""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from agent.errors import InvalidMessages

MAX_SCHEMA_CHARS = 20_000
MAX_REASON_CHARS = 300  # of the validator's own reason quoted back: it may repr a large value
MAX_REASKS = 2
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def check_schema(schema: Any) -> dict[str, Any]:
    """Refuse a schema that is not a JSON Schema object (or too large), with a sentence."""
    if not isinstance(schema, dict):
        raise InvalidMessages("output_schema must be a JSON Schema object, e.g. {'type': 'object', ...}.")
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise InvalidMessages(f"output_schema is larger than {MAX_SCHEMA_CHARS:,} characters of JSON.")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top"
        what = exc.message if len(exc.message) <= MAX_REASON_CHARS else exc.message[:MAX_REASON_CHARS] + "…"
        raise InvalidMessages(f"output_schema is not a valid JSON Schema at {where}: {what}.") from None
    return schema


def parse_result(text: str | None, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """(the JSON value, None) when ``text`` is JSON valid for ``schema``; (None, what is wrong) otherwise."""
    raw = (text or "").strip()
    fenced = _FENCE.match(raw)
    if fenced:
        raw = fenced.group(1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, f"it is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    error = next(iter(sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: e.path)), None)
    if error is None:
        return value, None
    where = "/".join(str(p) for p in error.absolute_path) or "the top level"
    message = error.message if len(error.message) <= 300 else error.message[:300] + "…"
    return None, f"at {where}: {message}"


def reask(problem: str, schema: dict[str, Any]) -> str:
    """The user message that asks for the answer again."""
    shown = json.dumps(schema, ensure_ascii=False)
    if len(shown) > 2000:
        shown = shown[:2000] + "…"
    return (
        f"Your final answer must be JSON valid for this JSON Schema, and it is not: {problem}. "
        f"Answer again with only the JSON, no other text. The schema: {shown}"
    )
