"""Where a rewind cuts a trace: at a message, moved past an assistant message's tool results.

A cut inside a tool-call group would leave calls without results, which no provider accepts, so it is
refused with the sequences that would work instead.
"""

from __future__ import annotations

from agent.errors import SequenceError
from agent.trace.models import Message, Trace
from agent.trace.store import TraceStore


async def cut_point(store: TraceStore, trace: Trace, sequence: int, argument: str = "insert_after") -> int:
    """Where a rewind after ``sequence`` (``insert_after``, or a fork's ``from_sequence``: ``argument``
    names which the caller gave) really cuts: past an assistant message's tool results."""
    if sequence < 1:
        raise SequenceError(
            f"{argument} must be a message sequence of trace '{trace.trace_id}' (1 or more), not {sequence}."
        )
    message = await store.get_message(trace.trace_id, sequence)
    if message is None:
        raise SequenceError(
            f"Trace '{trace.trace_id}' has no message with sequence {sequence}; "
            "get_trace shows the sequences that exist."
        )
    if message.role == "assistant" and message.tool_calls:
        return (await tool_results(store, trace.trace_id, message))[-1].sequence
    if message.role == "tool":
        group = message
        while group.role == "tool" and group.parent_sequence is not None:
            parent = await store.get_message(trace.trace_id, group.parent_sequence)
            assert parent is not None
            group = parent
        results = await tool_results(store, trace.trace_id, group)
        if results[-1].sequence != message.sequence:
            raise SequenceError(
                f"Cutting trace '{trace.trace_id}' after sequence {sequence} would split the tool results of "
                f"assistant message {group.sequence}; use {argument}={group.sequence} "
                f"(which keeps all its results) or {results[-1].sequence}."
            )
    return message.sequence


async def tool_results(store: TraceStore, trace_id: str, assistant: Message) -> list[Message]:
    """The assistant message followed by the chain of its stored tool results."""
    chain = [assistant]
    wanted = {c.id for c in assistant.tool_calls or []}
    while wanted:
        children = [
            m
            for m in await store.get_children(trace_id, chain[-1].sequence)
            if m.role == "tool" and m.tool_call_id in wanted
        ]
        if not children:
            break
        chain.append(children[0])
        wanted.discard(children[0].tool_call_id)
    return chain
