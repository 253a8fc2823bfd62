"""The built-in ``ask_host`` tool: the agent asks the host (an orchestrating model or a person) a question.

The runner never calls it: a call pauses the run as ``needs_input`` with the question on the trace, and
``run_trace(answer=…)`` stores the answer as the call's result. ``call`` only runs if something calls the
tool outside a run, and says so.
"""

from __future__ import annotations

import json
from typing import Any

from agent.errors import ToolCallError
from agent.text import one_line

ASK_HOST = "ask_host"
MAX_QUESTION_CHARS = 4000
APPROVAL_ARGUMENT_CHARS = 2000
"""How much of a call's arguments an approval question shows: enough to judge it by (the asking message
holds the call whole)."""


class AskHostTool:
    name = ASK_HOST
    group: str | None = None
    read_only = True
    description = (
        "Ask the host who gave you this task a question, when you cannot go on without a decision or a fact "
        "only they have. The run pauses until they answer; their answer comes back as this tool's result."
    )
    input_schema: dict[str, Any] = {  # noqa: RUF012 (read-only by convention; the registry never mutates it)
        "type": "object",
        "properties": {"question": {"type": "string", "description": "One clear question for the host."}},
        "required": ["question"],
        "additionalProperties": False,
    }

    async def call(self, arguments: dict[str, Any]) -> str:
        raise ToolCallError("ask_host is answered by the host through run_trace; it cannot run on its own.")


def question_of(arguments: str) -> str:
    """The question an ask_host call asks (its ``question`` argument, or its raw arguments), bounded."""
    try:
        value = json.loads(arguments or "{}")
    except (ValueError, RecursionError):
        value = arguments  # not JSON: the raw text is the best guess at what it asks
    if isinstance(value, dict):
        value = value.get("question")
    text = " ".join(str(value or "").split()) or "(no question given)"
    return text if len(text) <= MAX_QUESTION_CHARS else text[:MAX_QUESTION_CHARS] + "…"


def call_shown(name: str, arguments: str | None) -> str:
    """A tool call as an approval question names it: ``name(arguments)``, the arguments on one line, cut."""
    return f"{name}({one_line(arguments, APPROVAL_ARGUMENT_CHARS)})"
