"""HTTP as an attacker drives it: session floods, garbage POSTs, half-sent requests, foreign Hosts.

The server runs in-process under uvicorn on a real loopback port, with its guards' limits set small.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from mcp import Client, MCPError

import server.http as http
from server.app import build_server
from server.settings import Settings
from tests.fakes import ScriptedModel, models_for, reply
from tests.processes import free_port
from tests.server.helpers import call

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "flood", "version": "1"},
    },
}
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


@asynccontextmanager
async def serving(
    settings: Settings, models: Any = None, **limits: int
) -> AsyncIterator[tuple[str, http.SessionGuard]]:
    mcp = build_server(settings, models=models or models_for(scripted=ScriptedModel([reply("ok")])))
    app = http.http_app(mcp, settings, **limits)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", http=http.BoundedH11Protocol
        )
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        guard = mcp.session_manager.asgi_app.__self__
        try:
            yield f"http://127.0.0.1:{port}/mcp", guard
        finally:
            server.should_exit = True


@pytest.fixture
def settings(tmp_path, workspace) -> Settings:
    return Settings.for_data_dir(tmp_path / "data", model="scripted", workspace=workspace)


async def test_an_initialize_flood_cannot_lock_a_real_client_out(settings):
    """300 initialize POSTs never closed: the peer's oldest idle sessions are evicted, the count stays at its
    cap, and a real client still connects and works (before: 10,000 of them locked everyone out for 30 min)."""
    async with serving(settings, sessions_per_peer=16, max_sessions=32) as (url, guard):
        async with httpx2.AsyncClient(timeout=10) as hc:
            statuses = [(await hc.post(url, json=INIT, headers=HEADERS)).status_code for _ in range(300)]
        assert statuses.count(200) == 300
        assert guard.open_sessions() <= 16
        async with Client(url, mode="legacy") as client:
            tid = (await call(client, "create_trace", prompt="hello"))["trace_id"]
            assert len(tid) == 32
        print(
            f"flood: 300 initialize POSTs, {guard.open_sessions()} sessions left open (cap 16); client served"
        )


async def test_a_post_that_is_not_an_initialize_opens_no_session(settings):
    async with serving(settings) as (url, guard):
        async with httpx2.AsyncClient(timeout=10) as hc:
            for body, request_id, says in (
                (b"garbage", None, "Parse error: the frame is not valid JSON."),
                (b"[1, 2]", None, "batches are not supported"),
                (
                    b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":"x"}',
                    4,
                    "'params' must be an object",
                ),
                (json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/list"}).encode(), 7, "initialize"),
            ):
                response = await hc.post(url, content=body, headers=HEADERS)
                assert response.status_code == 400
                error = response.json()["error"]
                assert response.json()["id"] == request_id and says in error["message"]
                assert "validation error" not in error["message"].lower()  # one sentence, never a dump
        assert guard.open_sessions() == 0


async def test_a_half_sent_request_is_dropped(settings, monkeypatch):
    monkeypatch.setattr(http, "HEADER_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(http, "BODY_CHUNK_TIMEOUT_SECONDS", 0.5)
    async with serving(settings) as (url, _):
        port = int(url.split(":")[2].split("/")[0])

        def half(request: bytes) -> float:
            """Send part of a request; seconds until the server answers or closes the connection."""
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(request)
                start = time.monotonic()
                s.recv(4096)
                return time.monotonic() - start

        waited = await anyio.to_thread.run_sync(half, b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert waited < 3  # headers never finished: dropped after the header deadline
        body_start = b'{"jsonrpc": "2.0", '
        request = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\nContent-Length: 500\r\n\r\n" + body_start
        )
        waited = await anyio.to_thread.run_sync(half, request)
        assert 0.4 < waited < 3  # the body stopped arriving: given up after the chunk deadline


async def test_a_body_trickled_in_is_dropped_at_its_whole_deadline(settings, monkeypatch):
    monkeypatch.setattr(http, "BODY_CHUNK_TIMEOUT_SECONDS", 1.0)
    monkeypatch.setattr(http, "BODY_TIMEOUT_SECONDS", 2.0)
    async with serving(settings) as (url, _):
        port = int(url.split(":")[2].split("/")[0])

        def trickle() -> float:
            """A byte every 0.3 s (each within the chunk deadline); seconds until the server gives up."""
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(
                    f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
                    + b"Content-Type: application/json\r\n"
                    b"Accept: application/json, text/event-stream\r\nContent-Length: 100000\r\n\r\n"
                )
                start = time.monotonic()
                s.settimeout(0.3)
                while time.monotonic() - start < 10:
                    try:
                        s.sendall(b" ")
                        answer = s.recv(4096)
                        assert answer == b"" or b" 408 " in answer or b" 400 " in answer, answer
                        break  # closed, or an answer: given up on
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                return time.monotonic() - start

        waited = await anyio.to_thread.run_sync(trickle)
        assert 1.5 < waited < 5  # past the chunk deadline many times over, cut at the whole one


def test_a_token_on_a_public_bind_keeps_the_host_and_origin_checks(tmp_path):
    settings = Settings.for_data_dir(tmp_path, host="0.0.0.0", auth_token="secret")
    security = http.transport_security(settings)
    assert security is not None and security.enable_dns_rebinding_protection
    assert "evil.example:*" not in security.allowed_hosts and "127.0.0.1:*" in security.allowed_hosts
    named = Settings.for_data_dir(
        tmp_path, host="10.1.2.3", auth_token="secret", allowed_hosts=["mcp.example.com"]
    )
    security = http.transport_security(named)
    assert {"10.1.2.3:*", "mcp.example.com", "mcp.example.com:*"} <= set(security.allowed_hosts)
    assert "https://mcp.example.com" in security.allowed_origins


def test_a_wildcard_bind_accepts_the_address_other_machines_reach_this_one_by(tmp_path):
    """Where the host name resolves to loopback (Debian's 127.0.1.1), the machine's route-out address is
    what a client on another machine puts in its Host header."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect(("192.0.2.1", 9))
            outward = udp.getsockname()[0]
    except OSError:
        pytest.skip("this machine has no IPv4 route out")
    security = http.transport_security(Settings.for_data_dir(tmp_path, host="0.0.0.0", auth_token="secret"))
    assert security is not None and f"{outward}:*" in security.allowed_hosts


async def test_sessions_all_busy_never_lock_a_new_client_out(settings):
    """Sessions that each hold a GET stream are never idle: past its cap a peer keeps them (every local
    host shares 127.0.0.1), but at the total the biggest holder's oldest goes, so a new client is always
    served (before: 1,024 listening sessions locked everyone out with 503)."""
    async with serving(settings, sessions_per_peer=4, max_sessions=8) as (url, guard):
        async with httpx2.AsyncClient(timeout=10) as hc, AsyncExitStack() as streams:
            for _ in range(10):
                opened = await hc.post(url, json=INIT, headers=HEADERS)
                assert opened.status_code == 200
                session = {
                    "mcp-session-id": opened.headers["mcp-session-id"],
                    "mcp-protocol-version": "2025-11-25",
                }
                note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                await hc.post(url, json=note, headers=HEADERS | session)
                get = hc.stream("GET", url, headers={"accept": "text/event-stream"} | session)
                assert (await streams.enter_async_context(get)).status_code == 200
                assert guard.open_sessions() <= 8
        async with Client(url, mode="legacy") as client:
            assert len((await call(client, "create_trace", prompt="hello"))["trace_id"]) == 32


@pytest.mark.filterwarnings("ignore:resources/.*subscribe is removed")
async def test_subscriptions_are_bounded_and_an_unknown_version_is_told_the_supported_ones(settings):
    async with serving(settings) as (url, _):
        async with Client(url, mode="legacy") as client:
            with pytest.raises(MCPError) as refused:
                await client.session.subscribe_resource("trace://" + "a" * 3_000_000)
            assert "at most 500 characters" in refused.value.error.message and len(str(refused.value)) < 400
            await client.session.subscribe_resource(
                "test://any-uri-at-all"
            )  # the protocol lets a client name any
        async with httpx2.AsyncClient(timeout=10) as hc:
            future = {"mcp-protocol-version": "2099-01-01", "mcp-method": "server/discover"}
            envelope = {
                "io.modelcontextprotocol/protocolVersion": "2099-01-01",
                "io.modelcontextprotocol/clientCapabilities": {},
            }
            discover = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": envelope}}
            answer = await hc.post(url, json=discover, headers=HEADERS | future)
            assert answer.status_code == 400 and "2026-07-28" in json.dumps(answer.json()["error"])


def test_one_client_address_holds_at_most_its_share_of_listen_streams():
    from mcp.server.subscriptions import InMemorySubscriptionBus

    from server.notify import LISTENS_PER_PEER, Notifier

    notifier = Notifier(InMemorySubscriptionBus())
    with contextlib.ExitStack() as held:
        for _ in range(LISTENS_PER_PEER):
            held.enter_context(notifier.listening("10.0.0.1"))
        with pytest.raises(MCPError, match="close one before you open another"):
            held.enter_context(notifier.listening("10.0.0.1"))
        held.enter_context(notifier.listening("10.0.0.2"))  # another client is not held back
        held.enter_context(notifier.listening(None))  # nor stdio
    with notifier.listening("10.0.0.1"):
        pass  # closed streams give their place back


async def test_a_refused_initialize_leaves_no_session(settings):
    async with serving(settings) as (url, guard):
        async with httpx2.AsyncClient(timeout=10) as hc:
            broken = INIT | {"params": {"capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}}
            answer = await hc.post(url, json=broken, headers=HEADERS)
            assert "error" in answer.text
        with anyio.fail_after(5):  # dropped once the answer is out
            while guard.open_sessions():
                await anyio.sleep(0.01)


async def test_an_id_already_in_flight_on_a_session_is_refused_not_left_unanswered(settings):
    """The SDK files answers by str(id): 300 beside "300" (or a second 300) took the first's answer and
    left one request waiting forever; "_GET_stream" took over the session's GET stream."""
    slow = ScriptedModel([reply("late")], name="slow")
    slow.delay = 30
    async with serving(settings, models_for(scripted=ScriptedModel([reply("ok")]), slow=slow)) as (url, _):
        async with httpx2.AsyncClient(timeout=20) as hc:
            opened = await hc.post(url, json=INIT, headers=HEADERS)
            session = {
                "mcp-session-id": opened.headers["mcp-session-id"],
                "mcp-protocol-version": "2025-11-25",
            }
            await hc.post(
                url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=HEADERS | session
            )
            create = {"name": "create_trace", "arguments": {"prompt": "hi", "model": "slow"}}
            started = await hc.post(
                url,
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": create},
                headers=HEADERS | session,
            )
            tid = json.loads(started.text.split("data:", 1)[1])["result"]["structuredContent"]["trace_id"]
            wait = {"name": "get_trace", "arguments": {"trace_id": tid, "wait_seconds": 3}}
            results: dict = {}

            async def send(request_id) -> None:
                body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": wait}
                results[repr(request_id)] = await hc.post(url, json=body, headers=HEADERS | session)

            async with anyio.create_task_group() as group:
                group.start_soon(send, 300)
                await anyio.sleep(0.5)
                group.start_soon(send, "300")
                group.start_soon(send, "_GET_stream")
            assert results["300"].status_code == 200 and '"id":300' in results["300"].text
            for refused in ("'300'", "'_GET_stream'"):
                assert results[refused].status_code == 400 and "already in use" in results[refused].text
            for _ in range(200):  # free again the moment its answer is out, however soon it is reused
                ping = await hc.post(
                    url, json={"jsonrpc": "2.0", "id": 300, "method": "ping"}, headers=HEADERS | session
                )
                assert ping.status_code == 200, ping.text
