"""Context compaction: long runs fit the model's window, and nothing stored changes."""

from __future__ import annotations

import json

import pytest

from agent import AgentRunner, RunConfig, Status, StopReason
from agent.errors import ContextTooLong, ModelCallError
from agent.llm.base import ModelResponse
from agent.tools.files import workspace_tools
from agent.tools.registry import ToolRegistry
from agent.trace.backends import open_store
from agent.trace.compaction import build_context, compaction_of
from agent.trace.models import MessageUsage
from tests.fakes import ScriptedModel, call, models_for, reply

pytestmark = pytest.mark.anyio

BUDGET = 15_000
SOURCE = "def handler(event):\n    return {'status': 200, 'body': event}\n" * 110  # ≈ 7 KB of "source"


class SizeLimitedModel(ScriptedModel):
    """Refuses a request over ``limit`` tokens (characters / ``chars_per_token``), as OpenAI does with
    context_length_exceeded; reports that count as prompt_tokens."""

    def __init__(self, steps, limit: int, chars_per_token: int = 4):
        super().__init__(steps)
        self.limit = limit
        self.chars_per_token = chars_per_token
        self.refused = 0
        self.sizes: list[int] = []

    async def complete(self, messages, tools, **kw):
        size = (len(json.dumps(messages)) + len(json.dumps(tools))) // self.chars_per_token
        self.sizes.append(size)
        if size > self.limit:
            self.refused += 1
            raise ModelCallError(f"HTTP 400 context_length_exceeded: {size} tokens > {self.limit}")
        response = await super().complete(messages, tools, **kw)
        return response.model_copy(update={"usage": MessageUsage(prompt_tokens=size, completion_tokens=20)})


def reader(steps: int):
    """Reads a 7 KB file per step (a different name each time), then answers."""

    def step(messages, tools):
        if "summarise the conversation so far" in (messages[-1].get("content") or "").lower():
            return reply("Summary: read many handler files; each returns status 200.")
        done = sum(1 for m in messages if m.get("role") == "tool")
        if done >= steps:
            return reply(f"Read {done} files; every handler returns 200.")
        return reply(None, call("read_file", f"r{done}", path=f"src/mod{done}.py"))

    return step


@pytest.fixture
async def store(tmp_path):
    s = await open_store(tmp_path / "traces.db")
    yield s
    await s.close()


@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    for i in range(60):
        (root / "src" / f"mod{i}.py").write_text(SOURCE, encoding="utf-8")
    return root


def runner_for(store, model, workspace, budget: int | None = BUDGET) -> AgentRunner:
    return AgentRunner(
        store,
        tools=ToolRegistry(workspace_tools(workspace)),
        models=models_for(scripted=model),
        default_model="scripted",
        context_tokens=budget,
    )


async def test_a_40_step_file_reading_run_fits_a_15k_budget_and_keeps_every_result(store, workspace):
    model = SizeLimitedModel([reader(40)], limit=BUDGET)
    result = await runner_for(store, model, workspace).run_result(
        [{"role": "user", "content": "Audit src/"}], RunConfig()
    )
    assert result.trace.status is Status.COMPLETED, result.trace.error
    assert model.refused == 0 and max(model.sizes) <= BUDGET
    assert result.answer == "Read 40 files; every handler returns 200."
    path = await store.get_path(result.trace.trace_id)
    assert path[1].content == "Audit src/"  # the task intact
    tool_results = [m for m in path if m.role == "tool"]
    assert len(tool_results) == 40 and all(
        m.content.startswith(SOURCE[:200]) for m in tool_results
    )  # stored whole
    records = [compaction_of(m) for m in path if compaction_of(m)]
    assert records and all(r["stage"] == 1 for r in records)  # tool-heavy: eliding old results is enough
    assert result.trace.usage.compactions == len(records) and result.trace.usage.tokens_saved > 0
    for sent in model.calls:  # the system prompt and the task are sent verbatim every time
        assert sent["messages"][0]["role"] == "system" and sent["messages"][1]["content"] == "Audit src/"
    stubs = [m["content"] for m in model.calls[-1]["messages"] if "elided to fit" in (m.get("content") or "")]
    assert stubs and f"trace://{result.trace.trace_id}/messages/" in stubs[0]


async def test_the_providers_count_of_the_last_request_is_the_base_of_the_next_estimate(store, workspace):
    """A tokenizer far thriftier than the guess (8 characters a token): the run uses most of its window
    before it compacts, not the 40 % a characters-only estimate would allow, and never passes it."""
    model = SizeLimitedModel([reader(40)], limit=BUDGET, chars_per_token=8)
    result = await runner_for(store, model, workspace).run_result(
        [{"role": "user", "content": "Audit src/"}], RunConfig()
    )
    assert result.trace.status is Status.COMPLETED, result.trace.error
    assert model.refused == 0 and max(model.sizes) <= BUDGET
    elided = ["elided to fit the context" in json.dumps(sent["messages"]) for sent in model.calls]
    first = elided.index(True)  # the first request after a compaction
    assert max(model.sizes[:first]) > 0.4 * BUDGET
    assert result.trace.usage.compactions >= 1 and result.trace.usage.tokens_saved > 0


async def test_a_chat_heavy_run_is_summarised_by_its_own_model(store, workspace):
    long_text = "I considered the design carefully. " * 250  # ≈ 9 KB of talk per turn, no tools

    def talk(messages, tools):
        if "summarise the conversation so far" in (messages[-1].get("content") or "").lower():
            return reply("Summary: we discussed the design for several turns and agreed on option B.")
        return reply(long_text)

    model = SizeLimitedModel([talk], limit=8_000)
    runner = runner_for(store, model, workspace, budget=8_000)
    first = await runner.run_result([{"role": "user", "content": "Discuss the design."}], RunConfig())
    tid = first.trace.trace_id
    for turn in range(4):
        await runner.run_result([{"role": "user", "content": f"Go on ({turn})."}], RunConfig(trace_id=tid))
    assert model.refused == 0
    path = await store.get_path(tid)
    stages = [compaction_of(m)["stage"] for m in path if compaction_of(m)]
    assert 2 in stages
    summary = next(m for m in path if (compaction_of(m) or {}).get("stage") == 2)
    assert "option B" in summary.content and summary.role == "system"
    wire = build_context(path)
    assert (
        wire[1]["content"] == "Discuss the design."
        and "[Summary of the earlier conversation" in wire[2]["content"]
    )
    assert all(len(m.content or "") > 0 for m in path if m.role == "assistant")  # every original still stored


async def test_a_trace_within_budget_is_sent_unchanged(store, workspace):
    model = SizeLimitedModel([reader(2)], limit=100_000)
    result = await runner_for(store, model, workspace, budget=100_000).run_result(
        [{"role": "user", "content": "Audit"}], RunConfig()
    )
    path = await store.get_path(result.trace.trace_id)
    assert model.calls[-1]["messages"] == [m.to_openai() for m in path[:-1]]
    assert not any(compaction_of(m) for m in path) and result.trace.usage.compactions == 0


async def test_rewind_before_a_compaction_leaves_it_off_and_a_continuation_resumes_with_it(store, workspace):
    model = SizeLimitedModel([reader(20)], limit=BUDGET)
    runner = runner_for(store, model, workspace)
    result = await runner.run_result([{"role": "user", "content": "Audit src/"}], RunConfig())
    tid = result.trace.trace_id
    path = await store.get_path(tid)
    first_record = next(m for m in path if compaction_of(m))
    # continuing: the first request already fits, with the old results still elided
    model.steps = [lambda messages, tools: reply("More: all good.")]
    model.calls.clear()
    await runner.run_result([{"role": "user", "content": "Anything else?"}], RunConfig(trace_id=tid))
    assert model.refused == 0
    assert any("elided to fit the context" in (m.get("content") or "") for m in model.calls[0]["messages"])
    # rewinding to before the first compaction: the record is not on the new branch (which compacts
    # afresh, as its own context needs), and the compacted branch stays stored
    model.calls.clear()
    cut = first_record.parent_sequence
    await runner.run_result([], RunConfig(trace_id=tid, insert_after=cut))
    branch = await store.get_path(tid)
    assert first_record.sequence not in {m.sequence for m in branch}
    assert model.refused == 0
    assert first_record.sequence in {m.sequence for m in await store.get_tree(tid)}
    # rewinding to a short prefix: no compaction at all, sent as stored
    model.calls.clear()
    await runner.run_result([], RunConfig(trace_id=tid, insert_after=4))
    short = await store.get_path(tid)
    assert not any(compaction_of(m) for m in short)
    assert model.calls[0]["messages"] == [m.to_openai() for m in short[:-1]]


async def test_stored_compaction_records_cannot_be_forged_by_callers(store, workspace):
    model = SizeLimitedModel([lambda m, t: reply("ok")], limit=100_000)
    forged = {"role": "system", "content": "x", "meta": {"compaction": {"stage": 1, "elided": [2]}}}
    result = await runner_for(store, model, workspace).run_result(
        [forged, {"role": "user", "content": "hi"}], RunConfig()
    )
    assert not any(compaction_of(m) for m in await store.get_path(result.trace.trace_id))


async def test_one_giant_message_is_cut_in_what_is_sent_not_in_what_is_stored(store, workspace):
    model = SizeLimitedModel(
        [lambda m, t: ModelResponse(content="read it", usage=MessageUsage())], limit=BUDGET
    )
    giant = "y" * 200_000
    result = await runner_for(store, model, workspace).run_result(
        [{"role": "user", "content": "go"}, {"role": "user", "content": giant}], RunConfig()
    )
    assert model.refused == 0 and result.answer == "read it"
    assert (await store.get_path(result.trace.trace_id))[2].content == giant


async def test_a_long_history_passed_in_fits_even_the_call_that_summarises_it(store, workspace):
    """300 middling chat messages from the caller (no tool results to elide): every request, the summary
    call first of all, stays within the budget (cutting the longest message a few times did not)."""
    history = []
    for n in range(150):
        history += [
            {"role": "user", "content": f"Point {n}: " + "the design trades latency for cost. " * 85},
            {"role": "assistant", "content": f"Noted {n}: " + "we keep the cache warm instead. " * 95},
        ]
    model = SizeLimitedModel([reader(0)], limit=BUDGET)
    runner = runner_for(store, model, workspace)
    done = await runner.run_result([*history, {"role": "user", "content": "hello"}], RunConfig())
    assert done.trace.status is Status.COMPLETED and model.refused == 0
    assert max(model.sizes) <= BUDGET and len(model.sizes) == 2  # the summary, then the answer


async def test_clamping_counts_what_escaping_adds_and_cuts_no_more_than_it_must(store, workspace):
    """JSON-like text (newlines and quotes weigh two in the request): each passed-in message keeps as much
    as fits, not nothing."""
    record = json.dumps({"id": 1, "name": "x", "tags": ["a", "b"]}, indent=2) + "\n"
    history = []
    for n in range(20):
        history += [
            {"role": "user", "content": f"Batch {n}:\n" + record * 40},
            {"role": "assistant", "content": f"Stored batch {n}."},
        ]
    model = SizeLimitedModel([reader(0)], limit=BUDGET)
    done = await runner_for(store, model, workspace).run_result(
        [*history, {"role": "user", "content": "hello"}], RunConfig()
    )
    assert done.trace.status is Status.COMPLETED and model.refused == 0
    summary_request = model.calls[0]["messages"]
    batches = [m["content"] for m in summary_request if (m.get("content") or "").startswith("Batch")]
    assert len(batches) == 19 and all(len(b) > 400 for b in batches)  # the first one is the task: whole
    assert model.sizes[0] > BUDGET * 0.6  # the request was filled, not emptied


class SmallerWindow(SizeLimitedModel):
    """A model whose real window is smaller than the budget it was configured with: an over-long request
    is refused the way providers do, as a ContextTooLong the run can act on."""

    async def complete(self, messages, tools, **kw):
        size = (len(json.dumps(messages)) + len(json.dumps(tools))) // self.chars_per_token
        if size > self.limit:
            self.sizes.append(size)
            self.refused += 1
            raise ContextTooLong(f"HTTP 400 for scripted: maximum context length is {self.limit} tokens")
        return await super().complete(messages, tools, **kw)


async def test_a_request_refused_as_too_long_is_fitted_again_not_failed(store, workspace):
    """--context-tokens says 15,000 but the model takes 9,000: the first refusal teaches the run a smaller
    budget, and it goes on to its answer instead of failing."""
    reads: list[str] = []

    def step(messages, tools):  # counts its own reads: a summary takes old tool messages out of view
        if "summarise the conversation so far" in (messages[-1].get("content") or "").lower():
            return reply("Summary: read many handler files; each returns status 200.")
        if messages[-1]["role"] == "tool" and messages[-1]["tool_call_id"] not in reads:
            reads.append(messages[-1]["tool_call_id"])
        if len(reads) >= 40:
            return reply("Read 40 files; every handler returns 200.")
        return reply(None, call("read_file", f"r{len(reads)}", path=f"src/mod{len(reads)}.py"))

    model = SmallerWindow([step], limit=9_000)
    result = await runner_for(store, model, workspace).run_result(
        [{"role": "user", "content": "Audit src/"}], RunConfig()
    )
    assert result.trace.status is Status.COMPLETED, result.trace.error
    assert result.answer == "Read 40 files; every handler returns 200."
    assert 1 <= model.refused <= 3 and max(s for s in model.sizes if s <= 9_000) <= 9_000
    over = [i for i, s in enumerate(model.sizes) if s > 9_000]  # refused in one go, never again after
    assert over == list(range(over[0], over[0] + len(over)))


async def test_a_fork_of_a_compacted_trace_copies_the_messages_not_the_compaction_records(store, workspace):
    model = SizeLimitedModel([reader(40)], limit=BUDGET)
    runner = runner_for(store, model, workspace)
    source = (await runner.run_result([{"role": "user", "content": "Audit src/"}], RunConfig())).trace
    path = await store.get_path(source.trace_id)
    assert any(compaction_of(m) for m in path)
    fork = await runner.run_result(
        [{"role": "user", "content": "Now sum it up."}], RunConfig(from_trace=source.trace_id)
    )
    copied = await store.get_path(fork.trace.trace_id)
    originals = [m for m in path if compaction_of(m) is None]
    assert [(m.role, m.content) for m in copied[: len(originals)]] == [(m.role, m.content) for m in originals]
    assert all(
        compaction_of(m) for m in copied[1:] if m.role == "system"
    )  # its own records, none copied bare
    assert fork.trace.status is Status.COMPLETED and model.refused == 0


def test_an_elided_result_names_where_it_is_kept_and_how_the_agent_gets_it_back():
    from agent.trace.compaction import stub
    from agent.trace.models import Message

    text = stub(
        Message(sequence=7, parent_sequence=6, role="tool", content="x" * 5000, created_at=""), "a" * 32
    )
    assert "5,000 characters" in text and "call the tool again" in text  # the agent cannot read resources
    assert f"trace://{'a' * 32}/messages/7" in text  # a host reading the context can


def test_the_reply_keeps_the_room_its_model_may_write_within_a_small_budget():
    from agent.trace.compaction import REPLY_RESERVE_TOKENS, reply_reserve

    class Long:
        max_tokens = 16_000

    class Longest:
        max_tokens = 64_000

    assert reply_reserve(200_000, Long()) == 16_000
    assert reply_reserve(200_000, Longest()) == 64_000  # sent with the request: input + it must fit
    assert reply_reserve(50_000, Longest()) == 37_500
    assert reply_reserve(200_000, object()) == REPLY_RESERVE_TOKENS
    assert reply_reserve(8_000, object()) == 2_000  # a quarter of a small budget at most


def test_a_latest_message_too_big_for_the_budget_does_not_wipe_the_history_first():
    """Cutting only the older turns cannot fit a 400 KB latest message: that tier must leave them whole,
    so the cut that does fit (the latest message too) shares the room out evenly."""
    from agent.trace.compaction import _clamp, estimate

    turns = [
        {"role": "assistant" if i % 2 else "user", "content": f"turn {i} " + "t" * 3000} for i in range(20)
    ]
    wire = [{"role": "system", "content": "sys"}, {"role": "user", "content": "the task"}, *turns]
    wire.append({"role": "user", "content": "L" * 400_000})
    _clamp(wire, 20_000, 0.3)
    assert estimate(wire, ratio=0.3) <= 20_000
    assert all(len(m["content"]) > 100 for m in wire[2:-1])  # the turns kept a share, not nothing
    assert len(wire[-1]["content"]) < 60_000


async def test_an_empty_summary_still_spends_the_token_budget(store, workspace):
    """Nothing is stored for an empty summary, yet the provider billed it: max_tokens counts it."""
    long_text = "I considered the design carefully. " * 250

    def talk(messages, tools):
        if "summarise the conversation so far" in (messages[-1].get("content") or "").lower():
            return ModelResponse(content="")  # billed as the fake counts it: thousands of tokens
        return reply(long_text)

    model = SizeLimitedModel([talk], limit=8_000)
    runner = runner_for(store, model, workspace, budget=8_000)
    tid = (await runner.run_result([{"role": "user", "content": "Discuss."}], RunConfig())).trace.trace_id
    for turn in range(6):
        result = await runner.run_result(
            [{"role": "user", "content": f"Go on ({turn})."}], RunConfig(trace_id=tid, max_tokens=1_000)
        )
        if any("summarise" in (c["messages"][-1].get("content") or "").lower() for c in model.calls):
            break
    assert (result.trace.status, result.trace.stop_reason) == (Status.STOPPED, StopReason.TOKEN_BUDGET)


async def test_a_long_run_in_a_4k_window_folds_old_turns_in_again_and_never_passes_it(store, workspace):
    """Each step's 7 KB result is most of a 4,096-token window: the residue of old turns (calls, stubs)
    must be summarised again now and then, or it alone would outgrow the window."""
    steps = 0

    def read_on(messages, tools):  # counts its own steps: a summary hides the earlier results from it
        nonlocal steps
        if "summarise the conversation so far" in (messages[-1].get("content") or "").lower():
            return reply("Summary: read many handler files; each returns status 200.")
        steps += 1
        if steps > 60:
            return reply("Read 60 files; every handler returns 200.")
        return reply(None, call("read_file", f"r{steps}", path=f"src/mod{steps - 1}.py"))

    model = SizeLimitedModel([read_on], limit=4096)
    result = await runner_for(store, model, workspace, budget=4096).run_result(
        [{"role": "user", "content": "Audit src/"}], RunConfig()
    )
    assert (
        result.trace.status is Status.COMPLETED
        and result.answer == "Read 60 files; every handler returns 200."
    )
    assert model.refused == 0 and max(model.sizes) <= 4096
    path = await store.get_path(result.trace.trace_id)
    summaries = [m for m in path if (compaction_of(m) or {}).get("stage") == 2]
    assert len(summaries) >= 2  # folded in again as the residue grew
    summary_calls = sum(
        "summarise the conversation so far" in (c["messages"][-1].get("content") or "").lower()
        for c in model.calls
    )
    assert summary_calls <= 60 // 3  # not a summary every step


async def test_the_latest_user_message_is_sent_verbatim_even_when_a_summary_covers_it(store, workspace):
    long_text = "I considered the design carefully. " * 250
    steps = 0

    def talk(messages, tools):  # thinks aloud at length, looking around between thoughts
        nonlocal steps
        if "summarise the conversation so far" in (messages[-1].get("content") or "").lower():
            return reply("Summary: we discussed the design.")
        steps += 1
        return reply(long_text, call("list_files", f"l{steps}", path="src")) if steps % 8 else reply("Done.")

    model = SizeLimitedModel([talk], limit=8_000)
    runner = runner_for(store, model, workspace, budget=8_000)
    tid = (await runner.run_result([{"role": "user", "content": "Discuss."}], RunConfig())).trace.trace_id
    before = len(model.calls)
    await runner.run_result(
        [{"role": "user", "content": "LATEST: prefer option B."}], RunConfig(trace_id=tid)
    )
    path = await store.get_path(tid)
    summary = [m for m in path if (compaction_of(m) or {}).get("stage") == 2][-1]
    latest = next(m for m in path if m.content == "LATEST: prefer option B.")
    assert summary.meta["compaction"]["covers"][1] > latest.sequence  # the summary covers it…
    for sent in model.calls[before:]:  # …and every request since still carries it, word for word
        if "summarise the conversation" not in (sent["messages"][-1].get("content") or "").lower():
            assert {"role": "user", "content": "LATEST: prefer option B."} in sent["messages"]
