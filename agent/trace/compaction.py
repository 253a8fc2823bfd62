"""Fitting a long active path into the model's window without changing anything stored.

The model sees ``build_context(path)``: the stored messages as OpenAI chat messages, with the effect of
every compaction record on the path applied. A compaction record is itself a stored message (role
``system``, ``meta["compaction"]``), appended at the head when the next call would pass the budget:

1. **elide**: old tool results become a one-line stub (most of the bytes, no model call; the stored
   result stays whole, ``trace://{id}/messages/{seq}`` for a host);
2. **summarise**: if that is not enough, the oldest turns (after the task) are replaced by one summary the
   trace's own model wrote.

The system prompt, the task (the first user message) and the latest user message are sent verbatim
(unless nothing else can make room: a summary that covers the latest user message follows it), and the
latest turns are never elided or summarised. Records are
read in path order, so a rewind to before one leaves it off the new branch, and a continued trace resumes
with its compactions. If even that does not fit (one giant message), the longest contents still in view
are cut in what is sent — never in what is stored. A provider that still refuses
the request as too long makes the run recount more carefully and try again (``agent.core.run``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import defaults
from agent.trace.models import Message, NewMessage, message_uri

KEEP_TURNS = 2
"""The latest assistant turns (with their tool results) always sent verbatim."""
REPLY_RESERVE_TOKENS = 4096
"""Room left for the model's reply, unless the model says how long its reply may be (Anthropic's max_tokens)."""
LOW_WATER = 0.6
"""A compaction aims at this share of the room, so the next one is many steps away, not the next step."""
RESUMMARY_SHARE = 0.2
"""A path that has a summary is summarised again only when that folds in at least this share of the room."""
INITIAL_TOKENS_PER_CHAR = 0.3
"""Until a provider reports its count, a conservative guess (≈3.3 characters a token). Sizes are counted in
UTF-8 bytes, so a CJK character weighs three: tokenizers spend about a token on one, a quarter on ASCII."""
CLAMP_MARKER_CHARS = 40
"""About what the marker of a message cut to fit adds (cutting one shorter than that saves nothing)."""
SUMMARY_PROMPT = (
    "Summarise the conversation so far for yourself, to continue the task with less context: the task, "
    "what you did (tools called and what they showed), what you found, and what is left to do. Be concise "
    "and keep every fact you still need (names, paths, numbers, decisions)."
)


def budget_for(context_tokens: int | None, window: int | None) -> int:
    """The prompt budget: the configured size, else the model's known window, else the default."""
    return context_tokens or window or defaults.CONTEXT_TOKENS


def reply_reserve(budget: int, model: object) -> int:
    """Room kept for the reply: what the model may write when it sends a ``max_tokens`` (the provider
    counts it against the window: input + max_tokens must fit), at most three quarters of the budget;
    else REPLY_RESERVE_TOKENS, at most a quarter of a small budget."""
    limit = getattr(model, "max_tokens", None)
    if isinstance(limit, int) and limit > 0:
        return min(limit, budget * 3 // 4)
    return min(REPLY_RESERVE_TOKENS, budget // 4)


def room(budget: int, model: object, tool_tokens: int) -> int:
    """Tokens the messages of a request may take: the budget less the reply's room and the tool schemas."""
    return budget - reply_reserve(budget, model) - tool_tokens


def compaction_of(message: Message) -> dict[str, Any] | None:
    record = (message.meta or {}).get("compaction")
    return record if isinstance(record, dict) else None


def stub(message: Message, trace_id: str | None = None) -> str:
    """What the model sees of an elided result: enough to know it existed, where it is kept whole (for a
    reader of the trace) and how the agent gets it back (its tools: it cannot read resources)."""
    size = len(message.content or "")
    kept = f", kept whole at {message_uri(trace_id, message.sequence)}" if trace_id else ""
    return (
        f"[tool result elided to fit the context: {size:,} characters (message {message.sequence}){kept}; "
        "call the tool again if you need it]"
    )


@dataclass
class View:
    """What the compaction records on a path say: elided results and the latest summary."""

    elided: set[int] = field(default_factory=set)
    covers: tuple[int, int] | None = None
    summary: str | None = None

    @classmethod
    def of(cls, path: Sequence[Message]) -> View:
        view = cls()
        for message in path:
            record = compaction_of(message)
            if record is None:
                continue
            view.elided.update(int(s) for s in record.get("elided", []))
            if record.get("covers"):
                first, last = record["covers"]
                view.covers = (int(first), int(last))
                view.summary = message.content or ""
        return view


def build_context(
    path: Sequence[Message],
    *,
    convert: Callable[[Message], dict[str, Any]] = Message.to_openai,
    extra_elided: Iterable[int] = (),
    clamp_to: int | None = None,
    tokens_per_char: float = INITIAL_TOKENS_PER_CHAR,
    trace_id: str | None = None,
) -> list[dict[str, Any]]:
    """The active path as the model receives it, every compaction applied (and, with ``clamp_to``, the
    longest remaining contents cut until the estimate fits; with ``trace_id``, stubs name where each elided
    result is kept). ``convert`` may cache; it is never mutated."""
    view = View.of(path)
    view.elided.update(extra_elided)
    latest = latest_user(path)
    wire: list[dict[str, Any]] = []
    for message in path:
        if compaction_of(message) is not None:
            continue
        if view.covers is not None and view.covers[0] <= message.sequence <= view.covers[1]:
            if message.sequence == view.covers[0]:
                if latest is not None and view.covers[0] <= latest.sequence <= view.covers[1]:
                    wire.append(convert(latest))  # the host's latest word stays verbatim, before the summary
                wire.append(
                    {
                        "role": "user",
                        "content": f"[Summary of the earlier conversation, messages {view.covers[0]}–{view.covers[1]}]\n"
                        f"{view.summary}",
                    }
                )
            continue
        item = convert(message)
        if message.role == "tool" and message.sequence in view.elided:
            item = {**item, "content": stub(message, trace_id)}
        wire.append(item)
    if clamp_to is not None:
        _clamp(wire, clamp_to, tokens_per_char)
    return wire


def _clamp(wire: list[dict[str, Any]], budget: int, ratio: float) -> None:
    """Last resort: cut the longest contents to one common length, the longest that fits, so a path of many
    middling messages fits as surely as one with a huge one. The system prompt, the task and the latest user
    message are cut only if the rest cannot make room (the system prompt last of all).

    Savings are counted as the estimate counts: in JSON's UTF-8 bytes (a newline or a quote weighs two)."""
    users = [i for i, m in enumerate(wire) if m["role"] == "user"]
    for protected in ({0, *users[:1], *users[-1:]}, {0}, set()):
        attempt = list(wire)  # a tier that cannot fit leaves nothing cut: the next one starts afresh
        if _cut_longest(attempt, budget, ratio, protected) or not protected:
            wire[:] = attempt
            return


def _cut_longest(wire: list[dict[str, Any]], budget: int, ratio: float, protected: set[int]) -> bool:
    """Cut the longest contents outside ``protected``; True once the estimate fits."""
    for _ in range(8):  # each pass recounts: the weights are averages and the estimate rounds
        over = estimate(wire, ratio=ratio) - budget
        if over <= 0:
            return True
        candidates = [
            i
            for i, m in enumerate(wire)
            if i not in protected
            and isinstance(m.get("content"), str)
            and len(m["content"]) > CLAMP_MARKER_CHARS
        ]
        if not candidates:
            return False
        lengths = [len(wire[i]["content"]) for i in candidates]
        weights = [chars_of(wire[i]["content"]) / n for i, n in zip(candidates, lengths, strict=True)]
        keep = _common_length(lengths, weights, math.ceil(over / ratio))
        for i in candidates:
            text = wire[i]["content"]
            if len(text) > keep:
                wire[i] = {**wire[i], "content": f"{text[:keep]}… [cut to fit: {len(text):,} chars]"}
    return estimate(wire, ratio=ratio) <= budget


def _common_length(lengths: list[int], weights: list[float], excess: int) -> int:
    """The longest length that, cutting every longer content to it (its marker added), saves ``excess``
    JSON characters; ``weights`` are each content's JSON characters per character."""

    def saved(keep: int) -> float:
        pairs = zip(lengths, weights, strict=True)
        return sum((n - keep) * w - CLAMP_MARKER_CHARS for n, w in pairs if n > keep)

    keep, high = 0, max(lengths)
    while keep < high:  # saved() shrinks as keep grows: bisect
        middle = (keep + high + 1) // 2
        if saved(middle) >= excess:
            keep = middle
        else:
            high = middle - 1
    return keep


_ENCODER = json.JSONEncoder(ensure_ascii=False)  # made once: json.dumps with options builds one per call


def chars_of(item: Any) -> int:
    """The item's size as the estimate counts it: its JSON in UTF-8 bytes (see INITIAL_TOKENS_PER_CHAR)."""
    text = _ENCODER.encode(item)
    return len(text) if text.isascii() else len(text.encode())  # isascii is a flag check: no copy for ASCII


def estimate(
    wire: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    ratio: float,
    sizes: Callable[[dict[str, Any]], int] = chars_of,
) -> int:
    """Tokens a request would hold: its JSON's characters times the calibrated tokens-per-character."""
    chars = sum(sizes(item) for item in wire) + (chars_of(tools) if tools else 0)
    return math.ceil(chars * ratio)


@dataclass
class Plan:
    """What a compaction would record (stage 1: ``elided``; stage 2 adds ``covers``)."""

    elided: list[int]
    covers: tuple[int, int] | None = None


def protected_from(path: Sequence[Message]) -> int:
    """Index of the first message of the latest KEEP_TURNS assistant turns: it and all after stay verbatim."""
    turns = [i for i, m in enumerate(path) if m.role == "assistant" and not m.side]
    if len(turns) <= KEEP_TURNS:
        return turns[0] if turns else len(path)
    return turns[-KEEP_TURNS]


def latest_user(path: Sequence[Message]) -> Message | None:
    """The latest user message after the task (the host's latest word), if there is one."""
    task = task_index(path)
    for message in reversed(path[task + 1 :]):
        if message.role == "user" and not message.side and compaction_of(message) is None:
            return message
    return None


def task_index(path: Sequence[Message]) -> int:
    return next((i for i, m in enumerate(path) if m.role == "user"), 0)


def plan_elision(path: Sequence[Message], fits: Callable[[list[int]], bool]) -> Plan | None:
    """Stage 1: elide old tool results, oldest first, until ``fits(elided)``; None when there is none to elide."""
    view = View.of(path)
    keep_from = protected_from(path)
    candidates = [
        m.sequence
        for m in path[:keep_from]
        if m.role == "tool" and m.sequence not in view.elided and len(m.content or "") > 200
        and not (view.covers and view.covers[0] <= m.sequence <= view.covers[1])
    ]  # fmt: skip
    if not candidates:
        return None
    chosen: list[int] = []
    for sequence in candidates:
        chosen.append(sequence)
        if fits(chosen):
            break
    return Plan(elided=chosen)


def plan_summary(path: Sequence[Message]) -> Plan | None:
    """Stage 2: the turns between the task and the protected latest ones; None when nothing is there."""
    start = task_index(path) + 1
    end = protected_from(path) - 1
    body = [m for m in path[start : end + 1] if compaction_of(m) is None]
    if not body:
        return None
    view = View.of(path)
    first = view.covers[0] if view.covers else body[0].sequence
    if view.covers and body[-1].sequence <= view.covers[1]:
        return None  # already summarised up to here: nothing new to fold in
    return Plan(elided=[], covers=(first, body[-1].sequence))


def summary_request(
    path: Sequence[Message],
    plan: Plan,
    room: int,
    ratio: float,
    convert: Callable[[Message], dict[str, Any]] = Message.to_openai,
) -> list[dict[str, Any]]:
    """What the trace's model is asked to summarise: the path up to the covered range's end, with the
    results themselves rather than their elision stubs (an earlier summary stands for what it covers), cut
    to ``room`` tokens if need be."""
    assert plan.covers is not None
    upto = [
        m
        for m in path
        if (m.sequence <= plan.covers[1] and compaction_of(m) is None)
        or (compaction_of(m) or {}).get("covers")
    ]
    wire = build_context(upto, convert=convert, clamp_to=room - 200, tokens_per_char=ratio)
    return [*wire, {"role": "user", "content": SUMMARY_PROMPT}]


def record(plan: Plan, *, trace_id: str, saved: int, summary: str | None = None) -> NewMessage:
    """The stored compaction message for a plan."""
    meta: dict[str, Any] = {"stage": 2 if plan.covers else 1, "elided": plan.elided, "tokens_saved": saved}
    if plan.covers:
        meta["covers"] = list(plan.covers)
        content = summary or ""
    else:
        listed = ", ".join(str(s) for s in plan.elided[:20]) + (" …" if len(plan.elided) > 20 else "")
        content = (
            f"[Context compaction: the results of tool messages {listed} are elided from the model's view; "
            f"each is kept whole at {message_uri(trace_id, plan.elided[0])} and alike.]"
        )
    return NewMessage(role="system", content=content, meta={"compaction": meta})
