"""Anthropic provider: the pure conversions both ways, stream assembly, and errors (via an in-memory transport)."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
from anthropic import AsyncAnthropic
from anthropic.types import Message

from agent.errors import ModelCallError, ModelConfigError
from agent.llm.anthropic import (
    AnthropicModel,
    StreamAccumulator,
    from_anthropic_message,
    native_schema,
    to_anthropic_messages,
    to_anthropic_tools,
)
from agent.llm.base import resolve_model, split_model_spec
from agent.llm.windows import context_window

SECRET = "sk-ant-test-secret-0123456789"


def tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_system_messages_are_joined_and_removed_from_the_turns():
    system, turns = to_anthropic_messages(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "system", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": "hi"},
        ]
    )
    assert system == "You are terse.\n\nUse tools."
    assert turns == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def test_tool_calls_become_tool_use_and_consecutive_results_one_user_turn():
    system, turns = to_anthropic_messages(
        [
            {"role": "user", "content": "add things"},
            {
                "role": "assistant",
                "content": "Let me add.",
                "tool_calls": [
                    tool_call("c1", "add", '{"a": 2, "b": 3}'),
                    tool_call("c2", "add", "not json"),
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "5"},
            {"role": "tool", "tool_call_id": "c2", "content": ""},
            {"role": "assistant", "content": "Done: 5."},
        ]
    )
    assert system == ""
    assert turns == [
        {"role": "user", "content": [{"type": "text", "text": "add things"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me add."},
                {"type": "tool_use", "id": "c1", "name": "add", "input": {"a": 2, "b": 3}},
                {"type": "tool_use", "id": "c2", "name": "add", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "5"},
                {"type": "tool_result", "tool_use_id": "c2"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Done: 5."}]},
    ]


def test_adjacent_same_role_messages_merge_and_empty_content_is_dropped():
    _, turns = to_anthropic_messages(
        [
            {"role": "user", "content": "one"},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": None, "tool_calls": [tool_call("c1", "ls", "{}")]},
            {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
            {"role": "user", "content": "  "},
            {"role": "user", "content": "now what?"},
            {"role": "assistant", "content": ""},
        ]
    )
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[0]["content"] == [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert turns[1]["content"] == [{"type": "tool_use", "id": "c1", "name": "ls", "input": {}}]
    # tool results stay first in the merged user turn, as Anthropic requires
    assert turns[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "c1", "content": "a.txt"},
        {"type": "text", "text": "now what?"},
    ]


def test_a_conversation_starting_with_the_assistant_gets_a_user_turn_first():
    _, turns = to_anthropic_messages([{"role": "assistant", "content": "Hello!"}])
    assert [t["role"] for t in turns] == ["user", "assistant"]
    _, only_system = to_anthropic_messages([{"role": "system", "content": "s"}])
    assert [t["role"] for t in only_system] == ["user"]


def test_tool_schemas_convert_to_input_schema():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "read_file",
                "description": "Read a file",
                "parameters": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}},
                    "required": ["path"],
                },
            },
        },
        {"type": "function", "function": {"name": "now"}},
    ]
    assert to_anthropic_tools(tools) == [
        {
            "name": "read_file",
            "description": "Read a file",
            "input_schema": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]


MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-test",
    "content": [
        {"type": "text", "text": "I'll add "},
        {"type": "text", "text": "them."},
        {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 2, "b": 3}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 40, "output_tokens": 9, "cache_read_input_tokens": 2},
}


@pytest.mark.parametrize("message", [MESSAGE, Message.model_validate(MESSAGE)], ids=["dict", "sdk"])
def test_response_parsing(message):
    response = from_anthropic_message(message)
    assert response.content == "I'll add them."
    assert len(response.tool_calls) == 1
    call = response.tool_calls[0]
    assert (call.id, call.function.name, call.function.parsed_arguments()) == (
        "toolu_1",
        "add",
        {"a": 2, "b": 3},
    )
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (42, 9)


def test_text_only_response_has_no_tool_calls():
    response = from_anthropic_message({**MESSAGE, "content": [{"type": "text", "text": "Hi."}]})
    assert response.content == "Hi." and response.tool_calls == []


STREAM_EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {**MESSAGE, "content": [], "usage": {"input_tokens": 25, "output_tokens": 1}},
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Adding "}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "now."}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_9", "name": "add", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"a": 2,'},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": ' "b": 3}'},
    },
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 17}},
    {"type": "message_stop"},
]


def test_stream_accumulator_assembles_text_tool_input_and_usage():
    acc = StreamAccumulator()
    texts = [acc.add(event) for event in STREAM_EVENTS]
    assert [t for t in texts if t] == ["Adding ", "now."]
    response = acc.response()
    assert response.content == "Adding now."
    assert [(c.id, c.function.parsed_arguments()) for c in response.tool_calls] == [
        ("toolu_9", {"a": 2, "b": 3})
    ]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (25, 17)


def _model(handler, **kw) -> AnthropicModel:
    client = AsyncAnthropic(
        api_key=SECRET,
        base_url="http://anthropic.test",
        max_retries=kw.pop("max_retries", 0),
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )
    return AnthropicModel(
        "claude-test", api_key=SECRET, base_url="http://anthropic.test", client=client, **kw
    )


@pytest.mark.anyio
async def test_complete_sends_converted_request_and_streams_text():
    requests: list[dict] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        requests.append(json.loads(request.content))
        body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in STREAM_EVENTS)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())

    model = _model(handler, max_tokens=123)
    seen: list[str] = []
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]
    response = await model.complete(messages, tools, temperature=1.7, on_text=seen.append)
    assert seen == ["Adding ", "now."]
    assert response.tool_calls[0].function.name == "add"
    sent = requests[0]
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 123 and sent["stream"] is True
    assert "temperature" not in sent  # the SDK 2.x Messages API has no temperature
    assert sent["tools"] == [{"name": "add", "input_schema": {"type": "object"}}]


@pytest.mark.anyio
async def test_provider_error_becomes_a_sentence_without_the_key():
    def handler(request: httpx2.Request) -> httpx2.Response:
        error = {"type": "error", "error": {"type": "overloaded_error", "message": f"Overloaded {SECRET}"}}
        return httpx2.Response(529, json=error)

    model = _model(handler, stream=False)
    with pytest.raises(ModelCallError) as caught:
        await model.complete([{"role": "user", "content": "hi"}], [], temperature=0)
    text = str(caught.value)
    assert text.startswith("The model provider returned HTTP 529 for anthropic:claude-test: Overloaded")
    assert SECRET not in text


def test_from_env_without_key_says_what_to_set():
    with pytest.raises(ModelConfigError) as caught:
        resolve_model("anthropic:claude-sonnet-4-5", {"OPENAI_API_KEY": "sk-other"})
    assert "Model 'anthropic:claude-sonnet-4-5' needs ANTHROPIC_API_KEY" in str(caught.value)
    assert "'offline'" in str(caught.value)


def test_from_env_reads_key_base_url_and_limits():
    env = {
        "ANTHROPIC_API_KEY": SECRET,
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9999",
        "AGENT_TRACE_MAX_TOKENS": "2048",
        "AGENT_TRACE_LLM_TIMEOUT": "30",
        "AGENT_TRACE_LLM_RETRIES": "1",
    }
    model = resolve_model("anthropic:claude-test", env)
    assert isinstance(model, AnthropicModel)
    assert model.name == "anthropic:claude-test"
    assert (model.max_tokens, model.timeout, model.max_retries) == (2048, 30.0, 1)
    assert str(model._client.base_url).startswith("http://127.0.0.1:9999")
    assert SECRET not in repr(model)
    assert AnthropicModel.from_env("x", {"ANTHROPIC_API_KEY": SECRET}).max_tokens == 4096
    with pytest.raises(ModelConfigError, match="AGENT_TRACE_MAX_TOKENS"):
        AnthropicModel.from_env("x", {"ANTHROPIC_API_KEY": SECRET, "AGENT_TRACE_MAX_TOKENS": "lots"})


def test_flattened_tool_blocks_become_text_that_alternates():
    messages = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": "On it.", "tool_calls": [tool_call("c1", "add", '{"a": 2}')]},
        {"role": "tool", "tool_call_id": "c1", "content": "2"},
        {"role": "user", "content": "Reflect."},
    ]
    _, turns = to_anthropic_messages(messages, flatten_tools=True)
    assert turns == [
        {"role": "user", "content": [{"type": "text", "text": "add"}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": 'On it.\n[called tool add (id c1) with {"a": 2}]'}],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "[result of tool add (id c1)]\n2"},
                {"type": "text", "text": "Reflect."},
            ],
        },
    ]


def _request(messages, tools, **kw) -> dict:
    model = AnthropicModel("claude-sonnet-4-5", api_key=SECRET, base_url="http://anthropic.test")
    return model.build_request(messages, tools, **kw)


def test_side_branch_requests_keep_tools_or_flatten_them():
    tools = [{"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}]
    history = [
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call("c1", "ls", "{}")]},
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
        {"role": "user", "content": "Reflect."},
    ]
    native = _request(history, tools, tool_choice="none")
    assert native["tool_choice"] == {"type": "none"} and native["tools"][0]["name"] == "ls"
    assert native["messages"][1]["content"][0]["type"] == "tool_use"
    flat = _request(history, [], tool_choice="none")
    assert "tools" not in flat and "tool_choice" not in flat
    assert all(block["type"] == "text" for turn in flat["messages"] for block in turn["content"])
    auto = _request(history, tools)
    assert "tool_choice" not in auto and auto["messages"] == native["messages"]


def test_native_schema_only_where_structured_outputs_help():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}, "required": ["n"]}
    config = native_schema("claude-sonnet-4-5", schema)
    assert config is not None and config["format"]["type"] == "json_schema"
    assert config["format"]["schema"]["additionalProperties"] is False
    assert (
        "minimum: 1" in config["format"]["schema"]["properties"]["n"]["description"]
    )  # still validated by us
    for old in ("claude-3-7-sonnet-latest", "claude-sonnet-4-20250514", "claude-opus-4-0", "claude-2.1"):
        assert native_schema(old, schema) is None, old
    assert native_schema("claude-sonnet-4-5", {"type": "object"}) is None  # free-form: it would force {}
    assert native_schema("claude-sonnet-4-5", {"additionalProperties": {"type": "string"}}) is None
    assert "output_config" in _request([{"role": "user", "content": "x"}], [], response_schema=schema)


def test_bare_claude_names_mean_anthropic_and_others_openai():
    assert split_model_spec("claude-sonnet-4-5") == ("anthropic", "claude-sonnet-4-5")
    assert split_model_spec("gpt-4o") == ("openai", "gpt-4o")
    assert split_model_spec("openai:claude-proxy") == ("openai", "claude-proxy")
    with pytest.raises(ModelConfigError, match="ANTHROPIC_API_KEY"):
        resolve_model("claude-sonnet-4-5", {"OPENAI_API_KEY": "sk-other"})


@pytest.mark.parametrize(
    ("spec", "tokens"),
    [
        ("openai:gpt-4o", 128_000),
        ("gpt-4o-mini-2024-07-18", 128_000),
        ("openai:gpt-4.1-nano", 1_047_576),
        ("o3-mini", 200_000),
        ("o4-mini", 200_000),
        ("gpt-5-mini", 272_000),
        ("claude-sonnet-4-5", 200_000),
        ("anthropic:claude-3-5-haiku-latest", 200_000),
        ("anthropic:claude-opus-4-1-20250805", 200_000),
        ("openai:openai/gpt-4o", 128_000),
        ("openai:llama3", None),
        ("offline", None),
        ("", None),
        ("mystery:model", None),
    ],
)
def test_context_window_by_prefix(spec, tokens):
    assert context_window(spec) == tokens
