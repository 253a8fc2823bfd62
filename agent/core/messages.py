"""Checking caller-supplied messages: OpenAI chat format in, NewMessage out, with sentences on refusal.

The same rules judge where new messages land in a trace, so a stored conversation is always one a
model provider accepts: every tool message answers an open call of the assistant message before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from agent.errors import InvalidMessages
from agent.trace.models import Message, NewMessage, ToolCall

ROLES = ("system", "user", "assistant", "tool")


def _text_content(index: int, content: Any) -> str | None:
    """OpenAI allows content as a list of parts; we keep text, joined, and refuse anything else."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise InvalidMessages(
                    f"Message {index} has a content part that is not text; only text content is supported."
                )
        return "\n".join(texts)
    raise InvalidMessages(f"Message {index} has content of type {type(content).__name__}; send a string.")


def parse_messages(raw: Sequence[Any]) -> list[NewMessage]:
    """Validate OpenAI-format messages one by one (numbered from 1 in errors)."""
    if not isinstance(raw, (list, tuple)):
        raise InvalidMessages(
            "messages must be a list of OpenAI chat messages ({'role': ..., 'content': ...})."
        )
    parsed = []
    for index, item in enumerate(raw, start=1):
        if not isinstance(item, dict):
            raise InvalidMessages(
                f"Message {index} is not an object; send {{'role': 'user', 'content': '...'}}."
            )
        role = item.get("role")
        if role not in ROLES:
            raise InvalidMessages(
                f"Message {index} has role {shown(role)}; use one of system, user, assistant, tool."
            )
        data = {
            k: v for k, v in item.items() if k not in ("usage", "meta")
        }  # engine fields, never a caller's
        data["content"] = _text_content(index, item.get("content"))
        try:
            message = NewMessage.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidMessages(f"Message {index} is malformed at '{where}': {first['msg']}.") from None
        too_long = [
            what
            for what, value in (
                ("name", message.name),
                ("tool_call_id", message.tool_call_id),
                *(("a tool call's id", c.id) for c in message.tool_calls or []),
                *(("a tool call's function name", c.function.name) for c in message.tool_calls or []),
            )
            if value is not None and len(value) > MAX_NAME_CHARS
        ]
        if too_long:
            raise InvalidMessages(
                f"Message {index} has {too_long[0]} longer than {MAX_NAME_CHARS} characters."
            )
        if len(message.tool_calls or []) > MAX_TOOL_CALLS:
            raise InvalidMessages(
                f"Message {index} has {len(message.tool_calls or []):,} tool calls; at most {MAX_TOOL_CALLS}."
            )
        if role in ("system", "user") and not (message.content or "").strip():
            raise InvalidMessages(f"Message {index} ({role}) needs text content, not only whitespace.")
        if role == "tool" and not message.tool_call_id:
            raise InvalidMessages(
                f"Message {index} is a tool message without tool_call_id; name the call it answers."
            )
        if role == "assistant" and not message.content and not message.tool_calls:
            raise InvalidMessages(f"Message {index} (assistant) has neither content nor tool_calls.")
        if role != "assistant" and message.tool_calls:
            raise InvalidMessages(
                f"Message {index} ({role}) has tool_calls; only assistant messages can call tools."
            )
        ids = [c.id for c in message.tool_calls or []]
        if len(ids) != len(set(ids)):
            raise InvalidMessages(
                f"Message {index} (assistant) has two tool calls with the same id; ids must differ."
            )
        if role != "tool":
            message.tool_call_id = None
        parsed.append(message)
    return parsed


def open_tool_calls(path: Sequence[Message | NewMessage]) -> list[str]:
    """Ids of the tool calls at the end of ``path`` that have no tool message yet, in call order.

    Reads only the tail (the last assistant message and the tool messages after it), so it costs the
    same on a long trace as on a short one.
    """
    answered: set[str | None] = set()
    for message in reversed(path):
        if message.role == "tool":
            answered.add(message.tool_call_id)
            continue
        if message.role == "assistant":
            return [c.id for c in message.tool_calls or [] if c.id not in answered]
        return []
    return []


MAX_NAME_CHARS = 200
"""Ids and names (a message's ``name``, a tool call's id and function name): no real one comes near."""
MAX_TOOL_CALLS = 128
"""Tool calls one assistant message may carry, from a caller or a model (a model's past it are dropped)."""


def shown(value: Any, limit: int = 80) -> str:
    """A caller's value as an error sentence may quote it: repr, elided past ``limit`` with its length."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text):,} characters)"


def listed(ids: Sequence[str], limit: int = 5) -> str:
    """Ids for a sentence: the first few, each elided, and how many more."""
    head = ", ".join(shown(i, 60) for i in ids[:limit])
    return head + (f" and {len(ids) - limit:,} more" if len(ids) > limit else "")


def bounded_calls(calls: Sequence[ToolCall]) -> list[ToolCall]:
    """A model's tool calls as they may be stored: the first MAX_TOOL_CALLS, ids and names cut to
    MAX_NAME_CHARS, repeated ids made distinct (a provider refuses a conversation whose ids repeat)."""
    seen: set[str] = set()
    bounded: list[ToolCall] = []
    for call in calls[:MAX_TOOL_CALLS]:
        call_id = call.id[:MAX_NAME_CHARS] or "call"
        base, n = call_id, 1
        while call_id in seen:
            n += 1
            call_id = f"{base[: MAX_NAME_CHARS - 8]}-{n}"
        seen.add(call_id)
        name = call.function.name[:MAX_NAME_CHARS]
        if call_id != call.id or name != call.function.name:
            call = call.model_copy(
                update={"id": call_id, "function": call.function.model_copy(update={"name": name})}
            )
        bounded.append(call)
    return bounded


def ends_in_answer(path: Sequence[Message]) -> bool:
    """The path ends in the model's answer: running it with nothing new would only answer that answer."""
    return bool(path) and path[-1].role == "assistant" and not path[-1].tool_calls


def check_placement(
    path: Sequence[Message | NewMessage], new: Sequence[NewMessage], *, first_index: int = 1
) -> None:
    """Refuse new messages that would leave the conversation invalid after ``path``.

    Open calls at the end of ``path`` may be left open when ``new`` starts with something other than
    a tool message: the request closes them first (``agent.core.requests``).
    """
    open_ids = [] if new and new[0].role != "tool" else open_tool_calls(path)
    caller_calls = False  # open calls made by an assistant message in ``new``, not by the model
    for offset, message in enumerate(new):
        index = first_index + offset
        if message.role == "tool":
            if message.tool_call_id not in open_ids:
                raise InvalidMessages(
                    f"Message {index} answers tool call {shown(message.tool_call_id)}, which is not an open call of the "
                    "assistant message before it."
                )
            open_ids.remove(message.tool_call_id)
            continue
        if open_ids:
            raise InvalidMessages(
                f"Message {index} comes before the results of tool call(s) {listed(open_ids)}; "
                "add a tool message for each call first."
            )
        if message.role == "assistant":
            open_ids = [c.id for c in message.tool_calls or []]
            caller_calls = bool(open_ids)
    if caller_calls and open_ids:
        raise InvalidMessages(
            f"The assistant message calls tool(s) {listed(open_ids)} without their results; add a tool message "
            "for each call: tools run only when the model calls them."
        )
