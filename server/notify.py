"""Engine events -> MCP change notifications, in both protocol eras.

2025-11-25 clients subscribe with ``resources/subscribe`` (the SDK has no handler for it, so a middleware
answers it and remembers the connection); 2026-07-28 clients listen with ``subscriptions/listen`` and we
publish on the SDK's subscription bus. Both are driven by the engine's event stream, never by polling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.subscriptions import ResourcesListChanged, ResourceUpdated, SubscriptionBus
from mcp.types import INVALID_PARAMS, METHOD_NOT_FOUND
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from agent.engine import Engine
from agent.trace.events import ExperiencesChanged, MessageStored, TraceChanged, TraceDeleted
from server.connections import Connections, Outbox

log = logging.getLogger(__name__)


EXPERIENCES_URI = "experiences://memory"


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

    # -- connections (called from the middleware) ----------------------------------------------

    def _client(self, session: ServerSession) -> _LegacyClient:
        """The record for this request's connection, dropped again when the connection closes."""
        return self._clients.get(session)[0]

    def subscribe(self, session: ServerSession, uri: str) -> None:
        self._client(session).uris.add(uri)

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
        uri = str((ctx.params or {}).get("uri", ""))
        if not uri:
            raise MCPError(code=INVALID_PARAMS, message=f"{ctx.method} needs a 'uri'.")
        if ctx.method == "resources/subscribe":
            notifier.subscribe(ctx.session, uri)
        else:
            notifier.unsubscribe(ctx.session, uri)
        return {}
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
