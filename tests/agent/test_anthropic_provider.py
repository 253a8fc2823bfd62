"""AnthropicModel through the real ``anthropic`` SDK against a strict fake Messages API on 127.0.0.1.

The fake (tests/fake_anthropic.py) refuses what the real API refuses, so a conversion that would get
HTTP 400 from Anthropic gets it here too: retries, streaming, cancellation and errors are real HTTP.
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import httpx2
import pytest

from agent.errors import ContextTooLong, ModelCallError
from agent.llm.anthropic import AnthropicModel
from tests.fake_anthropic import FakeAnthropic, events, message, serving_anthropic, text, tool_use

pytestmark = pytest.mark.slow  # real HTTP to the fake provider

SECRET = "sk-ant-test-secret-0123456789"
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    },
}
USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
TOOL_HISTORY = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "add 2 and 3, then 1 and 1"},
    {
        "role": "assistant",
        "content": "Adding.",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
            },
            {
                "id": "toolu_2",
                "type": "function",
                "function": {"name": "add", "arguments": '{"a": 1, "b": 1}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "toolu_1", "content": "5"},
    {"role": "tool", "tool_call_id": "toolu_2", "content": "2"},
    {"role": "assistant", "content": "5 and 2."},
    {"role": "user", "content": "Reflect on this run: what lessons would help next time?"},
]


@pytest.fixture(scope="module")
def anthropic_server():
    with serving_anthropic(FakeAnthropic()) as fake:
        yield fake


@pytest.fixture
def fake(anthropic_server: FakeAnthropic):
    anthropic_server.requests.clear()
    anthropic_server.script = []
    anthropic_server.release.clear()
    yield anthropic_server
    anthropic_server.release.set()


def make_model(fake: FakeAnthropic, **kw: Any) -> AnthropicModel:
    kw.setdefault("max_retries", 2)
    kw.setdefault("timeout", 30)
    return AnthropicModel("claude-test", api_key=SECRET, base_url=fake.base_url, **kw)


def accepted(fake: FakeAnthropic) -> list[dict[str, Any]]:
    refused = [r["refused"] for r in fake.requests if r["refused"]]
    assert not refused, refused
    return [r["body"] for r in fake.requests]


@pytest.mark.anyio
async def test_plain_answer_with_usage(fake):
    fake.script = [("json", message(text("Hello there."), usage=(40, 9)))]
    model = make_model(fake, stream=False, max_tokens=321)
    seen: list[str] = []
    response = await model.complete(USER, [], temperature=0.2, on_text=seen.append)
    await model.aclose()
    assert response.content == "Hello there." and seen == ["Hello there."] and response.tool_calls == []
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (40, 9)
    [body] = accepted(fake)
    assert body["model"] == "claude-test" and body["max_tokens"] == 321 and body["system"] == "Be brief."
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert not {"tools", "tool_choice", "stream", "temperature", "output_config"} & body.keys()
    assert fake.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"


@pytest.mark.anyio
async def test_streamed_answer_reaches_on_text_with_usage(fake):
    fake.script = [("sse", (events(message(text("Hello streamed world"), usage=(25, 17))), False))]
    model = make_model(fake)
    seen: list[str] = []
    response = await model.complete(USER, [], temperature=0, on_text=seen.append)
    await model.aclose()
    assert len(seen) == 3 and "".join(seen) == "Hello streamed world" == response.content
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (25, 17)
    assert accepted(fake)[0]["stream"] is True


@pytest.mark.anyio
async def test_cancelling_a_hanging_stream_keeps_the_partial_text(fake):
    partial = events(message(text("partial answer")), pieces=2)[:4]  # start, ping, block start, 1 delta
    fake.script = [("sse", (partial, True))]
    model = make_model(fake)
    seen: list[str] = []
    arrived = anyio.Event()

    def sink(delta: str) -> None:
        seen.append(delta)
        arrived.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def call() -> None:
                with scope:
                    await model.complete(USER, [], temperature=0, on_text=sink)

            tg.start_soon(call)
            await arrived.wait()
            scope.cancel()
    assert scope.cancelled_caught and seen == ["partial"]
    await model.aclose()


@pytest.mark.anyio
async def test_tool_use_round_trip(fake):
    fake.script = [
        ("sse", (events(message(text("Adding."), tool_use("toolu_9", "add", {"a": 2, "b": 3}))), False)),
        ("json", message(text("It is 5."))),
    ]
    model = make_model(fake)
    first = await model.complete(USER, [ADD_TOOL], temperature=0)
    assert first.content == "Adding."
    [call] = first.tool_calls
    assert (call.id, call.function.name, call.function.parsed_arguments()) == (
        "toolu_9",
        "add",
        {"a": 2, "b": 3},
    )
    conversation = [
        *USER,
        {"role": "assistant", "content": first.content, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    second = await model.complete(conversation, [ADD_TOOL], temperature=0)
    await model.aclose()
    assert second.content == "It is 5." and second.tool_calls == []
    sent = accepted(fake)[1]
    assert sent["tools"] == [
        {"name": "add", "description": "Add two numbers", "input_schema": ADD_TOOL["function"]["parameters"]}
    ]
    assert sent["messages"][-1] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "5"}],
    }


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("tools", "tool_choice"),
    [([], "auto"), ([], "none"), ([ADD_TOOL], "none")],
    ids=["no-tools", "no-tools-choice-none", "tools-choice-none"],
)
async def test_side_branch_over_tool_history_answers_in_text(fake, tools, tool_choice):
    """The reflection side branch: tool blocks in the history, no tool may be called (issue 8, item 5)."""
    fake.script = [("json", message(text("- Add in one batch.")))]
    model = make_model(fake, stream=False)
    extra = {"tool_choice": tool_choice} if tool_choice != "auto" else {}  # "auto": the call made before
    response = await model.complete(TOOL_HISTORY, tools, temperature=0, **extra)
    await model.aclose()
    assert response.content == "- Add in one batch." and response.tool_calls == []
    [body] = accepted(fake)
    if tools:  # the history keeps its tool blocks; the tools go with use forbidden
        assert body["tool_choice"] == {"type": "none"} and [t["name"] for t in body["tools"]] == ["add"]
        assert body["messages"][1]["content"][1]["type"] == "tool_use"
    else:  # nothing to define tools with: the tool blocks are written as text
        assert "tools" not in body and "tool_choice" not in body
        flat = str(body["messages"])
        assert "tool_use" not in flat and "tool_result" not in flat
        assert "[called tool add (id toolu_1)" in flat and "[result of tool add (id toolu_2)]" in flat


@pytest.mark.anyio
async def test_tool_calls_are_dropped_when_the_choice_is_none(fake):
    fake.script = [("json", message(text("Text."), tool_use("toolu_5", "add", {})))]  # a server ignoring it
    model = make_model(fake, stream=False)
    response = await model.complete(USER, [ADD_TOOL], temperature=0, tool_choice="none")
    await model.aclose()
    assert response.content == "Text." and response.tool_calls == []


@pytest.mark.anyio
async def test_response_schema_goes_as_output_config_where_supported(fake):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "minLength": 2}},
        "required": ["answer"],
    }
    fake.script = [("json", message(text('{"answer": "ok"}')))]
    modern, old = (
        make_model(fake, stream=False),
        AnthropicModel("claude-3-5-haiku-latest", api_key=SECRET, base_url=fake.base_url, max_retries=0),
    )
    await modern.complete(USER, [], temperature=0, response_schema=schema)
    await old.complete(USER, [], temperature=0, response_schema=schema)
    await modern.complete(USER, [], temperature=0, response_schema={"type": "object"})  # free-form
    await modern.aclose()
    await old.aclose()
    sent, old_sent, free = accepted(fake)
    native = sent["output_config"]["format"]
    assert native["type"] == "json_schema"
    assert native["schema"]["required"] == ["answer"] and native["schema"]["additionalProperties"] is False
    assert "output_config" not in old_sent and "output_config" not in free


@pytest.mark.anyio
async def test_persistent_server_error_is_a_sentence_without_the_key(fake):
    fake.script = [("error", (500, "api_error", f"Internal failure near {SECRET}"))]
    model = make_model(fake, max_retries=2)
    with pytest.raises(ModelCallError) as caught:
        await model.complete(USER, [], temperature=0)
    await model.aclose()
    sentence = str(caught.value)
    assert len(fake.requests) == 3
    assert sentence.startswith(
        "The model provider returned HTTP 500 for anthropic:claude-test after 2 retries:"
    )
    assert "Internal failure" in sentence and SECRET not in sentence


@pytest.mark.anyio
async def test_a_prompt_refused_as_too_long_is_told_apart(fake):
    fake.script = [
        ("error", (400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"))
    ]
    model = make_model(fake, stream=False)
    with pytest.raises(ContextTooLong, match="prompt is too long"):
        await model.complete([{"role": "user", "content": "hi"}], [], temperature=0)
    await model.aclose()


@pytest.mark.anyio
async def test_a_refused_request_is_a_400_sentence_and_not_retried(fake):
    fake.script = [("json", message(text("never")))]
    model = make_model(fake, stream=False)
    orphan = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Let me see."},
        {"role": "tool", "tool_call_id": "toolu_x", "content": "5"},
    ]
    with pytest.raises(ModelCallError) as caught:
        await model.complete(orphan, [ADD_TOOL], temperature=0)
    await model.aclose()
    assert len(fake.requests) == 1
    assert str(caught.value).startswith("The model provider returned HTTP 400 for anthropic:claude-test: ")
    assert "unexpected `tool_use_id`" in str(caught.value)


@pytest.mark.anyio
async def test_bad_key_is_a_401_sentence_without_the_key(fake):
    fake.script = [("error", (401, "authentication_error", "invalid x-api-key"))]
    model = make_model(fake, stream=False)
    with pytest.raises(
        ModelCallError, match=r"HTTP 401 for anthropic:claude-test: invalid x-api-key"
    ) as caught:
        await model.complete(USER, [], temperature=0)
    await model.aclose()
    assert SECRET not in str(caught.value) and len(fake.requests) == 1


@pytest.mark.anyio
async def test_unreachable_server_is_a_connection_sentence():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = AnthropicModel("claude-test", api_key=SECRET, base_url=f"http://127.0.0.1:{port}", max_retries=0)
    with pytest.raises(ModelCallError, match=r"Could not reach the model provider at http://127.0.0.1"):
        await model.complete(USER, [], temperature=0)
    await model.aclose()


@pytest.mark.anyio
async def test_the_fake_refuses_what_the_real_api_refuses(fake):
    """The fake's own rules, so a lenient fake cannot hide a conversion bug."""
    fake.script = [("json", message(text("ok")))]
    tool = {"name": "add", "input_schema": {"type": "object"}}
    use = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "add", "input": {}}]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "5"}]}
    hi = {"role": "user", "content": "hi"}
    cases = {
        "first message must use the": {"messages": [{"role": "assistant", "content": "x"}]},
        "roles must alternate": {"messages": [hi, hi]},
        "must be non-empty": {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
        "non-whitespace": {"messages": [{"role": "user", "content": [{"type": "text", "text": "  "}]}]},
        "must define tools": {"messages": [hi, use, result]},
        "without `tool_result` blocks": {"messages": [hi, use, hi], "tools": [tool]},
        "tool_choice may only": {"messages": [hi], "tool_choice": {"type": "none"}},
        "expected tags": {"messages": [hi], "tools": [tool], "tool_choice": {"type": "never"}},
    }
    async with httpx2.AsyncClient(base_url=fake.base_url) as client:
        headers = {"x-api-key": SECRET, "anthropic-version": "2023-06-01"}
        for expected, body in cases.items():
            reply = await client.post(
                "/v1/messages", json={"model": "m", "max_tokens": 5, **body}, headers=headers
            )
            assert reply.status_code == 400, expected
            assert reply.json()["error"]["type"] == "invalid_request_error"
            assert expected in reply.json()["error"]["message"], (expected, reply.json())
        ok = {"model": "m", "max_tokens": 5, "messages": [hi, use, result], "tools": [tool]}
        assert (await client.post("/v1/messages", json=ok, headers=headers)).status_code == 200
