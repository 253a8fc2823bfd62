"""The run lifecycle owned by the store: supervised runs, cancel-safe starts, reflection inside the claim,
empty replies, and two runners (as two processes would) sharing one database."""

from __future__ import annotations

import json
import random
from contextlib import AsyncExitStack

import anyio
import pytest

from agent import AgentRunner, EventBus, MessageStored, RunConfig, Status, StopReason, TraceChanged
from agent.core.run import EMPTY_REPLY_ERROR
from agent.errors import TraceRunning
from agent.experiences import Experiences
from agent.llm.base import ModelResponse
from agent.reflection import reflect_on_trace
from agent.tools.registry import ToolRegistry
from agent.trace.backends import open_store
from agent.trace.models import MessageUsage, Trace
from tests.fakes import FuncTool, ScriptedModel, add_tool, call, models_for, reply, slow_tool

pytestmark = pytest.mark.anyio


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def make_runner(store, model, *tools, **kw) -> AgentRunner:
    return AgentRunner(
        store,
        tools=ToolRegistry(tools or [add_tool()]),
        models=models_for(scripted=model),
        default_model="scripted",
        **kw,
    )


def reflecting_runner(store, model, tmp_path) -> tuple[AgentRunner, Experiences]:
    """A runner whose runs with reflect=true reflect on a side branch into tmp_path's experiences file."""
    experiences = Experiences(tmp_path / "experiences.md")
    runner = make_runner(store, model)

    async def reflect(trace, head):
        return (await reflect_on_trace(runner, experiences, trace.trace_id, head=head)).events

    runner.reflector = reflect
    return runner, experiences


@pytest.fixture
async def store(tmp_path):
    s = await open_store(tmp_path / "traces.db")
    yield s
    await s.close()


async def wait_status(store, trace_id: str, *statuses: Status) -> Trace:
    with anyio.fail_after(10):
        while (trace := await store.get_trace(trace_id)).status not in statuses:
            await anyio.sleep(0.01)
    return trace


class RealStore:
    """A real store with one method overridden by a subclass (a fault), everything else passed through."""

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name):
        return getattr(self._store, name)


class FinishFails(RealStore):
    """A real store whose ``finish`` raises for one trace, as a full disk or a long lock would."""

    def __init__(self, store, victim: list[str]):
        super().__init__(store)
        self._victim = victim

    async def finish(self, trace_id, token, **kw):
        if trace_id in self._victim:
            raise OSError(28, "No space left on device")
        return await self._store.finish(trace_id, token, **kw)


async def test_a_failed_write_ends_its_own_run_only_and_the_runner_goes_on(store, caplog):
    victim: list[str] = []
    model = ScriptedModel([reply("done")], delay=0.05)
    runner = make_runner(FinishFails(store, victim), model)
    async with runner:
        doomed = await runner.start([user("a")], RunConfig())
        victim.append(doomed.trace_id)
        healthy = await runner.start([user("b")], RunConfig())
        await wait_status(store, healthy.trace_id, Status.COMPLETED)
        with anyio.fail_after(10):
            await runner.wait(doomed.trace_id)
        assert not runner.is_running(doomed.trace_id)
        # the supervisor caught it: the shared task group still takes new runs
        later = await runner.start([user("c")], RunConfig())
        assert (await wait_status(store, later.trace_id, Status.COMPLETED)).status is Status.COMPLETED
    assert "failed outside its loop" in caplog.text or "could not record the failure" in caplog.text


async def test_a_cancelled_start_never_leaves_a_ghost(store):
    """300 starts cancelled 0-3 ms in: each trace is either never stored or really runs to its end."""
    model = ScriptedModel([reply("ok")])
    runner = make_runner(store, model)
    rng = random.Random(6)
    async with runner:
        for _ in range(300):
            with anyio.move_on_after(rng.uniform(0, 0.003)):
                await runner.start([user("x")], RunConfig())
        with anyio.fail_after(20):
            while runner.running():
                await anyio.sleep(0.01)
    page = await store.list_traces(limit=500)
    assert page.traces, "some starts got through"
    assert {t.status for t in page.traces} == {Status.COMPLETED}
    assert await store.running_ids() == []


async def test_an_empty_reply_is_asked_again_once_then_fails_with_a_sentence(store):
    empty = ModelResponse(content=None)
    runner = make_runner(store, ScriptedModel([empty, reply("second try")]))
    result = await runner.run_result([user("x")], RunConfig())
    assert result.answer == "second try" and result.trace.status is Status.COMPLETED
    assert [m.role for m in await store.get_path(result.trace.trace_id)] == ["system", "user", "assistant"]

    model = ScriptedModel([empty])
    result = await make_runner(store, model).run_result([user("x")], RunConfig())
    assert (result.trace.status, result.trace.error) == (Status.FAILED, EMPTY_REPLY_ERROR)
    assert len(model.calls) == 2
    assert [m.role for m in await store.get_path(result.trace.trace_id)] == ["system", "user"]


async def test_reflection_happens_inside_the_claim_and_a_continuation_waits_behind_it(store, tmp_path):
    """The host sees the answer at once; a continuation asked for meanwhile is accepted and runs after the
    reflection, which is neither refused nor lost."""
    reflecting = anyio.Event()
    release = anyio.Event()
    order: list[str] = []

    async def model_step(messages, tools):
        return reply("ok")

    class Model(ScriptedModel):
        async def complete(self, messages, tools, **kw):
            if kw.get("tool_choice") == "none":  # the reflection's side branch
                order.append("reflection")
                reflecting.set()
                await release.wait()
                return reply("- Reflect before you continue.")
            order.append(messages[-1]["content"])
            return reply(f"answer to {messages[-1]['content']}")

    runner, experiences = reflecting_runner(store, Model([]), tmp_path)
    try:
        async with runner:
            trace = await runner.start([user("first")], RunConfig(reflect=True))
            with anyio.fail_after(10):
                await reflecting.wait()
            done = await store.get_trace(trace.trace_id)
            assert done.status is Status.COMPLETED  # the answer is visible while the reflection runs
            again = await runner.start([user("second")], RunConfig(trace_id=trace.trace_id))
            assert again.status is Status.RUNNING  # accepted, not "already running"
            with pytest.raises(TraceRunning):  # but only one continuation may queue
                await runner.start([user("third")], RunConfig(trace_id=trace.trace_id))
            release.set()
            with anyio.fail_after(10):
                await runner.wait(trace.trace_id)
        final = await store.get_trace(trace.trace_id)
        assert final.status is Status.COMPLETED
        assert order == ["first", "reflection", "second", "reflection"]  # each run of the trace reflects
        assert [m.content for m in await store.get_path(trace.trace_id)][-1] == "answer to second"
        assert "Reflect before you continue." in await experiences.read_text()
    finally:
        experiences.close()


async def two_stores(stack: AsyncExitStack, path) -> tuple:
    """Two stores on one database file, as two server processes have: closed when ``stack`` closes."""
    stores = []
    for _ in range(2):
        store = await open_store(path)
        stack.push_async_callback(store.close)
        stores.append(store)
    return tuple(stores)


async def test_a_stop_the_change_feed_missed_is_found_when_the_lease_is_renewed(tmp_path, monkeypatch):
    """The feed is the quick path for another process's stop; renewing the lease is the backstop."""
    from agent import defaults
    from agent.trace.feed import ChangeFeed

    dispatch = ChangeFeed._dispatch
    monkeypatch.setattr(
        ChangeFeed, "_dispatch", lambda self, c: None if c.kind == "stop" else dispatch(self, c)
    )
    monkeypatch.setattr(defaults, "LEASE_RENEW_SECONDS", 0.1)
    path = tmp_path / "traces.db"
    started = anyio.Event()
    async with AsyncExitStack() as stack:
        store_a, store_b = await two_stores(stack, path)
        model = ScriptedModel([reply(None, call("slow", "s1"))])
        a = await stack.enter_async_context(make_runner(store_a, model, slow_tool(started)))
        trace = await a.start([user("go")], RunConfig())
        with anyio.fail_after(5):
            await started.wait()
        assert await store_b.request_stop(trace.trace_id)
        with anyio.fail_after(5):
            final = await wait_status(store_b, trace.trace_id, Status.STOPPED)
        assert final.stop_reason is StopReason.STOPPED and await store_a.stops_requested() == []


async def test_two_runners_on_one_database_share_claims_stops_and_events(tmp_path):
    """Two stores on one file behave like two server processes: one run at a time, stop from either,
    and each hears the other's messages through the change feed."""
    path = tmp_path / "traces.db"
    started = anyio.Event()
    async with AsyncExitStack() as stack:
        store_a, store_b = await two_stores(stack, path)
        model = ScriptedModel([reply(None, call("slow", "s1"))])
        bus_b = EventBus()
        a = await stack.enter_async_context(make_runner(store_a, model, slow_tool(started)))
        b = await stack.enter_async_context(make_runner(store_b, model, slow_tool(), events=bus_b))
        async with bus_b.subscribe() as heard:
            trace = await a.start([user("go")], RunConfig())
            with anyio.fail_after(5):
                await started.wait()
            with pytest.raises(TraceRunning):  # B may not run what A runs
                await b.start([user("me too")], RunConfig(trace_id=trace.trace_id))
            assert await store_b.running_ids() == [trace.trace_id]
            with anyio.fail_after(5):  # B hears A's messages
                async for event in heard:
                    if isinstance(event, MessageStored) and event.message.role == "assistant":
                        assert event.trace_id == trace.trace_id
                        break
            assert await store_b.request_stop(trace.trace_id)  # stop from B reaches A's run
            with anyio.fail_after(5):
                async for event in heard:
                    if isinstance(event, TraceChanged) and event.trace.status is not Status.RUNNING:
                        break
        final = await store_a.get_trace(trace.trace_id)
        assert (final.status, final.stop_reason) == (Status.STOPPED, StopReason.STOPPED)
        path_messages = await store_a.get_path(trace.trace_id)
        assert path_messages[-1].role == "tool" and path_messages[-1].content.startswith("Cancelled")
        # now B may continue it
        model.steps = [reply("resumed")]
        result = await b.run_result([user("go on")], RunConfig(trace_id=trace.trace_id))
        assert result.answer == "resumed"


class ClaimAfter(RealStore):
    """A real store whose ``claim`` waits for an event first: a request prepared, then overtaken."""

    def __init__(self, store, go: anyio.Event):
        super().__init__(store)
        self._go = go
        self.arrived = anyio.Event()  # a request has read the trace and come to claim it

    async def claim(self, *args, **kw):
        self.arrived.set()
        await self._go.wait()
        return await self._store.claim(*args, **kw)


async def test_a_continuation_overtaken_by_another_process_is_refused_not_branched(tmp_path):
    """B reads the trace at head 3, then A's continuation runs to its end before B claims: B must be told,
    not silently continue from head 3 (which would drop A's turn off the path)."""
    path = tmp_path / "traces.db"
    store_a, store_b = await open_store(path), await open_store(path)
    try:
        a = make_runner(store_a, ScriptedModel([reply("from A")]))
        tid = (await a.run_result([user("q")], RunConfig())).trace.trace_id
        go = anyio.Event()
        late = ClaimAfter(store_b, go)
        b = make_runner(late, ScriptedModel([reply("from B")]))
        async with a, b, anyio.create_task_group() as tg:
            refused: list[Exception] = []

            async def b_continues() -> None:
                try:
                    await b.start([user("B asks")], RunConfig(trace_id=tid))
                except TraceRunning as exc:
                    refused.append(exc)

            tg.start_soon(b_continues)
            with anyio.fail_after(5):
                await late.arrived.wait()  # B has read the trace and waits to claim
            await a.start([user("A asks")], RunConfig(trace_id=tid))
            await a.wait(tid)
            go.set()
        assert len(refused) == 1 and "was run by another call" in str(refused[0])
        assert [m.content for m in await store_a.get_path(tid)][-2:] == ["A asks", "from A"]
        assert all(m.content != "B asks" for m in await store_a.get_tree(tid))
    finally:
        await store_a.close()
        await store_b.close()


async def test_a_run_whose_lease_was_taken_stops_writing(tmp_path):
    """A paused owner whose lease lapsed: another process resumed the trace, so the old run must not
    write another message."""
    path = tmp_path / "traces.db"
    started = anyio.Event()
    store_a = await open_store(path, lease_seconds=0.0)
    store_b = await open_store(path)
    try:
        model = ScriptedModel([reply(None, call("slow", "s1"))])
        a = make_runner(store_a, model, slow_tool(started, seconds=0.5))
        async with a:
            trace = await a.start([user("go")], RunConfig())
            with anyio.fail_after(5):
                await started.wait()
            assert trace.trace_id in await store_b.sweep()  # its lease lapsed: B sees an interrupted trace
            model_b = ScriptedModel([reply("mine now")])
            result = await make_runner(store_b, model_b).run_result(
                [], RunConfig(trace_id=trace.trace_id, insert_after=2)
            )
            with anyio.fail_after(5):
                await a.wait(trace.trace_id)
        path_messages = await store_b.get_path(trace.trace_id)
        assert [m.content for m in path_messages][-1] == "mine now" and result.answer == "mine now"
        assert all(m.content != "slow done" for m in await store_b.get_tree(trace.trace_id))
    finally:
        await store_a.close()
        await store_b.close()


async def test_a_stop_for_a_run_whose_owner_is_gone_ends_it_stopped_at_once(tmp_path):
    """Its owner's lease lapsed (frozen, or dead): a stop from another process takes the claim over and
    ends the trace ``stopped`` with its open call closed, instead of saying "stopping" and leaving it to
    read ``interrupted`` a lease later."""
    path = tmp_path / "traces.db"
    started = anyio.Event()
    store_a = await open_store(path, lease_seconds=0.0)
    store_b = await open_store(path)
    try:
        a = make_runner(
            store_a, ScriptedModel([reply(None, call("slow", "s1"))]), slow_tool(started, seconds=0.5)
        )
        async with a:
            trace = await a.start([user("go")], RunConfig())
            with anyio.fail_after(5):
                await started.wait()
            b = make_runner(store_b, ScriptedModel([reply("unused")]))
            assert await b.stop_unattended(trace.trace_id) is True
            with anyio.fail_after(5):
                await a.wait(trace.trace_id)
        final = await store_b.get_trace(trace.trace_id)
        assert (final.status, final.stop_reason) == (Status.STOPPED, StopReason.STOPPED)
        closing = (await store_b.get_path(trace.trace_id))[-1]
        assert (
            closing.role == "tool"
            and closing.tool_call_id == "s1"
            and "slow done" not in (closing.content or "")
        )
    finally:
        await store_a.close()
        await store_b.close()


async def test_a_run_that_lost_its_claim_tells_its_own_process_how_the_trace_stands(tmp_path):
    """The sweep that interrupts a lapsed run writes under that run's token, which the owner's feed skips
    as its own: the lost run itself announces the trace, so waits in its process do not hang on."""
    path = tmp_path / "traces.db"
    started = anyio.Event()
    store_a = await open_store(path, lease_seconds=0.0)
    store_b = await open_store(path)
    bus_a = EventBus()
    try:
        model = ScriptedModel([reply(None, call("slow", "s1"))])
        async with make_runner(store_a, model, slow_tool(started, seconds=0.5), events=bus_a) as a:
            async with bus_a.subscribe() as heard:
                trace = await a.start([user("go")], RunConfig())
                with anyio.fail_after(5):
                    await started.wait()
                assert trace.trace_id in await store_b.sweep()
                with anyio.fail_after(5):
                    async for event in heard:
                        if isinstance(event, TraceChanged) and event.trace.status is not Status.RUNNING:
                            break
                assert (event.trace.trace_id, event.trace.status) == (trace.trace_id, Status.INTERRUPTED)
    finally:
        await store_a.close()
        await store_b.close()


async def test_an_empty_reply_when_the_budget_is_spent_ends_the_run_and_stores_nothing(store):
    spent = ModelResponse(content=None, usage=MessageUsage(prompt_tokens=900, completion_tokens=200))
    model = ScriptedModel([spent])
    result = await make_runner(store, model).run_result([user("x")], RunConfig(max_tokens=1000))
    assert (result.trace.status, result.trace.stop_reason) == (Status.STOPPED, StopReason.TOKEN_BUDGET)
    assert len(model.calls) == 1  # not asked again: the budget is gone
    assert [m.role for m in await store.get_path(result.trace.trace_id)] == ["system", "user"]


async def test_a_continuation_from_another_process_during_a_long_reflection_is_told_why(
    store, tmp_path, monkeypatch
):
    """Another process cannot queue behind a reflection it does not hold: it waits (briefly, for the
    host's timeout) and then says the trace is being reflected on, not the "already running" of a trace
    that reads completed."""
    import agent.core.runner as runner_module
    from agent.errors import TraceReflecting

    reflecting, release = anyio.Event(), anyio.Event()

    class Model(ScriptedModel):
        async def complete(self, messages, tools, **kw):
            if kw.get("tool_choice") == "none":
                reflecting.set()
                await release.wait()
                return reply("- Reflect first.")
            return reply("answered")

    monkeypatch.setattr(runner_module, "HANDOVER_WAIT_SECONDS", 0.3)
    runner, experiences = reflecting_runner(store, Model([]), tmp_path)
    other_store = await open_store(tmp_path / "traces.db")
    other = make_runner(other_store, ScriptedModel([reply("second answer")]))
    try:
        async with runner, other:
            trace = await runner.start([user("first")], RunConfig(reflect=True))
            with anyio.fail_after(10):
                await reflecting.wait()
            with pytest.raises(TraceReflecting) as refused:
                await other.start([user("second")], RunConfig(trace_id=trace.trace_id))
            assert "still reflecting on it" in str(refused.value) and "again" in str(refused.value)
            assert len(await store.get_path(trace.trace_id)) == 3  # nothing of the refused request stored
            release.set()
            await runner.wait(trace.trace_id)
            await other.start([user("second")], RunConfig(trace_id=trace.trace_id))
            with anyio.fail_after(10):
                await other.wait(trace.trace_id)
        assert (await store.get_path(trace.trace_id))[-1].content == "second answer"
    finally:
        await other_store.close()
        experiences.close()


async def test_the_time_limit_does_not_cut_the_reflection_nor_the_continuation_queued_behind_it(
    store, tmp_path
):
    """The answer came within ``timeout_seconds``: the reflection after it may take longer, and a
    continuation queued meanwhile runs to its own end rather than inheriting the first run's timeout."""
    reflecting = anyio.Event()

    class Model(ScriptedModel):
        async def complete(self, messages, tools, **kw):
            if kw.get("tool_choice") == "none":
                reflecting.set()
                await anyio.sleep(0.6)  # past the first run's 0.3 s deadline
                return reply("- Take your time over the reflection.")
            return reply(f"answer to {messages[-1]['content']}")

    runner, experiences = reflecting_runner(store, Model([]), tmp_path)
    try:
        async with runner:
            trace = await runner.start([user("first")], RunConfig(reflect=True, timeout_seconds=0.3))
            with anyio.fail_after(10):
                await reflecting.wait()
            await runner.start([user("second")], RunConfig(trace_id=trace.trace_id))
            with anyio.fail_after(10):
                await runner.wait(trace.trace_id)
        final = await store.get_trace(trace.trace_id)
        assert (final.status, final.stop_reason) == (Status.COMPLETED, StopReason.END_TURN)
        assert [m.content for m in await store.get_path(trace.trace_id)][-1] == "answer to second"
        assert "Take your time over the reflection." in await experiences.read_text()
    finally:
        experiences.close()


class SummaryHangs(ScriptedModel):
    """Chats at length; the call that summarises for compaction waits until stopped."""

    def __init__(self):
        super().__init__([])
        self.summarising = anyio.Event()

    async def complete(self, messages, tools, **kw):
        self.calls.append({"messages": messages})
        if "summarise the conversation so far" in (messages[-1].get("content") or "").lower():
            self.summarising.set()
            await anyio.sleep(3600)
        size = len(json.dumps(messages)) // 4
        return ModelResponse(
            content="I considered the design carefully. " * 250,
            usage=MessageUsage(prompt_tokens=size, completion_tokens=20),
        )


async def test_a_stop_during_the_compaction_summary_ends_the_run_stopped(store):
    model = SummaryHangs()
    runner = make_runner(store, model, context_tokens=8_000)
    first = await runner.run_result([user("Discuss the design.")], RunConfig())
    tid = first.trace.trace_id
    async with runner:
        for turn in range(8):
            await runner.start([user(f"Go on ({turn}).")], RunConfig(trace_id=tid))
            with anyio.fail_after(10):
                while runner.is_running(tid) and not model.summarising.is_set():
                    await anyio.sleep(0.01)
            if model.summarising.is_set():
                break
            await runner.wait(tid)
        assert model.summarising.is_set(), "the conversation never grew past its context budget"
        assert runner.stop(tid)
        with anyio.fail_after(10):
            await runner.wait(tid)
    final = await store.get_trace(tid)
    assert (final.status, final.stop_reason, final.error) == (Status.STOPPED, StopReason.STOPPED, None)


async def test_a_compaction_summary_spends_the_token_budget(store):
    """A summary call is a model call like any other: its tokens count toward ``max_tokens``."""

    class Costly(ScriptedModel):
        async def complete(self, messages, tools, **kw):
            self.calls.append({"messages": messages})
            size = len(json.dumps(messages)) // 4
            if "summarise the conversation so far" in (messages[-1].get("content") or "").lower():
                return ModelResponse(
                    content="Summary: we talked design.",
                    usage=MessageUsage(prompt_tokens=50_000, completion_tokens=20),
                )
            return ModelResponse(
                content="I considered the design carefully. " * 250,
                usage=MessageUsage(prompt_tokens=size, completion_tokens=20),
            )

    model = Costly([])
    runner = make_runner(store, model, context_tokens=8_000)
    tid = (await runner.run_result([user("Discuss the design.")], RunConfig())).trace.trace_id
    for turn in range(8):
        result = await runner.run_result(
            [user(f"Go on ({turn}).")], RunConfig(trace_id=tid, max_tokens=20_000)
        )
        if result.trace.usage.compactions and any(
            "summarise the conversation so far" in (c["messages"][-1].get("content") or "").lower()
            for c in model.calls
        ):
            break
        assert result.trace.status is Status.COMPLETED
    else:
        pytest.fail("the conversation was never summarised")
    trace = result.trace
    assert (trace.status, trace.stop_reason) == (Status.STOPPED, StopReason.TOKEN_BUDGET)
    last_call = model.calls[-1]["messages"][-1].get("content") or ""
    assert "summarise the conversation so far" in last_call.lower()  # no model call after the summary


class SlowClaim(RealStore):
    """A real store whose ``claim`` takes a while, so a reflection can end while a continuation claims."""

    async def claim(self, *args, **kw):
        await anyio.sleep(0.2)
        return await self._store.claim(*args, **kw)


async def test_a_continuation_claimed_while_the_reflection_ends_still_runs(store, tmp_path):
    """The run may not end while a continuation is being claimed under its token: it waits, then runs it."""
    reflecting = anyio.Event()

    class Model(ScriptedModel):
        async def complete(self, messages, tools, **kw):
            if kw.get("tool_choice") == "none":
                reflecting.set()
                await anyio.sleep(0.05)  # ends while the continuation's claim is under way
                return reply("- Keep going.")
            return reply(f"answer to {messages[-1]['content']}")

    runner, experiences = reflecting_runner(SlowClaim(store), Model([]), tmp_path)
    try:
        async with runner:
            trace = await runner.start([user("first")], RunConfig(reflect=True))
            with anyio.fail_after(10):
                await reflecting.wait()
                await runner.start([user("second")], RunConfig(trace_id=trace.trace_id))
                await runner.wait(trace.trace_id)
            assert [m.content for m in await store.get_path(trace.trace_id)][-1] == "answer to second"
            final = await store.get_trace(trace.trace_id)
            assert final.status is Status.COMPLETED and await store.running_ids() == []
    finally:
        experiences.close()


async def test_a_continuation_racing_the_end_of_a_reflection_always_runs(store, tmp_path):
    """Queued behind a reflecting run just as it ends, a continuation either runs after it in the same
    claim or, if the run has already closed, on a claim of its own: never dropped, never hung."""
    rng = random.Random(12)

    class Model(ScriptedModel):
        async def complete(self, messages, tools, **kw):
            if kw.get("tool_choice") == "none":
                await anyio.sleep(rng.uniform(0, 0.004))
                return reply("- Keep going.")
            return reply(f"answer to {messages[-1]['content']}")

    runner, experiences = reflecting_runner(store, Model([]), tmp_path)
    try:
        async with runner:
            for attempt in range(40):
                trace = await runner.start([user("first")], RunConfig(reflect=True))
                await anyio.sleep(rng.uniform(0, 0.006))
                with anyio.fail_after(10):
                    while True:
                        try:
                            await runner.start([user(f"next {attempt}")], RunConfig(trace_id=trace.trace_id))
                            break
                        except TraceRunning:  # still on its first answer: not yet reflecting
                            await anyio.sleep(0.001)
                    await runner.wait(trace.trace_id)
                path = await store.get_path(trace.trace_id)
                assert path[-1].content == f"answer to next {attempt}", attempt
                assert (await store.get_trace(trace.trace_id)).status is Status.COMPLETED
    finally:
        experiences.close()


class NoChangeLog(RealStore):
    """A real store whose change log cannot be read when the runner starts, as a locked database."""

    async def last_change_id(self):
        raise OSError("database is locked")


async def test_a_runner_that_cannot_start_its_feed_raises_the_cause_and_leaves_nothing_running(store):
    runner = make_runner(NoChangeLog(store), ScriptedModel([reply("x")]))
    with pytest.raises(OSError, match="database is locked"):
        async with runner:
            pytest.fail("entered a runner with no change feed")
    # entered again on a healthy store, the same process serves as before
    async with make_runner(store, ScriptedModel([reply("fine")])) as healthy:
        trace = await healthy.start([user("x")], RunConfig())
        assert (await wait_status(store, trace.trace_id, Status.COMPLETED)).status is Status.COMPLETED


async def test_going_on_from_a_stopped_trace_does_not_run_the_call_that_was_stopped(store):
    """A trace the sweep ended ``stopped`` (its owner died after the stop was asked) may still hold an open
    call: a later run closes it as cancelled, it does not run the tool the host stopped."""
    from agent.trace.models import NewMessage, TraceConfig
    from agent.trace.store import new_token

    ran: list[str] = []

    async def risky(**_: object) -> str:
        ran.append("risky")
        return "done"

    model = ScriptedModel([reply("ok")])
    runner = AgentRunner(
        store,
        tools=ToolRegistry([FuncTool("risky", risky)]),
        models=models_for(scripted=model),
        default_model="scripted",
    )
    token = new_token()
    trace = Trace(trace_id="s" * 32, model="scripted", config=TraceConfig())
    created, _ = await store.create(
        trace, [NewMessage(role="system", content="s"), NewMessage(role="user", content="go")], token
    )
    await store.append(
        created.trace_id, NewMessage(role="assistant", tool_calls=[call("risky", "r1")]), 2, token=token
    )
    await store.finish(
        created.trace_id, token, status=Status.STOPPED, stop_reason=StopReason.STOPPED, error=None
    )
    async with runner:
        await runner.run_result([], RunConfig(trace_id=created.trace_id))
    path = await store.get_path(created.trace_id)
    assert ran == [] and path[3].role == "tool" and path[3].content.startswith("Cancelled")
    assert path[-1].content == "ok"
