"""Handshake-era connections we push notifications to: one record each, and a bounded outbox with its own
sender, so a client that stops reading never delays the others (nor the engine's event stream behind them).

``ServerSession`` is a per-request proxy; the connection behind it is the stable identity, and its exit stack
is the only teardown hook the SDK offers (no public accessor: ``_connection``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskGroup
from mcp.server.session import ServerSession

log = logging.getLogger(__name__)

OUTBOX_LENGTH = 256
"""Notifications a connection may fall behind by before it is dropped."""
SEND_SECONDS = 5.0
"""A single send that takes longer drops the connection: it has stopped reading."""

Send = Callable[[ServerSession], Awaitable[object]]


class Outbox:
    """What one connection has yet to be sent, delivered in order by :meth:`deliver`."""

    def __init__(self, session: ServerSession, on_drop: Callable[[], None]):
        self.session = session
        self._in, self._out = anyio.create_memory_object_stream[Send](OUTBOX_LENGTH)
        self._on_drop = on_drop
        self._delivering = False
        self.dropped = False

    def post(self, send: Send) -> None:
        """Queue a send without waiting; a connection this far behind is dropped."""
        if self.dropped:
            return
        try:
            self._in.send_nowait(send)
        except anyio.WouldBlock:
            log.debug("dropping a connection %d notifications behind", OUTBOX_LENGTH)
            self.drop()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.drop()

    def drop(self) -> None:
        if not self.dropped:
            self.dropped = True
            self._in.close()
            if not self._delivering:  # else deliver closes its end as it returns
                self._out.close()
            self._on_drop()

    async def deliver(self) -> None:
        """Send what is posted until the connection goes, fails, or stalls past SEND_SECONDS."""
        self._delivering = True
        try:
            async with self._out:
                async for send in self._out:
                    with anyio.move_on_after(SEND_SECONDS) as waited:
                        try:
                            await send(self.session)
                        except Exception:
                            log.debug("dropping a connection whose stream failed", exc_info=True)
                            break
                    if waited.cancelled_caught:
                        log.debug("dropping a connection that has not read for %g s", SEND_SECONDS)
                        break
        finally:
            self.drop()


R = TypeVar("R")


class Connections(Generic[R]):
    """Records by connection, made by ``make(outbox)`` on first sight and forgotten when it closes or is
    dropped. Senders run in the task group given to :meth:`serve`; before that, posts wait in the outbox."""

    def __init__(self, make: Callable[[Outbox], R]):
        self._make = make
        self._records: dict[int, tuple[R, Outbox]] = {}
        self._group: TaskGroup | None = None
        self._waiting: list[Outbox] = []

    def serve(self, group: TaskGroup) -> None:
        self._group = group
        for outbox in self._waiting:
            group.start_soon(outbox.deliver)
        self._waiting.clear()

    def get(self, session: ServerSession) -> tuple[R, bool]:
        """The record for this request's connection, and whether it is new."""
        connection: Any = getattr(session, "_connection", session)
        key = id(connection)
        known = self._records.get(key)
        if known is not None:
            return known[0], False

        def forget() -> None:
            if self._records.get(key, (None, None))[1] is outbox:
                del self._records[key]

        outbox = Outbox(session, forget)
        record = self._make(outbox)
        self._records[key] = (record, outbox)
        exit_stack = getattr(connection, "exit_stack", None)
        if exit_stack is not None:
            exit_stack.callback(outbox.drop)
        if self._group is not None:
            self._group.start_soon(outbox.deliver)
        else:
            self._waiting.append(outbox)
        return record, True

    def records(self) -> list[R]:
        return [record for record, _ in self._records.values()]

    def __len__(self) -> int:
        return len(self._records)
