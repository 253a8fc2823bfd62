"""Reflection: ask a finished trace's model for lessons on a side branch, and record them as experience."""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.runner import AgentRunner
from agent.errors import TraceError
from agent.experiences import Experiences, source_line
from agent.reflection.prompt import reflection_prompt


@dataclass
class Reflection:
    trace_id: str
    text: str
    lessons: list[str]


async def reflect_on_trace(
    runner: AgentRunner, experiences: Experiences, trace_id: str, focus: str | None = None
) -> Reflection:
    """Run the reflection prompt off the trace's head (the head and status are restored), then append
    the answer to the experiences file under the trace's own section."""
    before = await runner.store.get_trace(trace_id)  # a running trace is refused by the runner's claim
    result = await runner.run_side_branch(trace_id, reflection_prompt(focus))
    text = (result.answer or "").strip()
    if not text:
        reason = result.error or "the model gave an empty answer"
        raise TraceError(f"The reflection on trace '{trace_id}' produced no text: {reason}")
    # the reflected path runs from the first message (sequence 1) to the head the reflection started from
    head = before.head_sequence
    source = source_line(trace_id, 1, head) if head else source_line(trace_id)
    lessons = await experiences.append_reflection(trace_id, text, source=source)
    return Reflection(trace_id, text, lessons)
