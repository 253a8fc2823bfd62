"""Downstream MCP servers as agent tools: config, naming, schemas, results, and real stdio/HTTP servers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import types

from agent.errors import ToolCallError
from agent.tools.mcp import HttpServerSpec, McpServers, McpTool, ServerSpec, StdioServerSpec, load_mcp_config
from agent.tools.mcp_format import normalize_input_schema, result_to_text, tool_name
from agent.tools.registry import ToolRegistry
from tests.agent.mcp_test_server import PNG_1X1

SERVER_SCRIPT = str(Path(__file__).with_name("mcp_test_server.py"))
CALC = StdioServerSpec(command=sys.executable, args=[SERVER_SCRIPT], env={"CALC_SECRET": "42"})


# --- config -------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "mcp.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_config_reads_stdio_and_http_servers(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "mcpServers": {
                "calc": {"command": "python", "args": ["s.py"], "env": {"A": "1"}, "cwd": "/tmp"},
                "web": {"url": "http://127.0.0.1:9/mcp", "headers": {"Authorization": "Bearer x"}},
                "off": {"command": "x", "disabled": True},
            }
        },
    )
    specs = load_mcp_config(path)
    assert specs["calc"] == StdioServerSpec(command="python", args=["s.py"], env={"A": "1"}, cwd="/tmp")
    assert specs["web"] == HttpServerSpec(url="http://127.0.0.1:9/mcp", headers={"Authorization": "Bearer x"})
    assert "off" not in specs


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "is not valid JSON"),
        ({"servers": {}}, '"mcpServers"'),
        ({"mcpServers": {"calc": {"args": ["x"]}}}, "Server 'calc' in MCP config file"),
        ({"mcpServers": {"calc": {"args": ["x"]}}}, 'neither "command"'),
        ({"mcpServers": {"calc": {"command": "x", "url": "http://h"}}}, 'both "command" and "url"'),
        ({"mcpServers": {"calc": {"command": "x", "args": "not a list"}}}, "calc"),
        ({"mcpServers": {"web": {"url": "ftp://h"}}}, "http://"),
        ({"mcpServers": {"web": {"url": "http://h", "timeout": 0}}}, "timeout"),
        ({"mcpServers": {"a b": {"command": "x"}, "a_b": {"command": "y"}}}, "two servers named 'a_b'"),
    ],
)
def test_config_errors_are_sentences_naming_file_and_server(
    tmp_path: Path, content: Any, expected: str
) -> None:
    path = write_config(tmp_path, content)
    with pytest.raises(ValueError) as info:
        load_mcp_config(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_config_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    path = write_config(
        folder,
        {
            "mcpServers": {
                "no_cwd": {"command": "python", "args": ["s.py"]},
                "rel_cwd": {"command": "python", "cwd": "servers/a"},
                "abs_cwd": {"command": "python", "cwd": "/srv"},
                "rel_cmd": {"command": "./bin/srv.py", "cwd": "servers"},
                "sub_cmd": {"command": "bin/tool"},
                "abs_cmd": {"command": "/usr/bin/tool"},
            }
        },
    )
    monkeypatch.chdir(tmp_path)  # a relative config path is taken from where we were started
    stdio = {n: s for n, s in load_mcp_config("conf/mcp.json").items() if isinstance(s, StdioServerSpec)}
    assert stdio["no_cwd"].cwd == str(folder) and stdio["no_cwd"].command == "python"  # PATH lookup kept
    assert stdio["no_cwd"].args == ["s.py"]  # arguments are the server's business (found from its cwd)
    assert stdio["rel_cwd"].cwd == str(folder / "servers" / "a")
    assert stdio["abs_cwd"].cwd == "/srv"
    assert stdio["rel_cmd"].command == str(folder / "bin" / "srv.py")  # the folder, not the cwd
    assert stdio["sub_cmd"].command == str(folder / "bin" / "tool")
    assert stdio["abs_cmd"].command == "/usr/bin/tool"
    assert path.parent == folder and len(stdio) == 6


def test_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_mcp_config(tmp_path / "nope.json")


def test_config_server_names_are_made_usable_in_tool_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path, {"mcpServers": {"Google Drive": {"command": "x"}}})
    assert list(load_mcp_config(path)) == ["Google_Drive"]
    assert "Google Drive" in caplog.text


# --- names, schemas, results ---------------------------------------------------------------------------


def test_tool_names_are_provider_safe_and_stable() -> None:
    assert tool_name("calc", "add") == "calc__add"
    assert tool_name("calc", "do.thing/now") == "calc__do_thing_now"
    long = tool_name("server", "x" * 100)
    assert len(long) == 64 and long == tool_name("server", "x" * 100)
    assert long != tool_name("server", "x" * 99)
    assert all(c.isalnum() or c in "_-" for c in long)
    assert tool_name("calc", "a.b", force_hash=True) != tool_name("calc", "a.b")


def test_schemas_are_normalized_to_object_schemas() -> None:
    assert normalize_input_schema({}) == {"type": "object", "properties": {}}
    assert normalize_input_schema(None) == {"type": "object", "properties": {}}
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "properties": {"tags": {"type": "array"}, "n": {"type": "integer"}},
        "required": ["n"],
        "anyOf": [{"required": ["n"]}],
    }
    assert normalize_input_schema(schema) == {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {}}, "n": {"type": "integer"}},
        "required": ["n"],
    }
    assert "$schema" in schema  # the original is not modified
    assert normalize_input_schema({"type": "string"}) == {"type": "object", "properties": {}}


def test_results_become_text() -> None:
    def result(*blocks: Any, structured: Any = None) -> types.CallToolResult:
        return types.CallToolResult(content=list(blocks), structured_content=structured)

    assert result_to_text(result(types.TextContent(text="a"), types.TextContent(text="b"))) == "a\nb"
    assert result_to_text(result(structured={"x": 1})) == '{"x": 1}'
    assert result_to_text(result(types.TextContent(text="5"), structured={"result": 5})) == "5"
    image = result_to_text(result(types.ImageContent(data="AAAA", mime_type="image/png")))
    assert image == "[image: image/png, 3 bytes; binary content omitted]"
    audio = result_to_text(result(types.AudioContent(data="AAAA", mime_type="audio/wav")))
    assert audio.startswith("[audio: audio/wav")
    text_resource = types.EmbeddedResource(
        resource=types.TextResourceContents(uri="file:///a.txt", text="hello")
    )
    blob_resource = types.EmbeddedResource(
        resource=types.BlobResourceContents(uri="file:///a.bin", blob="AAAA")
    )
    assert result_to_text(result(text_resource)) == "hello"
    assert "file:///a.bin" in result_to_text(result(blob_resource))
    link = types.ResourceLink(name="report", uri="file:///r.pdf")
    assert result_to_text(result(link)) == "[resource link: report <file:///r.pdf>]"
    assert result_to_text(result()) == "(the tool returned no content)"


class FakeServer:
    """Stands in for a server's supervisor: answers every call with a fixed result after a delay."""

    name = "fake"

    def __init__(self, result: types.CallToolResult, delay: float = 0.0):
        self.result, self.delay = result, delay
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call_tool(self, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
        self.calls.append((tool, arguments))
        await anyio.sleep(self.delay)
        return self.result


@pytest.mark.anyio
async def test_mcp_tool_sends_the_original_name_and_reports_errors() -> None:
    ok = FakeServer(types.CallToolResult(content=[types.TextContent(text="fine")]))
    tool = McpTool(ok, types.Tool(name="do.it", input_schema={"type": "object"}))
    assert (tool.name, tool.group, tool.description) == (
        "fake__do_it",
        "fake",
        "Tool do.it of MCP server fake",
    )
    assert await tool.call({"x": 1}) == "fine"
    assert ok.calls == [("do.it", {"x": 1})]

    failing = FakeServer(types.CallToolResult(content=[types.TextContent(text="bad input")], is_error=True))
    with pytest.raises(ToolCallError, match="bad input"):
        await McpTool(failing, types.Tool(name="t", input_schema={})).call({})

    assert tool.read_only is False  # no annotations: assume it may write
    annotated = types.Tool(
        name="look", input_schema={}, annotations=types.ToolAnnotations(read_only_hint=True)
    )
    assert McpTool(ok, annotated).read_only is True

    slow = FakeServer(types.CallToolResult(content=[]), delay=30)
    with anyio.fail_after(10), pytest.raises(ToolCallError, match=r"fake__t timed out after 0.05 s"):
        await McpTool(slow, types.Tool(name="t", input_schema={}), timeout=0.05).call({})


# --- real servers ---------------------------------------------------------------------------------------


@asynccontextmanager
async def servers(
    specs: dict[str, ServerSpec], **options: Any
) -> AsyncIterator[tuple[McpServers, ToolRegistry]]:
    registry = ToolRegistry()
    options.setdefault("startup_timeout", 30)
    with anyio.fail_after(60):
        async with McpServers(specs, registry, **options) as mcp_servers:
            yield mcp_servers, registry
    assert registry.names() == []


async def call(registry: ToolRegistry, name: str, /, **arguments: Any) -> str:
    tool = registry.get(name)
    assert tool is not None, f"{name} not in {registry.names()}"
    return await tool.call(arguments)


async def wait_for_tool(registry: ToolRegistry, name: str) -> None:
    with anyio.fail_after(20):
        while registry.get(name) is None:
            await anyio.sleep(0.05)


def process_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") != -1
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: fall back to signalling
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


@pytest.mark.slow
@pytest.mark.anyio
async def test_stdio_server_tools_are_registered_and_called() -> None:
    async with servers({"calc": CALC}) as (mcp_servers, registry):
        assert mcp_servers.status() == {"calc": "connected"}
        (state,) = mcp_servers.describe()
        assert (state.name, state.state, state.reason) == ("calc", "up", None)
        assert set(state.tools) == set(registry.names())
        assert {"calc__add", "calc__slow", "calc__fail", "calc__picture"} <= set(registry.names())
        assert registry.get("calc__add").read_only is True  # type: ignore[union-attr]
        assert registry.get("calc__count").read_only is False  # type: ignore[union-attr]
        add = registry.get("calc__add")
        assert add is not None and add.group == "calc"
        assert add.input_schema["type"] == "object" and set(add.input_schema["properties"]) == {"a", "b"}
        assert add.description == "Add two integers."

        assert await call(registry, "calc__add", a=2, b=3) == "5"
        with pytest.raises(ToolCallError, match="the calculator is out of paper"):
            await call(registry, "calc__fail")
        assert (
            await call(registry, "calc__picture")
            == f"[image: image/png, {len(PNG_1X1)} bytes; binary content omitted]"
        )
        assert await call(registry, "calc__env", name="CALC_SECRET") == "42"  # spec env reaches the child
        assert await call(registry, "calc__env", name="PATH") != "<unset>"  # over the default environment
        pid = int(await call(registry, "calc__pid"))
    with anyio.fail_after(10):  # the subprocess is gone once the block has exited
        while not process_gone(pid):
            await anyio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.anyio
async def test_slow_call_is_cancelled_promptly_and_times_out() -> None:
    async with servers({"calc": CALC}) as (_, registry):
        with anyio.fail_after(10):  # guard: cancellation must not wait for the 60 s sleep
            with anyio.move_on_after(0.2) as scope:
                await call(registry, "calc__slow", seconds=60)
        assert scope.cancelled_caught
        assert await call(registry, "calc__add", a=1, b=1) == "2"  # the connection still works

        slow = registry.get("calc__slow")
        assert isinstance(slow, McpTool)
        slow.timeout = 0.2
        with anyio.fail_after(10), pytest.raises(ToolCallError, match=r"calc__slow timed out after 0.2 s"):
            await slow.call({"seconds": 60})
        assert await call(registry, "calc__add", a=2, b=2) == "4"


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_changed_tool_list_is_reread(mode: str) -> None:
    async with servers({"calc": CALC}, protocol_mode=mode) as (_, registry):
        assert registry.get("calc__extra") is None
        assert await call(registry, "calc__grow") == "grown"
        await wait_for_tool(registry, "calc__extra")
        assert await call(registry, "calc__extra") == "extra!"


@pytest.mark.slow
@pytest.mark.anyio
async def test_crashed_server_is_restarted() -> None:
    async with servers({"calc": CALC}, backoff_initial=0.05) as (mcp_servers, registry):
        with pytest.raises(ToolCallError, match="unavailable"):
            await call(registry, "calc__crash")
        await wait_for_tool(registry, "calc__add")
        assert await call(registry, "calc__add", a=20, b=22) == "42"
        assert mcp_servers.status() == {"calc": "connected"}


@pytest.mark.slow
@pytest.mark.anyio
async def test_servers_that_cannot_start_leave_the_others_working(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="agent.tools.mcp")
    dying = "import sys; sys.stderr.write('fatal: no database configured\\n'); sys.exit(1)"
    specs: dict[str, ServerSpec] = {
        "calc": CALC,
        "missing": StdioServerSpec(command="/nonexistent/mcp-server"),
        "dies": StdioServerSpec(command=sys.executable, args=["-c", dying]),
    }
    async with servers(specs) as (mcp_servers, registry):
        status = mcp_servers.status()
        assert status["calc"] == "connected"
        assert status["missing"].startswith("failed: ") and "/nonexistent/mcp-server" in status["missing"]
        assert status["dies"].startswith("failed: ")
        assert registry.groups() == ["calc"]
        assert await call(registry, "calc__add", a=2, b=3) == "5"
        described = {state.name: state for state in mcp_servers.describe()}
        assert [described[n].state for n in ("calc", "missing", "dies")] == ["up", "failed", "failed"]
        assert described["dies"].stderr_last_line == "fatal: no database configured"
        assert described["dies"].tools == [] and described["dies"].reason
        assert "/nonexistent/mcp-server" in (described["missing"].reason or "")
        assert described["missing"].stderr_last_line is None
    assert "fatal: no database configured" in caplog.text  # the failure is logged with the child's stderr
    assert "'missing' failed to start" in caplog.text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def http_test_server(port: int | None = None) -> AsyncIterator[tuple[HttpServerSpec, Any]]:
    """The test server over streamable HTTP in its own process, ready to connect; killed on exit."""
    port = port or free_port()
    command = [sys.executable, SERVER_SCRIPT, "--http", str(port)]
    process = await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with anyio.fail_after(30):
            while True:
                try:
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    assert process.returncode is None, "the HTTP test server exited"
                    await anyio.sleep(0.1)
        yield HttpServerSpec(url=f"http://127.0.0.1:{port}/mcp", headers={"X-Test": "1"}), process
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with anyio.fail_after(10), anyio.CancelScope(shield=True):
            await process.wait()
        await process.aclose()


@pytest.mark.slow
@pytest.mark.anyio
async def test_http_server_tools() -> None:
    async with http_test_server() as (spec, _), servers({"web": spec}) as (mcp_servers, registry):
        assert mcp_servers.status() == {"web": "connected"}
        assert await call(registry, "web__add", a=2, b=3) == "5"
        with pytest.raises(ToolCallError, match="out of paper"):
            await call(registry, "web__fail")


@pytest.mark.slow
@pytest.mark.anyio
async def test_config_servers_start_in_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    (folder / "bin").mkdir(parents=True)
    (folder / "data").mkdir()
    script = folder / "bin" / "srv.py"
    script.write_text(
        f"#!{sys.executable}\nimport runpy\nrunpy.run_path({SERVER_SCRIPT!r}, run_name='__main__')\n"
    )
    script.chmod(0o755)
    config = {
        "mcpServers": {
            "here": {"command": "./bin/srv.py"},
            "there": {"command": sys.executable, "args": ["../bin/srv.py"], "cwd": "data"},
        }
    }
    path = write_config(folder, config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    async with servers(load_mcp_config(path)) as (mcp_servers, registry):
        assert mcp_servers.status() == {"here": "connected", "there": "connected"}
        assert await call(registry, "here__cwd") == os.path.realpath(folder)
        assert await call(registry, "there__cwd") == os.path.realpath(folder / "data")
