"""Long values in what a host reads: questions, typed results, big messages and number-shaped arguments.

Each answer is bounded for the host, and whatever it leaves out it says where to read whole.
"""

from __future__ import annotations

import json

import pytest
from mcp import Client

from tests.fakes import call as tool_call
from tests.fakes import reply, turn_script
from tests.server.helpers import call, call_error, full, wait_done

pytestmark = pytest.mark.anyio

COMPACT_ROW = {
    "trace_id", "name", "tags", "status", "outcome", "stop_reason", "model", "steps", "usage", "created_at",
    "updated_at",
}  # fmt: skip


@pytest.fixture(params=["legacy", "auto"])
async def client(request, server):
    async with Client(server, mode=request.param) as c:
        yield c


async def test_a_long_question_is_cut_with_a_marker_naming_the_asking_message(client, model):
    question = "Which of these files should I read first? " + "option " * 220  # ≈ 1,580 characters
    model.steps = [turn_script(reply(None, tool_call("ask_host", "q1", question=question)), reply("ok"))]
    tid = (await call(client, "create_trace", prompt="read something"))["trace_id"]
    view = await wait_done(client, tid)
    assert view["trace"]["outcome"] == "needs_input"
    marker = f"read trace://{tid}/messages/3 for the whole call"
    assert view["question"].startswith("Which of these files") and marker in view["question"]
    row = (await call(client, "await_traces", trace_ids=[tid]))["done"][0]
    assert marker in row["question"]
    asking = await client.read_resource(f"trace://{tid}/messages/3")
    assert (
        question.strip()
        in json.loads(json.loads(asking.contents[0].text)["tool_calls"][0]["function"]["arguments"])[
            "question"
        ]
    )


async def test_an_approval_question_shows_the_calls_arguments_a_host_judges_by(client, model):
    note = "a" * 1200
    model.steps = [
        turn_script(reply(None, tool_call("read_file", "c1", path="README.md", note=note)), reply("read"))
    ]
    tid = (await call(client, "create_trace", prompt="read", confirm_tools=["read_file"]))["trace_id"]
    view = await call(client, "get_trace", trace_id=tid, view="full")
    while view["trace"]["status"] == "running":
        view = await call(client, "get_trace", trace_id=tid, view="full", wait_seconds=5)
    assert note in view["trace"]["question"] and "read_file(" in view["trace"]["question"]


async def test_await_traces_returns_a_typed_result_whole_or_says_where_it_is(client, model):
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    mid, big = {"text": "m" * 1800}, {"text": "b" * 9000}
    model.steps = [turn_script(reply(json.dumps(mid)))]
    first = (await call(client, "create_trace", prompt="mid", output_schema=schema))["trace_id"]
    await wait_done(client, first)
    model.steps = [turn_script(reply(json.dumps(big)))]
    second = (await call(client, "create_trace", prompt="big", output_schema=schema))["trace_id"]
    await wait_done(client, second)
    whole = await call(client, "await_traces", trace_ids=[first])
    assert whole["done"][0]["result"] == mid and "next" not in whole
    answer = await call(client, "await_traces", trace_ids=[second])
    row = answer["done"][0]
    assert row["result"] is None and f"trace://{second}/messages/3" in answer["next"]
    assert f"The result of {second} (9,012 characters of JSON)" in answer["next"]
    assert set(row) == {*COMPACT_ROW, "answer", "result", "question"}  # the rows as product.md names them


async def test_a_full_page_stays_under_a_mebibyte_in_multi_byte_text(client, model):
    model.steps = [turn_script(reply("中" * 600_000))]  # 1.8 MB of UTF-8 in one answer
    tid = (await call(client, "create_trace", prompt="write a lot"))["trace_id"]
    await wait_done(client, tid)
    first = await client.call_tool("get_trace", {"trace_id": tid, "view": "full"})
    assert first.structured_content["next_after_sequence"] == 2  # the answer starts the next page
    result = await client.call_tool("get_trace", {"trace_id": tid, "view": "full", "after_sequence": 2})
    assert len(result.content[0].text.encode()) < 1_000_000
    answer = result.structured_content["messages"][0]
    assert answer["content"].startswith("中" * 1000) and f"trace://{tid}/messages/3" in answer["content"]


async def test_a_messages_page_stays_under_the_hosts_spill_size(client, model, workspace):
    (workspace / "big.txt").write_text("x" * 9000, encoding="utf-8")
    read = reply(None, tool_call("read_file", "c1", path="big.txt"))
    model.steps = [turn_script(*[read] * 20, reply("read"))]
    tid = (await call(client, "create_trace", prompt="read big.txt often"))["trace_id"]
    await wait_done(client, tid)
    for max_chars in (0, 1, 2000, 9000):
        result = await client.call_tool(
            "get_trace", {"trace_id": tid, "view": "messages", "max_chars": max_chars}
        )
        assert len(result.content[0].text) <= 40_000
    page = result.structured_content
    assert page["next_after_sequence"] and "after_sequence=" in page["next"]


async def test_one_message_bigger_than_a_messages_page_is_cut_to_fit_it(client, model):
    wide = [tool_call("read_file", f"c{n}", path="README.md", note="w" * 30_000) for n in range(3)]
    model.steps = [turn_script(reply("t" * 30_000, *wide), reply("read"))]
    tid = (await call(client, "create_trace", prompt="read"))["trace_id"]
    await wait_done(client, tid)
    arguments = {"trace_id": tid, "view": "messages", "max_chars": 40_000, "after_sequence": 2}
    result = await client.call_tool("get_trace", arguments)
    assert len(result.content[0].text) <= 40_000
    first = result.structured_content["messages"][0]
    assert first["sequence"] == 3 and f"trace://{tid}/messages/3" in first["content"]


async def test_true_or_false_is_no_number(client):
    text = await call_error(client, "create_trace", prompt="x", max_iterations=True)
    assert text == "Argument 'max_iterations' of create_trace must be an integer; got True."
    text = await call_error(client, "create_trace", prompt="x", temperature=False)
    assert text == "Argument 'temperature' of create_trace must be a number; got False."
    assert "wait_seconds" in await call_error(client, "get_trace", trace_id="a" * 32, wait_seconds=True)
    assert (await call(client, "list_traces"))["traces"] == []
    tid = (await call(client, "create_trace", prompt="x", max_iterations=3, temperature=1))["trace_id"]
    assert (await full(client, tid))["trace"]["config"]["max_iterations"] == 3


async def test_confirm_tools_is_bounded_and_tags_hold_no_control_characters(client):
    text = await call_error(client, "create_trace", prompt="x", confirm_tools=["read_file"] * 201)
    assert text == "confirm_tools lists 201 names; at most 200 are allowed."
    text = await call_error(client, "create_trace", prompt="x", tags=["prod\x00evil"])
    assert text == "A tag cannot hold control characters; got 'prod\\x00evil'."
    tid = (await call(client, "create_trace", prompt="x", tags=["prod"]))["trace_id"]
    for tool, extra in (("list_traces", {}), ("stop_trace", {}), ("await_traces", {"wait_seconds": 0})):
        text = await call_error(client, tool, tag="prod\x00x", **extra)
        assert text == f"Argument 'tag' of {tool} must be a tag without control characters; got 'prod\\x00x'."
    assert [t["trace_id"] for t in (await call(client, "list_traces", tag="prod"))["traces"]] == [tid]


async def test_a_trace_of_many_small_messages_is_read_under_a_mebibyte_on_the_wire(client):
    history = [
        {"role": "user" if n % 2 == 0 else "assistant", "content": f'message "{n}" of a long chat'}
        for n in range(6000)
    ]
    history.append({"role": "user", "content": "sum up"})
    tid = (await call(client, "create_trace", messages=history))["trace_id"]
    await wait_done(client, tid)
    after, seen = None, []
    while True:
        arguments = {"trace_id": tid, "view": "full"} | ({"after_sequence": after} if after else {})
        result = await client.call_tool("get_trace", arguments)
        assert len(result.model_dump_json(by_alias=True).encode()) < 1_000_000  # text and structured copy
        page = result.structured_content
        seen += [m["sequence"] for m in page["messages"]]
        if "next_after_sequence" not in page:
            break
        after = page["next_after_sequence"]
    assert seen == list(range(1, page["last_sequence"] + 1)) and len(seen) > len(history)
    for uri in (f"trace://{tid}", f"trace://{tid}/tree"):
        text = (await client.read_resource(uri)).contents[0].text
        assert len(json.dumps(text).encode()) < 1_000_000
        body = json.loads(text)
        assert body["messages"][-1]["sequence"] == seen[-1] and "pages through every one" in body["note"]


def test_the_summary_fits_in_4_kb_even_when_the_traces_own_texts_are_long_and_multi_byte():
    from agent.trace.models import Status, StopReason, Trace
    from server.views import SUMMARY_BYTES, size_of, summary

    emoji = "😀" * 193
    trace = Trace(
        trace_id="a" * 32,
        model="openai:" + emoji,
        name=emoji[:120],
        tags=[emoji[:64]] * 5,
        status=Status.FAILED,
        stop_reason=StopReason.ERROR,
        error="提供者拒绝了请求。" * 200,
    )
    body = summary(trace, [], None)
    assert size_of(body) <= SUMMARY_BYTES and body["trace"]["outcome"] == "failed"
    assert body["trace"]["error"].startswith("提供者拒绝了请求。")  # shortened, not dropped


async def test_a_question_past_the_stored_cap_does_not_claim_a_false_length(client, model):
    question = "Which one? " + "x" * 100_000
    model.steps = [turn_script(reply(None, tool_call("ask_host", "q1", question=question)), reply("ok"))]
    tid = (await call(client, "create_trace", prompt="ask"))["trace_id"]
    view = await wait_done(client, tid)
    assert "more than 4,000 characters" in view["question"] and "4,001" not in view["question"]
