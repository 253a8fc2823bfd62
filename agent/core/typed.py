"""Typed results: a final answer must be JSON valid for the trace's ``output_schema`` (checked with
``jsonschema``); otherwise the agent is told what is wrong, in one message, and asked again."""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from agent.core.patterns import bounded_validator
from agent.errors import InvalidMessages

MAX_SCHEMA_CHARS = 20_000
MAX_REASON_CHARS = 300  # of the validator's own reason quoted back: it may repr a large value
MAX_REASKS = 2
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


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
        if exc.absolute_path and exc.absolute_path[-1] == "type":  # the validator's anyOf wording says little
            what = f"{exc.instance!r:.80} is not a JSON Schema type (use {', '.join(JSON_TYPES)})"
        raise InvalidMessages(f"output_schema is not a valid JSON Schema at {where}: {what}.") from None
    _check_refs(schema)
    if _uses(schema, "unevaluatedProperties") and _uses(schema, "patternProperties"):
        raise InvalidMessages(
            "output_schema may not combine unevaluatedProperties with patternProperties "
            "(use additionalProperties instead)."
        )
    return schema


def _uses(node: Any, keyword: str) -> bool:
    """Whether ``keyword`` is a key anywhere in the schema (a property named so counts too: it errs safe)."""
    if isinstance(node, dict):
        return keyword in node or any(_uses(value, keyword) for value in node.values())
    if isinstance(node, list):
        return any(_uses(item, keyword) for item in node)
    return False


def _check_refs(schema: dict[str, Any]) -> None:
    """Every ``$ref`` must point inside the schema: else the run would do all its work, then fail."""
    resolver = Registry().with_resource("", DRAFT202012.create_resource(schema)).resolver()
    for ref in _refs(schema):
        shown = ref if len(ref) <= 80 else ref[:80] + "…"
        if not ref.startswith("#"):
            raise InvalidMessages(f"output_schema may only use local $ref ('#/...'), not {shown!r}.")
        try:
            resolver.lookup(ref)
        except Unresolvable:
            raise InvalidMessages(
                f"output_schema has a $ref {shown!r} that points nowhere in the schema."
            ) from None


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def unfenced(text: str) -> str:
    """The inside of a ```json fenced block (string operations: a regex here backtracked for minutes on an
    unclosed fence followed by whitespace, freezing the event loop), else the text as it is."""
    if len(text) < 6 or not text.startswith("```") or not text.endswith("```"):
        return text
    inner = text[3:-3]
    if inner.startswith("json"):
        inner = inner[4:]
    return inner.strip()


def parse_result(text: str | None, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """(the JSON value, None) when ``text`` is JSON valid for ``schema``; (None, what is wrong) otherwise.

    Blocking (its patterns may take up to ``MATCH_BUDGET_SECONDS``): run it in a worker thread. Raises
    :class:`PatternTimeout` when they take longer: asking the model again could not help."""
    raw = unfenced((text or "").strip())
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, f"it is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    except RecursionError:
        return None, "it nests brackets too deeply to read"
    errors = sorted(bounded_validator(schema).iter_errors(value), key=lambda e: e.path)
    error = errors[0] if errors else None
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
