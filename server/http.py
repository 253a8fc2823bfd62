"""Serving over streamable HTTP: Host/Origin protection, the optional bearer token, bounded sessions and
bounded requests.

What an adversary tried and these guards stop: a web page reaching a loopback server (Origin/Host checks
stay on whatever the bind address, token or not); thousands of ``initialize`` POSTs never closed (sessions
expire when idle, each peer has a cap, the oldest idle session is evicted first, so a flood cannot lock
real clients out); POSTs that are not an ``initialize`` opening sessions; half-sent requests held open
(a deadline for headers, for each chunk of a body and for the whole body).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.trace.backends import open_store
from server.settings import LOOPBACK_HOSTS, Settings
from server.stream_transport import parse_frame
from server.views import elide

log = logging.getLogger(__name__)

LOOPBACK_ALLOWED_HOSTS = ["127.0.0.1", "127.0.0.1:*", "localhost", "localhost:*", "[::1]", "[::1]:*"]
"""With and without a port: a client of port 80 (or 443) sends none."""
LOOPBACK_ALLOWED_ORIGINS = [
    *(f"http://{host}" for host in ("127.0.0.1", "localhost", "[::1]")),
    *(f"http://{host}:*" for host in ("127.0.0.1", "localhost", "[::1]")),
]
WILDCARD_BINDS = ("0.0.0.0", "::", "")

SESSION_IDLE_SECONDS = 300.0
"""A session with no request in flight (a client's GET stream counts as one) expires after this."""
MAX_SESSIONS = 1024
SESSIONS_PER_PEER = 64
SDK_GET_STREAM_KEY = "_GET_stream"
"""The key the SDK files a session's GET stream under, among its request ids."""
ANSWER_PEEK_BYTES = 65_536
"""How much of an initialize answer is read to see whether it refused (an answer is a few KB)."""
HEADER_TIMEOUT_SECONDS = 10.0
BODY_CHUNK_TIMEOUT_SECONDS = 30.0
BODY_TIMEOUT_SECONDS = 120.0
"""The whole body, however it trickles in (4 MiB at this pace is 35 KB/s): one byte every few seconds
cannot hold a connection open for days."""
MAX_BODY_BYTES = 4 * 1024 * 1024


class UnsafeBind(Exception):
    """Serving a non-loopback address with nothing guarding it."""


def check_bind(settings: Settings) -> None:
    if settings.host in LOOPBACK_HOSTS or settings.auth_token or settings.allowed_hosts:
        return
    raise UnsafeBind(
        f"Refusing to serve on {settings.host} with no protection: anyone who can reach it could run agents "
        "with your keys. Set --auth-token (or AGENT_TRACE_TOKEN) to require a bearer token, and/or "
        "--allowed-host NAME for the host names clients use, or bind 127.0.0.1."
    )


def _own_names() -> list[str]:
    """This machine's names and addresses: what clients of a wildcard bind put in their Host header."""
    names = {socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):
        names |= {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
    # where a host name resolves to loopback (Debian's 127.0.1.1), the addresses other machines reach this
    # one by: the source address of a route out (a UDP "connect" sends nothing)
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.connect((probe, 9))
            names.add(str(udp.getsockname()[0]))
    return sorted(n for n in names if n)


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """Host/Origin checks stay on for every bind: loopback (with or without a port), plus --allowed-host,
    plus the bind address (for a wildcard bind, this machine's own names)."""
    extra = [
        spelling for host in settings.allowed_hosts for spelling in (host, host.lower())
    ]  # as typed, or as most clients send it
    if settings.host not in LOOPBACK_HOSTS:
        extra += _own_names() if settings.host in WILDCARD_BINDS else [settings.host]
    hosts, origins = list(LOOPBACK_ALLOWED_HOSTS), list(LOOPBACK_ALLOWED_ORIGINS)
    for host in dict.fromkeys(extra):
        shown = f"[{host}]" if ":" in host else host
        hosts += [shown, f"{shown}:*"]
        origins += [f"http://{shown}", f"https://{shown}", f"http://{shown}:*", f"https://{shown}:*"]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


async def _reply(
    send: Send, status: int, body: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class BearerToken:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>`` (compared in constant time)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, credentials = given.strip().partition(b" ")
            bearer = scheme.lower() == b"bearer"  # RFC 7235: the scheme is case-insensitive
            if not (hmac.compare_digest(credentials.strip(), self.expected) and bearer):
                body = {"error": "unauthorized", "error_description": "Send 'Authorization: Bearer <token>'."}
                await _reply(send, 401, body, ((b"www-authenticate", b'Bearer realm="agent-trace-mcp"'),))
                return
        await self.app(scope, receive, send)


class BodyDeadline:
    """ASGI middleware: a body that stops arriving, or trickles past its whole deadline, is a gone client
    (each chunk has a deadline, and so has the whole body)."""

    def __init__(self, app: ASGIApp, seconds: float | None = None, total: float | None = None):
        self.app = app
        self.seconds = seconds or BODY_CHUNK_TIMEOUT_SECONDS
        self.total = total or BODY_TIMEOUT_SECONDS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = False
        deadline = anyio.current_time() + self.total

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            message: Message = {"type": "http.disconnect"}
            with anyio.move_on_after(min(self.seconds, max(0.0, deadline - anyio.current_time()))):
                message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, timed_receive, send)


@dataclass
class _Session:
    peer: str
    last_seen: float
    in_flight: int = 0
    ids: set[str] = field(default_factory=set)
    """The request ids in flight, as the SDK keys them (``str(id)``: 300 and "300" are one)."""


class SessionGuard:
    """Bounds the SDK's HTTP sessions: only an ``initialize`` opens one, each peer has a cap, and when a
    cap or the total is reached the oldest idle session goes first (a flood cannot lock clients out)."""

    def __init__(self, manager: Any, *, per_peer: int = SESSIONS_PER_PEER, total: int = MAX_SESSIONS):
        self._manager = manager
        self._handle: Callable[[Scope, Receive, Send], Awaitable[None]] = manager.asgi_app
        self._per_peer = per_peer
        self._total = total
        self._sessions: dict[str, _Session] = {}
        manager.asgi_app = (
            self.handle_request
        )  # what the route's ASGI app calls (the SDK's body limit inside)

    def open_sessions(self) -> int:
        self._forget_closed()
        return len(self._sessions)

    async def handle_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        session_id = headers.get(b"mcp-session-id", b"").decode("latin-1") or None
        peer = (scope.get("client") or ("?", 0))[0]
        if session_id is not None:
            await self._serve_existing(session_id, scope, receive, send)
            return
        version = headers.get(b"mcp-protocol-version", b"").decode("latin-1")
        modern = bool(version) and version not in HANDSHAKE_PROTOCOL_VERSIONS  # the SDK names what it speaks
        if scope.get("method") != "POST" or modern:
            await self._handle(scope, receive, send)  # sessionless (2026-07-28) or refused by the SDK itself
            return
        body, receive = await _buffered(receive)
        if not _is_initialize(body):
            await _reply(
                send,
                400,
                _jsonrpc_error(
                    body,
                    "Only an initialize request may open a session; send "
                    "the Mcp-Session-Id header the initialize answer gave.",
                ),
            )
            return
        await self._make_room(peer)
        created: list[str] = []
        answer = bytearray()  # the start of the initialize answer: a refusal must not leave a session

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message.get("status", 500) < 400:
                for name, value in message.get("headers", []):
                    if name.lower() == b"mcp-session-id":  # counted now: its GET stream may open at once
                        created.append(value.decode("latin-1"))
                        self._sessions[created[-1]] = _Session(peer, time.monotonic())
            elif message["type"] == "http.response.body" and len(answer) < ANSWER_PEEK_BYTES:
                answer.extend(message.get("body", b"")[:ANSWER_PEEK_BYTES])
            await send(message)

        await self._handle(scope, receive, watch)
        if created and _refused(bytes(answer)):
            for session_id in created:
                transport = self._manager._server_instances.get(session_id)
                self._sessions.pop(session_id, None)
                if transport is not None:
                    await self._manager._discard_session(session_id, transport)

    async def _serve_existing(self, session_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        record = self._sessions.get(session_id)
        key: str | None = None
        if record is not None and scope.get("method") == "POST":
            body, receive = await _buffered(receive)
            key = _request_key(body)
            if key is not None and (key in record.ids or key == SDK_GET_STREAM_KEY):
                # the SDK routes answers by str(id): a second request under one would take the first's
                text = f"The id {elide(key, 40)} is already in use by a request in flight on this session."
                await _reply(send, 400, _jsonrpc_error(body, text))
                return
            del body
        if record is not None:
            record.in_flight += 1
            if key is not None:
                record.ids.add(key)

        async def answering(message: Message) -> None:
            # free the id as its answer goes out: the client may reuse it the moment it reads the answer
            if (
                record is not None
                and key in record.ids
                and message["type"] == "http.response.body"
                and _answers(message.get("body", b""), key or "")
            ):
                record.ids.discard(key or "")
            await send(message)

        try:
            await self._handle(scope, receive, answering)
        finally:
            if record is not None:
                record.in_flight -= 1
                record.last_seen = time.monotonic()
                record.ids.discard(key or "")

    def _forget_closed(self) -> None:
        live = self._manager._server_instances  # the SDK's table of open sessions
        for session_id in [s for s in self._sessions if s not in live]:
            del self._sessions[session_id]

    async def _make_room(self, peer: str) -> None:
        """Evict the oldest idle session of this peer at its cap; at the total, the oldest idle one of
        anyone, else the oldest of the peer holding the most (every local host shares 127.0.0.1, so a
        peer's busy sessions are closed only when one address holds the whole table)."""
        self._forget_closed()
        mine = [s for s, r in self._sessions.items() if r.peer == peer]
        if len(mine) >= self._per_peer:
            await self._evict_oldest(mine)
        if len(self._manager._server_instances) >= self._total and not await self._evict_oldest(
            list(self._sessions)
        ):
            holders = Counter(r.peer for r in self._sessions.values())
            if holders:
                biggest = holders.most_common(1)[0][0]
                await self._evict_oldest(
                    [s for s, r in self._sessions.items() if r.peer == biggest], busy_too=True
                )

    async def _evict_oldest(self, candidates: list[str], *, busy_too: bool = False) -> bool:
        idle = [s for s in candidates if self._sessions[s].in_flight == 0] or (candidates if busy_too else [])
        if not idle:
            return False  # every one is busy
        oldest = min(idle, key=lambda s: self._sessions[s].last_seen)
        transport = self._manager._server_instances.get(oldest)
        del self._sessions[oldest]
        if transport is not None:
            await self._manager._discard_session(oldest, transport)
        return True


async def _buffered(receive: Receive) -> tuple[bytes, Receive]:
    """Read a (bounded) request body, and a receive that replays it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)  # kept even past the limit: the replay hands the app every byte read
        if size > MAX_BODY_BYTES:
            break
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    kept: bytes | None = body

    async def replay() -> Message:
        nonlocal kept
        if kept is not None:
            message: Message = {"type": "http.request", "body": kept, "more_body": False}
            kept = None  # not held for as long as the request lasts (a 45 s wait)
            return message
        return await receive()

    return body, replay


class HostOriginFirst:
    """Host and Origin are checked before anything reads the request: the SDK checks them only once a
    request reaches its transport, after the session and frame checks here have answered it."""

    def __init__(self, app: ASGIApp, security: TransportSecuritySettings):
        self.app = app
        self.check = TransportSecurityMiddleware(security)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = await self.check.validate_request(Request(scope))
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


class FrameCheck:
    """A malformed JSON-RPC frame gets the answer stdio gives it (its own id, one sentence: ``parse_frame``),
    not the SDK's validator dump under ``id: null``."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or b"json" not in headers.get(b"content-type", b"")
        ):
            await self.app(scope, receive, send)
            return
        body, receive = await _buffered(receive)
        reply = parse_frame(body)[1] if len(body) <= MAX_BODY_BYTES else None  # too large: the SDK says 413
        del body  # the replay holds it only until the app reads it
        if reply is None:
            await self.app(scope, receive, send)
            return
        lines = reply.strip().split(b"\n")
        reply = lines[0] if len(lines) == 1 else b"[" + b",".join(lines) + b"]"  # a batch: one error each
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(reply)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": reply})


def _frame(payload: bytes | str) -> dict[str, Any] | None:
    """One JSON-RPC frame as an object, or None (garbage, a batch, a bare value): every peek here at a
    request or an answer reads it this way."""
    try:
        message = json.loads(payload)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _request_key(body: bytes) -> str | None:
    """A request's id as the SDK keys its answer stream; None for a notification, a response or garbage."""
    message = _frame(body)
    if message is None or "method" not in message or message.get("id") is None:
        return None
    return str(message["id"])


def _answers(chunk: bytes, key: str) -> bool:
    """Whether a response chunk (JSON, or SSE ``data:`` events) carries the answer to request ``key``."""
    return any(
        str(message.get("id")) == key and ("result" in message or "error" in message)
        for message in _messages(chunk)
    )


def _messages(chunk: bytes) -> list[dict[str, Any]]:
    text = chunk.decode("utf-8", "replace")
    payloads = [line[5:] for line in text.splitlines() if line.startswith("data:")] or [text]
    return [message for payload in payloads if (message := _frame(payload)) is not None]


def _refused(answer: bytes) -> bool:
    """Whether an initialize answer (JSON, or one SSE ``data:`` event) is a JSON-RPC error."""
    return any("error" in message and "result" not in message for message in _messages(answer))


def _is_initialize(body: bytes) -> bool:
    message = _frame(body)
    return message is not None and message.get("method") == "initialize"


def _jsonrpc_error(body: bytes, text: str) -> dict[str, Any]:
    message = _frame(body) or {}
    request_id = message.get("id") if isinstance(message.get("id"), (str, int)) else None
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32600, "message": text}}


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers: a half-sent request is dropped."""

    _header_timer: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the headers are in: the app runs (its body has deadlines of its own)
        elif self._header_timer is None:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_SECONDS, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def http_app(
    mcp: MCPServer,
    settings: Settings,
    *,
    sessions_per_peer: int = SESSIONS_PER_PEER,
    max_sessions: int = MAX_SESSIONS,
) -> ASGIApp:
    """The ASGI app serving ``/mcp`` (stateful, so 2025-11-25 clients get pushed notifications)."""
    security = transport_security(settings)
    app: ASGIApp = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        host=settings.host,
        transport_security=security,
        session_idle_timeout=SESSION_IDLE_SECONDS,
        max_sessions=max_sessions,
        max_request_body_size=MAX_BODY_BYTES,
    )
    SessionGuard(mcp.session_manager, per_peer=sessions_per_peer, total=max_sessions)
    app = BodyDeadline(HostOriginFirst(FrameCheck(app), security))
    if settings.auth_token:
        app = BearerToken(app, settings.auth_token)
    return app


async def check_store(settings: Settings) -> None:
    """Open the store once before serving: a refusal (an unreachable database) is then its one sentence,
    where uvicorn would report the app's failed start-up as a traceback."""
    store = await open_store(settings.db, lease_seconds=settings.lease_seconds, pool_size=1)
    await store.close()


async def serve_http(mcp: MCPServer, settings: Settings) -> None:
    import uvicorn

    check_bind(settings)
    await check_store(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("serving MCP over streamable HTTP at http://%s:%d/mcp", host, settings.port)
    config = uvicorn.Config(
        http_app(mcp, settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        lifespan="on",
        http=BoundedH11Protocol,
    )
    await uvicorn.Server(config).serve()
