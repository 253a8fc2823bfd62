"""The change feed: what other processes store on the same database reaches this process's event bus.

Runs publish their own events the moment they commit; the feed tails the store's change log (on SQLite a
``PRAGMA data_version`` check, on PostgreSQL a LISTEN wake-up) and publishes the rest, so waits,
``list_running``, notifications and progress see traces run anywhere. It also delivers stop requests to
the local run they name. Idle, it costs one cheap query per poll interval on SQLite and a parked LISTEN on
PostgreSQL; it never polls per trace.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import anyio

from agent import defaults
from agent.trace.events import EventBus, ExperiencesChanged, MessageStored, TraceChanged, TraceDeleted
from agent.trace.store import Change, TraceStore

log = logging.getLogger(__name__)


class Recent:
    """A bounded set of recently seen keys (insertion order; the oldest fall out)."""

    def __init__(self, size: int = 50_000):
        self._size = size
        self._keys: OrderedDict[object, None] = OrderedDict()

    def add(self, key: object) -> None:
        self._keys[key] = None
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._keys


class ChangeFeed:
    """Publishes other processes' changes; ``own_tokens``/``own_messages`` hold what this process published."""

    def __init__(
        self,
        store: TraceStore,
        events: EventBus,
        *,
        on_stop: Callable[[str], None],
        poll_seconds: float = defaults.FEED_POLL_SECONDS,
    ):
        self._store = store
        self._events = events
        self._on_stop = on_stop
        self._poll = poll_seconds
        self.own_tokens = Recent()
        self.own_messages = Recent()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Tail the change log until cancelled; a failed read is logged and retried, never raised."""
        cursor = await self._store.last_change_id()
        task_status.started()
        while True:
            try:
                await self._store.wait_for_changes(max(self._poll * 10, 1.0))
                while True:
                    changes = await self._store.changes_after(cursor)
                    for change in changes:
                        cursor = change.id
                        self._dispatch(change)
                    if len(changes) < 500:
                        break
            except Exception:
                log.exception("reading the change feed failed; retrying")
                await anyio.sleep(1.0)

    def _dispatch(self, change: Change) -> None:
        if change.kind == "stop":
            self._on_stop(change.trace_id)
            return
        if change.kind == "deleted":
            self._events.publish(TraceDeleted(change.trace_id))
            return
        if change.kind == "experiences":
            self._events.publish(ExperiencesChanged(change.trace_id))  # written by database experiences only
            return
        if change.kind == "message":
            if change.message is None or (change.trace_id, change.sequence) in self.own_messages:
                return
            self._events.publish(MessageStored(change.trace_id, change.message))
            return
        if change.trace is None or (change.token is not None and change.token in self.own_tokens):
            return
        self._events.publish(TraceChanged(change.trace, created=change.kind == "created"))
