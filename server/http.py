"""Serving over streamable HTTP: Host/Origin protection, the optional bearer token, the bind-address rule."""

from __future__ import annotations

import hmac
import json

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from server.settings import LOOPBACK_HOSTS, Settings

LOOPBACK_ALLOWED_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
LOOPBACK_ALLOWED_ORIGINS = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]


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


def transport_security(settings: Settings) -> TransportSecuritySettings | None:
    """None lets the SDK protect a loopback bind itself; named hosts get an explicit allow-list."""
    if not settings.allowed_hosts:
        return None
    hosts, origins = list(LOOPBACK_ALLOWED_HOSTS), list(LOOPBACK_ALLOWED_ORIGINS)
    for host in settings.allowed_hosts:
        hosts += [host, f"{host}:*"]
        origins += [f"http://{host}", f"https://{host}", f"http://{host}:*", f"https://{host}:*"]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


class BearerToken:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>`` (compared in constant time)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = json.dumps(
                    {"error": "unauthorized", "error_description": "Send 'Authorization: Bearer <token>'."}
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer realm="agent-trace-mcp"'),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def http_app(mcp: MCPServer, settings: Settings) -> ASGIApp:
    """The ASGI app serving ``/mcp`` (stateful, so 2025-11-25 clients get pushed notifications)."""
    app: ASGIApp = mcp.streamable_http_app(
        streamable_http_path="/mcp", host=settings.host, transport_security=transport_security(settings)
    )
    if settings.auth_token:
        app = BearerToken(app, settings.auth_token)
    return app


async def serve_http(mcp: MCPServer, settings: Settings) -> None:
    import uvicorn

    check_bind(settings)
    config = uvicorn.Config(
        http_app(mcp, settings), host=settings.host, port=settings.port, log_level="warning", lifespan="on"
    )
    await uvicorn.Server(config).serve()
