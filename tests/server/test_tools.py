"""Every tool through a real MCP client in-process, in both protocol eras, on the scripted model."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from mcp import Client

from agent import defaults
from server.app import build_server
from server.progress import PROGRESS_SETTLE_SECONDS
from server.settings import Settings
from tests.fakes import call as tool_call
from tests.fakes import models_for, reply, slow_reflection, turn_script
from tests.server.helpers import call, call_error, full, wait_done

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "auto"]


@pytest.fixture(params=ERAS)
async def client(request, server):
    async with Client(server, mode=request.param) as c:
        yield c


def text_of(result) -> str:
    return result.content[0].text


async def test_tools_are_listed_with_described_arguments_and_honest_annotations(client):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert {
        "create_trace", "run_trace", "stop_trace", "reflect_trace", "list_running", "get_trace", "await_traces",
        "list_traces", "get_experiences", "consolidate_experiences", "agent_info",
    } <= set(tools)  # fmt: skip
    for tool in tools.values():
        assert tool.description
        for name, prop in tool.input_schema.get("properties", {}).items():
            assert prop.get("description"), f"{tool.name}.{name} has no description"
        assert tool.output_schema is not None, tool.name
    for reader in (
        "list_running",
        "get_trace",
        "await_traces",
        "list_traces",
        "get_experiences",
        "agent_info",
    ):
        assert tools[reader].annotations.read_only_hint is True
    # every tool the agent has here only reads (workspace files, skills): running it changes nothing outside
    assert tools["create_trace"].annotations.destructive_hint is False
    assert tools["consolidate_experiences"].annotations.destructive_hint is True


async def test_tools_list_leaves_out_what_only_repeats_itself_and_still_validates(client):
    """Every host reads tools/list into its context: no pydantic titles or null defaults, ~18 KB in all."""
    listed = await client.list_tools()
    text = json.dumps([t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in listed.tools])
    assert len(text) < 19_000
    tools = {t.name: t for t in listed.tools}
    for tool in tools.values():
        for schema in (tool.input_schema, tool.output_schema):
            dumped = json.dumps(schema)
            assert '"title": "' not in dumped and '"default": null' not in dumped, tool.name
    create = tools["create_trace"].input_schema["properties"]
    assert create["temperature"]["default"] == defaults.TEMPERATURE  # a real default stays
    assert {"type": "null"} in create["model"]["anyOf"]  # null is still accepted, as the server does
    started = await call(client, "create_trace", prompt="What does the README say?", model=None, name=None)
    assert started["status"] == "started"
    assert "temperature" in await call_error(client, "create_trace", prompt="x", temperature="hot")


async def test_create_then_get_trace_summary_is_small_and_says_what_happened(client):
    started = await call(client, "create_trace", prompt="What does the README say?")
    assert started["status"] == "started" and len(started["trace_id"]) == 32
    assert started["trace_id"] in started["message"] and "wait_seconds=30" in started["message"]
    view = await wait_done(client, started["trace_id"])
    trace = view["trace"]
    assert (trace["status"], trace["outcome"], trace["stop_reason"]) == ("completed", "answered", "end_turn")
    assert "config" not in trace and "lessons" not in trace
    assert view["answer"] == "The README says the answer is 42."
    assert view["last_text"] == view["answer"]  # the latest assistant text, whatever the state
    assert view["recent"][-3].startswith("#3 assistant called read_file(")
    assert view["recent"][-2].startswith("#4 read_file returned")
    assert view["recent"][0].startswith("#2 user")  # not the system prompt: the host wrote it
    assert view["last_sequence"] == 5 and view["next"].startswith("Done.")
    assert trace["steps"] == 2 and trace["usage"]["tool_calls"] == 1


async def test_summary_stays_under_4_kb_however_long_the_trace(client, model, workspace):
    (workspace / "big.txt").write_text("lorem ipsum " * 5000, encoding="utf-8")
    reads = [reply(None, tool_call("read_file", f"c{i}", path="big.txt")) for i in range(30)]
    model.steps = [turn_script(*reads, reply("Done reading. " + "long answer " * 2000))]
    tid = (await call(client, "create_trace", prompt="read it a lot"))["trace_id"]
    await wait_done(client, tid)
    result = await client.call_tool("get_trace", {"trace_id": tid})
    assert len(text_of(result).encode()) <= 4000
    view = result.structured_content
    assert view["answer"].startswith("Done reading.") and f"trace://{tid}/messages/" in view["answer"]
    seq = int(view["answer"].split("/messages/")[1].split(" ")[0])
    whole = json.loads((await client.read_resource(f"trace://{tid}/messages/{seq}")).contents[0].text)
    assert whole["content"].endswith("long answer ") and len(whole["content"]) > 20_000

    model.steps = [reply("答" * 3000)]  # multi-byte text everywhere: 3 bytes a character
    tags = [chr(0x4E00 + i) * 64 for i in range(20)]
    tid = (await call(client, "create_trace", prompt="x", name="名" * 200, tags=tags))["trace_id"]
    await wait_done(client, tid)
    result = await client.call_tool("get_trace", {"trace_id": tid})
    assert len(text_of(result).encode()) <= 4000
    assert result.structured_content["trace"]["tags"][-1].endswith(" more")  # the rest named by count


async def test_view_messages_cuts_each_message_and_pages(client, model, workspace):
    (workspace / "big.txt").write_text("x" * 9000, encoding="utf-8")
    model.steps = [turn_script(reply(None, tool_call("read_file", "c1", path="big.txt")), reply("read"))]
    tid = (await call(client, "create_trace", prompt="read big.txt"))["trace_id"]
    await wait_done(client, tid)
    view = await call(client, "get_trace", trace_id=tid, view="messages", max_chars=500)
    tool_message = next(m for m in view["messages"] if m["role"] == "tool")
    assert (
        tool_message["content"].startswith("x" * 500)
        and f"trace://{tid}/messages/4" in tool_message["content"]
    )
    assert "9,000 characters in all" in tool_message["content"]
    outline = await call(client, "get_trace", trace_id=tid, view="messages", max_chars=0)  # markers only
    read = next(m for m in outline["messages"] if m["role"] == "tool")
    assert read["content"].startswith(f"… [cut: 9,000 characters in all; read trace://{tid}/messages/4")
    after = await call(client, "get_trace", trace_id=tid, view="messages", after_sequence=3)
    assert [m["sequence"] for m in after["messages"]] == [4, 5]
    whole = await full(client, tid)
    assert whole["messages"][3]["content"] == "x" * 9000  # full: uncut
    assert whole["trace"]["config"]["max_iterations"] == defaults.MAX_ITERATIONS  # full: the whole trace


async def test_huge_tool_call_arguments_are_cut_in_views_and_resources(client, model):
    """A model may write 950 KB into one call's arguments: views cut them as they cut contents."""
    huge = tool_call("read_file", "c1", path="README.md", note="y" * 950_000)
    model.steps = [turn_script(reply(None, huge), reply("read"))]
    tid = (await call(client, "create_trace", prompt="read"))["trace_id"]
    await wait_done(client, tid)
    result = await client.call_tool("get_trace", {"trace_id": tid, "view": "messages", "max_chars": 100})
    assert len(text_of(result).encode()) < 20_000
    calling = next(m for m in result.structured_content["messages"] if m.get("tool_calls"))
    arguments = calling["tool_calls"][0]["function"]["arguments"]
    assert f"trace://{tid}/messages/{calling['sequence']}" in arguments and len(arguments) < 400
    resource = (await client.read_resource(f"trace://{tid}")).contents[0].text
    assert len(resource) < 900_000  # cut there too, to stay under 1 MiB; the message's own resource is whole
    whole = json.loads(
        (await client.read_resource(f"trace://{tid}/messages/{calling['sequence']}")).contents[0].text
    )
    assert "y" * 950_000 in whole["tool_calls"][0]["function"]["arguments"]


async def test_max_iterations_is_hit_limit_with_no_answer(client, model):
    model.steps = [turn_script(reply("thinking", tool_call("read_file", "c1", path="README.md")))]
    tid = (await call(client, "create_trace", prompt="loop", max_iterations=2))["trace_id"]
    view = await wait_done(client, tid)
    assert (view["trace"]["status"], view["trace"]["outcome"]) == ("completed", "hit_limit")
    assert view["answer"] is None and view["last_text"] == "thinking"
    assert "limit" in view["next"]


async def test_run_trace_continues_rewinds_and_regenerates(client):
    tid = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
    await wait_done(client, tid)
    again = await call(client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "again"}])
    assert again == {"trace_id": tid, "status": "started", "message": again["message"]}
    await wait_done(client, tid)
    assert [m["sequence"] for m in (await full(client, tid))["messages"]] == list(range(1, 10))
    # rewind to the assistant message with the tool call: the cut moves past its tool result
    await call(
        client, "run_trace", trace_id=tid, insert_after=3, messages=[{"role": "user", "content": "and?"}]
    )
    await wait_done(client, tid)
    assert [m["sequence"] for m in (await full(client, tid))["messages"]][:5] == [1, 2, 3, 4, 10]
    # regenerate from the first user message
    await call(client, "run_trace", trace_id=tid, insert_after=2)
    await wait_done(client, tid)
    assert [m["sequence"] for m in (await full(client, tid))["messages"]][:3] == [1, 2, 14]


async def test_stop_trace_one_many_and_by_tag(client):
    a = (await call(client, "create_trace", prompt="think", model="slow", tags=["batch"]))["trace_id"]
    b = (await call(client, "create_trace", prompt="think", model="slow", tags="batch"))[
        "trace_id"
    ]  # a lone tag
    c = (await call(client, "create_trace", prompt="think", model="slow"))["trace_id"]
    unknown = "f" * 32
    refused = await call_error(client, "stop_trace", trace_ids=[a, unknown])
    assert unknown in refused and len(refused) < 200
    running = await call(client, "list_running")
    assert set(running["running"]) == {a, b, c}  # the refused call stopped nothing, not even a
    row = next(r for r in running["traces"] if r["trace_id"] == a)
    assert row["started_at"] and row["last_action"].startswith("user: think") and row["outcome"] == "running"
    assert await call(client, "stop_trace", trace_id=c) == {"trace_id": c, "status": "stopping"}
    stopped = await call(client, "stop_trace", tag="batch")
    assert sorted(stopped["stopping"]) == sorted([a, b]) and stopped["not_running"] == []
    for tid in (a, b, c):
        assert (await wait_done(client, tid))["trace"]["outcome"] == "stopped"
    assert await call(client, "stop_trace", trace_ids=[a, c]) == {"stopping": [], "not_running": [a, c]}
    assert (await call(client, "list_running"))["running"] == []
    with anyio.fail_after(5):  # no trace with the tag: answered at once, not after the whole wait
        nothing = await call(client, "await_traces", tag="nobody", wait_seconds=30)
    assert nothing["done"] == nothing["running"] == [] and "No trace has the tag 'nobody'" in nothing["next"]
    assert "await_traces needs trace_ids or tag" in await call_error(client, "await_traces")


async def test_a_tag_names_every_trace_that_has_it_however_many_pages(client, monkeypatch):
    import server.tools

    monkeypatch.setattr(server.tools, "TAG_PAGE", 2)
    ids = [
        (await call(client, "create_trace", prompt="t", model="slow", tags=["many"]))["trace_id"]
        for _ in range(5)
    ]
    waited = await call(client, "await_traces", tag="many", mode="all", wait_seconds=0)
    assert sorted(waited["running"]) == sorted(ids)  # the oldest too: not only the first page
    monkeypatch.setattr(server.tools, "MAX_TAGGED_TRACES", 4)
    refused = await call_error(client, "stop_trace", tag="many")
    assert "more than 4 traces" in refused and "trace_ids" in refused
    assert len((await call(client, "list_running"))["running"]) == 5  # refused whole: nothing stopped
    monkeypatch.setattr(server.tools, "MAX_TAGGED_TRACES", 5)
    assert sorted((await call(client, "stop_trace", tag="many"))["stopping"]) == sorted(ids)
    for tid in ids:
        await wait_done(client, tid)


async def test_a_trace_deleted_while_waited_on_leaves_the_others_answered(client):
    slow = (await call(client, "create_trace", prompt="slow", model="slow"))["trace_id"]
    quick = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
    await wait_done(client, quick)
    async with anyio.create_task_group() as group:
        waited: dict = {}

        async def wait() -> None:
            waited.update(
                await call(client, "await_traces", trace_ids=[slow, quick], mode="all", wait_seconds=20)
            )

        group.start_soon(wait)
        await anyio.sleep(0.3)
        assert (await call(client, "delete_trace", trace_id=quick))["deleted"] is True
        await anyio.sleep(0.3)
        await call(client, "stop_trace", trace_id=slow)
    assert [r["trace_id"] for r in waited["done"]] == [slow] and waited["running"] == []
    assert f"Deleted while waited on (not in done or running): {quick}." in waited["next"]


async def test_await_traces_any_and_all_in_few_calls_and_bytes(client, model, slow_model):
    ids = [
        (await call(client, "create_trace", prompt=f"task {i}", tags=["fan"]))["trace_id"] for i in range(5)
    ]
    result = await client.call_tool("await_traces", {"tag": "fan", "mode": "all", "wait_seconds": 20})
    done = result.structured_content
    assert sorted(r["trace_id"] for r in done["done"]) == sorted(ids) and done["running"] == []
    assert all(r["answer"] == "The README says the answer is 42." for r in done["done"])
    assert all(r["result"] is None and r["question"] is None for r in done["done"])  # keys as in get_trace
    assert len(text_of(result).encode()) < 10_000
    slow = (await call(client, "create_trace", prompt="slow", model="slow"))["trace_id"]
    either = await call(client, "await_traces", trace_ids=[slow, ids[0]], mode="any", wait_seconds=5)
    assert [r["trace_id"] for r in either["done"]] == [ids[0]] and either["running"] == [slow]
    await call(client, "stop_trace", trace_id=slow)


async def test_a_wait_is_capped_by_max_wait_and_says_what_to_do_next(settings, model, slow_model):
    from server.app import build_server
    from tests.fakes import models_for

    settings.max_wait = 0.2
    server = build_server(settings, models=models_for(scripted=model, slow=slow_model))
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        for name in ("get_trace", "await_traces"):  # the server's own cap, not the default's
            assert "0.2 s" in tools[name].input_schema["properties"]["wait_seconds"]["description"]
        tid = (await call(client, "create_trace", prompt="slow", model="slow"))["trace_id"]
        with anyio.fail_after(10):
            view = await call(client, "get_trace", trace_id=tid, wait_seconds=3600)
        assert view["trace"]["outcome"] == "running"
        assert "--max-wait" in view["next"] and view["next"].count("Still running") == 1
        assert "wait_seconds=" in view["next"]
        await call(client, "stop_trace", trace_id=tid)


async def test_waiting_reports_messages_stored_before_it_began_and_a_heartbeat(
    client, slow_model, monkeypatch
):
    monkeypatch.setattr(defaults, "PROGRESS_INTERVAL_SECONDS", 0.05)
    slow_model.steps = [reply(None, tool_call("read_file", "c1", path="README.md")), reply("never")]
    slow_model.delay = 0
    gate = anyio.Event()

    async def hold(*args, **kwargs):
        await gate.wait()
        return reply("late")

    slow_model.steps = [reply(None, tool_call("read_file", "c1", path="README.md")), hold]
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)
        if len([p for p in progress if p == "still running"]) >= 2:
            gate.set()

    tid = (await call(client, "create_trace", prompt="read", model="slow"))["trace_id"]
    with anyio.fail_after(10):
        while (await call(client, "get_trace", trace_id=tid))["last_sequence"] < 4:
            await anyio.sleep(0.01)
    await client.call_tool(
        "get_trace", {"trace_id": tid, "wait_seconds": 20, "after_sequence": 2}, progress_callback=on_progress
    )
    assert progress[0].startswith("assistant called read_file") and progress[1].startswith(
        "read_file returned"
    )
    assert "still running" in progress


async def test_the_last_progress_of_a_wait_is_kept_apart_from_its_answer(client, slow_model):
    """Sent together, the TypeScript SDK reads the answer first and drops the progress: a pause between."""
    slow_model.steps, slow_model.delay = [reply("done")], 0.3
    heard: list[float] = []

    async def on_progress(value, total, message):
        heard.append(anyio.current_time())

    tid = (await call(client, "create_trace", prompt="think", model="slow"))["trace_id"]
    await client.call_tool("get_trace", {"trace_id": tid, "wait_seconds": 20}, progress_callback=on_progress)
    answered = anyio.current_time()
    assert heard and answered - heard[-1] >= PROGRESS_SETTLE_SECONDS * 0.9


async def test_a_wait_beats_while_other_traces_are_busy_and_await_traces_reports_messages(
    client, model, slow_model, monkeypatch
):
    """Another trace's events are not progress for this wait: the heartbeat keeps its own clock."""
    monkeypatch.setattr(defaults, "PROGRESS_INTERVAL_SECONDS", 0.2)
    quiet = (await call(client, "create_trace", prompt="think", model="slow"))["trace_id"]
    model.delay = 0.01
    model.steps = [
        reply(None, tool_call("read_file", "c1", path="README.md"))
    ]  # busy: a message every few ms
    busy = (await call(client, "create_trace", prompt="loop", max_iterations=150))["trace_id"]
    heard: list[str] = []

    async def on_progress(value, total, message):
        heard.append(message)

    await client.call_tool("get_trace", {"trace_id": quiet, "wait_seconds": 1}, progress_callback=on_progress)
    assert heard.count("still running") >= 2
    heard.clear()
    await client.call_tool(
        "await_traces",
        {"trace_ids": [busy, quiet], "mode": "all", "wait_seconds": 1},
        progress_callback=on_progress,
    )
    assert any(line.startswith(f"{busy[:8]}: ") for line in heard)  # one per stored message of the awaited
    results = [line for line in heard if " returned " in line]
    assert results and all(line.startswith(f"{busy[:8]}: read_file returned") for line in results)
    await call(client, "stop_trace", trace_ids=[quiet, busy])


async def test_list_traces_rows_are_compact_and_filter_by_tag(client):
    ids = []
    for i in range(3):
        tags = ["even"] if i % 2 == 0 else []
        ids.append(
            (await call(client, "create_trace", prompt=f"hello {i}", uid="bob", tags=tags))["trace_id"]
        )
        await wait_done(client, ids[-1])
    page = await call(client, "list_traces", limit=2)
    assert [t["trace_id"] for t in page["traces"]] == [ids[2], ids[1]]
    assert set(page["traces"][0]) >= {"trace_id", "name", "tags", "status", "outcome", "steps", "usage"}
    assert "config" not in page["traces"][0] and "lessons" not in page["traces"][0]
    page2 = await call(client, "list_traces", limit=2, cursor=page["next_cursor"])
    assert [t["trace_id"] for t in page2["traces"]] == [ids[0]] and page2["next_cursor"] is None
    assert [t["trace_id"] for t in (await call(client, "list_traces", tag="even"))["traces"]] == [
        ids[2],
        ids[0],
    ]


async def test_reflect_trace_appends_lessons_and_keeps_the_main_path(client, settings):
    tid = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
    before = await wait_done(client, tid)
    result = await call(client, "reflect_trace", trace_id=tid, focus="tool use")
    assert result["trace_id"] == tid and result["lessons"] == [
        "Read the file with read_file before answering questions about it."
    ]
    after = await call(client, "get_trace", trace_id=tid)
    assert after["last_sequence"] == before["last_sequence"] and after["trace"]["status"] == "completed"
    text = settings.experiences.read_text(encoding="utf-8")
    assert f"## {tid} (" in text and result["lessons"][0] in text
    whole = await call(client, "get_experiences")
    assert whole["content"] == text and whole["path"] == str(settings.experiences)
    ranked = await call(client, "get_experiences", query="read the file")
    assert set(ranked) == {"lessons", "path"}
    assert ranked["lessons"][0]["text"] == result["lessons"][0]


async def test_agent_info_lists_tools_servers_models_workspace(client, workspace):
    info = await call(client, "agent_info")
    names = {t["name"]: t for t in info["tools"]}
    assert {"read_file", "list_files", "search_files", "load_skill"} <= set(names)
    assert names["read_file"]["read_only"] is True and names["read_file"]["server"] is None
    assert info["default_model"] == "scripted" and info["providers"]["offline"] is True
    assert info["workspace"] == str(workspace) and info["servers"] == []
    assert info["max_wait_seconds"] == defaults.MAX_WAIT_SECONDS
    for tool in info["tools"]:  # one line each, cut at a word with an ellipsis when long
        assert len(tool["description"]) <= 161 and "\n" not in tool["description"]
        assert len(tool["description"]) < 150 or tool["description"].endswith(("…", "."))


async def test_agent_info_stays_short_with_the_most_skills(tmp_path, model, workspace):
    skills = tmp_path / "skills"
    for i in range(100):  # the most skills there may be, each with the longest description
        (skills / f"skill{i}").mkdir(parents=True)
        words = " ".join(["calibrate"] * 50)[:500]
        (skills / f"skill{i}" / "SKILL.md").write_text(
            f"---\nname: skill{i}\ndescription: {words}\n---\nbody\n"
        )
    settings = Settings.for_data_dir(
        tmp_path / "data", model="scripted", workspace=workspace, skills_dir=skills
    )
    async with Client(build_server(settings, models=models_for(scripted=model))) as client:
        result = await client.call_tool("agent_info", {})
    info = result.structured_content
    assert len(info["skills"]) == 100 and {s["name"] for s in info["skills"]} == {
        f"skill{i}" for i in range(100)
    }
    assert len(text_of(result)) < 30_000  # one line each, as the tools are
    assert all(len(s["description"]) <= 161 for s in info["skills"])


async def test_agent_info_warns_when_the_workspace_is_the_filesystem_root(tmp_path, model):
    """Hosts start servers in / : a server left on that default can read every file, and says so."""
    settings = Settings.for_data_dir(tmp_path / "data", model="scripted", workspace=Path("/"))
    async with Client(build_server(settings, models=models_for(scripted=model))) as root_client:
        info = await call(root_client, "agent_info")
    assert info["workspace"] == "/"
    assert any(n.startswith("The workspace is / ") and "--workspace" in n for n in info["notes"])


async def test_errors_are_one_sentence_naming_the_argument_and_change_nothing(client):
    unknown = "0" * 32
    for tool in ("get_trace", "run_trace", "reflect_trace"):
        text = await call_error(client, tool, trace_id=unknown)
        assert f"There is no trace '{unknown}'" in text and "\n" not in text
    huge = "x" * 1_000_000
    text = await call_error(client, "get_trace", trace_id=huge)
    assert len(text) < 300 and "trace_id" in text and "32 hex" in text and "1,000,000 characters" in text
    text = await call_error(client, "get_trace", trace_id=unknown, wait_seconds=-1)
    assert text == "Argument 'wait_seconds' of get_trace must be at least 0; got -1."
    text = await call_error(client, "get_trace", trace_id=unknown, view="everything")
    assert "view" in text and "summary" in text and "http" not in text

    tid = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
    await wait_done(client, tid)
    before = await full(client, tid)
    assert "has no message with sequence 99" in await call_error(
        client, "run_trace", trace_id=tid, insert_after=99
    )
    text = await call_error(client, "run_trace", trace_id=tid, insert_after=2**63)
    assert "insert_after" in text and "at most" in text
    text = await call_error(client, "run_trace", trace_id=tid, messages=[{"role": "robot", "content": "hi"}])
    assert "role 'robot'" in text
    text = await call_error(
        client, "run_trace", trace_id=tid, messages=[{"role": "r" * 500_000, "content": "x"}]
    )
    assert len(text) < 300 and "500,002 characters" in text
    text = await call_error(
        client,
        "run_trace",
        trace_id=tid,
        messages=[{"role": "tool", "tool_call_id": "i" * 900_000, "content": "x"}],
    )
    assert text == "Message 1 has tool_call_id longer than 200 characters."
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}
        for i in range(9000)
    ]
    text = await call_error(
        client, "run_trace", trace_id=tid, messages=[{"role": "assistant", "tool_calls": calls}]
    )
    assert text == "Message 1 has 9,000 tool calls; at most 128."
    calls = calls[:100]
    text = await call_error(
        client, "run_trace", trace_id=tid, messages=[{"role": "assistant", "tool_calls": calls}]
    )
    assert len(text) < 400 and "and 95 more" in text
    text = await call_error(client, "run_trace", trace_id=tid, messages=["not a message"])
    assert "messages" in text and "http" not in text and "\n" not in text
    assert "Unknown model provider 'nosuch'" in await call_error(
        client, "create_trace", prompt="x", model="nosuch:m"
    )
    text = await call_error(
        client, "create_trace", prompt="x", tools="nosuch_tool"
    )  # a lone string is a list
    assert "nosuch_tool" in text and "read_file" in text and "agent_info" in text
    assert "prompt" in await call_error(client, "create_trace")
    assert await call_error(client, "create_trace", prompt=" \n\t") == (
        "prompt is empty (only whitespace); give the task as text."
    )
    text = await call_error(client, "create_trace", messages=[{"role": "user", "content": "   "}])
    assert "Message 1 (user) needs text content" in text
    text = await call_error(client, "get_trace", trace_id="T", wait_seconds=-1, view="x")
    assert text.count(". ") == 0 and text.endswith("(and 2 more problems).")
    assert "cursor" in await call_error(client, "list_traces", cursor="bogus")
    text = await call_error(client, "create_trace", prompt="x", name="n" * 5000)
    assert "name" in text and "200" in text
    text = await call_error(client, "create_trace", prompt="x", tools=[f"t{i}" for i in range(10_000)])
    assert "tools" in text and "200" in text
    result = await client.call_tool("no_such_tool", {})
    assert result.is_error and "no_such_tool" in text_of(result) and "tools/list" in text_of(result)
    assert await full(client, tid) == before


async def test_a_running_trace_refuses_run_reflect_and_delete(client):
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

    tid = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
    await wait_done(client, tid)
    with anyio.fail_after(5):
        result = await client.call_tool(
            "get_trace", {"trace_id": tid, "wait_seconds": 40}, progress_callback=on_progress
        )
    assert result.structured_content["trace"]["status"] == "completed"
    assert progress == []


async def test_two_reflections_at_once_append_whole_sections(client, settings):
    ids = []
    for i in range(2):
        ids.append(
            (await call(client, "create_trace", prompt=f"What does the README say? ({i})"))["trace_id"]
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
        views.append(await call(client, "get_trace", trace_id=tid, wait_seconds=30))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_it)
            await anyio.sleep(0.2)
            assert (await call(client, "stop_trace", trace_id=tid))["status"] == "stopping"
    assert views[0]["trace"]["status"] == "stopped"


async def test_prompts_are_real_and_unknown_ones_are_invalid_params(client):
    from mcp import MCPError

    names = {p.name for p in (await client.list_prompts()).prompts}
    assert names == {"delegate", "fan_out", "review_trace"}
    prompt = await client.get_prompt("fan_out", {"tasks": "a\nb", "tag": "it's"})
    assert 'await_traces(tag="it\'s"' in prompt.messages[0].content.text  # quoted as JSON
    first, second = [
        (await client.get_prompt("fan_out", {"tasks": "a"})).messages[0].content.text for _ in range(2)
    ]
    assert "fan-out-" in first and first != second  # each batch its own tag: no earlier batch collected
    for name, arguments, said in [
        ("nope", {}, "There is no prompt 'nope'"),
        ("delegate", {"task": "x", "bogus": "y"}, "has no argument 'bogus'; its arguments are task"),
        ("fan_out", {"tasks": " \n "}, "at least one task"),
        ("review_trace", {"trace_id": "bad id!"}, "trace_id must be a trace id"),
    ]:
        with pytest.raises(MCPError) as info:
            await client.get_prompt(name, arguments)
        assert info.value.error.code == -32602 and said in info.value.error.message


async def test_a_consolidation_that_could_not_be_made_is_a_tool_error(settings, model):
    from server.app import build_server
    from tests.fakes import ModelCallError, ScriptedModel, models_for

    text = "".join(
        f"## {c * 32} (2026-11-0{i} 10:00)\n- Read the file first.\n\n" for i, c in enumerate("ab", 1)
    )
    settings.experiences.parent.mkdir(parents=True, exist_ok=True)
    settings.experiences.write_text(text, encoding="utf-8")
    failing = ScriptedModel([ModelCallError("The provider is down.")], name="failing")
    async with Client(build_server(settings, models=models_for(scripted=model, failing=failing))) as client:
        refused = await call_error(client, "consolidate_experiences", model="failing")
    assert refused == "The model call failed: The provider is down."
    assert settings.experiences.read_text(encoding="utf-8") == text  # nothing changed


async def test_retain_days_deletes_finished_traces_and_keeps_running_ones(settings, model, slow_model):
    from server.app import build_server
    from tests.fakes import models_for

    settings.retain_days = 1 / 86400  # one second
    server = build_server(settings, models=models_for(scripted=model, slow=slow_model))
    async with Client(server) as client:
        done = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
        await wait_done(client, done)
        running = (await call(client, "create_trace", prompt="slow", model="slow"))["trace_id"]
        with anyio.fail_after(10):
            while (
                "There is no trace"
                not in (await client.call_tool("get_trace", {"trace_id": done})).content[0].text
            ):
                await anyio.sleep(0.1)
        assert (await call(client, "get_trace", trace_id=running))["trace"]["outcome"] == "running"
        await call(client, "stop_trace", trace_id=running)


async def test_delete_right_after_the_answer_waits_for_the_reflection(client, model):
    """reflect=true: the trace reads completed while its reflection still holds it; a delete then waits
    for the reflection rather than calling a finished trace 'running'."""
    reflecting = anyio.Event()
    model.steps = [slow_reflection("done", "- Keep it short.", 0.5, reflecting)]
    tid = (await call(client, "create_trace", prompt="x", reflect=True))["trace_id"]
    with anyio.fail_after(10):
        await reflecting.wait()
    assert (await call(client, "get_trace", trace_id=tid))["trace"]["status"] == "completed"
    assert await call(client, "delete_trace", trace_id=tid) == {"trace_id": tid, "deleted": True}
    assert "There is no trace" in await call_error(client, "get_trace", trace_id=tid)


async def test_get_experiences_right_after_the_answer_has_the_automatic_reflection(client, model):
    """reflect=true: the host reads the answer while the reflection still runs; asking for the lessons at
    once (the obvious next call) waits for it instead of missing them."""
    model.steps = [slow_reflection("done", "- Check the README before answering.", 0.5)]
    tid = (await call(client, "create_trace", prompt="x", reflect=True))["trace_id"]
    view = await wait_done(client, tid)
    assert view["trace"]["outcome"] == "answered" and "get_experiences" in view["next"]
    content = (await call(client, "get_experiences"))["content"]
    assert tid in content and "Check the README before answering." in content
    found = await call(client, "get_experiences", query="README answering")
    assert [lesson["trace_id"] for lesson in found["lessons"]] == [tid]


async def test_budgets_and_ask_host_pass_through_the_tools(client, model, slow_model):
    """What the runner's tests prove of budgets and ask_host, checked to arrive through MCP."""
    model.steps = [reply(None, tool_call("read_file", "c1", path="README.md"))]  # scripted usage: 15 a call
    tid = (await call(client, "create_trace", prompt="loop", max_tokens=40))["trace_id"]
    view = await wait_done(client, tid)
    assert (view["trace"]["outcome"], view["trace"]["stop_reason"]) == ("hit_limit", "token_budget")
    assert view["trace"]["steps"] == 3  # 15 + 15 + 15 ≥ 40: no fourth call
    await call(
        client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "go on"}], max_tokens=20
    )
    again = await wait_done(client, tid)
    assert (
        again["trace"]["stop_reason"] == "token_budget" and again["trace"]["steps"] == 5
    )  # 2 more, then cut

    slow = (await call(client, "create_trace", prompt="think", model="slow", timeout_seconds=0.3))["trace_id"]
    timed = await wait_done(client, slow)
    assert (timed["trace"]["outcome"], timed["trace"]["stop_reason"]) == ("hit_limit", "timeout")
    await call(
        client,
        "run_trace",
        trace_id=slow,
        messages=[{"role": "user", "content": "again"}],
        timeout_seconds=0.3,
    )
    assert (await wait_done(client, slow))["trace"]["stop_reason"] == "timeout"

    model.steps = [reply("fine")]
    model.calls.clear()
    quiet = (await call(client, "create_trace", prompt="hi", ask_host=False))["trace_id"]
    await wait_done(client, quiet)
    assert all(t["function"]["name"] != "ask_host" for t in model.calls[0]["tools"])
    model.calls.clear()
    asks = (await call(client, "create_trace", prompt="hi"))["trace_id"]
    await wait_done(client, asks)
    assert any(t["function"]["name"] == "ask_host" for t in model.calls[0]["tools"])


async def test_list_traces_filters_by_status_and_uid_and_await_traces_is_capped(settings, model, slow_model):
    from server.app import build_server
    from tests.fakes import models_for

    settings.max_wait = 0.2
    async with Client(build_server(settings, models=models_for(scripted=model, slow=slow_model))) as client:
        done = (await call(client, "create_trace", prompt="x", uid="ann"))["trace_id"]
        await wait_done(client, done)
        running = (await call(client, "create_trace", prompt="x", model="slow", uid="bob"))["trace_id"]
        assert [t["trace_id"] for t in (await call(client, "list_traces", status="running"))["traces"]] == [
            running
        ]
        assert [t["trace_id"] for t in (await call(client, "list_traces", uid="ann"))["traces"]] == [done]
        assert (await call(client, "list_traces", uid="ann", status="running"))["traces"] == []
        with anyio.fail_after(10):
            waited = await call(client, "await_traces", trace_ids=[running], wait_seconds=3600)
        assert waited["running"] == [running] and "capped at 0.2 s" in waited["next"]
        await call(client, "stop_trace", trace_id=running)


async def test_await_traces_stays_bounded_however_many_traces_finished(client, model):
    """A fan-out of 80 with long answers: the answer stays near 24 KB, every finished trace is either a row
    (its answer shortened) or named in more_done, and asking for those by id returns their rows."""
    model.steps = [reply("word " * 400)]  # a 2,000-character answer each
    ids = [
        (await call(client, "create_trace", prompt=f"task {n}", tags=["wide"]))["trace_id"] for n in range(80)
    ]
    for tid in ids:
        await wait_done(client, tid)
    result = await client.call_tool("await_traces", {"tag": "wide", "mode": "all", "wait_seconds": 1})
    assert len(text_of(result).encode()) < 32_000
    first = result.structured_content
    shown = [row["trace_id"] for row in first["done"]]
    assert sorted(shown + first["more_done"]) == sorted(ids) and first["running"] == []
    assert all("[cut:" in row["answer"] and len(row["answer"]) < 600 for row in first["done"])
    assert "more_done" in first["next"]
    rest = await call(client, "await_traces", trace_ids=first["more_done"][:20], mode="all")
    assert [row["trace_id"] for row in rest["done"]] == first["more_done"][:20]
    assert "more_done" not in rest and "next" not in rest


async def test_a_typed_result_too_long_for_the_summary_says_where_it_is(client, model):
    big = {"summary": "s" * 5000}
    model.steps = [reply(json.dumps(big))]
    schema = {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}
    tid = (await call(client, "create_trace", prompt="sum up", output_schema=schema))["trace_id"]
    view = await wait_done(client, tid)
    assert view["trace"]["outcome"] == "answered" and view["result"] is None
    assert f"trace://{tid}/messages/" in view["next"] and "too long to show here" in view["next"]
    assert (await call(client, "get_trace", trace_id=tid, view="full"))["trace"]["result"] == big


async def test_a_misspelt_argument_is_refused_not_silently_dropped(client):
    text = await call_error(client, "create_trace", prompt="x", max_iteration=5, wait=3)
    assert text.startswith(
        "create_trace has no argument 'max_iteration' (did you mean 'max_iterations'?) (and 1 more); its "
        "arguments are messages, prompt,"
    )
    assert len(text) < 600 and text.count(".") == 1
    assert (await call(client, "list_traces"))["traces"] == []  # nothing was started
    assert "no argument 'wait'" in await call_error(client, "get_trace", trace_id="a" * 32, wait=30)
    text = await call_error(client, "list_running", verbose=True)
    assert text == "list_running has no argument 'verbose'; it takes no arguments."


async def test_oversized_messages_are_refused_like_an_oversized_prompt(client):
    big = [{"role": "user", "content": "short"}, {"role": "user", "content": "x" * 1_000_001}]
    text = await call_error(client, "create_trace", messages=big)
    assert text == "Message 2 has 1,000,001 characters of content; the most is 1,000,000."
    wide = [{"role": "user", "content": "中" * 700_000}]  # counted in characters, as a prompt is
    assert (await client.call_tool("create_trace", {"messages": wide})).is_error is False
    many = [{"role": "user", "content": "y" * 900_000}] * 5
    assert "the most in one call is 4,000,000" in await call_error(client, "create_trace", messages=many)
    assert len((await call(client, "list_traces"))["traces"]) == 1  # the refused ones started nothing
    tid = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
    await wait_done(client, tid)
    assert "Message 2 has" in await call_error(client, "run_trace", trace_id=tid, messages=big)


async def test_steps_count_the_models_replies_not_the_history_passed_in(client, model):
    model.steps = [reply("Summed up.")]
    history = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}] * 5
    tid = (await call(client, "create_trace", messages=[*history, {"role": "user", "content": "sum up"}]))[
        "trace_id"
    ]
    view = await wait_done(client, tid)
    assert view["trace"]["steps"] == 1 and view["trace"]["usage"]["llm_calls"] == 1


async def test_a_malformed_id_in_trace_ids_is_named_as_such(client):
    for tool in ("await_traces", "stop_trace"):
        text = await call_error(client, tool, trace_ids=["a" * 32, "bad"])
        assert text == (
            f"Argument 'trace_ids' of {tool} must hold trace ids (32 hex characters, as create_trace returned "
            "them); got 'bad'."
        )
    assert "There is no trace" in await call_error(client, "await_traces", trace_ids=["a" * 32])


async def test_too_many_items_are_counted_not_echoed(client):
    text = await call_error(client, "create_trace", prompt="x", tags=["t"] * 21)
    assert text == "Argument 'tags' of create_trace is too long: at most 20 items are allowed; got 21 items."


async def test_progress_names_the_tool_of_a_result_whose_call_is_out_of_sight(client, slow_model):
    """45 parallel calls: the wait's look back (the last 40 messages) misses the assistant message, yet
    every replayed result is named by its tool, looked up from its call."""
    gate = anyio.Event()

    async def hold(*args, **kwargs):
        await gate.wait()
        return reply("done")

    calls = [tool_call("read_file", f"c{i}", path="README.md") for i in range(45)]
    slow_model.delay = 0
    slow_model.steps = [reply(None, *calls), hold]
    tid = (await call(client, "create_trace", prompt="read them all", model="slow"))["trace_id"]
    with anyio.fail_after(10):
        while (await call(client, "get_trace", trace_id=tid))["last_sequence"] < 47:
            await anyio.sleep(0.01)
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)
        if len(progress) >= 45:
            gate.set()

    arguments = {"trace_id": tid, "wait_seconds": 20, "after_sequence": 3}  # from the first result
    await client.call_tool("get_trace", arguments, progress_callback=on_progress)
    results = [p for p in progress if "returned" in p]
    assert len(results) == 45 and all(p.startswith("read_file returned") for p in results)


async def test_list_running_stays_bounded_however_many_run(client):
    ids = [
        (
            await call(
                client, "create_trace", prompt=f"think {n}", model="slow", tags=["busy"], name="n" * 150
            )
        )["trace_id"]
        for n in range(70)
    ]
    result = await client.call_tool("list_running", {})
    assert len(text_of(result).encode()) < 32_000
    shown = result.structured_content
    assert sorted(shown["running"]) == sorted(ids) and 0 < len(shown["traces"]) < 70
    assert f"{70 - len(shown['traces'])} more running traces" in shown["note"]
    assert len((await call(client, "stop_trace", tag="busy"))["stopping"]) == 70


async def test_get_experiences_waits_for_the_reflection_not_a_continuation_queued_behind_it(client, model):
    reflecting = anyio.Event()
    model.steps = [slow_reflection("done", "- Read first.", 0.5, reflecting)]
    tid = (await call(client, "create_trace", prompt="x", reflect=True))["trace_id"]
    with anyio.fail_after(10):
        await reflecting.wait()
    await call(
        client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "more"}], model="slow"
    )
    with anyio.fail_after(5):  # the queued continuation runs for an hour: it is not waited for
        assert "- Read first." in (await call(client, "get_experiences"))["content"]
    await call(client, "stop_trace", trace_id=tid)


async def test_the_wait_for_reflections_keeps_within_max_wait(settings, model, slow_model):
    from server.app import build_server
    from tests.fakes import models_for

    settings.max_wait = 0.5
    model.steps = [slow_reflection("done", "- Never in time.", 3600)]
    async with Client(build_server(settings, models=models_for(scripted=model, slow=slow_model))) as client:
        tid = (await call(client, "create_trace", prompt="x", reflect=True))["trace_id"]
        await wait_done(client, tid)
        with anyio.fail_after(5):
            assert tid not in (await call(client, "get_experiences"))["content"]
        await call(client, "stop_trace", trace_id=tid)


async def test_last_text_is_found_behind_a_turn_of_many_tool_calls(client, model):
    """The summary's tail is short; last_text is the latest assistant text however many results follow."""
    calls = [tool_call("read_file", f"c{i}", path="README.md") for i in range(45)]
    model.steps = [reply("Thinking aloud before the tools.", *calls)]
    tid = (await call(client, "create_trace", prompt="read a lot", max_iterations=1))["trace_id"]
    view = await wait_done(client, tid)
    assert view["trace"]["outcome"] == "hit_limit" and view["last_sequence"] == 48
    assert view["last_text"] == "Thinking aloud before the tools." and view["answer"] is None


async def test_a_messages_page_of_a_running_trace_says_how_to_wait_for_more(client, slow_model):
    tid = (await call(client, "create_trace", prompt="think", model="slow"))["trace_id"]
    page = await call(client, "get_trace", trace_id=tid, view="messages", wait_seconds=0.2)
    assert page["note"] == "Waited 0.2 s." and page["next"].startswith("Still running.")
    assert f"view='messages', after_sequence={page['last_sequence']}, wait_seconds=30" in page["next"]
    await call(client, "stop_trace", trace_id=tid)


async def test_list_traces_stays_bounded_and_its_cursor_goes_on_where_the_answer_was_cut(client, model):
    tags = [f"{i:02d}-" + "t" * 61 for i in range(20)]
    ids = [
        (await call(client, "create_trace", prompt=f"hi {i}", name="n" * 200, tags=tags))["trace_id"]
        for i in range(30)
    ]
    for tid in ids:
        await wait_done(client, tid)
    result = await client.call_tool("list_traces", {"limit": 200})
    first = json.loads(text_of(result))
    assert len(text_of(result).encode()) < 26_000 and 0 < len(first["traces"]) < 30
    assert "next_cursor continues" in first["note"]
    rest = await call(client, "list_traces", limit=200, cursor=first["next_cursor"])
    seen = [t["trace_id"] for t in first["traces"]]
    while True:
        seen += [t["trace_id"] for t in rest["traces"]]
        if rest["next_cursor"] is None:
            break
        rest = await call(client, "list_traces", limit=200, cursor=rest["next_cursor"])
    assert seen == ids[::-1] and "note" not in rest


async def test_run_trace_on_a_paused_trace_without_a_reply_says_what_it_waits_for(client, model):
    model.steps = [reply(None, tool_call("ask_host", "q1", question="Which file?")), reply("ok")]
    tid = (await call(client, "create_trace", prompt="summarise"))["trace_id"]
    assert (await wait_done(client, tid))["trace"]["outcome"] == "needs_input"
    before = await full(client, tid)
    text = await call_error(client, "run_trace", trace_id=tid)
    assert text.startswith(f"Trace '{tid}' is waiting for input: reply with answer")
    assert await full(client, tid) == before
    await call(client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "never mind"}])
    assert (await wait_done(client, tid))["answer"] == "ok"  # messages move on without an answer


async def test_errors_name_a_malformed_trace_id_and_the_list_item_that_is_wrong(client):
    text = await call_error(client, "create_trace", prompt="x", from_trace="zz")
    assert text.startswith("Argument 'from_trace' of create_trace must be a trace id (32 hex characters")
    text = await call_error(client, "create_trace", messages=[{"role": "user", "content": "a"}, 2])
    assert text == "Item 2 of argument 'messages' of create_trace must be an object; got 2."


async def test_an_empty_question_reads_as_no_question(client, model):
    model.steps = [reply(None, tool_call("ask_host", "q1", question=""))]
    tid = (await call(client, "create_trace", prompt="ask"))["trace_id"]
    assert (await wait_done(client, tid))["question"] == "(no question given)"


def test_storage_failures_a_host_can_act_on_are_sentences():
    import errno
    import sqlite3

    from agent.errors import storage_trouble

    assert "disk holding the trace database is full" in storage_trouble(
        OSError(errno.ENOSPC, "No space left")
    )
    assert "disk holding" in storage_trouble(sqlite3.OperationalError("database or disk is full"))
    assert "locked by another process" in storage_trouble(sqlite3.OperationalError("database is locked"))
    assert storage_trouble(ValueError("something else")) is None
    assert storage_trouble(FileNotFoundError(2, "no such file: /data/no space left/x")) is None  # words alone
    assert storage_trouble(RuntimeError("database is locked")) is None
