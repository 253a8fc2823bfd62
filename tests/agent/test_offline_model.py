"""OfflineModel: deterministic tool calls with schema-valid arguments, summaries, reflections, plain replies."""

from __future__ import annotations

import json

import anyio
import jsonschema
import pytest

from agent.llm.base import Model, resolve_model
from agent.llm.offline import OfflineModel

pytestmark = pytest.mark.anyio


def tool(name: str, properties: dict, required: list[str] | None = None) -> dict:
    schema: dict = {"type": "object", "properties": properties}
    if required is not None:
        schema["required"] = required
    return {
        "type": "function",
        "function": {"name": name, "description": f"the {name} tool", "parameters": schema},
    }


ADD = tool("calc__add", {"a": {"type": "number"}, "b": {"type": "integer"}}, ["a", "b"])
READ = tool(
    "read_file",
    {"path": {"type": "string"}, "offset": {"type": "integer", "default": 0}, "limit": {"type": "integer"}},
    ["path"],
)
GREP = tool(
    "grep",
    {"pattern": {"type": "string"}, "path": {"type": "string"}, "ignore_case": {"type": "boolean"}},
    ["pattern"],
)
KITCHEN_SINK = tool(
    "kitchen_sink",
    {
        "mode": {"type": "string", "enum": ["fast", "slow"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 3},
        "flag": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "options": {"type": "object", "properties": {"depth": {"type": "integer"}}, "required": ["depth"]},
        "level": {"type": "string", "default": "info"},
        "maybe": {"anyOf": [{"type": "null"}, {"type": "number"}]},
        "note": {"type": "string"},
    },
    ["mode", "count", "flag", "tags", "options", "level", "maybe", "note"],
)
TOOLS = [ADD, READ, GREP, KITCHEN_SINK]


def convo(text: str, system: str | None = "You are helpful.") -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def schema_of(name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


async def calls_for(text: str, tools: list[dict] = TOOLS) -> list[tuple[str, str, dict]]:
    response = await OfflineModel().complete(convo(text), tools, temperature=0.3)
    assert response.content is None
    out = []
    for call in response.tool_calls:
        arguments = call.function.parsed_arguments()
        jsonschema.validate(arguments, schema_of(call.function.name))
        out.append((call.id, call.function.name, arguments))
    return out


def test_it_is_a_model_and_resolves_as_offline():
    model = resolve_model("offline", {})
    assert isinstance(model, OfflineModel) and isinstance(model, Model)
    assert model.name == "offline"
    assert "no intelligence" in OfflineModel.__doc__ and "demo" in OfflineModel.__doc__


async def test_numbers_fill_required_numeric_properties_in_order():
    assert await calls_for("use calc__add to add 2 and 3") == [
        ("call_offline_1", "calc__add", {"a": 2, "b": 3})
    ]


async def test_the_part_after_double_underscore_names_a_tool_when_unambiguous():
    assert await calls_for("please add 1.5 and 4") == [("call_offline_1", "calc__add", {"a": 1.5, "b": 4})]
    ambiguous = [ADD, tool("other__add", {}, [])]
    response = await OfflineModel().complete(convo("please add 1 and 4"), ambiguous, temperature=0)
    assert response.tool_calls == [] and response.content


async def test_path_and_pattern_come_from_the_text():
    assert await calls_for("read_file docs/guide.md") == [
        ("call_offline_1", "read_file", {"path": "docs/guide.md"})
    ]
    assert await calls_for("grep for TODO in src/") == [
        ("call_offline_1", "grep", {"pattern": "TODO", "path": "src/"})
    ]
    assert await calls_for("grep 'def main' please") == [("call_offline_1", "grep", {"pattern": "def main"})]


async def test_explicit_values_fill_optional_properties():
    calls = await calls_for("read_file README.md limit=5 and grep for x ignore_case=true")
    assert calls == [
        ("call_offline_1", "read_file", {"path": "README.md", "limit": 5}),
        ("call_offline_2", "grep", {"pattern": "x", "ignore_case": True}),
    ]


async def test_fallbacks_are_schema_valid_for_every_type():
    [(_, _, arguments)] = await calls_for("run kitchen_sink with 9 now")
    assert arguments["mode"] == "fast"
    assert arguments["count"] == 3  # 9, clamped to the maximum
    assert arguments["flag"] is False and arguments["tags"] == []
    assert arguments["options"] == {"depth": 0}
    assert arguments["level"] == "info"
    assert arguments["note"] == "run kitchen_sink with 9 now"
    [(_, _, read_arguments)] = await calls_for("read_file please")
    assert read_arguments == {"path": "."}


async def test_summary_after_tool_results():
    long_output = "line " * 200
    messages = convo("read_file a.txt and grep for x") + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "a.txt"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "grep", "arguments": '{"pattern": "x"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": long_output},
        {"role": "tool", "tool_call_id": "c2", "content": "Error: no such directory"},
    ]
    response = await OfflineModel().complete(messages, TOOLS, temperature=0)
    assert response.tool_calls == []
    lines = response.content.splitlines()
    assert "2 tools" in lines[0]
    assert lines[1].startswith("- `read_file`") and "a.txt" in lines[1]
    assert len(lines[1].split(" returned: ", 1)[1]) <= 400
    assert lines[2].startswith("- `grep`") and " failed: " in lines[2] and "no such directory" in lines[2]


async def test_reflection_answers_with_grounded_bullets():
    messages = convo("use calc__add to add 2 and 3") + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "calc__add", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "Reflect on this run: what lessons would help next time?"},
    ]
    response = await OfflineModel().complete(messages, TOOLS, temperature=0)
    assert response.tool_calls == []  # naming no tool call even though tools are offered
    bullets = response.content.splitlines()
    assert 2 <= len(bullets) <= 4 and all(b.startswith("- ") for b in bullets)
    assert "calc__add" in response.content and "add 2 and 3" in response.content
    assert "2 model steps" in response.content


async def test_reflection_mentions_a_failed_tool():
    messages = convo("grep for x") + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "grep", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Error: pattern missing"},
        {"role": "assistant", "content": "It failed."},
        {"role": "user", "content": "What LESSON do you take away?"},
    ]
    response = await OfflineModel().complete(messages, [], temperature=0)
    assert "`grep` failed" in response.content


async def test_plain_answer_quotes_the_request():
    response = await OfflineModel().complete(convo("What is the capital of France?"), TOOLS, temperature=0)
    assert response.tool_calls == []
    assert '"What is the capital of France?"' in response.content
    assert "system prompt" in response.content
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0


async def test_no_tools_offered_means_no_tool_calls():
    response = await OfflineModel().complete(convo("read_file a.txt", system=None), [], temperature=0)
    assert response.tool_calls == [] and "read_file a.txt" in response.content


async def test_no_user_message():
    response = await OfflineModel().complete([{"role": "system", "content": "s"}], [], temperature=0)
    assert response.content and response.tool_calls == []


async def test_same_input_same_output():
    model = OfflineModel()
    for text in ("use calc__add to add 2 and 3", "hello", "reflect please"):
        first = await model.complete(convo(text), TOOLS, temperature=0.9)
        second = await OfflineModel().complete(convo(text), TOOLS, temperature=0.1)
        assert first.model_dump() == second.model_dump()
        assert json.dumps(first.model_dump(), sort_keys=True) == json.dumps(
            second.model_dump(), sort_keys=True
        )


async def test_on_text_gets_the_answer_in_chunks():
    seen: list[str] = []
    response = await OfflineModel().complete(convo("hello"), [], temperature=0, on_text=seen.append)
    assert len(seen) > 1 and "".join(seen) == response.content


async def test_delay_is_cancellable():
    with anyio.fail_after(20):
        with anyio.move_on_after(0.05) as scope:
            await OfflineModel(delay=60).complete(convo("hello"), [], temperature=0)
    assert scope.cancelled_caught


ASK = tool("ask_host", {"question": {"type": "string"}}, ["question"])


async def run_turns(model: OfflineModel, requests: list[str], tools: list[dict]) -> list[dict]:
    """Drive the model as the runner does: each request, its tool calls answered, until it answers."""
    messages = convo(requests[0])
    for index, request in enumerate(requests):
        if index:
            messages.append({"role": "user", "content": request})
        for _ in range(3):
            response = await model.complete(messages, tools, temperature=0)
            calls = [c.model_dump() for c in response.tool_calls]
            messages.append({"role": "assistant", "content": response.content, "tool_calls": calls or None})
            if not calls:
                break
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in calls]
    return messages


async def test_call_ids_are_unique_across_turns_and_reflection_counts_every_call():
    messages = await run_turns(
        OfflineModel(), ["use calc__add to add 2 and 3", "now read_file a.txt and grep for x"], TOOLS
    )
    ids = [c["id"] for m in messages if m.get("tool_calls") for c in m["tool_calls"]]
    assert ids == ["call_offline_1", "call_offline_2", "call_offline_3"]
    messages.append({"role": "user", "content": "Reflect on this run."})
    reflection = await OfflineModel().complete(messages, TOOLS, temperature=0)
    assert "3 tool calls" in reflection.content and "4 model steps" in reflection.content


async def test_tool_choice_none_never_calls_a_tool():
    response = await OfflineModel().complete(
        convo("use calc__add to add 2 and 3"), TOOLS, temperature=0, tool_choice="none"
    )
    assert response.tool_calls == [] and "use calc__add to add 2 and 3" in response.content


async def test_compaction_request_gets_a_bounded_digest_and_no_calls():
    model = OfflineModel()
    messages = await run_turns(model, ["read_file notes.md please", "grep for TODO"], TOOLS)
    messages.append({"role": "user", "content": "Summarise the conversation so far; read_file is named."})
    response = await model.complete(messages, TOOLS, temperature=0)
    assert response.tool_calls == []
    digest = response.content
    assert 'Task: "read_file notes.md please"' in digest
    assert '`read_file` {"path": "notes.md"} → ok' in digest and "`grep`" in digest
    assert "Latest answer:" in digest and "here is what came back" in digest
    many = convo("count to 300") + [
        m
        for i in range(300)
        for m in (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": f"c{i}", "type": "function", "function": {"name": "grep", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": f"c{i}", "content": f"result {i} " + "x" * 300},
        )
    ]
    many.append({"role": "user", "content": "Please SUMMARISE THE CONVERSATION SO FAR."})
    long_digest = (await model.complete(many, TOOLS, temperature=0)).content
    assert len(long_digest) <= 1_500 and "earlier call(s) left out" in long_digest
    assert "result 299" in long_digest and "result 0 " not in long_digest
    assert long_digest == (await OfflineModel().complete(many, TOOLS, temperature=0)).content


@pytest.mark.parametrize(
    ("text", "question"),
    [
        ("Use ask_host to ask the host which colour to use, then summarise", "Which colour to use?"),
        ("ask_host: which file should I read?", "Which file should I read?"),
        ("Which database should I use? Ask with ask_host.", "Which database should I use?"),
        ('call ask_host "May I delete build/?"', "May I delete build/?"),
        ("ask_host", "What should I do next?"),
    ],
)
async def test_ask_host_gets_a_question_from_the_text(text, question):
    response = await OfflineModel().complete(convo(text), [ASK, READ], temperature=0)
    [call] = response.tool_calls
    assert call.function.name == "ask_host" and call.function.parsed_arguments() == {"question": question}


async def test_the_hosts_answer_is_summarised():
    messages = convo("Use ask_host to ask which file to read") + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_offline_1",
                    "type": "function",
                    "function": {"name": "ask_host", "arguments": '{"question": "Which file to read?"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_offline_1", "content": "Read README.md"},
    ]
    response = await OfflineModel().complete(messages, [ASK], temperature=0)
    assert response.tool_calls == []
    assert "`ask_host`" in response.content and "returned: Read README.md" in response.content


@pytest.mark.parametrize(
    "schema",
    [
        {
            "type": "object",
            "properties": {"answer": {"type": "string"}, "n": {"type": "integer"}},
            "required": ["answer", "n"],
        },
        {
            "type": "object",
            "properties": {
                "verdict": {"enum": ["pass", "fail"]},
                "files": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "detail": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
            },
            "required": ["verdict", "files", "detail"],
            "additionalProperties": False,
        },
        {"type": "string", "maxLength": 20},
        {"type": "array", "items": {"type": "number", "minimum": 10}, "minItems": 2},
    ],
)
async def test_text_answers_are_json_valid_for_a_response_schema(schema):
    for messages in (
        convo("What is the capital of France? Say 3 things."),
        convo("Reflect on this run."),
        await run_turns(OfflineModel(), ["use calc__add to add 2 and 3"], TOOLS),
    ):
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # ask for the answer again, now with the schema
        response = await OfflineModel().complete(messages, TOOLS, temperature=0, response_schema=schema)
        assert response.tool_calls == []
        jsonschema.validate(json.loads(response.content), schema)
        again = await OfflineModel().complete(messages, TOOLS, temperature=0, response_schema=schema)
        assert again.content == response.content


async def test_a_response_schema_does_not_stop_tool_calls():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    response = await OfflineModel().complete(
        convo("use calc__add to add 2 and 3"), TOOLS, temperature=0, response_schema=schema
    )
    assert response.content is None and [c.function.name for c in response.tool_calls] == ["calc__add"]
    summary = await OfflineModel().complete(
        convo("x")[:1] + [{"role": "user", "content": "hello"}], [], temperature=0, response_schema=schema
    )
    assert json.loads(summary.content)["a"].startswith('You asked: "hello".')


async def test_consolidation_merges_lessons_that_say_the_same_words_and_drops_none(tmp_path):
    """The demo model can curate: `consolidate` on the offline model merges duplicates, keeps the rest."""
    from agent.experiences.consolidate import consolidate
    from agent.experiences.file import ExperienceFile

    path = tmp_path / "experiences.md"
    path.write_text(
        "## "
        + "a" * 32
        + " (2026-11-26 14:05)\n- Read the README first.\n- Check the tests (all of them).\n\n"
        "## " + "b" * 32 + " (2026-11-27 10:00)\n- read the  README first\n- Prefer small diffs.\n",
        encoding="utf-8",
    )
    result = await consolidate(ExperienceFile(path), OfflineModel(), budget=0, force=True)
    assert (result.before, result.after, result.merged, result.dropped) == (4, 3, 1, [])
    assert result.skipped_reason is None and result.backup_path is not None
    text = path.read_text(encoding="utf-8")
    assert text.count("README first") == 1
    assert "Check the tests (all of them)." in text and "Prefer small diffs." in text
    again = await consolidate(ExperienceFile(path), OfflineModel(), budget=0, force=True)
    assert (again.before, again.after, again.merged) == (3, 3, 0)
