"""Reflection: ask a finished trace's model for lessons on a side branch, and record them as experience."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.core.runner import AgentRunner
from agent.errors import TraceError
from agent.experiences import Experiences, source_line
from agent.reflection.prompt import reflection_prompt
from agent.trace.events import MessageStored, TraceEvent


@dataclass
class Reflection:
    trace_id: str
    text: str
    lessons: list[str]
    events: list[TraceEvent] = field(default_factory=list)


async def reflect_on_trace(
    runner: AgentRunner,
    experiences: Experiences,
    trace_id: str,
    focus: str | None = None,
    *,
    head: int | None = None,
) -> Reflection:
    """Run the reflection prompt on a side branch off ``head`` (default: the head; refused while the trace
    runs), then append the answer to the experiences file under the trace's own section.

    With ``head`` (a run reflecting inside its own claim) the branch's events are returned, not published.
    """
    inside_run = head is not None
    if head is None:
        head = (await runner.store.get_trace(trace_id)).head_sequence
    result = await runner.run_side_branch(
        trace_id, reflection_prompt(focus), head=head if inside_run else None, publish=not inside_run
    )
    text = (result.answer or "").strip()
    if not text:
        reason = result.error or "the model gave an empty answer"
        raise TraceError(f"The reflection on trace '{trace_id}' produced no text: {reason}")
    source = source_line(trace_id, 1, head) if head else source_line(trace_id)
    lessons = await experiences.append_reflection(trace_id, text, source=source)
    events: list[TraceEvent] = [MessageStored(trace_id, m) for m in result.messages] if inside_run else []
    return Reflection(trace_id, text, lessons, events)
