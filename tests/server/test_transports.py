"""The console script as hosts run it: a stdio subprocess, and streamable HTTP on 127.0.0.1 (both eras),
with Origin protection, the bearer token and the open-bind refusal."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import anyio
import httpx2
import mcp.types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.fake_openai import completion
from tests.processes import HttpServer, console_script, free_port, server_args, stdio_params
from tests.server.helpers import call, wait_done

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:resources/.*subscribe is removed"),
]


@pytest.fixture
def http_server(tmp_path, workspace) -> Iterator[HttpServer]:
    server = HttpServer(tmp_path, workspace)
    yield server
    server.close()


# -- stdio ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_stdio_subprocess_runs_a_trace(tmp_path, workspace, mode):
    async with Client(stdio_params(tmp_path, workspace), mode=mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"create_trace", "run_trace", "stop_trace", "reflect_trace", "list_running"} <= names
        tid = (await call(client, "create_trace", prompt="Use read_file to read README.md"))["trace_id"]
        view = await wait_done(client, tid)
        assert view["trace"]["status"] == "completed"
        steps = (await call(client, "get_trace", trace_id=tid, view="messages"))["messages"]
        assert "The answer is 42." in steps[3]["content"]
        reflection = await call(client, "reflect_trace", trace_id=tid)
        assert reflection["reflection"]
        resources = [str(r.uri) for r in (await client.list_resources()).resources]
        assert resources[:2] == ["experiences://memory", f"trace://{tid}"]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_stdio_get_trace_wait_streams_progress_from_an_openai_compatible_model(
    tmp_path, workspace, mode, fake_openai
):
    """The openai: provider against a fake server on loopback that pauses before its first answer, so
    the long-poll is already waiting and every later message reaches the client as progress."""
    read_call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "read_file", "arguments": json.dumps({"path": "README.md"})},
    }
    fake_openai.script = [
        ("slow", (1.0, completion(None, tool_calls=[read_call]))),
        ("json", completion("The README says the answer is 42.")),
    ]
    env = fake_openai.env
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)

    params = stdio_params(tmp_path, workspace, "--model", "openai:gpt-test", **env)
    async with Client(params, mode=mode) as client:
        tid = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
        result = await client.call_tool(
            "get_trace",
            {"trace_id": tid, "wait_seconds": 30, "after_sequence": 2},
            progress_callback=on_progress,
        )
    view = result.structured_content
    assert view["trace"]["status"] == "completed"
    assert view["answer"] == "The README says the answer is 42."
    assert progress[0] == 'assistant called read_file({"path": "README.md"})'
    assert progress[1].startswith("read_file returned 33 chars: # Demo project")
    assert progress[2] == "assistant answered: The README says the answer is 42."
    assert fake_openai.requests[0]["body"]["tools"]  # the provider offered the tools over real HTTP


async def assert_legacy_push(client: Client, updates: list[str]) -> None:
    """Subscribe to a finished trace, run it again, and see resources/updated arrive."""
    tid = (await call(client, "create_trace", prompt="hello"))["trace_id"]
    await wait_done(client, tid)
    await client.session.subscribe_resource(f"trace://{tid}")
    await call(client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "again"}])
    await wait_done(client, tid)
    with anyio.fail_after(10):
        while f"trace://{tid}" not in updates:
            await anyio.sleep(0.05)


def updated_uris(updates: list[str]):
    async def handler(message):
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))

    return handler


async def test_stdio_legacy_subscriber_gets_updates(tmp_path, workspace):
    updates: list[str] = []
    async with Client(
        stdio_params(tmp_path, workspace), mode="legacy", message_handler=updated_uris(updates)
    ) as c:
        await assert_legacy_push(c, updates)


# -- streamable HTTP --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_http_runs_a_trace(http_server, mode):
    async with Client(http_server.url, mode=mode) as client:
        tid = (await call(client, "create_trace", prompt="Use read_file to read README.md"))["trace_id"]
        view = await wait_done(client, tid)
        assert view["trace"]["status"] == "completed" and view["answer"]
        assert (await call(client, "list_running"))["running"] == []


async def test_http_legacy_subscriber_gets_pushed_updates(http_server):
    updates: list[str] = []
    async with Client(http_server.url, mode="legacy", message_handler=updated_uris(updates)) as client:
        await assert_legacy_push(client, updates)


async def test_http_modern_listener_gets_events(http_server):
    async with Client(http_server.url) as client:
        tid = (await call(client, "create_trace", prompt="hello"))["trace_id"]
        await wait_done(client, tid)
        async with client.listen(resource_subscriptions=[f"trace://{tid}"]) as sub:
            await call(client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "again"}])
            with anyio.fail_after(10):
                event = await sub.__anext__()
            assert event.uri == f"trace://{tid}"
        await wait_done(client, tid)


INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


async def test_http_refuses_a_foreign_origin(http_server):
    async with httpx2.AsyncClient() as http:
        evil = await http.post(
            http_server.url, json=INIT, headers={**HEADERS, "origin": "http://evil.example"}
        )
        assert evil.status_code == 403
        for frame in ({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, b"not json"):  # checked first
            body = {"json": frame} if isinstance(frame, dict) else {"content": frame}
            early = await http.post(
                http_server.url, **body, headers={**HEADERS, "origin": "http://evil.example"}
            )
            assert early.status_code == 403, early.text
        rebound = await http.post(http_server.url, json=INIT, headers={**HEADERS, "host": "evil.example"})
        assert rebound.status_code == 421
        ok = await http.post(
            http_server.url, json=INIT, headers={**HEADERS, "origin": f"http://127.0.0.1:{http_server.port}"}
        )
        assert ok.status_code == 200


async def test_http_token_is_required_when_set(tmp_path, workspace):
    server = HttpServer(tmp_path, workspace, env={"AGENT_TRACE_TOKEN": "s3cret-token"})
    try:
        async with httpx2.AsyncClient() as http:
            missing = await http.post(server.url, json=INIT, headers=HEADERS)
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"].startswith("Bearer")
            wrong = await http.post(
                server.url, json=INIT, headers={**HEADERS, "authorization": "Bearer nope"}
            )
            assert wrong.status_code == 401
            right = await http.post(
                server.url, json=INIT, headers={**HEADERS, "authorization": "Bearer s3cret-token"}
            )
            assert right.status_code == 200
            for spelled in ("bearer s3cret-token", "BEARER  s3cret-token"):  # the scheme is case-insensitive
                also = await http.post(server.url, json=INIT, headers={**HEADERS, "authorization": spelled})
                assert also.status_code == 200, spelled
            for wrong_scheme in ("Basic s3cret-token", "s3cret-token", "Bearer s3cret-token-and-more"):
                refused = await http.post(
                    server.url, json=INIT, headers={**HEADERS, "authorization": wrong_scheme}
                )
                assert refused.status_code == 401, wrong_scheme
        async with httpx2.AsyncClient(headers={"authorization": "Bearer s3cret-token"}) as http:
            async with Client(streamable_http_client(server.url, http_client=http), mode="legacy") as client:
                assert "create_trace" in {t.name for t in (await client.list_tools()).tools}
    finally:
        server.close()


def test_open_bind_without_protection_refuses_to_start(tmp_path, workspace):
    env = {k: v for k, v in os.environ.items() if k != "AGENT_TRACE_TOKEN"}
    done = subprocess.run(
        [*console_script(), "--transport", "http", "--host", "0.0.0.0", "--port", str(free_port()),
         *server_args(tmp_path, workspace)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Refusing to serve on 0.0.0.0" in done.stderr and "--auth-token" in done.stderr


def test_demo_command_exits_0_and_shows_the_trace(tmp_path):
    done = subprocess.run(
        [*console_script(), "demo", "--data-dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120, env={**os.environ}, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Trace id:" in out and "read_file" in out and "reflect_trace" in out
    assert "● " in out and "○ " in out  # the tree shows the active path and the other branches
    assert (tmp_path / "demo" / "experiences.md").exists()


def test_a_bad_mcp_config_is_a_sentence_at_start_up(tmp_path, workspace):
    config = tmp_path / "servers.json"
    config.write_text('{"mcpServers": {"calc": {"args": ["x"]}}}')
    done = subprocess.run(
        [*console_script(), *server_args(tmp_path, workspace), "--mcp-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 2
    assert "calc" in done.stderr and "Traceback" not in done.stderr
