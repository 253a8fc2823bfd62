"""AgentRunner with a scripted model: the loop, tools, stop, failures, continue/rewind/regenerate."""

from __future__ import annotations

import anyio
import pytest

from agent import AgentRunner, EventBus, MessageStored, RunConfig, Status, StopReason, TraceChanged
from agent.core.messages import open_tool_calls
from agent.core.run import MAX_PARALLEL_TOOL_CALLS
from agent.errors import (
    InvalidMessages,
    ModelCallError,
    ModelConfigError,
    SequenceError,
    TraceRunning,
    UnknownToolError,
)
from agent.tools.registry import ToolRegistry
from agent.trace.backends import open_store
from tests.fakes import FuncTool, ScriptedModel, add_tool, call, fail_tool, models_for, reply, slow_tool

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path):
    s = await open_store(tmp_path / "traces.db")
    yield s
    await s.close()


def make_runner(store, model, *tools, **kw) -> AgentRunner:
    return AgentRunner(
        store,
        tools=ToolRegistry(tools or [add_tool()]),
        models=models_for(scripted=model),
        default_model="scripted",
        **kw,
    )


def user(text: str) -> dict:
    return {"role": "user", "content": text}


async def test_tool_loop_stores_every_message_in_order(store):
    model = ScriptedModel([reply(None, call("add", a=2, b=3)), reply("It is 5.")])
    runner = make_runner(store, model)
    result = await runner.run_result([user("add 2 and 3")], RunConfig())
    trace = result.trace
    assert (trace.status, trace.stop_reason) == (Status.COMPLETED, StopReason.END_TURN)
    path = await store.get_path(trace.trace_id)
    assert [m.role for m in path] == ["system", "user", "assistant", "tool", "assistant"]
    assert path[3].content == "5" and path[3].tool_call_id == "c1"
    assert result.answer == "It is 5."
    assert trace.usage.llm_calls == 2 and trace.usage.tool_calls == 1
    assert trace.usage.prompt_tokens == 20 and trace.usage.completion_tokens == 10
    # the model saw the tool schema and the whole path
    assert model.calls[0]["tools"][0]["function"]["name"] == "add"
    assert [m["role"] for m in model.calls[1]["messages"]] == ["system", "user", "assistant", "tool"]
    assert model.calls[0]["temperature"] == 0.3


async def test_run_yields_the_claimed_trace_then_each_stored_event(store):
    runner = make_runner(store, ScriptedModel([reply("hi")]))
    events = [event async for event in runner.run([user("hello")], RunConfig())]
    assert isinstance(events[0], TraceChanged) and events[0].trace.status is Status.RUNNING
    assert [e.message.role for e in events[1:-1]] == ["assistant"]
    assert isinstance(events[-1], TraceChanged) and events[-1].trace.status is Status.COMPLETED


async def test_parallel_tool_calls_run_concurrently_and_store_in_call_order(store):
    both_started = anyio.Event()
    started = []

    async def tool_a(**_):
        started.append("a")
        await both_started.wait()
        return "A"

    async def tool_b(**_):
        started.append("b")
        if len(started) == 2:
            both_started.set()
        return "B"

    from tests.fakes import FuncTool

    model = ScriptedModel([reply(None, call("a", "x1"), call("b", "x2")), reply("done")])
    runner = make_runner(store, model, FuncTool("a", tool_a), FuncTool("b", tool_b))
    with anyio.fail_after(10):
        result = await runner.run_result([user("go")], RunConfig())
    tools = [m for m in result.messages if m.role == "tool"]
    assert [(m.tool_call_id, m.content) for m in tools] == [("x1", "A"), ("x2", "B")]


async def test_max_iterations_ends_the_run(store):
    model = ScriptedModel([reply(None, call("add", a=1, b=1))])  # always calls a tool
    runner = make_runner(store, model)
    result = await runner.run_result([user("loop")], RunConfig(max_iterations=3))
    assert result.trace.stop_reason is StopReason.MAX_ITERATIONS
    assert result.trace.status is Status.COMPLETED
    assert len(model.calls) == 3
    assert open_tool_calls(await store.get_path(result.trace.trace_id)) == []


async def test_stop_during_a_slow_model_call_is_prompt_and_keeps_partial_text(store):
    model = ScriptedModel([reply("one two three four five six")], stream=True, chunk_delay=3600)
    runner = make_runner(store, model)
    async with anyio.create_task_group() as tg:
        trace = await runner.start([user("talk")], RunConfig(), tg)
        while not model.calls:
            await anyio.sleep(0.01)
        await anyio.sleep(0.05)
        assert runner.stop(trace.trace_id)
        with anyio.fail_after(5):
            await runner.wait(trace.trace_id)
    final = await store.get_trace(trace.trace_id)
    assert (final.status, final.stop_reason) == (Status.STOPPED, StopReason.STOPPED)
    path = await store.get_path(trace.trace_id)
    assert path[-1].role == "assistant" and path[-1].content == "one "
    assert not runner.is_running(trace.trace_id)


async def test_stop_during_a_slow_tool_closes_every_open_call(store):
    started = anyio.Event()
    model = ScriptedModel([reply(None, call("slow", "s1"), call("add", "s2", a=1, b=2), call("slow", "s3"))])
    runner = make_runner(store, model, slow_tool(started), add_tool())
    async with anyio.create_task_group() as tg:
        trace = await runner.start([user("slow please")], RunConfig(), tg)
        with anyio.fail_after(5):
            await started.wait()
        runner.stop(trace.trace_id)
        with anyio.fail_after(5):
            await runner.wait(trace.trace_id)
    path = await store.get_path(trace.trace_id)
    assert open_tool_calls(path) == []
    results = {m.tool_call_id: m.content for m in path if m.role == "tool"}
    assert results["s2"] == "3"
    assert "Cancelled" in results["s1"] and "Cancelled" in results["s3"]
    assert (await store.get_trace(trace.trace_id)).status is Status.STOPPED
    # the stopped trace can be continued, and the model sees a valid conversation
    model.steps = [reply("resumed")]
    result = await runner.run_result([user("go on")], RunConfig(trace_id=trace.trace_id))
    assert result.answer == "resumed" and result.trace.status is Status.COMPLETED


async def test_stop_of_a_trace_that_is_not_running(store):
    runner = make_runner(store, ScriptedModel([reply("x")]))
    assert runner.stop("nope") is False


async def test_provider_failure_ends_failed_with_a_sentence_and_keeps_messages(store):
    model = ScriptedModel(
        [reply(None, call("add", a=1, b=2)), ModelCallError("The provider returned HTTP 500.")]
    )
    runner = make_runner(store, model)
    result = await runner.run_result([user("x")], RunConfig())
    assert (result.trace.status, result.trace.stop_reason) == (Status.FAILED, StopReason.ERROR)
    assert result.trace.error == "The provider returned HTTP 500."
    assert [m.role for m in await store.get_path(result.trace.trace_id)] == [
        "system",
        "user",
        "assistant",
        "tool",
    ]


async def test_tool_failure_is_read_by_the_model_and_the_run_goes_on(store):
    model = ScriptedModel([reply(None, call("fail")), reply("sorry")])
    runner = make_runner(store, model, fail_tool())
    result = await runner.run_result([user("x")], RunConfig())
    tool_message = next(m for m in result.messages if m.role == "tool")
    assert tool_message.content == "Error: the disk is on fire"
    assert model.calls[1]["messages"][-1]["content"] == "Error: the disk is on fire"
    assert result.trace.status is Status.COMPLETED


async def test_unknown_tool_and_bad_arguments_become_tool_messages(store):
    from agent.trace.models import FunctionCall, ToolCall

    bad = ToolCall(id="b", function=FunctionCall(name="add", arguments="{not json"))
    deep = ToolCall(id="d", function=FunctionCall(name="add", arguments="[" * 100_000 + "]" * 100_000))
    model = ScriptedModel([reply(None, call("nosuch", "n"), bad, deep), reply("ok")])
    runner = make_runner(store, model)
    result = await runner.run_result([user("x")], RunConfig())
    contents = [m.content for m in result.messages if m.role == "tool"]
    assert "no tool named 'nosuch'" in contents[0] and "Tools offered: add" in contents[0]
    assert "not a valid JSON object" in contents[1]
    assert "nested too deeply" in contents[2] and result.answer == "ok"  # the run goes on


async def test_a_second_run_of_a_running_trace_is_refused_and_changes_nothing(store):
    started = anyio.Event()
    model = ScriptedModel([reply(None, call("slow", "s1"))])
    runner = make_runner(store, model, slow_tool(started))
    async with anyio.create_task_group() as tg:
        trace = await runner.start([user("x")], RunConfig(), tg)
        await started.wait()
        before = await store.get_tree(trace.trace_id)
        with pytest.raises(TraceRunning, match=trace.trace_id):
            await runner.run_result([user("again")], RunConfig(trace_id=trace.trace_id))
        assert await store.get_tree(trace.trace_id) == before
        runner.stop(trace.trace_id)


async def test_fifty_traces_run_concurrently(store):
    gate = anyio.Event()
    inner = ScriptedModel([lambda m, t: reply(None, call("add", a=1, b=2)) if len(m) == 2 else reply("3")])

    class GatedModel:
        name = "scripted"

        async def complete(self, messages, tools, **kw):
            await gate.wait()  # every run is in flight at once before any answers
            return await inner.complete(messages, tools, **kw)

    runner = make_runner(store, GatedModel())
    async with anyio.create_task_group() as tg:
        ids = [(await runner.start([user(f"task {i}")], RunConfig(), tg)).trace_id for i in range(50)]
        assert len(runner.running()) == 50
        gate.set()
    traces = [await store.get_trace(i) for i in ids]
    assert all(t.status is Status.COMPLETED for t in traces)
    assert [len(await store.get_path(i)) for i in ids] == [5] * 50
    assert runner.running() == []


async def test_continue_rewind_and_regenerate(store):
    model = ScriptedModel(
        [reply(None, call("add", "k1", a=1, b=1), call("add", "k2", a=2, b=2)), reply("first")]
    )
    runner = make_runner(store, model)
    first = await runner.run_result([user("q1")], RunConfig())
    tid = first.trace.trace_id
    # path: 1 system, 2 user, 3 assistant(calls), 4 tool, 5 tool, 6 assistant "first"
    model.steps = [reply("second")]
    cont = await runner.run_result([user("q2")], RunConfig(trace_id=tid))
    assert [m.sequence for m in await store.get_path(tid)] == [1, 2, 3, 4, 5, 6, 7, 8]

    # rewind to the assistant message with tool calls: the cut moves past both tool results
    model.steps = [reply("branch")]
    await runner.run_result([user("q3")], RunConfig(trace_id=tid, insert_after=3))
    path = await store.get_path(tid)
    assert [m.sequence for m in path] == [1, 2, 3, 4, 5, 9, 10]
    assert path[-1].content == "branch"

    # regenerate: no messages, cut at the user message 2 -> a new assistant answer off it
    model.steps = [reply("again")]
    await runner.run_result([], RunConfig(trace_id=tid, insert_after=2))
    path = await store.get_path(tid)
    assert [m.sequence for m in path] == [1, 2, 11] and path[-1].content == "again"
    assert len(await store.get_tree(tid)) == 11  # old branches stay stored
    assert cont.answer == "second"


async def test_running_an_answer_again_with_nothing_new_regenerates_it(store):
    model = ScriptedModel([reply("first")])
    runner = make_runner(store, model)
    tid = (await runner.run_result([user("q")], RunConfig())).trace.trace_id
    model.steps = [reply("second")]
    await runner.run_result([], RunConfig(trace_id=tid))  # not a second answer after the first
    path = await store.get_path(tid)
    assert [(m.sequence, m.content) for m in path[1:]] == [(2, "q"), (4, "second")]
    assert model.calls[-1]["messages"][-1]["role"] == "user"
    model.steps = [reply("third")]
    await runner.run_result([], RunConfig(trace_id=tid, insert_after=4))  # the same, named
    assert [m.sequence for m in await store.get_path(tid)] == [1, 2, 5]
    model.steps = [reply("forked")]
    fork = await runner.run_result([], RunConfig(from_trace=tid))  # a fork with nothing new, alike
    assert [(m.role, m.content) for m in (await store.get_path(fork.trace.trace_id))[1:]] == [
        ("user", "q"),
        ("assistant", "forked"),
    ]
    assert fork.trace.forked_from is not None and fork.trace.forked_from.sequence == 2


async def test_bad_cuts_are_refused_before_anything_changes(store):
    model = ScriptedModel([reply(None, call("add", "k1", a=1, b=1), call("add", "k2", a=2, b=2)), reply("x")])
    runner = make_runner(store, model)
    tid = (await runner.run_result([user("q")], RunConfig())).trace.trace_id
    before = (await store.get_trace(tid), await store.get_tree(tid))
    with pytest.raises(SequenceError, match="has no message with sequence 99"):
        await runner.run_result([user("x")], RunConfig(trace_id=tid, insert_after=99))
    with pytest.raises(SequenceError, match="1 or more"):
        await runner.run_result([user("x")], RunConfig(trace_id=tid, insert_after=-1))
    with pytest.raises(SequenceError, match="would split the tool results of assistant message 3"):
        await runner.run_result([user("x")], RunConfig(trace_id=tid, insert_after=4))
    with pytest.raises(InvalidMessages, match="Message 1 answers tool call 'zz'"):
        await runner.run_result(
            [{"role": "tool", "tool_call_id": "zz", "content": "x"}], RunConfig(trace_id=tid)
        )
    assert (await store.get_trace(tid), await store.get_tree(tid)) == before
    assert not runner.is_running(tid)
    # cutting after the last tool result of the group is allowed
    model.steps = [reply("fine")]
    result = await runner.run_result([], RunConfig(trace_id=tid, insert_after=5))
    assert result.answer == "fine"


async def test_malformed_messages_unknown_model_and_tools_are_refused_before_storing(store):
    runner = make_runner(store, ScriptedModel([reply("x")]))
    with pytest.raises(InvalidMessages, match="role 'bot'"):
        await runner.run_result([{"role": "bot", "content": "x"}], RunConfig())
    with pytest.raises(InvalidMessages, match="at least one message"):
        await runner.run_result([], RunConfig())
    with pytest.raises(ModelConfigError, match="Unknown model provider 'nope'"):
        await runner.run_result([user("x")], RunConfig(model="nope:thing"))
    with pytest.raises(ModelConfigError, match="OPENAI_API_KEY"):
        await runner.run_result([user("x")], RunConfig(model="openai:gpt-4o"))
    with pytest.raises(UnknownToolError, match="'nosuch'.*available: add"):
        await runner.run_result([user("x")], RunConfig(tools=["nosuch"]))
    assert (await store.list_traces()).traces == []


async def test_whitelist_by_tool_and_by_group_is_stored_and_applies_on_continue(store):
    model = ScriptedModel([reply("ok")])
    runner = make_runner(store, model, add_tool(group="calc", name="calc__add"), fail_tool())
    result = await runner.run_result([user("x")], RunConfig(tools=["calc"]))
    assert [t["function"]["name"] for t in model.calls[0]["tools"]] == ["calc__add", "ask_host"]
    assert result.trace.config.tools == ["calc"]
    await runner.run_result([user("y")], RunConfig(trace_id=result.trace.trace_id))
    assert [t["function"]["name"] for t in model.calls[1]["tools"]] == ["calc__add", "ask_host"]
    no_questions = await runner.run_result([user("x")], RunConfig(tools=["calc"], ask_host=False))
    assert [t["function"]["name"] for t in model.calls[2]["tools"]] == ["calc__add"]
    assert no_questions.trace.config.ask_host is False


async def test_side_branch_leaves_head_and_status_and_forbids_tools(store):
    model = ScriptedModel([reply("answer")])
    runner = make_runner(store, model)
    first = await runner.run_result([user("q")], RunConfig())
    tid = first.trace.trace_id
    model.steps = [reply("- a lesson")]
    side = await runner.run_side_branch(tid, "reflect please")
    assert side.answer == "- a lesson"
    after = await store.get_trace(tid)
    assert after.head_sequence == first.trace.head_sequence
    assert (after.status, after.stop_reason) == (Status.COMPLETED, StopReason.END_TURN)
    assert [m.content for m in await store.get_path(tid)][-1] == "answer"
    tree = await store.get_tree(tid)
    assert len(tree) == 5 and [m.side for m in tree[-2:]] == [True, True]
    # the trace's tools go along (providers refuse tool blocks without them), their use forbidden
    assert [t["function"]["name"] for t in model.calls[1]["tools"]] == ["add", "ask_host"]
    assert model.calls[1]["tool_choice"] == "none"


async def test_events_are_published_after_each_commit(store):
    bus = EventBus()
    runner = make_runner(store, ScriptedModel([reply(None, call("add", a=1, b=1)), reply("2")]), events=bus)
    seen = []
    async with bus.subscribe() as events:
        result = await runner.run_result([user("x")], RunConfig())
        with anyio.move_on_after(0.1):
            async for event in events:
                seen.append(event)
    stored = [e.message.sequence for e in seen if isinstance(e, MessageStored)]
    assert stored == [1, 2, 3, 4, 5]
    changes = [e for e in seen if isinstance(e, TraceChanged)]
    assert changes[0].created and changes[-1].trace.status is Status.COMPLETED
    for event in seen:
        if isinstance(event, MessageStored):  # committed before published: the store has it
            assert await store.get_message(result.trace.trace_id, event.message.sequence) is not None


async def test_walking_away_from_run_releases_the_trace(store):
    runner = make_runner(store, ScriptedModel([reply("x")]))
    from contextlib import aclosing

    async with aclosing(runner.run([user("x")], RunConfig())) as steps:
        async for first in steps:  # noqa: B007  (the first event is the claimed trace)
            break
    assert not runner.is_running(first.trace_id)
    assert (await store.get_trace(first.trace_id)).status is Status.STOPPED


async def crashed_trace(store, trace_id: str) -> None:
    """A trace left interrupted with its head on an assistant message whose call never ran."""
    from agent.trace.models import NewMessage, Trace
    from agent.trace.store import new_token

    token = new_token()
    await store.create(
        Trace(trace_id=trace_id, model="scripted"),
        [
            NewMessage(role="user", content="x"),
            NewMessage(role="assistant", tool_calls=[call("add", a=4, b=4)]),
        ],
        token,
    )
    await store.finish(
        trace_id, token, status=Status.INTERRUPTED, stop_reason=StopReason.INTERRUPTED, error=None
    )


async def test_open_calls_left_by_a_crash_run_when_continued(store):
    """An interrupted trace whose head is an assistant message with calls: continuing runs them."""
    await crashed_trace(store, "crashed")
    runner = make_runner(store, ScriptedModel([reply("8")]))
    result = await runner.run_result([], RunConfig(trace_id="crashed"))
    assert [m.content for m in result.messages] == ["8", "8"]
    # a new user message instead closes them as unfinished
    await crashed_trace(store, "crashed2")
    await runner.run_result([user("never mind")], RunConfig(trace_id="crashed2"))
    path = await store.get_path("crashed2")
    assert path[2].role == "tool" and path[2].content.startswith("Not run")


async def test_a_reply_of_many_calls_runs_sixteen_at_a_time_in_call_order(store):
    running = peak = 0

    async def count(**_: object) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1
        return "counted"

    calls = [call("count", f"c{i}") for i in range(50)]
    model = ScriptedModel([reply(None, *calls), reply("done")])
    runner = AgentRunner(
        store,
        tools=ToolRegistry([FuncTool("count", count)]),
        models=models_for(scripted=model),
        default_model="scripted",
    )
    result = await runner.run_result([user("go")], RunConfig())
    results = [m.tool_call_id for m in result.messages if m.role == "tool"]
    assert results == [f"c{i}" for i in range(50)] and peak == MAX_PARALLEL_TOOL_CALLS


async def test_a_models_repeated_or_huge_call_ids_and_names_are_stored_bounded_and_distinct(store):
    from agent.trace.models import FunctionCall, ToolCall

    huge = ToolCall(id="x" * 2_000_000, function=FunctionCall(name="n" * 2_000_000, arguments="{}"))
    model = ScriptedModel(
        [reply(None, call("add", "same", a=1, b=2), call("add", "same", a=3, b=4), huge), reply("ok")]
    )
    result = await make_runner(store, model).run_result([user("x")], RunConfig())
    stored = next(m for m in result.messages if m.tool_calls)
    ids = [c.id for c in stored.tool_calls]
    assert (
        ids[:2] == ["same", "same-2"]
        and len(ids[2]) == 200
        and len(stored.tool_calls[2].function.name) == 200
    )
    results = {m.tool_call_id: m.content for m in result.messages if m.role == "tool"}
    assert results["same"] == "3" and results["same-2"] == "7" and len(results[ids[2]]) < 400
    assert result.answer == "ok"


async def test_a_reply_of_thousands_of_calls_keeps_the_first_128_and_answers_each(store):
    from agent.core.messages import MAX_TOOL_CALLS

    calls = [call("add", f"c{i}", a=i, b=1) for i in range(3000)]
    model = ScriptedModel([reply(None, *calls), reply("ok")])
    result = await make_runner(store, model).run_result([user("x")], RunConfig())
    stored = next(m for m in result.messages if m.tool_calls)
    assert [c.id for c in stored.tool_calls] == [f"c{i}" for i in range(MAX_TOOL_CALLS)]
    assert [m.tool_call_id for m in result.messages if m.role == "tool"] == [
        f"c{i}" for i in range(MAX_TOOL_CALLS)
    ]
    assert result.answer == "ok"
