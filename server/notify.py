"""Engine events -> MCP change notifications, in both protocol eras.

2025-11-25 clients subscribe with ``resources/subscribe`` (the SDK has no handler for it, so a middleware
answers it and remembers the connection); 2026-07-28 clients listen with ``subscriptions/listen`` and we
publish on the SDK's subscription bus. Both are driven by the engine's event stream, never by polling.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.subscriptions import ResourcesListChanged, ResourceUpdated, SubscriptionBus
from mcp.types import INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from agent.engine import Engine
from agent.trace.events import ExperiencesChanged, MessageStored, TraceChanged, TraceDeleted
from server.connections import Connections, Outbox
from server.views import elide

log = logging.getLogger(__name__)


EXPERIENCES_URI = "experiences://memory"
MAX_URI_CHARS = 500
SUBSCRIBED_URIS = 200
"""Resource URIs one handshake-era connection may subscribe to, or one listen stream follow: what a
client names is kept as long as its stream lives (≤ 100 KB each; ours are under 80 characters)."""
LISTENS_PER_PEER = 256
"""subscriptions/listen streams one HTTP client address may hold, of the SDK's 1,024 for everyone (every
local host shares 127.0.0.1, and a load balancer's clients its address: a quarter, not a sixteenth)."""


def checked_uris(method: str, uris: Any) -> list[str]:
    """The URIs a subscription names, bounded in number and length; MCPError -32602 otherwise (any URI
    may be followed, as the protocol allows, but not a 3 MB one)."""
    if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
        raise MCPError(code=INVALID_PARAMS, message=f"{method} takes resource URIs as a list of strings.")
    if len(uris) > SUBSCRIBED_URIS:
        raise MCPError(
            code=INVALID_PARAMS, message=f"{method} may follow at most {SUBSCRIBED_URIS:,} resources."
        )
    for uri in uris:
        if len(uri) > MAX_URI_CHARS:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"{method} takes URIs of at most {MAX_URI_CHARS} characters (this server's are "
                f"trace://<trace_id>, its /tree and experiences://memory); got {elide(uri)}.",
            )
    return uris


def trace_uris(trace_id: str) -> tuple[str, str]:
    return f"trace://{trace_id}", f"trace://{trace_id}/tree"


@dataclass(eq=False)
class _LegacyClient:
    """A handshake-era connection: where its notifications queue, and the URIs it subscribed to."""

    outbox: Outbox
    uris: set[str] = field(default_factory=set)


class Notifier:
    def __init__(self, bus: SubscriptionBus):
        self._bus = bus
        self._clients = Connections(_LegacyClient)
        self._listens: dict[str, int] = {}

    # -- connections (called from the middleware) ----------------------------------------------

    def _client(self, session: ServerSession) -> _LegacyClient:
        """The record for this request's connection, dropped again when the connection closes."""
        return self._clients.get(session)[0]

    def subscribe(self, session: ServerSession, uri: str) -> None:
        uris = self._client(session).uris
        if uri not in uris and len(uris) >= SUBSCRIBED_URIS:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"This connection follows {SUBSCRIBED_URIS:,} resources already, the most it may; "
                "unsubscribe from some first.",
            )
        uris.add(uri)

    @contextlib.contextmanager
    def listening(self, peer: str | None) -> Iterator[None]:
        """Count one listen stream of an HTTP client address while it is open; refuse one past its cap."""
        if peer is None:  # stdio: one host, one connection
            yield
            return
        if self._listens.get(peer, 0) >= LISTENS_PER_PEER:
            raise MCPError(
                code=INVALID_REQUEST,
                message=f"This client holds {LISTENS_PER_PEER} subscriptions/listen streams already, the most "
                "one may; close one before you open another.",
            )
        self._listens[peer] = self._listens.get(peer, 0) + 1
        try:
            yield
        finally:
            self._listens[peer] -= 1
            if not self._listens[peer]:
                del self._listens[peer]

    def unsubscribe(self, session: ServerSession, uri: str) -> None:
        self._client(session).uris.discard(uri)

    def seen(self, session: ServerSession) -> None:
        """Remember a handshake-era connection so it hears of new traces (list_changed)."""
        if session.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self._client(session)

    def connection_count(self) -> int:
        return len(self._clients)

    # -- events -> notifications ---------------------------------------------------------------

    async def pump(self, engine: Engine, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Forward engine events until cancelled (runs in the server's lifespan task group)."""
        async with anyio.create_task_group() as senders, engine.subscribe() as stream:
            self._clients.serve(senders)
            task_status.started()
            async for event in stream:
                try:
                    if (isinstance(event, TraceChanged) and event.created) or isinstance(event, TraceDeleted):
                        await self.resources_list_changed()
                    if isinstance(event, (MessageStored, TraceChanged, TraceDeleted)):
                        await self.resource_updated(*trace_uris(event.trace_id))
                    elif isinstance(event, ExperiencesChanged):
                        await self.resource_updated(EXPERIENCES_URI)
                except Exception:
                    log.exception("could not send a change notification for trace %s", event.trace_id)
            senders.cancel_scope.cancel()

    async def resource_updated(self, *uris: str) -> None:
        for uri in uris:
            await self._bus.publish(ResourceUpdated(uri=uri))
        for client in self._clients.records():
            for uri in uris:
                if uri in client.uris:
                    client.outbox.post(partial(_send_updated, uri))

    async def resources_list_changed(self) -> None:
        await self._bus.publish(ResourcesListChanged())
        for client in self._clients.records():
            client.outbox.post(_send_list_changed)


async def _send_updated(uri: str, session: ServerSession) -> None:
    await session.send_resource_updated(uri)


async def _send_list_changed(session: ServerSession) -> None:
    await session.send_resource_list_changed()


def _wire(result: HandlerResult) -> dict[str, Any]:
    if result is None:
        return {}
    if isinstance(result, dict):
        return result
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


async def subscriptions_middleware(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Answer legacy ``resources/subscribe``/``unsubscribe``; advertise them in ``initialize`` and what
    changes (resources) and what does not (tools, prompts) in both eras' capabilities."""
    notifier: Notifier | None = getattr(ctx.lifespan_context, "notifier", None)
    if notifier is None:  # before the lifespan has produced the engine
        return await call_next(ctx)
    if ctx.method in ("resources/subscribe", "resources/unsubscribe"):
        if ctx.session.protocol_version in MODERN_PROTOCOL_VERSIONS:
            raise MCPError(
                code=METHOD_NOT_FOUND,
                message=f"{ctx.method} is not part of protocol {ctx.session.protocol_version}; "
                "open a subscriptions/listen stream instead.",
            )
        uri = (ctx.params or {}).get("uri")
        if not uri:
            raise MCPError(code=INVALID_PARAMS, message=f"{ctx.method} needs a 'uri'.")
        if ctx.method == "resources/subscribe":
            notifier.subscribe(ctx.session, checked_uris(ctx.method, [uri])[0])
        else:
            notifier.unsubscribe(ctx.session, str(uri))
        return {}
    if ctx.method == "subscriptions/listen":
        wanted = (ctx.params or {}).get("notifications")
        if isinstance(wanted, dict) and wanted.get("resourceSubscriptions") is not None:
            checked_uris(ctx.method, wanted["resourceSubscriptions"])
        with notifier.listening(_peer(ctx)):
            return await call_next(ctx)
    result = await call_next(ctx)
    notifier.seen(ctx.session)
    if ctx.method in ("initialize", "server/discover"):
        wire = _wire(result)
        capabilities = wire.setdefault("capabilities", {})
        resources = capabilities.get("resources") or {}
        resources.update(subscribe=True, listChanged=True)
        capabilities["resources"] = resources
        for fixed in ("tools", "prompts"):  # they never change: both eras say so alike
            if isinstance(capabilities.get(fixed), dict):
                capabilities[fixed]["listChanged"] = False
        return wire
    return result


def _peer(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The HTTP client address a request came from; None over stdio (and the shared server's socket)."""
    client = getattr(getattr(ctx, "request", None), "client", None)
    host = getattr(client, "host", None)
    return host if isinstance(host, str) else None
