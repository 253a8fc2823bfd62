"""Steering through a real MCP client against the scripted OpenAI-compatible server: questions, approvals,
typed results, overrides reaching the provider, forks, tags and deletion."""

from __future__ import annotations

import pytest
from mcp import Client

from server.app import build_server
from server.settings import Settings
from tests.fake_openai import completion, tool_call
from tests.server.helpers import call, call_error, full, wait_done

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture
async def client(tmp_path, workspace, fake_openai, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("AGENT_TRACE_LLM_STREAM", "0")
    settings = Settings.for_data_dir(tmp_path / "data", model="openai:gpt-test", workspace=workspace)
    async with Client(build_server(settings), mode="legacy") as c:
        yield c


async def test_ask_answer_and_complete(client, fake_openai):
    fake_openai.script = [
        ("json", completion(None, [tool_call("ask_host", "q1", question="Which file?")])),
        ("json", completion("I read notes.txt as you said.")),
    ]
    tid = (await call(client, "create_trace", prompt="Summarise a file"))["trace_id"]
    paused = await wait_done(client, tid)
    assert paused["trace"]["outcome"] == "needs_input" and paused["question"] == "Which file?"
    assert paused["next"] == f"Waiting for you. Reply with run_trace(trace_id='{tid}', answer='...')."
    assert "asks nothing" not in await call_error(client, "run_trace", trace_id=tid, approve=True)
    await call(client, "run_trace", trace_id=tid, answer="notes.txt")
    done = await wait_done(client, tid)
    assert done["answer"] == "I read notes.txt as you said."
    sent = fake_openai.requests[-1]["body"]["messages"]
    assert sent[-1] == {"role": "tool", "content": "notes.txt", "tool_call_id": "q1"}
    assert any(t["function"]["name"] == "ask_host" for t in fake_openai.requests[0]["body"]["tools"])


async def test_approve_a_confirmed_tool_then_decline_one(client, fake_openai):
    fake_openai.script = [
        ("json", completion(None, [tool_call("read_file", "r1", path="README.md")])),
        ("json", completion("Read it.")),
    ]
    tid = (await call(client, "create_trace", prompt="read the README", confirm_tools=["read_file"]))[
        "trace_id"
    ]
    paused = await wait_done(client, tid)
    assert paused["trace"]["outcome"] == "needs_input" and "read_file" in paused["question"]
    assert (
        paused["next"].startswith("Waiting for your approval.") and "approve=true) to run" in paused["next"]
    )
    await call(client, "run_trace", trace_id=tid, approve=True)
    assert (await wait_done(client, tid))["answer"] == "Read it."
    steps = (await full(client, tid))["messages"]
    assert "The answer is 42." in next(m for m in steps if m["role"] == "tool")["content"]

    fake_openai.script = [
        ("json", completion(None, [tool_call("read_file", "r2", path="notes.txt")])),
        ("json", completion("Fine, I will not.")),
    ]
    await call(client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "now the notes"}])
    assert (await wait_done(client, tid))["trace"]["outcome"] == "needs_input"
    await call(client, "run_trace", trace_id=tid, approve=False, answer="private")
    assert (await wait_done(client, tid))["answer"] == "Fine, I will not."
    assert fake_openai.requests[-1]["body"]["messages"][-1]["content"] == "declined: private"


async def test_stop_by_tag_stops_a_trace_waiting_for_input(client, fake_openai):
    fake_openai.script = [("json", completion(None, [tool_call("ask_host", "q1", question="Go on?")]))]
    tid = (await call(client, "create_trace", prompt="ask first", tags=["paused"]))["trace_id"]
    assert (await wait_done(client, tid))["trace"]["outcome"] == "needs_input"
    assert await call(client, "stop_trace", tag="paused") == {"stopping": [tid], "not_running": []}
    assert (await wait_done(client, tid))["trace"]["outcome"] == "stopped"  # as stop_trace(trace_id) does


async def test_typed_result_overrides_fork_tags_and_delete(client, fake_openai):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    fake_openai.script = [("json", completion("forty-two")), ("json", completion('{"answer": 42}'))]
    tid = (
        await call(client, "create_trace", prompt="What is the answer?", output_schema=schema, tags=["q"])
    )["trace_id"]
    done = await wait_done(client, tid)
    assert done["result"] == {"answer": 42} and done["trace"]["outcome"] == "answered"
    assert fake_openai.requests[0]["body"]["response_format"]["json_schema"]["schema"] == schema
    rows = await call(client, "await_traces", tag="q", mode="all", wait_seconds=1)
    assert rows["done"][0]["result"] == {"answer": 42}

    fake_openai.script = [("json", completion('{"answer": 7}'))]
    await call(
        client,
        "run_trace",
        trace_id=tid,
        messages=[{"role": "user", "content": "again"}],
        model="openai:gpt-other",
        temperature=1.0,
    )
    await wait_done(client, tid)
    assert fake_openai.requests[-1]["body"]["model"] == "gpt-other"
    assert fake_openai.requests[-1]["body"]["temperature"] == 1.0

    fake_openai.script = [("json", completion('{"answer": 1}'))]
    fork = (await call(client, "create_trace", from_trace=tid, from_sequence=2, prompt="differently"))[
        "trace_id"
    ]
    forked = await wait_done(client, fork)
    assert forked["trace"]["forked_from"] == {"trace_id": tid, "sequence": 2}
    assert [m["role"] for m in (await full(client, fork))["messages"]][:3] == ["system", "user", "user"]

    again = (await call(client, "create_trace", from_trace=tid, prompt=""))["trace_id"]  # "" is no prompt
    assert (await wait_done(client, again))["trace"]["forked_from"]["trace_id"] == tid
    assert (await call(client, "delete_trace", trace_id=fork)) == {"trace_id": fork, "deleted": True}
    assert "There is no trace" in await call_error(client, "get_trace", trace_id=fork)
    text = await call_error(client, "create_trace", prompt="x", output_schema={"type": "bogus"})
    assert "output_schema" in text and "http" not in text
    text = await call_error(client, "create_trace", from_trace=tid, from_sequence=999, prompt="x")
    assert "no message with sequence 999" in text


async def test_a_fork_of_a_paused_trace_closes_the_open_call_and_keeps_the_sources_settings(
    client, fake_openai
):
    fake_openai.script = [("json", completion(None, [tool_call("read_file", "r1", path="README.md")]))]
    source = (
        await call(
            client,
            "create_trace",
            prompt="read the README",
            confirm_tools=["read_file"],
            ask_host=False,
            temperature=1.2,
            max_iterations=5,
        )
    )["trace_id"]
    assert (await wait_done(client, source))["trace"]["outcome"] == "needs_input"
    fake_openai.script = [("json", completion("Hi."))]
    fork = (await call(client, "create_trace", from_trace=source, prompt="Never mind: say hi."))["trace_id"]
    assert (await wait_done(client, fork))["answer"] == "Hi."
    body = fake_openai.requests[-1]["body"]
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool", "user"]
    closed = body["messages"][3]
    assert closed["tool_call_id"] == "r1" and closed["content"].startswith("Not run")
    assert body["temperature"] == 1.2 and all(t["function"]["name"] != "ask_host" for t in body["tools"])
    config = (await full(client, fork))["trace"]["config"]
    assert config["max_iterations"] == 5 and config["ask_host"] is False
    assert (await wait_done(client, source))["trace"]["outcome"] == "needs_input"  # the source is as it was


async def test_approve_with_an_answer_answers_the_question_asked_beside_the_approval(client, fake_openai):
    fake_openai.script = [
        (
            "json",
            completion(
                None,
                [
                    tool_call("ask_host", "q1", question="Which part?"),
                    tool_call("read_file", "r1", path="README.md"),
                ],
            ),
        ),
        ("json", completion("Read the intro.")),
    ]
    tid = (await call(client, "create_trace", prompt="read", confirm_tools=["read_file"]))["trace_id"]
    paused = await wait_done(client, tid)
    assert paused["trace"]["outcome"] == "needs_input" and "answer='...', approve=true)" in paused["next"]
    await call(client, "run_trace", trace_id=tid, approve=True, answer="the intro")
    assert (await wait_done(client, tid))["answer"] == "Read the intro."
    sent = fake_openai.requests[-1]["body"]["messages"]
    results = {m["tool_call_id"]: m["content"] for m in sent if m["role"] == "tool"}
    assert results["q1"] == "the intro" and "The answer is 42." in results["r1"]

    fake_openai.script = [("json", completion(None, [tool_call("read_file", "r2", path="notes.txt")]))]
    await call(client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "and the notes"}])
    assert (await wait_done(client, tid))["trace"]["outcome"] == "needs_input"
    text = await call_error(client, "run_trace", trace_id=tid, approve=True, answer="lost")
    assert "asks no question, so approve=true takes no answer" in text
