"""The in-process event stream: runs publish after each commit, the change feed adds what other
processes stored, the server listens.

Events are wake-ups, the store is the truth: a subscriber that falls too far behind loses events
(logged) rather than slowing the runner down.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from agent.trace.models import Message, Trace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MessageStored:
    trace_id: str
    message: Message


@dataclass(frozen=True)
class TraceChanged:
    """A trace was created, or its status, head or error changed."""

    trace: Trace
    created: bool = False

    @property
    def trace_id(self) -> str:
        return self.trace.trace_id


@dataclass(frozen=True)
class TraceDeleted:
    trace_id: str


@dataclass(frozen=True)
class ExperiencesChanged:
    """The experiences file changed (a reflection was appended, or it was consolidated)."""

    trace_id: str = ""


TraceEvent = MessageStored | TraceChanged | TraceDeleted | ExperiencesChanged


class EventBus:
    def __init__(self, buffer: int = 10_000):
        self._buffer = buffer
        self._subscribers: set[MemoryObjectSendStream[TraceEvent]] = set()

    def publish(self, event: TraceEvent) -> None:
        """Deliver to every subscriber without waiting; never raises."""
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(event)
            except anyio.WouldBlock:
                log.warning(
                    "event subscriber is %d events behind; dropping an event for %s",
                    self._buffer,
                    event.trace_id,
                )
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._subscribers.discard(stream)

    @asynccontextmanager
    async def subscribe(self, buffer: int | None = None) -> AsyncIterator[AsyncIterator[TraceEvent]]:
        """``async with bus.subscribe() as events: async for event in events: ...``"""
        size = self._buffer if buffer is None else buffer
        send, receive = anyio.create_memory_object_stream[TraceEvent](math.inf if size <= 0 else size)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
            receive.close()
