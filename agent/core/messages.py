"""Checking caller-supplied messages: OpenAI chat format in, NewMessage out, with sentences on refusal.

The same rules judge where new messages land in a trace, so a stored conversation is always one a
model provider accepts: every tool message answers an open call of the assistant message before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from agent.errors import InvalidMessages
from agent.trace.models import Message, NewMessage

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
                f"Message {index} has role {role!r}; use one of system, user, assistant, tool."
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
                    f"Message {index} answers tool call {message.tool_call_id!r}, which is not an open call of the "
                    "assistant message before it."
                )
            open_ids.remove(message.tool_call_id)
            continue
        if open_ids:
            raise InvalidMessages(
                f"Message {index} comes before the results of tool call(s) {', '.join(open_ids)}; "
                "add a tool message for each call first."
            )
        if message.role == "assistant":
            open_ids = [c.id for c in message.tool_calls or []]
            caller_calls = bool(open_ids)
    if caller_calls and open_ids:
        raise InvalidMessages(
            f"The assistant message calls tool(s) {', '.join(open_ids)} without their results; add a tool message "
            "for each call: tools run only when the model calls them."
        )
