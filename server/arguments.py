"""Tool arguments as a calling model writes them: forgiving types, and one-sentence refusals.

A model that sends ``tools="read_file"`` meant a one-item list; a model that sends a bad value needs one
sentence naming the argument and what is allowed — not a validator dump with a URL, and never its own
megabyte of input echoed back.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BeforeValidator, Field, ValidationError
from pydantic_core import ErrorDetails

from server.views import elide

MAX_NAME_CHARS = 200
MAX_UID_CHARS = 200
MAX_TAGS = 20
MAX_TAG_CHARS = 64
MAX_TOOLS = 200
MAX_TOOL_NAME_CHARS = 128
MAX_SYSTEM_PROMPT_CHARS = 100_000
MAX_PROMPT_CHARS = 1_000_000
MAX_MESSAGES = 10_000
MAX_MESSAGES_CHARS = 4_000_000
"""All the messages of one call together (as JSON): what the HTTP transport's 4 MiB body cap admits."""
MAX_SEQUENCE = 10**12
TRACE_ID_PATTERN = r"^[0-9a-f]{32}$"
TAG_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
"""Tags hold no control characters nor line breaks (a NUL would cut one short in the store's JSON functions)."""
_TRACE_ID = re.compile(TRACE_ID_PATTERN)


def is_trace_id(value: str) -> bool:
    """Whether ``value`` has a trace id's form (as create_trace returns them)."""
    return _TRACE_ID.fullmatch(value) is not None


def check_messages_size(messages: list[Any] | None) -> None:
    """Refuse caller messages too large to store and send on, as an oversized prompt is refused."""
    for index, message in enumerate(messages or [], start=1):
        content = message.get("content") if isinstance(message, dict) else None
        size = len(content) if isinstance(content, str) else len(_json(content))
        if content is not None and size > MAX_PROMPT_CHARS:
            raise ToolError(
                f"Message {index} has {size:,} characters of content; the most is {MAX_PROMPT_CHARS:,}."
            )
    total = len(_json(messages or []))
    if total > MAX_MESSAGES_CHARS:
        raise ToolError(
            f"messages hold {total:,} characters of JSON; the most in one call is {MAX_MESSAGES_CHARS:,}."
        )


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)  # characters as sent, not \u escapes


def one_item_list(value: Any) -> Any:
    """A lone string where a list is expected is a list of one."""
    return [value] if isinstance(value, str) else value


StrList = Annotated[list[str], BeforeValidator(one_item_list)]
TraceId = Annotated[
    str,
    Field(
        pattern=TRACE_ID_PATTERN,
        description="The trace id that create_trace returned (32 hex characters)",
    ),
]
Sequence_ = Annotated[int, Field(ge=1, le=MAX_SEQUENCE)]

_KINDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
}


def sentence(error: ErrorDetails, tool: str) -> str:
    """One validation error as a sentence naming the argument, what is allowed and (elided) what came."""
    where = ".".join(str(part) for part in error["loc"] if not isinstance(part, int)) or "arguments"
    index = next((part for part in error["loc"] if isinstance(part, int)), None)
    name = f"Argument '{where}' of {tool}"
    if index is not None:  # one item of a list argument is wrong, not the list
        name = f"Item {index + 1} of argument '{where}' of {tool}"
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = elide(error.get("input"))
    if kind == "missing":
        return f"{tool} needs the argument '{where}'."
    if kind in _KINDS:
        return f"{name} must be {_KINDS[kind]}; got {got}."
    if kind in ("greater_than_equal", "greater_than"):
        bound = _number(ctx.get("ge", ctx.get("gt")))
        word = "at least" if kind == "greater_than_equal" else "more than"
        return f"{name} must be {word} {bound}; got {got}."
    if kind in ("less_than_equal", "less_than"):
        bound = _number(ctx.get("le", ctx.get("lt")))
        word = "at most" if kind == "less_than_equal" else "less than"
        return f"{name} must be {word} {bound}; got {got}."
    if kind in ("string_too_long", "too_long"):
        limit = ctx.get("max_length")
        unit = "characters" if kind == "string_too_long" else "items"
        value = error.get("input")
        if kind == "too_long" and isinstance(value, (list, tuple, dict)):
            got = f"{len(value):,} items"  # a count says it; a repr of the list would not
        return f"{name} is too long: at most {limit} {unit} are allowed; got {got}."
    if kind in ("string_too_short", "too_short"):
        return f"{name} is too short: at least {ctx.get('min_length')} needed; got {got}."
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == TRACE_ID_PATTERN:
            return f"{name} must be a trace id (32 hex characters, as create_trace returned it); got {got}."
        if ctx.get("pattern") == TAG_PATTERN:
            return f"{name} must be a tag without control characters; got {got}."
        return f"{name} has the wrong form; got {got}."
    if kind in ("literal_error", "enum"):
        allowed = ctx.get("expected", "")
        return f"{name} must be one of {allowed}; got {got}."
    if kind == "extra_forbidden":
        return f"{tool} has no argument '{where}'."
    message = str(error.get("msg", "is invalid")).split(" [", 1)[0].rstrip(".")
    return f"{name} is invalid ({message}); got {got}."


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def validation_sentence(exc: ValidationError, tool: str) -> str:
    """The first problem as a sentence, and how many more there are."""
    errors = exc.errors(include_url=False)
    first = sentence(errors[0], tool)
    rest = len(errors) - 1
    if not rest:
        return first
    return f"{first.rstrip('.')} (and {rest} more problem{'s' if rest > 1 else ''})."


def bool_as_number(arguments: dict[str, Any], schema: dict[str, Any], tool: str) -> str | None:
    """The refusal for a true/false given where a number belongs (pydantic's lax mode would read it as
    1 or 0: ``max_iterations=true`` would quietly become one step), or None."""
    properties = schema.get("properties") or {}
    for key, value in arguments.items():
        if isinstance(value, bool) and _numeric(properties.get(key) or {}):
            kind = "an integer" if "integer" in _types(properties[key]) else "a number"
            return f"Argument '{key}' of {tool} must be {kind}; got {value!r}."
    return None


def _types(prop: dict[str, Any]) -> set[str]:
    kinds = {prop["type"]} if isinstance(prop.get("type"), str) else set(prop.get("type") or [])
    for option in prop.get("anyOf") or []:
        kinds |= _types(option)
    return kinds


def _numeric(prop: dict[str, Any]) -> bool:
    kinds = _types(prop)
    return bool(kinds & {"integer", "number"}) and "boolean" not in kinds
