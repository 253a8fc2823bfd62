"""Every tool through a real MCP client in-process, in both protocol eras."""

from __future__ import annotations

import anyio
import pytest
from mcp import Client

from tests.server.helpers import call, call_error, wait_done

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "auto"]


@pytest.fixture(params=ERAS)
async def client(request, server):
    async with Client(server, mode=request.param) as c:
        yield c


async def test_tools_are_listed_with_described_arguments_and_annotations(client):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert {
        "create_trace", "run_trace", "stop_trace", "reflect_trace", "list_running", "get_trace", "list_traces",
        "get_experiences",
    } <= set(tools)  # fmt: skip
    for tool in tools.values():
        assert tool.description
        for name, prop in tool.input_schema.get("properties", {}).items():
            assert prop.get("description"), f"{tool.name}.{name} has no description"
        assert tool.output_schema is not None
    for reader in ("list_running", "get_trace", "list_traces", "get_experiences"):
        assert tools[reader].annotations.read_only_hint is True
    for tool in tools.values():
        assert tool.annotations.destructive_hint is False


async def test_create_trace_runs_a_tool_and_answers(client):
    started = await call(client, "create_trace", prompt="Use read_file to read README.md", model="offline")
    assert started["status"] == "started" and len(started["trace_id"]) == 32
    assert started["trace_id"] in started["message"]
    view = await wait_done(client, started["trace_id"])
    trace, messages = view["trace"], view["messages"]
    assert (trace["status"], trace["stop_reason"]) == ("completed", "end_turn")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[2]["tool_calls"][0]["function"]["name"] == "read_file"
    assert "The answer is 42." in messages[3]["content"]
    assert view["answer"] == messages[-1]["content"]
    assert trace["usage"]["llm_calls"] == 2 and trace["usage"]["tool_calls"] == 1
    assert trace["head_sequence"] == 5
    # after_sequence trims the path
    tail = await call(client, "get_trace", trace_id=trace["trace_id"], after_sequence=3)
    assert [m["sequence"] for m in tail["messages"]] == [4, 5]


async def test_create_trace_with_messages_and_settings(client):
    started = await call(
        client,
        "create_trace",
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello"}],
        temperature=0.0,
        max_iterations=3,
        name="greeting",
        uid="alice",
        tools=["read_file"],
    )
    view = await wait_done(client, started["trace_id"])
    trace = view["trace"]
    assert trace["name"] == "greeting" and trace["uid"] == "alice"
    assert trace["config"]["temperature"] == 0.0 and trace["config"]["max_iterations"] == 3
    assert trace["config"]["tools"] == ["read_file"]
    assert view["messages"][0]["content"] == "Be terse."


async def test_run_trace_continues_rewinds_and_regenerates(client):
    tid = (await call(client, "create_trace", prompt="Use read_file to read README.md"))["trace_id"]
    await wait_done(client, tid)
    again = await call(client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "thanks"}])
    assert again == {"trace_id": tid, "status": "started", "message": again["message"]}
    view = await wait_done(client, tid)
    assert [m["sequence"] for m in view["messages"]] == [1, 2, 3, 4, 5, 6, 7]

    # rewind to the assistant message with the tool call: the cut moves past its tool result
    await call(
        client, "run_trace", trace_id=tid, insert_after=3, messages=[{"role": "user", "content": "and?"}]
    )
    view = await wait_done(client, tid)
    assert [m["sequence"] for m in view["messages"]] == [1, 2, 3, 4, 8, 9]

    # regenerate from the first user message
    await call(client, "run_trace", trace_id=tid, insert_after=2)
    view = await wait_done(client, tid)
    assert [m["sequence"] for m in view["messages"]][:2] == [1, 2] and view["messages"][2]["sequence"] == 10


async def test_stop_trace_is_prompt_even_during_a_model_call(client):
    tid = (await call(client, "create_trace", prompt="think slowly", model="slow"))["trace_id"]
    assert tid in (await call(client, "list_running"))["running"]
    assert await call(client, "stop_trace", trace_id=tid) == {"trace_id": tid, "status": "stopping"}
    view = await wait_done(client, tid)
    assert (view["trace"]["status"], view["trace"]["stop_reason"]) == ("stopped", "stopped")
    assert await call(client, "stop_trace", trace_id=tid) == {"trace_id": tid, "status": "not_running"}
    assert (await call(client, "list_running"))["running"] == []


async def test_reflect_trace_appends_lessons_and_keeps_the_main_path(client, settings):
    tid = (await call(client, "create_trace", prompt="Use read_file to read README.md"))["trace_id"]
    before = await wait_done(client, tid)
    result = await call(client, "reflect_trace", trace_id=tid, focus="tool use")
    assert result["trace_id"] == tid and result["reflection"].strip()
    assert result["lessons"]
    after = await call(client, "get_trace", trace_id=tid)
    assert after["trace"]["head_sequence"] == before["trace"]["head_sequence"]
    assert after["trace"]["status"] == "completed"
    assert after["messages"] == before["messages"]
    text = settings.experiences.read_text(encoding="utf-8")
    assert f"## {tid} (" in text
    assert result["lessons"][0] in text
    experiences = await call(client, "get_experiences")
    assert experiences["content"] == text and experiences["path"] == str(settings.experiences)


async def test_list_traces_pages_newest_first_and_filters(client):
    ids = []
    for i in range(3):
        ids.append(
            (await call(client, "create_trace", prompt=f"hello {i}", uid="bob" if i else "ann"))["trace_id"]
        )
        await wait_done(client, ids[-1])
    page = await call(client, "list_traces", limit=2)
    assert [t["trace_id"] for t in page["traces"]] == [ids[2], ids[1]]
    page2 = await call(client, "list_traces", limit=2, cursor=page["next_cursor"])
    assert [t["trace_id"] for t in page2["traces"]] == [ids[0]] and page2["next_cursor"] is None
    assert [t["trace_id"] for t in (await call(client, "list_traces", uid="ann"))["traces"]] == [ids[0]]
    assert len((await call(client, "list_traces", status="completed"))["traces"]) == 3
    assert (await call(client, "list_traces", status="running"))["traces"] == []


async def test_errors_are_tool_errors_with_sentences_and_change_nothing(client):
    unknown = "0" * 32
    for tool, args in [
        ("get_trace", {}),
        ("run_trace", {}),
        ("stop_trace", {}),
        ("reflect_trace", {}),
    ]:
        text = await call_error(client, tool, trace_id=unknown, **args)
        assert f"There is no trace '{unknown}'" in text

    tid = (await call(client, "create_trace", prompt="Use read_file to read README.md"))["trace_id"]
    before = await wait_done(client, tid)
    tree = await client.read_resource(f"trace://{tid}/tree")

    text = await call_error(client, "run_trace", trace_id=tid, insert_after=99)
    assert "has no message with sequence 99" in text
    text = await call_error(client, "run_trace", trace_id=tid, insert_after=-3)
    assert "1 or more" in text
    text = await call_error(client, "run_trace", trace_id=tid, messages=[{"role": "robot", "content": "hi"}])
    assert "role 'robot'" in text
    text = await call_error(client, "run_trace", trace_id=tid, messages=["not a message"])
    assert "messages.0" in text and "valid dict" in text  # the schema itself refuses it
    text = await call_error(client, "create_trace", prompt="x", model="nosuch:model")
    assert "Unknown model provider 'nosuch'" in text
    text = await call_error(client, "create_trace", prompt="x", tools=["nosuch_tool"])
    assert "nosuch_tool" in text and "read_file" in text
    text = await call_error(client, "create_trace")
    assert "prompt" in text
    text = await call_error(client, "list_traces", cursor="bogus")
    assert "cursor" in text

    after = await call(client, "get_trace", trace_id=tid)
    assert after["trace"] == before["trace"] and after["messages"] == before["messages"]
    assert (await client.read_resource(f"trace://{tid}/tree")) == tree


async def test_openai_without_a_key_is_refused_with_what_to_set(client, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    text = await call_error(client, "create_trace", prompt="x", model="openai:gpt-4o")
    assert "OPENAI_API_KEY" in text
    assert (await call(client, "list_traces"))["traces"] == []


async def test_a_running_trace_refuses_run_and_reflect(client):
    tid = (await call(client, "create_trace", prompt="slow", model="slow"))["trace_id"]
    assert "already running" in await call_error(client, "run_trace", trace_id=tid)
    text = await call_error(client, "reflect_trace", trace_id=tid)
    assert "already running" in text and "reflect on" in text
    await call(client, "stop_trace", trace_id=tid)
    await wait_done(client, tid)


async def test_get_trace_wait_on_a_finished_trace_returns_at_once_without_progress(client):
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)

    tid = (await call(client, "create_trace", prompt="Use read_file to read README.md"))["trace_id"]
    await wait_done(client, tid)
    with anyio.fail_after(5):  # far below wait_seconds: it must not wait for the time to run out
        result = await client.call_tool(
            "get_trace", {"trace_id": tid, "wait_seconds": 3600}, progress_callback=on_progress
        )
    assert result.structured_content["trace"]["status"] == "completed"
    assert progress == []


async def test_get_trace_wait_reports_the_tool_call(client, settings, slow_model):
    """A slow first answer guarantees the wait starts before anything after the prompt is stored."""
    from tests.fakes import call as tool_call
    from tests.fakes import reply

    slow_model.steps = [reply(None, tool_call("read_file", path="README.md")), reply("done")]
    slow_model.delay = 0.3
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)

    tid = (await call(client, "create_trace", prompt="read it", model="slow"))["trace_id"]
    result = await client.call_tool(
        "get_trace", {"trace_id": tid, "wait_seconds": 20}, progress_callback=on_progress
    )
    assert result.structured_content["trace"]["status"] == "completed"
    assert "assistant called read_file" in progress
    assert any(p.startswith("read_file returned") for p in progress)
    assert progress[-1].startswith("assistant answered")


async def test_two_reflections_at_once_append_whole_sections(client, settings):
    ids = []
    for i in range(2):
        ids.append(
            (await call(client, "create_trace", prompt=f"Use read_file to read README.md ({i})"))["trace_id"]
        )
        await wait_done(client, ids[-1])
    results = {}

    async def reflect(tid):
        results[tid] = await call(client, "reflect_trace", trace_id=tid)

    async with anyio.create_task_group() as tg:
        for tid in ids:
            tg.start_soon(reflect, tid)
    text = settings.experiences.read_text(encoding="utf-8")
    for tid in ids:
        section = text.split(f"## {tid} (")[1].split("\n## ")[0]
        for lesson in results[tid]["lessons"]:
            assert f"- {lesson}" in section


async def test_stop_while_another_request_waits_on_the_trace(client):
    """A long-poll does not block the connection: stop_trace gets through and ends the wait."""
    tid = (await call(client, "create_trace", prompt="think slowly", model="slow"))["trace_id"]
    views = []

    async def wait_for_it():
        views.append(await call(client, "get_trace", trace_id=tid, wait_seconds=60))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_it)
            await anyio.sleep(0.2)
            assert (await call(client, "stop_trace", trace_id=tid))["status"] == "stopping"
    assert views[0]["trace"]["status"] == "stopped"
