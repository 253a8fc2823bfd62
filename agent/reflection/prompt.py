"""The reflection prompt: what the agent is asked on the side branch after a trace.

Reflexion and ExpeL get their gains from short, transferable lessons fed into later attempts, not
from narratives, so the prompt asks for a handful of bullets only. Those bullets become the lessons
of one section in the experiences file (see ``agent.experiences``). The words "reflect" and
"lessons" must stay in the prompt: the offline demo model keys on them.
"""

from __future__ import annotations

REFLECTION_PROMPT = (
    "Stop working on the task now and reflect on the conversation above. "
    "Write down the lessons a future agent should take from it: "
    "answer ONLY with 2 to 5 markdown bullet lines (each starting with '- '), and nothing else. "
    "Each bullet is one short, transferable lesson: what to do or what to avoid, and when it applies "
    "(the kind of task, tool or situation), so it helps on a different task too. "
    "Ground every lesson in what actually happened above (a tool that failed, a step that worked, "
    "a wrong assumption); do not invent lessons the conversation does not support, "
    "and do not restate the task or its answer."
)


def reflection_prompt(focus: str | None = None) -> str:
    """The user message appended on the reflection side branch, with the caller's focus if any."""
    focus = (focus or "").strip()
    if not focus:
        return REFLECTION_PROMPT
    return f"{REFLECTION_PROMPT}\n\nFocus: {focus}"
