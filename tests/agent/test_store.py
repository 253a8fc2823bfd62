"""The TraceStore contract: tree and path, claims, fenced appends, side branches, stop requests, sweeps
and the change log. Every test runs on each backend in ``store_backends`` (see tests/store_backends.py)."""

from __future__ import annotations

import re
from datetime import datetime

import anyio
import pytest

from agent import defaults
from agent.errors import TraceError, TraceMoved, TraceNotFound, TraceRunning
from agent.trace.models import (
    FunctionCall,
    MessageUsage,
    NewMessage,
    Status,
    StopReason,
    ToolCall,
    Trace,
    TraceConfig,
    TraceUsage,
)
from agent.trace.store import ClaimLost, new_token
from tests.store_backends import open_test_store

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(store_url):
    s = await open_test_store(store_url)
    yield s
    await s.close()


def user(text: str = "hi") -> NewMessage:
    return NewMessage(role="user", content=text)


async def new_trace(store, trace_id="t1", *messages: NewMessage, token: str | None = None, **kw):
    """A trace created claimed by ``token`` (a fresh one by default); returns (trace, token)."""
    token = token or new_token()
    trace, _ = await store.create(Trace(trace_id=trace_id, model="offline", **kw), messages, token)
    return trace, token


async def idle_trace(store, trace_id="t1", *messages: NewMessage, **kw) -> Trace:
    """A trace created and finished: claimable by anyone."""
    _, token = await new_trace(store, trace_id, *messages, **kw)
    return await store.finish(
        trace_id, token, status=Status.COMPLETED, stop_reason=StopReason.END_TURN, error=None
    )


async def test_append_builds_a_tree_and_the_path_follows_the_head(store):
    _, token = await new_trace(store, "t1", NewMessage(role="system", content="sys"), user("hi"))
    a1 = await store.append("t1", NewMessage(role="assistant", content="one"), 2, token=token)
    a2 = await store.append("t1", NewMessage(role="assistant", content="two"), 2, token=token)
    assert [a1.sequence, a2.sequence] == [3, 4]
    trace = await store.get_trace("t1")
    assert trace.head_sequence == 4
    assert [m.content for m in await store.get_path("t1")] == ["sys", "hi", "two"]
    assert [m.content for m in await store.get_path("t1", 3)] == ["sys", "hi", "one"]
    assert [m.sequence for m in await store.get_tree("t1")] == [1, 2, 3, 4]
    assert [m.sequence for m in await store.get_children("t1", 2)] == [3, 4]


async def test_usage_totals_accumulate_with_each_message(store):
    _, token = await new_trace(store, "t1", user("x"))
    usage = MessageUsage(prompt_tokens=7, completion_tokens=3)
    await store.append("t1", NewMessage(role="assistant", content="y", usage=usage), 1, token=token)
    await store.append("t1", NewMessage(role="tool", content="z", tool_call_id="c"), 2, token=token)
    passed_in = NewMessage(role="assistant", content="a caller's history: no model call")
    await store.append("t1", passed_in, 3, token=token)
    trace = await store.get_trace("t1")
    assert trace.usage == TraceUsage(prompt_tokens=7, completion_tokens=3, llm_calls=1, tool_calls=1)
    assert (await store.get_message("t1", 2)).usage.prompt_tokens == 7


async def test_unicode_and_a_megabyte_round_trip(store):
    text = "héllo 🌍 — 漢字\n" + "x" * (1024 * 1024)
    await new_trace(store, "t1", user(text))
    assert (await store.get_message("t1", 1)).content == text


async def test_unknown_trace_is_a_sentence(store):
    with pytest.raises(TraceNotFound, match="no trace 'nope'"):
        await store.get_trace("nope")
    with pytest.raises(TraceNotFound):
        await store.append("nope", user(), None, token="x")
    with pytest.raises(TraceNotFound):
        await store.claim("nope", new_token(), head=None, model="offline", config=TraceConfig())
    with pytest.raises(TraceNotFound):
        await store.request_stop("nope")


async def test_list_traces_newest_first_with_filters_and_cursor(store):
    for i in range(5):
        await idle_trace(
            store, f"t{i}", uid="alice" if i % 2 else "bob", created_at=f"2026-01-0{i + 1}T00:00:00"
        )
    await new_trace(store, "run", created_at="2025-01-01T00:00:00")
    page = await store.list_traces(limit=2)
    assert [t.trace_id for t in page.traces] == ["t4", "t3"]
    page2 = await store.list_traces(limit=2, cursor=page.next_cursor)
    assert [t.trace_id for t in page2.traces] == ["t2", "t1"]
    page3 = await store.list_traces(limit=2, cursor=page2.next_cursor)
    assert [t.trace_id for t in page3.traces] == ["t0", "run"] and page3.next_cursor is None
    assert [t.trace_id for t in (await store.list_traces(uid="alice")).traces] == ["t3", "t1"]
    assert [t.trace_id for t in (await store.list_traces(status="running")).traces] == ["run"]
    assert await store.running_ids() == ["run"]


async def test_bad_cursor_is_a_sentence(store):
    with pytest.raises(TraceError, match="not one this server returned"):
        await store.list_traces(cursor="garbage!")


# -- claims -------------------------------------------------------------------------------------------


async def test_a_claim_is_a_compare_and_set(store):
    _, first = await new_trace(store, "t1", user())
    with pytest.raises(TraceRunning):
        await store.claim("t1", new_token(), head=1, model="offline", config=TraceConfig())
    await store.finish("t1", first, status=Status.COMPLETED, stop_reason=StopReason.END_TURN, error=None)
    second = new_token()
    trace, stored = await store.claim(
        "t1", second, head=1, model="offline", config=TraceConfig(temperature=1.0), messages=[user("more")]
    )
    assert (trace.status, trace.head_sequence, trace.config.temperature) == (Status.RUNNING, 2, 1.0)
    assert [m.sequence for m in stored] == [2]
    # the holder may claim again (a continuation queued behind its reflection); others may not
    again, _ = await store.claim("t1", second, head=2, model="offline", config=TraceConfig())
    assert again.status is Status.RUNNING
    with pytest.raises(TraceRunning):
        await store.claim("t1", new_token(), head=2, model="offline", config=TraceConfig())


async def test_a_claim_for_a_head_another_run_moved_is_refused(store):
    """Two callers read head 1; the first runs and moves it: the second's claim must not branch off 1."""
    _, first = await new_trace(store, "t1", user())
    await store.finish("t1", first, status=Status.COMPLETED, stop_reason=StopReason.END_TURN, error=None)
    winner = new_token()
    await store.claim(
        "t1", winner, head=1, model="offline", config=TraceConfig(), messages=[user("x")], read_head=1
    )
    await store.finish("t1", winner, status=Status.COMPLETED, stop_reason=StopReason.END_TURN, error=None)
    before = (await store.get_trace("t1"), await store.get_tree("t1"))
    with pytest.raises(TraceMoved, match="head is now message 2"):
        await store.claim(
            "t1",
            new_token(),
            head=1,
            model="offline",
            config=TraceConfig(),
            messages=[user("y")],
            read_head=1,
        )
    assert (await store.get_trace("t1"), await store.get_tree("t1")) == before
    trace, _ = await store.claim(
        "t1", new_token(), head=2, model="offline", config=TraceConfig(), read_head=2
    )
    assert trace.status is Status.RUNNING


async def test_a_refused_claim_changes_nothing(store):
    await new_trace(store, "t1", user())
    before = (await store.get_trace("t1"), await store.get_tree("t1"))
    with pytest.raises(TraceRunning):
        await store.claim(
            "t1", new_token(), head=1, model="other", config=TraceConfig(), messages=[user("x")]
        )
    assert (await store.get_trace("t1"), await store.get_tree("t1")) == before


async def test_writes_need_the_claims_token(store):
    await new_trace(store, "t1", user())
    with pytest.raises(ClaimLost):
        await store.append("t1", NewMessage(role="assistant", content="x"), 1, token="stale")
    with pytest.raises(ClaimLost):
        await store.finish("t1", "stale", status=Status.FAILED, stop_reason=StopReason.ERROR, error="x")
    assert await store.release("t1", "stale") is None
    assert (await store.get_trace("t1")).status is Status.RUNNING
    assert len(await store.get_tree("t1")) == 1


async def test_an_unclaimed_trace_takes_no_main_path_message(store):
    before = await idle_trace(store, "t1", user())
    with pytest.raises(ClaimLost):  # no token is no claim: NULL matches no run
        await store.append("t1", NewMessage(role="assistant", content="x"), 1, token=None)
    assert (await store.get_trace("t1")).head_sequence == before.head_sequence
    assert len(await store.get_tree("t1")) == 1


async def test_side_branch_messages_never_move_the_head(store):
    trace = await idle_trace(store, "t1", user("q"), NewMessage(role="assistant", content="a"))
    question = await store.append("t1", user("reflect"), 2, token=None, side=True)
    answer = await store.append(
        "t1", NewMessage(role="assistant", content="- lesson"), question.sequence, token=None, side=True
    )
    after = await store.get_trace("t1")
    assert after.head_sequence == trace.head_sequence == 2
    assert (after.status, after.stop_reason) == (Status.COMPLETED, StopReason.END_TURN)
    assert [m.sequence for m in await store.get_path("t1")] == [1, 2]
    tree = await store.get_tree("t1")
    assert [m.side for m in tree] == [False, False, True, True] and answer.side


async def test_finish_can_keep_the_claim_until_release(store):
    _, token = await new_trace(store, "t1", user())
    done = await store.finish(
        "t1", token, status=Status.COMPLETED, stop_reason=StopReason.END_TURN, error=None, release=False
    )
    assert done.status is Status.COMPLETED
    with pytest.raises(TraceRunning):  # held: a reflection runs inside the claim
        await store.claim("t1", new_token(), head=1, model="offline", config=TraceConfig())
    assert await store.reflecting_ids() == ["t1"]  # its lessons are on the way
    assert await store.release("t1", token) is not None
    assert await store.reflecting_ids() == []
    trace, _ = await store.claim("t1", new_token(), head=1, model="offline", config=TraceConfig())
    assert trace.status is Status.RUNNING
    assert await store.reflecting_ids() == []  # running is not reflecting


async def test_stop_requests_are_stored_for_the_owner(store):
    await new_trace(store, "t1", user())
    await idle_trace(store, "t2", user())
    assert await store.request_stop("t1") is True
    assert await store.request_stop("t2") is False
    cursor = 0
    kinds = [(c.kind, c.trace_id) for c in await store.changes_after(cursor)]
    assert ("stop", "t1") in kinds
    assert await store.stops_requested() == ["t1"]  # the owner's backstop reads the same request


async def test_renew_returns_the_claims_this_process_holds(store):
    _, token = await new_trace(store, "t1", user())
    await idle_trace(store, "t2", user())
    assert await store.renew() == {"t1": token}


async def test_a_lapsed_lease_is_swept_and_the_trace_reads_interrupted(store_url):
    store = await open_test_store(store_url, lease_seconds=0.0)
    try:
        _, token = await new_trace(store, "t1", user())
        assert await store.sweep() == ["t1"]
        trace = await store.get_trace("t1")
        assert (trace.status, trace.stop_reason) == (Status.INTERRUPTED, StopReason.INTERRUPTED)
        with pytest.raises(ClaimLost):  # the old owner can no longer write
            await store.append("t1", user(), 1, token=token)
        claimed, _ = await store.claim("t1", new_token(), head=1, model="offline", config=TraceConfig())
        assert claimed.status is Status.RUNNING  # and anyone may resume it
    finally:
        await store.close()


async def test_a_stop_asked_for_before_the_owner_died_is_honoured_by_the_sweep(store_url):
    store = await open_test_store(store_url, lease_seconds=0.0)
    try:
        await new_trace(store, "t1", user())
        await new_trace(store, "t2", user())
        assert await store.request_stop("t1") is True  # its owner never acted on it
        assert sorted(await store.sweep()) == ["t1", "t2"]
        stopped, interrupted = await store.get_trace("t1"), await store.get_trace("t2")
        assert (stopped.status, stopped.stop_reason) == (Status.STOPPED, StopReason.STOPPED)
        assert (interrupted.status, interrupted.stop_reason) == (Status.INTERRUPTED, StopReason.INTERRUPTED)
    finally:
        await store.close()


async def test_renewing_keeps_a_lease_past_its_first_term(store_url):
    """A 2 s lease renewed at 1.2 s has not lapsed at 2.4 s (its first term is over); left alone, it lapses."""
    store = await open_test_store(store_url, lease_seconds=2.0)
    try:
        await new_trace(store, "t1", user())
        await anyio.sleep(1.2)
        await store.renew()
        await anyio.sleep(1.2)
        assert await store.sweep() == []
        with anyio.fail_after(10):
            while not (swept := await store.sweep()):
                await anyio.sleep(0.1)
        assert swept == ["t1"]
    finally:
        await store.close()


async def test_a_closed_stores_claims_are_orphans_for_the_next_one(store_url):
    first = await open_test_store(store_url)
    await new_trace(first, "live", user())
    second = await open_test_store(store_url)  # another process on the same database
    try:
        assert (await second.get_trace("live")).status is Status.RUNNING
        await second.sweep()
        assert (await second.get_trace("live")).status is Status.RUNNING  # its owner is alive
        await first.close()  # the owner is gone: its runs are orphans now
        assert await second.sweep() == ["live"]
        assert (await second.get_trace("live")).status is Status.INTERRUPTED
    finally:
        await second.close()


# -- the change log -------------------------------------------------------------------------------------


async def test_every_change_is_logged_with_the_token_that_made_it(store):
    start = await store.last_change_id()
    _, token = await new_trace(store, "t1", user())
    await store.append("t1", NewMessage(role="assistant", content="a"), 1, token=token)
    await store.finish("t1", token, status=Status.COMPLETED, stop_reason=StopReason.END_TURN, error=None)
    await store.append("t1", user("side"), 2, token=None, side=True)
    await store.note_change("experiences")
    changes = await store.changes_after(start)
    assert [(c.kind, c.sequence) for c in changes] == [
        ("created", None), ("message", 1), ("message", 2), ("trace", None), ("message", 3), ("experiences", None),
    ]  # fmt: skip
    assert [c.token for c in changes[:4]] == [token] * 4
    assert changes[1].message.content == "hi" and changes[3].trace.status is Status.COMPLETED
    assert await store.changes_after(changes[-1].id) == []
    assert await store.changes_after(start, limit=2) == changes[:2]


# -- steering fields, tails, deletion and retention --------------------------------------------------------


async def test_tags_fork_question_and_result_round_trip(store):
    from agent.trace.models import ForkPoint

    await new_trace(
        store, "t1", user(), tags=["batch-7", "eval"], forked_from=ForkPoint(trace_id="t0", sequence=4)
    )
    _, token = await new_trace(store, "t2", user(), tags=["eval"])
    paused = await store.finish(
        "t2",
        token,
        status=Status.NEEDS_INPUT,
        stop_reason=StopReason.NEEDS_INPUT,
        error=None,
        question="Which file?",
    )
    assert (paused.question, paused.outcome.value) == ("Which file?", "needs_input")
    assert [t.trace_id for t in (await store.list_traces(tag="eval")).traces] == ["t2", "t1"]
    assert [t.trace_id for t in (await store.list_traces(tag="batch-7")).traces] == ["t1"]
    one = await store.get_trace("t1")
    assert one.tags == ["batch-7", "eval"] and one.forked_from == ForkPoint(trace_id="t0", sequence=4)
    claimed, _ = await store.claim("t2", new_token(), head=1, model="offline", config=TraceConfig())
    assert claimed.question is None and claimed.started_at is not None
    done = await store.finish(
        "t2", (await store.renew())["t2"], status=Status.COMPLETED, stop_reason=StopReason.END_TURN,
        error=None, result={"files": 3},
    )  # fmt: skip
    assert done.result == {"files": 3} and (await store.get_trace("t2")).result == {"files": 3}


async def test_compaction_records_round_trip_and_add_to_the_totals(store):
    _, token = await new_trace(store, "t1", user())
    record = {"compaction": {"kind": "summary", "tokens_saved": 1200, "covers": [2, 9]}}
    stored = await store.append("t1", NewMessage(role="user", content="summary", meta=record), 1, token=token)
    await store.append(
        "t1", NewMessage(role="user", content="no saving", meta={"compaction": {}}), 2, token=token
    )
    await store.append("t1", NewMessage(role="user", content="other", meta={"note": 1}), 3, token=token)
    assert stored.meta == record and (await store.get_message("t1", 2)).meta == record
    assert (await store.get_message("t1", 1)).meta is None
    usage = (await store.get_trace("t1")).usage
    assert (usage.compactions, usage.tokens_saved) == (2, 1200)


async def test_tags_filter_pages_with_the_cursor(store):
    for n in range(5):
        await idle_trace(store, f"t{n}", user(), tags=["even" if n % 2 == 0 else "odd", "all"])
    first = await store.list_traces(tag="even", limit=2)
    assert [t.trace_id for t in first.traces] == ["t4", "t2"] and first.next_cursor
    rest = await store.list_traces(tag="even", limit=2, cursor=first.next_cursor)
    assert [t.trace_id for t in rest.traces] == ["t0"] and rest.next_cursor is None
    assert (await store.list_traces(tag="missing")).traces == []
    assert [t.trace_id for t in (await store.list_traces(tag="odd", status="completed")).traces] == [
        "t3",
        "t1",
    ]


async def test_the_tail_of_the_path_costs_its_length(store):
    await new_trace(store, "t1", *[user(str(i)) for i in range(10)])
    await store.append("t1", user("side"), 3, token=None, side=True)
    assert [m.content for m in await store.get_tail("t1", 3)] == ["7", "8", "9"]
    assert len(await store.get_tail("t1", 50)) == 10
    assert await store.get_tail("t1", 0) == []


async def test_delete_refuses_a_claimed_trace_and_removes_an_idle_one(store):
    await new_trace(store, "busy", user())
    await idle_trace(store, "idle", user(), NewMessage(role="assistant", content="a"))
    assert await store.delete("busy") is False
    assert (await store.get_trace("busy")).status is Status.RUNNING
    start = await store.last_change_id()
    assert await store.delete("idle") is True
    with pytest.raises(TraceNotFound):
        await store.get_trace("idle")
    assert await store.get_tree("idle") == []
    assert [c.kind for c in await store.changes_after(start)] == ["deleted"]
    with pytest.raises(TraceNotFound):
        await store.delete("idle")


async def test_prune_deletes_only_finished_traces_older_than_the_cut(store):
    await idle_trace(store, "done", user())
    await new_trace(store, "running", user())
    _, token = await new_trace(store, "asking", user())
    await store.finish(
        "asking", token, status=Status.NEEDS_INPUT, stop_reason=StopReason.NEEDS_INPUT, error=None
    )
    assert await store.prune("2000-01-01T00:00:00") == 0  # nothing finished that long ago
    assert await store.prune("2999-01-01T00:00:00") == 1  # a question waits for its answer however long
    assert sorted(t.trace_id for t in (await store.list_traces(limit=10)).traces) == ["asking", "running"]
    assert await store.get_tree("done") == []


async def test_prune_goes_on_batch_after_batch(store, monkeypatch):
    monkeypatch.setattr(defaults, "PRUNE_TRACES_BATCH", 2)
    for n in range(5):
        await idle_trace(store, f"done{n}", user())
    assert await store.prune("2999-01-01T00:00:00") == 5
    assert (await store.list_traces(limit=10)).traces == []


async def test_run_handles_keep_their_final_view_and_go_with_their_trace(store):
    await idle_trace(store, "t1", user())
    first = await store.add_handle("t1", "t1")
    assert (first.handle_id, first.trace_id, first.final) == ("t1", "t1", None)
    assert await store.add_handle("t1", "t1") == first  # recorded once
    later = await store.add_handle("t1.run.ab", "t1")
    held = await store.add_handle("t1.reflection.9", "t1", held=True)
    assert held.held_by == store.owner and later.held_by is None
    assert (await store.open_handle("t1")) == later  # the newest run handle that has not ended
    await store.end_handle("t1.run.ab", {"status": "completed", "text": "é\u0000"})
    await store.end_handle("t1.run.ab", {"status": "working"})  # an ended handle stays ended
    ended = await store.get_handle("t1.run.ab")
    assert ended is not None and ended.final == {"status": "completed", "text": "é\u0000"}
    assert (await store.open_handle("t1")) == first
    await store.end_handle("t1", {"status": "cancelled"})
    assert await store.open_handle("t1") is None and await store.get_handle("nope") is None
    with pytest.raises(TraceNotFound):
        await store.add_handle("x", "no-such-trace")
    assert await store.delete("t1") is True
    assert await store.get_handle("t1") is None and await store.get_handle("t1.run.ab") is None
    await idle_trace(store, "t2", user())
    await store.add_handle("t2", "t2")
    assert await store.prune("2999-01-01T00:00:00") == 1
    assert await store.get_handle("t2") is None


async def test_another_stores_commit_wakes_wait_for_changes(store_url):
    """The wake-up other processes' changes ride on: a commit elsewhere ends the wait long before its
    timeout (a data_version poll on SQLite, a NOTIFY on PostgreSQL)."""
    waiter = await open_test_store(store_url)
    writer = await open_test_store(store_url)
    try:
        cursor = await waiter.last_change_id()
        await waiter.wait_for_changes(0)  # sets its baseline (SQLite) or starts listening (PostgreSQL)
        await writer.note_change("experiences")
        with anyio.fail_after(20):
            await waiter.wait_for_changes(120)
        assert [c.kind for c in await waiter.changes_after(cursor)] == ["experiences"]
    finally:
        await writer.close()
        await waiter.close()


# -- what both backends must store exactly --------------------------------------------------------------


async def test_a_nul_character_round_trips_in_content_and_tool_arguments(store):
    """Tool output may hold U+0000 (PostgreSQL text cannot: content is stored as JSON there)."""
    text = "before\x00after \\u0000 literal"
    call = ToolCall(id="c1", function=FunctionCall(name="read_file", arguments='{"path": "a\\u0000b"}'))
    _, token = await new_trace(store, "t1", user(text))
    await store.append("t1", NewMessage(role="assistant", content=None, tool_calls=[call]), 1, token=token)
    first, second = await store.get_path("t1")
    assert first.content == text
    assert second.content is None and second.tool_calls == [call]


async def test_message_times_are_iso_utc_text_to_the_microsecond(store):
    """Cursors and ordering compare these as text, so both backends write the same shape."""
    trace, token = await new_trace(store, "t1", user())
    message = await store.append("t1", NewMessage(role="assistant", content="a"), 1, token=token)
    stored = await store.get_message("t1", 2)
    shape = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00"
    assert re.fullmatch(shape, stored.created_at) and stored.created_at == message.created_at
    after = await store.get_trace("t1")
    assert re.fullmatch(shape, after.updated_at) and after.updated_at >= trace.updated_at
    assert datetime.fromisoformat(stored.created_at).tzinfo is not None


async def test_concurrent_appends_to_one_trace_get_distinct_sequences(store):
    """Side-branch writes (unfenced) racing the run's own: each takes the next sequence, none is lost."""
    _, token = await new_trace(store, "t1", user())
    results: list[int] = []

    async def side(i: int) -> None:
        results.append((await store.append("t1", user(f"s{i}"), 1, token=None, side=True)).sequence)

    async def main(i: int) -> None:
        results.append((await store.append("t1", user(f"m{i}"), 1, token=token)).sequence)

    async with anyio.create_task_group() as group:
        for i in range(10):
            group.start_soon(side, i)
            group.start_soon(main, i)
    assert sorted(results) == list(range(2, 22))
    tree = await store.get_tree("t1")
    assert [m.sequence for m in tree] == list(range(1, 22))
    head = (await store.get_trace("t1")).head_sequence
    assert head is not None and not next(m for m in tree if m.sequence == head).side


async def test_a_dead_owners_claim_is_taken_over_by_claim_itself(store_url):
    """No sweep needed: a claim held by a process gone from this host is taken at once."""
    first = await open_test_store(store_url)
    await new_trace(first, "t1", user())
    await first.close()  # its owner is gone; the lease has not lapsed
    second = await open_test_store(store_url, lease_seconds=60.0)
    try:
        token = new_token()
        trace, stored = await second.claim(
            "t1", token, head=1, model="offline", config=TraceConfig(), messages=[user("again")]
        )
        assert trace.status is Status.RUNNING and [m.sequence for m in stored] == [2]
        assert await second.renew() == {"t1": token}
    finally:
        await second.close()


async def test_a_finished_run_keeps_its_history_and_reads_back_equal(store):
    """What create, append and finish return is what the reads return, field for field."""
    created, token = await new_trace(store, "t1", user("q"), name="n", uid="u", lessons=["be brief"])
    usage = MessageUsage(prompt_tokens=5, completion_tokens=2)
    answer = await store.append("t1", NewMessage(role="assistant", content="a", usage=usage), 1, token=token)
    done = await store.finish("t1", token, status=Status.FAILED, stop_reason=StopReason.ERROR, error="boom")
    assert done == await store.get_trace("t1")
    assert (done.name, done.uid, done.lessons, done.error) == ("n", "u", ["be brief"], "boom")
    assert answer == await store.get_message("t1", 2)
    assert done.created_at == created.created_at
