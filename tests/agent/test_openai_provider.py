"""OpenAIModel against a fake OpenAI-compatible server on 127.0.0.1 (never the internet).

The fake speaks POST /v1/chat/completions with plain JSON or SSE streams, follows a per-test script of
replies and records every request, so retries, streaming assembly and cancellation are real HTTP.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import anyio
import pytest

from agent.errors import ContextTooLong, ModelCallError, ModelConfigError
from agent.llm.base import resolve_model
from agent.llm.openai import OpenAIModel
from agent.llm.redact import RedactingFilter, redact
from tests.fake_openai import FakeOpenAI, chunk, completion

SECRET = "sk-test-secret-0123456789"
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    },
}


@pytest.fixture
def fake(fake_openai: FakeOpenAI) -> FakeOpenAI:
    return fake_openai


async def make_model(fake: FakeOpenAI, **kw: Any) -> OpenAIModel:
    kw.setdefault("max_retries", 2)
    kw.setdefault("timeout", 30)
    base_url = f"http://127.0.0.1:{fake.port}/v1"  # type: ignore[attr-defined]  # set by serving()
    return OpenAIModel("gpt-test", api_key=SECRET, base_url=base_url, **kw)


pytestmark = pytest.mark.slow  # real HTTP to the fake provider

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.anyio
async def test_plain_reply_with_usage(fake):
    fake.script = [("json", completion("Hello there."))]
    model = await make_model(fake, stream=False)
    seen: list[str] = []
    response = await model.complete(USER, [], temperature=0.2, on_text=seen.append)
    await model.aclose()
    assert response.content == "Hello there." and seen == ["Hello there."]
    assert response.tool_calls == []
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (11, 7)
    body = fake.requests[0]["body"]
    assert body["model"] == "gpt-test" and body["messages"] == USER and body["temperature"] == 0.2
    assert "stream" not in body and "tools" not in body
    assert fake.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"


@pytest.mark.anyio
async def test_streamed_reply_calls_on_text_and_takes_usage_from_last_chunk(fake):
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo "}),
        chunk({"content": "world"}),
        chunk(None, usage=(20, 3)),
    ]
    fake.script = [("sse", (chunks, False))]
    model = await make_model(fake)
    seen: list[str] = []
    response = await model.complete(USER, [], temperature=0.3, on_text=seen.append)
    await model.aclose()
    assert seen == ["Hel", "lo ", "world"]
    assert response.content == "Hello world"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (20, 3)
    body = fake.requests[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


@pytest.mark.anyio
async def test_tool_calls_plain(fake):
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
        {"id": "call_b", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 1}'}},
    ]
    fake.script = [("json", completion(None, calls))]
    model = await make_model(fake, stream=False)
    response = await model.complete(USER, [ADD_TOOL], temperature=0)
    await model.aclose()
    assert response.content is None
    assert [(c.id, c.function.name, c.function.parsed_arguments()) for c in response.tool_calls] == [
        ("call_a", "add", {"a": 2, "b": 3}),
        ("call_b", "add", {"a": 1, "b": 1}),
    ]
    assert fake.requests[0]["body"]["tools"] == [ADD_TOOL]


@pytest.mark.anyio
async def test_tool_calls_streamed_with_arguments_split_across_chunks(fake):
    def tc(index: int, **kw: Any) -> dict:
        return {"tool_calls": [{"index": index, **kw}]}

    chunks = [
        chunk({"role": "assistant", "content": None}),
        chunk(tc(0, id="call_x", type="function", function={"name": "add", "arguments": ""})),
        chunk(tc(0, function={"arguments": '{"a": '})),
        chunk(tc(1, id="call_y", type="function", function={"name": "add", "arguments": '{"a": 5'})),
        chunk(tc(0, function={"arguments": '2, "b": 3}'})),
        chunk(tc(1, function={"arguments": ', "b": 6}'})),
        chunk(None, usage=(30, 12)),
    ]
    fake.script = [("sse", (chunks, False))]
    model = await make_model(fake)
    seen: list[str] = []
    response = await model.complete(USER, [ADD_TOOL], temperature=0, on_text=seen.append)
    await model.aclose()
    assert seen == [] and response.content is None
    assert [(c.id, c.function.name, c.function.parsed_arguments()) for c in response.tool_calls] == [
        ("call_x", "add", {"a": 2, "b": 3}),
        ("call_y", "add", {"a": 5, "b": 6}),
    ]
    assert response.usage.completion_tokens == 12


@pytest.mark.anyio
async def test_server_error_then_success_is_retried_by_the_sdk(fake):
    fake.script = [("error", (500, "boom")), ("json", completion("Recovered."))]
    model = await make_model(fake, stream=False)
    response = await model.complete(USER, [], temperature=0)
    await model.aclose()
    assert response.content == "Recovered."
    assert len(fake.requests) == 2


@pytest.mark.anyio
async def test_persistent_server_error_becomes_a_sentence_without_the_key(fake):
    fake.script = [("error", (500, f"upstream exploded near {SECRET}"))]
    model = await make_model(fake, max_retries=2)
    with pytest.raises(ModelCallError) as caught:
        await model.complete(USER, [], temperature=0)
    await model.aclose()
    text = str(caught.value)
    assert len(fake.requests) == 3
    assert text.startswith("The model provider returned HTTP 500 for openai:gpt-test after 2 retries:")
    assert "upstream exploded" in text
    assert SECRET not in text and SECRET not in repr(model)


@pytest.mark.anyio
async def test_client_error_is_not_retried(fake):
    fake.script = [("error", (400, "bad request: messages is empty"))]
    model = await make_model(fake, stream=False)
    with pytest.raises(ModelCallError, match=r"HTTP 400 for openai:gpt-test: bad request"):
        await model.complete(USER, [], temperature=0)
    await model.aclose()
    assert len(fake.requests) == 1


@pytest.mark.anyio
async def test_a_request_refused_as_too_long_is_told_apart_so_the_run_can_compact_harder(fake):
    fake.script = [
        ("error", (400, "This model's maximum context length is 8192 tokens. However, you requested 9001.")),
        ("error", (400, "bad request: messages is empty")),
    ]
    model = await make_model(fake, stream=False)
    with pytest.raises(ContextTooLong, match=r"HTTP 400 for openai:gpt-test: This model's maximum context"):
        await model.complete(USER, [], temperature=0)
    with pytest.raises(ModelCallError) as other:
        await model.complete(USER, [], temperature=0)
    await model.aclose()
    assert not isinstance(other.value, ContextTooLong)


@pytest.mark.anyio
async def test_unreachable_server_is_a_connection_sentence():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = OpenAIModel("gpt-test", api_key=SECRET, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    with pytest.raises(ModelCallError, match=r"Could not reach the model provider at http://127.0.0.1"):
        await model.complete(USER, [], temperature=0)
    await model.aclose()


@pytest.mark.anyio
async def test_tools_sent_only_when_non_empty(fake):
    fake.script = [("json", completion("ok"))]
    model = await make_model(fake, stream=False)
    await model.complete(USER, [], temperature=0)
    await model.complete(USER, [ADD_TOOL], temperature=0)
    await model.aclose()
    assert "tools" not in fake.requests[0]["body"]
    assert fake.requests[1]["body"]["tools"] == [ADD_TOOL]


@pytest.mark.anyio
async def test_cancelling_a_hanging_call_returns_promptly(fake):
    fake.script = [("hang", None)]
    model = await make_model(fake, stream=False)
    with anyio.fail_after(20):
        with anyio.move_on_after(0.3) as scope:
            await model.complete(USER, [], temperature=0)
    assert scope.cancelled_caught
    await model.aclose()


@pytest.mark.anyio
async def test_cancelling_a_hanging_stream_keeps_the_partial_text(fake):
    fake.script = [("sse", ([chunk({"content": "partial "})], True))]
    model = await make_model(fake)
    seen: list[str] = []
    with anyio.fail_after(20), anyio.CancelScope() as scope:

        def on_text(text: str) -> None:  # cancelled once the first chunk is in, as a stop would
            seen.append(text)
            scope.cancel()

        await model.complete(USER, [], temperature=0, on_text=on_text)
    assert scope.cancelled_caught
    assert seen == ["partial "]
    await model.aclose()


def test_from_env_without_key_or_base_url_says_what_to_set():
    with pytest.raises(ModelConfigError) as caught:
        resolve_model("openai:gpt-4o", {})
    text = str(caught.value)
    assert "Model 'openai:gpt-4o' needs OPENAI_API_KEY" in text
    assert "OPENAI_BASE_URL" in text and "'offline'" in text


def test_from_env_with_base_url_only_uses_a_placeholder_key():
    model = resolve_model("openai:llama3", {"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"})
    assert isinstance(model, OpenAIModel)
    assert model.name == "openai:llama3"
    assert model._client.api_key  # any non-empty key: local servers ignore it
    assert str(model._client.base_url).startswith("http://127.0.0.1:11434/v1")


def test_from_env_reads_timeout_retries_and_stream():
    env = {
        "OPENAI_API_KEY": SECRET,
        "AGENT_TRACE_LLM_TIMEOUT": "7.5",
        "AGENT_TRACE_LLM_RETRIES": "0",
        "AGENT_TRACE_LLM_STREAM": "0",
    }
    model = OpenAIModel.from_env("gpt-4o", env)
    assert (model.timeout, model.max_retries, model.stream) == (7.5, 0, False)
    assert model._client.max_retries == 0
    default = OpenAIModel.from_env("gpt-4o", {"OPENAI_API_KEY": SECRET})
    assert (default.timeout, default.max_retries, default.stream) == (120.0, 2, True)
    with pytest.raises(ModelConfigError, match="AGENT_TRACE_LLM_TIMEOUT"):
        OpenAIModel.from_env("gpt-4o", {"OPENAI_API_KEY": SECRET, "AGENT_TRACE_LLM_TIMEOUT": "soon"})


@pytest.mark.anyio
async def test_tool_choice_none_goes_with_the_tools_and_no_call_comes_back(fake):
    calls = [{"id": "call_a", "type": "function", "function": {"name": "add", "arguments": "{}"}}]
    fake.script = [("json", completion("Text only.", calls))]  # a compatible server that ignores it
    model = await make_model(fake, stream=False)
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_a", "content": "0"},
        {"role": "user", "content": "Reflect on this run."},
    ]
    response = await model.complete(history, [ADD_TOOL], temperature=0, tool_choice="none")
    await model.complete(history, [], temperature=0, tool_choice="none")
    await model.complete(USER, [ADD_TOOL], temperature=0)
    await model.aclose()
    assert response.content == "Text only." and response.tool_calls == []
    with_tools, without_tools, auto = (r["body"] for r in fake.requests)
    assert with_tools["tool_choice"] == "none" and with_tools["tools"] == [ADD_TOOL]
    assert with_tools["messages"] == history
    assert "tool_choice" not in without_tools and "tools" not in without_tools  # refused without tools
    assert "tool_choice" not in auto  # the default is not spelled out: some servers reject it


@pytest.mark.anyio
async def test_response_schema_goes_as_a_json_schema_response_format(fake):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fake.script = [("sse", ([chunk({"content": '{"n": 3}'}), chunk(None, usage=(5, 2))], False))]
    model = await make_model(fake)
    response = await model.complete(USER, [], temperature=0, response_schema=schema)
    await model.aclose()
    assert response.content == '{"n": 3}'
    assert fake.requests[0]["body"]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "result", "schema": schema, "strict": False},
    }


def test_redact_hides_userinfo_and_secret_query_values():
    assert redact("POST http://alice:s3cret@host:8/v1/chat?api-key=k1&x=1&token=t2#f") == (
        "POST http://***@host:8/v1/chat?api-key=***&x=1&token=***#f"
    )
    kept = "GET https://host/v1/models?limit=5&design=x user@example.com"
    assert redact(kept) == kept


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["userinfo", "query"])
async def test_credentials_in_the_base_url_never_reach_the_log(fake, caplog, where):
    password = "pw-0123456789-secret"
    base = f"http://127.0.0.1:{fake.port}/v1"
    if where == "userinfo":
        base = f"http://bob:{password}@127.0.0.1:{fake.port}/v1"
    else:
        base += f"?api-key={password}"
    fake.script = [("json", completion("Hello."))]
    caplog.set_level(logging.INFO)
    for logger in [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)]:
        for installed in [f for f in logger.filters if isinstance(f, RedactingFilter)]:
            logger.removeFilter(installed)  # an earlier test's provider must not do this one's work
    model = resolve_model("openai:gpt-test", {"OPENAI_BASE_URL": base, "AGENT_TRACE_LLM_RETRIES": "0"})
    try:
        await model.complete(USER, [], temperature=0)
    except ModelCallError as exc:  # a query in a base URL may spoil the path: the log is what matters
        assert password not in str(exc)
    finally:
        await model.aclose()  # type: ignore[attr-defined]
    http_lines = [r.getMessage() for r in caplog.records if r.name.startswith("httpx")]
    assert any("HTTP Request: POST http://" in line and f":{fake.port}/v1" in line for line in http_lines)
    assert all(password not in r.getMessage() for r in caplog.records)
    assert password not in caplog.text and "***" in caplog.text
