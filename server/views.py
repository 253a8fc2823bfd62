"""What a host reads about a trace: compact rows, the ≤ 4 KB summary, and paged message views.

Every answer here is sized for a model's context window first: long texts are cut with a marker naming
``trace://{id}/messages/{seq}``, the resource that returns one message whole, so nothing is lost and
nothing floods a host.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agent import defaults
from agent.tools.ask import ASK_HOST, MAX_QUESTION_CHARS
from agent.trace.compaction import compaction_of
from agent.trace.models import Message, Outcome, ToolCall, Trace, message_uri

SUMMARY_BYTES = 4000
"""The most a default get_trace answer may weigh, whatever the trace's length (issue target: ≤ 4 KB)."""
MESSAGES_VIEW_CHARS = 40_000
"""The most one ``view=messages`` page weighs, in characters of its JSON (≈10k tokens): under Claude Code's
25k-token cap and its 50,000-character spill to a file."""
ANSWER_BYTES = 900_000
"""``view=full`` pages and trace resources stay under the 1 MiB message limit of common clients (counted in
UTF-8 bytes on the wire: see wire_size)."""
PAGE_FIELDS_CHARS = 400
"""What a page carries besides its trace and messages (last_sequence, next_after_sequence, next)."""
ANSWER_CHARS = 1500
ROW_ANSWER_CHARS = 1000
ROW_RESULT_CHARS = 8000
"""A typed result is what a program came for: a row carries up to this much of its JSON whole."""
ROWS_BYTES = 24_000
"""The most the rows of one await_traces or list_running answer weigh (≈6k tokens) however many traces
there are; traces past it are named by id only."""
MIN_ROW_ANSWER_CHARS = 200
QUESTION_CHARS = 800
LAST_TEXT_CHARS = 400
RECENT_LINES = 5
LINE_CHARS = 160
TAIL_MESSAGES = 40
"""How far back the summary looks for the latest assistant text (a cheap walk from the head)."""


def cut(text: str | None, limit: int, trace_id: str, sequence: int) -> str | None:
    """``text`` whole if it fits, else its start and a marker saying where the rest is."""
    if text is None or len(text) <= limit:
        return text
    return (
        f"{text[:limit]}… [cut: {len(text):,} characters in all; read {message_uri(trace_id, sequence)} "
        "for the whole message]"
    )


def elide(value: Any, limit: int = 60) -> str:
    """A value for an error sentence: its repr, shortened with its length when long."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    return f"{text[:limit]!r}… ({len(text):,} characters)"


def one_line(message: Message, names: dict[str, str] | None = None, limit: int = LINE_CHARS) -> str:
    """A short line for a message: progress notes, ``recent`` and ``last_action``."""
    names = names if names is not None else {}
    record = compaction_of(message)
    if record is not None:
        saved = f" (~{int(record.get('tokens_saved', 0)):,} tokens saved)"
        if record.get("covers"):
            first, last = record["covers"]
            return f"compacted the context: summarised messages {first}–{last}{saved}"
        return f"compacted the context: {len(record.get('elided', []))} old tool results elided{saved}"
    if message.role == "assistant" and message.tool_calls:
        calls = []
        for call in message.tool_calls:
            names[call.id] = call.function.name
            args = call.function.arguments or "{}"
            calls.append(f"{call.function.name}({_flat(args, 60) if args != '{}' else ''})")
        line = "assistant called " + ", ".join(calls)
    else:
        text = _flat(message.content or "", limit)
        if message.role == "tool":
            size = len(message.content or "")
            line = f"{names.get(message.tool_call_id or '', 'tool')} returned {size:,} chars: {text}"
        elif message.role == "assistant":
            line = f"assistant answered: {text}"
        else:
            line = f"{message.role}: {text}"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _flat(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def compact_row(trace: Trace) -> dict[str, Any]:
    """A trace as listings show it: no config, no lesson texts, no messages."""
    row: dict[str, Any] = {
        "trace_id": trace.trace_id,
        "name": _flat(trace.name, 120) if trace.name else None,
        "tags": trace.tags,
        "status": trace.status.value,
        "outcome": trace.outcome.value,
        "stop_reason": trace.stop_reason.value if trace.stop_reason else None,
        "model": trace.model,
        "steps": trace.usage.llm_calls,
        "usage": trace.usage.model_dump(),
        "created_at": trace.created_at,
        "updated_at": trace.updated_at,
    }
    if trace.error:
        row["error"] = trace.error
    if trace.forked_from is not None:
        row["forked_from"] = trace.forked_from.model_dump()
    return row


def tight_row(trace: Trace) -> dict[str, Any]:
    """The compact row with its free texts short (the summary's last resort: it must fit in 4 KB)."""
    row = compact_row(trace)
    row["name"] = _flat(trace.name, 40) if trace.name else None
    row["tags"] = [_flat(t, 40) for t in trace.tags]
    row["model"] = _flat(trace.model, 60)
    if trace.error:
        row["error"] = _flat(trace.error, 200)
    return row


def answer_of(trace: Trace, tail: Sequence[Message]) -> Message | None:
    """The final assistant message, only when the trace ended its turn with an answer."""
    if trace.outcome is not Outcome.ANSWERED or not tail:
        return None
    last = tail[-1]
    return last if last.role == "assistant" and last.content else None


def row_with_answer(
    trace: Trace,
    tail: Sequence[Message],
    answer_chars: int = ROW_ANSWER_CHARS,
    result_chars: int = ROW_RESULT_CHARS,
) -> dict[str, Any]:
    """A compact row plus what the caller came for: the answer, the typed result and the question, each
    null when there is none (as in the summary). A result too long for the row is left out (null: the
    answer's ``next`` says where it is, see result_left_out); the answer, its JSON text, is cut with its
    marker. ``tail`` ends the active path (a waiting trace's should reach back to the message that asks,
    for a long question's marker)."""
    row = compact_row(trace)
    answer = answer_of(trace, tail)
    row["answer"] = cut(answer.content, answer_chars, trace.trace_id, answer.sequence) if answer else None
    has_schema = trace.config.output_schema is not None
    row["result"] = _bounded_result(trace, max(answer_chars, result_chars)) if has_schema else None
    row["question"] = question_shown(trace, tail, QUESTION_CHARS)
    return row


class RowBudget:
    """The rows of one listing answer (list_traces, list_running, await_traces): ROWS_BYTES at most however
    many traces there are. Rows go in while they fit, the first always; after the first that does not,
    none does (the rest are paged or named by id)."""

    def __init__(self, limit: int = ROWS_BYTES) -> None:
        self.limit, self.used, self.full = limit, 0, False

    def take(self, row: dict[str, Any]) -> bool:
        """Whether ``row`` goes in (and is counted)."""
        weight = size_of(row)
        if self.full or (self.used and self.used + weight > self.limit):
            self.full = True
            return False
        self.used += weight
        return True


def row_answer_chars(finished: int) -> int:
    """How much of each answer await_traces shows when ``finished`` traces share its answer."""
    return max(MIN_ROW_ANSWER_CHARS, min(ROW_ANSWER_CHARS, ROWS_BYTES // (2 * max(1, finished))))


def row_result_chars(finished: int) -> int:
    """How much of each typed result's JSON await_traces shows whole when ``finished`` traces share it."""
    return max(MIN_ROW_ANSWER_CHARS, min(ROW_RESULT_CHARS, ROWS_BYTES // (2 * max(1, finished))))


def shorten(text: str, limit: int) -> str:
    """``text`` cut at a word to about ``limit`` characters with an ellipsis."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + "…"


def open_calls(tail: Sequence[Message]) -> tuple[Message | None, list[ToolCall]]:
    """The last assistant message with tool calls and those of its calls that have no result yet."""
    answered: set[str] = set()
    for message in reversed(tail):
        if message.role == "tool":
            answered.add(message.tool_call_id or "")
            continue
        if message.role == "assistant" and message.tool_calls:
            return message, [c for c in message.tool_calls if c.id not in answered]
        break
    return None, []


def question_shown(trace: Trace, tail: Sequence[Message], limit: int) -> str | None:
    """The pending question, cut at ``limit`` with a marker naming the message whose calls ask it whole."""
    question = trace.question
    if not question or len(question) <= limit:
        return question
    asking, _ = open_calls(tail)
    where = message_uri(trace.trace_id, asking.sequence) if asking else f"trace://{trace.trace_id}"
    size = (  # the stored question is itself capped: the call's arguments hold the rest
        f"more than {MAX_QUESTION_CHARS:,} characters"
        if len(question) > MAX_QUESTION_CHARS
        else f"{len(question):,} characters in all"
    )
    return f"{question[:limit]}… [cut: {size}; read {where} for the whole call]"


def _bounded_result(trace: Trace, limit: int) -> Any:
    if trace.result is None:
        return None
    if len(json.dumps(trace.result, ensure_ascii=False)) <= limit:
        return trace.result
    return None


def suggested_wait(max_wait: float = defaults.MAX_WAIT_SECONDS) -> int | float:
    """The wait_seconds a text suggests: never above --max-wait, nor the default's 45 s (a whole number of
    seconds, unless --max-wait is under one)."""
    wait = min(defaults.SUGGESTED_WAIT_SECONDS, max_wait)
    return int(wait) if wait >= 1 else wait


def next_step(
    trace: Trace,
    last_sequence: int | None,
    max_wait: float = defaults.MAX_WAIT_SECONDS,
    waiting: Sequence[ToolCall] = (),
) -> str:
    """The one call a host should make next, in words (waits suggested stay within --max-wait and 45 s).
    ``waiting``: the calls a paused trace waits on, to name the reply they need."""
    wait = suggested_wait(max_wait)
    tid = trace.trace_id
    outcome = trace.outcome
    if outcome is Outcome.RUNNING:
        after = f", after_sequence={last_sequence}" if last_sequence else ""
        return (
            f"Still running. Call get_trace(trace_id='{tid}', wait_seconds={wait}{after}) to wait for it, "
            "or await_traces for several traces at once."
        )
    if outcome is Outcome.NEEDS_INPUT:
        asks = any(c.function.name == ASK_HOST for c in waiting)
        approvals = any(c.function.name != ASK_HOST for c in waiting)
        reply = f"run_trace(trace_id='{tid}'"
        if approvals and not asks:
            return (
                f"Waiting for your approval. Reply with {reply}, approve=true) to run the call, or approve=false "
                "with answer='why' to decline it."
            )
        if approvals:
            return (
                f"Waiting for you. Reply with {reply}, answer='...', approve=true) to answer and run the call "
                "that waits too (approve=false with answer='why' declines the call)."
            )
        if asks:
            return f"Waiting for you. Reply with {reply}, answer='...')."
        return (
            f"Waiting for you. Reply with {reply}, answer='...'); for a tool approval pass "
            "approve=true or approve=false (with answer as the reason)."
        )
    if outcome is Outcome.ANSWERED:
        learn = (
            "its lessons (reflect=true) reach get_experiences"
            if trace.config.reflect
            else "reflect_trace learns from it"
        )
        return f"Done. view='messages' shows the steps; run_trace continues it; {learn}."
    if outcome is Outcome.HIT_LIMIT:
        return "It hit a limit before answering; run_trace continues it (you may raise the limit)."
    if outcome is Outcome.FAILED:
        return "It failed (see trace.error); run_trace retries from where it stopped."
    return "It is not running; run_trace continues it."


def still_running(trace: Trace, view: str, last_sequence: int | None, max_wait: float) -> str:
    """The next call for a messages or full page of a trace still running: wait for the steps after it."""
    after = f", after_sequence={last_sequence}" if last_sequence else ""
    return (
        f"Still running. Call get_trace(trace_id='{trace.trace_id}', view='{view}'{after}, "
        f"wait_seconds={suggested_wait(max_wait)}) for the steps that follow."
    )


def summary(
    trace: Trace,
    tail: Sequence[Message],
    last_text: Message | None,
    *,
    note: str | None = None,
    max_wait: float = defaults.MAX_WAIT_SECONDS,
) -> dict[str, Any]:
    """The default get_trace answer: what a host needs to decide its next call, in ≤ SUMMARY_BYTES.

    ``tail`` is the path's last messages; ``last_text`` the latest assistant text, however far back."""
    tid = trace.trace_id
    names: dict[str, str] = {}
    for message in tail:
        one_line(message, names)  # learn the tool names of calls whose results are in the tail
    answer = answer_of(trace, tail)
    last_sequence = tail[-1].sequence if tail else None
    waiting = open_calls(tail)[1] if trace.outcome is Outcome.NEEDS_INPUT else []
    steps = [m for m in tail if m.role != "system" or m.sequence != 1]  # the host wrote the system prompt
    limits = [  # tighter and tighter until it fits (multi-byte text weighs more than its characters)
        (ANSWER_CHARS, LAST_TEXT_CHARS, RECENT_LINES, QUESTION_CHARS, None, False),
        (600, 200, 3, 400, None, False),
        (200, 100, 2, 200, 5, False),
        (100, 60, 1, 100, 1, False),
        (
            60,
            0,
            0,
            60,
            1,
            True,
        ),  # the trace's own long texts too: a name, tags or model of emoji, a long error
    ]
    body: dict[str, Any] = {}
    for answer_chars, last_chars, lines, question_chars, tags, tight in limits:
        row = tight_row(trace) if tight else compact_row(trace)
        if tags is not None and len(row["tags"]) > tags:
            row["tags"] = [*row["tags"][:tags], f"… {len(trace.tags) - tags} more"]
        result = _bounded_result(trace, answer_chars)
        body = {
            "trace": row,
            "answer": cut(answer.content, answer_chars, tid, answer.sequence) if answer else None,
            "result": result,
            "question": question_shown(trace, tail, question_chars),
            "last_text": cut(last_text.content, last_chars, tid, last_text.sequence)
            if last_text and last_chars
            else None,
            "recent": [f"#{m.sequence} {one_line(m, names)}" for m in steps[-lines:]] if lines else [],
            "last_sequence": last_sequence,
            "next": (f"{note} " if note else "")
            + (result_left_out(trace, answer) + " " if result is None and trace.result is not None else "")
            + next_step(trace, last_sequence, max_wait, waiting),
        }
        if size_of(body) <= SUMMARY_BYTES:
            break
    return body


def result_left_out(trace: Trace, answer: Message | None, *, named: bool = False) -> str:
    """The sentence saying where a typed result too long to show is (``named``: which trace's it is)."""
    where = message_uri(trace.trace_id, answer.sequence) if answer else "view='full'"
    size = len(json.dumps(trace.result, ensure_ascii=False))
    whose = f" of {trace.trace_id}" if named else ""
    return f"The result{whose} ({size:,} characters of JSON) is too long to show here: read {where} for it."


def shown_message(
    message: Message, trace_id: str, limit: int | None, *, nulls: bool = False
) -> dict[str, Any]:
    """A message as views show it: its content and each tool call's arguments cut at ``limit`` characters
    (None: whole) with a marker naming the message's own resource; null fields only with ``nulls`` (the
    resources keep every field, as they always have)."""
    item = message.model_dump(mode="json", exclude_none=not nulls)
    if not nulls and not item.get("side"):
        item.pop("side", None)
    if limit is None:
        return item
    content = cut(message.content, limit, trace_id, message.sequence)
    if content is None and not nulls:
        item.pop("content", None)
    else:
        item["content"] = content
    for call in item.get("tool_calls") or []:
        call["function"]["arguments"] = cut(call["function"]["arguments"], limit, trace_id, message.sequence)
    return item


def json_chars(value: Any) -> int:
    """Characters of ``value`` as the compact JSON text a host reads."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def size_of(value: Any) -> int:
    """UTF-8 bytes of ``value`` as compact JSON."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def escaped_size(text: str) -> int:
    """UTF-8 bytes of ``text`` as the JSON string a message carries it in (its quotes escaped)."""
    return len(json.dumps(text, ensure_ascii=False).encode())


def wire_size(value: Any) -> int:
    """UTF-8 bytes ``value`` weighs in a tool result on the wire, what a client's 1 MiB message limit
    counts: once as structured content, and again as the text's JSON string."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return len(text.encode()) + escaped_size(text)


def messages_view(
    trace: Trace, path: Sequence[Message], after: int | None, max_chars: int, *, full: bool = False
) -> dict[str, Any]:
    """Active-path messages after ``after``, each cut at ``max_chars`` (``full``: uncut), a page at a time."""
    shown: list[dict[str, Any]] = []
    head = trace.model_dump(mode="json") if full else compact_row(trace)
    weigh = wire_size if full else json_chars
    budget = (ANSWER_BYTES if full else MESSAGES_VIEW_CHARS) - weigh(head) - PAGE_FIELDS_CHARS
    used = 0
    more_after: int | None = None
    for message in path:
        if after is not None and message.sequence <= after:
            continue
        item = shown_message(message, trace.trace_id, None if full else max_chars)
        weight = weigh(item)
        if shown and used + weight > budget:
            more_after = shown[-1]["sequence"]
            break
        if weight > budget:  # one message bigger than a page: its start, and where the rest is
            limit = budget // (2 + 2 * len(message.tool_calls or []))
            while True:  # multi-byte or escaped text weighs more than its characters: halve until it fits
                item = shown_message(message, trace.trace_id, limit)
                weight = weigh(item)
                if weight <= budget or limit == 0:
                    break
                limit //= 2
        shown.append(item)
        used += weight
    body: dict[str, Any] = {
        "trace": head,
        "messages": shown,
        "last_sequence": path[-1].sequence if path else None,
    }
    if more_after is not None:
        body["next_after_sequence"] = more_after
        body["next"] = f"More messages follow: call again with after_sequence={more_after}."
    return body
