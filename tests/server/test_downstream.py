"""Other MCP servers' tools, end to end: config file -> server startup -> a trace calling them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client

from server.app import build_server
from server.settings import Settings
from tests.fakes import ScriptedModel, models_for, reply
from tests.fakes import call as tool_call
from tests.server.helpers import call, call_error, full, wait_done

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

TEST_SERVER = Path(__file__).parent.parent / "agent" / "mcp_test_server.py"


@pytest.fixture
def scripted() -> ScriptedModel:
    return ScriptedModel([reply("nothing to do")])


@pytest.fixture
def downstream_server(tmp_path, workspace, scripted):
    config = tmp_path / "mcp_servers.json"
    config.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "calc": {"command": sys.executable, "args": [str(TEST_SERVER)]},
                    "broken": {"command": str(tmp_path / "no-such-program")},
                }
            }
        )
    )
    settings = Settings.for_data_dir(
        tmp_path / "data", model="scripted", workspace=workspace, mcp_config=config
    )
    return build_server(settings, models=models_for(scripted=scripted))


@pytest.fixture
async def client(downstream_server):
    async with Client(downstream_server, mode="legacy") as c:
        yield c


async def test_the_agent_calls_a_downstream_tool(client, scripted):
    scripted.steps = [reply(None, tool_call("calc__add", a=2, b=3)), reply("It is 5.")]
    tid = (await call(client, "create_trace", prompt="Use calc__add to add 2 and 3."))["trace_id"]
    await wait_done(client, tid)
    view = await full(client, tid)
    calls = [m for m in view["messages"] if m.get("tool_calls")]
    assert calls[0]["tool_calls"][0]["function"]["name"] == "calc__add"
    assert json.loads(calls[0]["tool_calls"][0]["function"]["arguments"]) == {"a": 2, "b": 3}
    assert next(m for m in view["messages"] if m["role"] == "tool")["content"] == "5"


async def test_a_failing_tool_reaches_the_model_and_the_run_goes_on(client, scripted):
    scripted.steps = [reply(None, tool_call("calc__fail")), reply("I saw the error")]
    tid = (await call(client, "create_trace", prompt="fail please", model="scripted"))["trace_id"]
    await wait_done(client, tid)
    view = await full(client, tid)
    tool_message = next(m for m in view["messages"] if m["role"] == "tool")
    assert tool_message["content"].startswith("Error:")
    assert scripted.calls[1]["messages"][-1]["content"] == tool_message["content"]
    assert view["trace"]["status"] == "completed"


async def test_stop_cancels_a_slow_downstream_tool(client, scripted):
    scripted.steps = [reply(None, tool_call("calc__slow", seconds=3600))]
    tid = (await call(client, "create_trace", prompt="slow", model="scripted"))["trace_id"]
    with anyio.fail_after(20):
        while True:  # wait until the tool call is stored (so the tool is in flight)
            view = await full(client, tid)
            if any(m.get("tool_calls") for m in view["messages"]):
                break
            await anyio.sleep(0.02)
    await anyio.sleep(0.2)
    assert (await call(client, "stop_trace", trace_id=tid))["status"] == "stopping"
    await wait_done(client, tid)
    view = await full(client, tid)
    assert view["trace"]["status"] == "stopped"
    assert view["messages"][-1]["role"] == "tool" and view["messages"][-1]["content"].startswith("Cancelled")
    # the connection still works for the next trace
    scripted.calls.clear()
    scripted.steps = [reply(None, tool_call("calc__add", a=1, b=1)), reply("2")]
    tid = (await call(client, "create_trace", prompt="add", model="scripted"))["trace_id"]
    await wait_done(client, tid)
    view = await full(client, tid)
    assert [m["content"] for m in view["messages"] if m["role"] == "tool"] == ["2"]


async def test_whitelists_by_server_and_by_tool(client, scripted):
    tid = (await call(client, "create_trace", prompt="x", model="scripted", tools=["calc"]))["trace_id"]
    await wait_done(client, tid)
    offered = [
        t["function"]["name"] for t in scripted.calls[-1]["tools"] if t["function"]["name"] != "ask_host"
    ]
    assert offered and all(name.startswith("calc__") for name in offered) and "calc__add" in offered

    tid = (
        await call(client, "create_trace", prompt="x", model="scripted", tools=["calc__add", "read_file"])
    )["trace_id"]
    await wait_done(client, tid)
    assert sorted(t["function"]["name"] for t in scripted.calls[-1]["tools"]) == [
        "ask_host",
        "calc__add",
        "read_file",
    ]

    # the whitelist is stored and applies when the trace is continued
    await call(client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "more"}])
    await wait_done(client, tid)
    assert sorted(t["function"]["name"] for t in scripted.calls[-1]["tools"]) == [
        "ask_host",
        "calc__add",
        "read_file",
    ]

    text = await call_error(client, "create_trace", prompt="x", tools=["calc__nope", "weather"])
    assert "'calc__nope', 'weather'" in text and "calc__add" in text and "calc (server)" in text


async def test_a_server_that_cannot_start_leaves_the_rest_working(client, scripted):
    tid = (await call(client, "create_trace", prompt="x", model="scripted"))["trace_id"]
    await wait_done(client, tid)
    offered = {t["function"]["name"] for t in scripted.calls[-1]["tools"]}
    assert {"calc__add", "read_file", "list_files", "search_files", "load_skill"} <= offered
    assert not any(name.startswith("broken__") for name in offered)
    # agent_info says which server is up and why the other is not; the agent may write through calc
    info = await call(client, "agent_info")
    states = {s["name"]: s for s in info["servers"]}
    assert (
        states["calc"]["state"] == "up"
        and states["broken"]["state"] == "failed"
        and states["broken"]["reason"]
    )
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert tools["create_trace"].annotations.destructive_hint is True
    text = await call_error(client, "create_trace", prompt="x", tools=["broken"])
    assert (
        text.startswith("MCP server 'broken' in tools is unavailable: it failed (") and "agent_info" in text
    )


MANY_TOOLS_SERVER = """
from mcp.server.mcpserver import MCPServer

mcp = MCPServer("wide")
for n in range(300):
    def tool(x: int = 0) -> int:
        return x
    mcp.add_tool(tool, name=f"op{n}", description=f"Operation {n}: " + "does a careful thing. " * 12)
mcp.run()
"""


async def test_agent_info_stays_bounded_with_hundreds_of_downstream_tools(tmp_path, workspace):
    script = tmp_path / "wide.py"
    script.write_text(MANY_TOOLS_SERVER)
    config = tmp_path / "wide.json"
    config.write_text(
        json.dumps({"mcpServers": {"wide": {"command": sys.executable, "args": [str(script)]}}})
    )
    settings = Settings.for_data_dir(
        tmp_path / "data", model="scripted", workspace=workspace, mcp_config=config
    )
    async with Client(build_server(settings, models=models_for(scripted=ScriptedModel([])))) as client:
        result = await client.call_tool("agent_info", {})
        info = result.structured_content
        names = [t["name"] for t in info["tools"]]
        assert sorted(f"wide__op{n}" for n in range(300)) == sorted(
            n for n in names if n.startswith("wide__")
        )
        assert len(result.content[0].text.encode()) < 40_000  # every tool named, in ~24 KB of rows
        assert "descriptions are shortened" in " ".join(info["notes"])
