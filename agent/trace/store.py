"""The TraceStore protocol: the named transitions a trace may go through, and the reads of its tree.

The database, not a process's memory, decides who runs a trace: ``claim`` is a compare-and-set that
succeeds only when no live owner holds the trace, and every main-path write names the claim's token, so a
process that lost its claim (its lease lapsed) can no longer write. Backends: ``agent.trace.sqlite`` (the
default) and, with the ``postgres`` extra, ``agent.trace.postgres``; one contract test suite runs on both.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from agent.errors import TraceError
from agent.pids import pid_alive
from agent.trace.models import Message, NewMessage, RunHandle, Status, StopReason, Trace, TraceConfig

ChangeKind = Literal["created", "message", "trace", "stop", "deleted", "experiences"]


class TracePage(BaseModel):
    traces: list[Trace]
    next_cursor: str | None = None

    def cursor_after(self, count: int) -> str:
        """The cursor that goes on after the page's first ``count`` traces (a caller shows fewer)."""
        return encode_cursor(self.traces[count - 1])


@dataclass(frozen=True)
class Change:
    """One row of the change log: what another process must hear of (events are wake-ups, rows the truth).

    ``token`` is the run token the trace held when the change was made, so the process that made it can
    skip its own changes; ``message`` / ``trace`` are the changed rows as of reading.
    """

    id: int
    trace_id: str
    kind: ChangeKind
    sequence: int | None = None
    token: str | None = None
    message: Message | None = None
    trace: Trace | None = None


class ClaimLost(TraceError):
    """A write named a claim the trace no longer holds: its lease lapsed and the trace moved on."""

    def __init__(self, trace_id: str):
        super().__init__(
            f"The run of trace '{trace_id}' lost its claim (its lease lapsed); it stopped writing."
        )
        self.trace_id = trace_id


class TraceStore(Protocol):
    """What the engine needs from storage."""

    owner: str
    """This process's identity, ``<host>#<pid namespace>:<pid>:<nonce>``: written on the traces it claims."""

    # -- transitions ------------------------------------------------------------------------------
    async def create(
        self, trace: Trace, messages: Sequence[NewMessage], token: str
    ) -> tuple[Trace, list[Message]]:
        """Store a new trace, claimed by ``token``, with its first messages, in one transaction."""
        ...

    async def claim(
        self,
        trace_id: str,
        token: str,
        *,
        head: int | None,
        model: str,
        config: TraceConfig,
        messages: Sequence[NewMessage] = (),
        read_head: int | None = None,
    ) -> tuple[Trace, list[Message]]:
        """Compare-and-set: mark the trace running under ``token`` at ``head`` and append ``messages``
        after it, in one transaction; raises TraceRunning when a live owner holds it (``token`` itself may
        re-claim), TraceMoved when ``read_head`` (the head the request was prepared from) is no longer the
        trace's head, TraceNotFound when it does not exist."""
        ...

    async def append(
        self, trace_id: str, message: NewMessage, parent: int | None, *, token: str | None, side: bool = False
    ) -> Message:
        """Store one message as a child of ``parent``; a main-path message moves the head and needs the
        claim's ``token`` (ClaimLost otherwise); a side-branch message moves nothing and needs none."""
        ...

    async def finish(
        self,
        trace_id: str,
        token: str,
        *,
        status: Status,
        stop_reason: StopReason | None,
        error: str | None,
        release: bool = True,
        question: str | None = None,
        result: Any = None,
    ) -> Trace:
        """Record how the run ended (with the question a paused run asks, or its typed result);
        ``release=False`` keeps the claim (a reflection follows)."""
        ...

    async def release(self, trace_id: str, token: str) -> Trace | None:
        """Give the claim up without touching the status; None when ``token`` no longer held it."""
        ...

    async def renew(self) -> dict[str, str]:
        """Extend the lease of every claim this process holds; returns {trace_id: token} still held."""
        ...

    async def request_stop(self, trace_id: str) -> bool:
        """Ask the owner of a running trace to stop it (any process may); False when it is not running."""
        ...

    async def sweep(self) -> list[str]:
        """Claims whose owner is dead (lapsed lease, or a gone pid on this host) are released; their
        running traces become interrupted, or stopped when a stop was asked for. Returns those trace ids."""
        ...

    async def note_change(self, kind: ChangeKind, trace_id: str = "") -> None:
        """Log a change made outside the trace tables (e.g. the experiences file)."""
        ...

    async def delete(self, trace_id: str) -> bool:
        """Remove an unclaimed trace and its messages; False (nothing changed) when it is claimed."""
        ...

    async def prune(self, finished_before: str) -> int:
        """Delete finished, unclaimed traces last updated before ``finished_before`` (ISO time); returns how many."""
        ...

    # -- run handles ----------------------------------------------------------------------------------
    async def add_handle(self, handle_id: str, trace_id: str, *, held: bool = False) -> RunHandle:
        """Record a handle for the trace's current run (the one already recorded, if it exists); ``held``:
        for work this process does itself (a reflection), so others can tell when it died unfinished."""
        ...

    async def end_handle(self, handle_id: str, final: dict[str, Any]) -> None:
        """Store the view a superseded handle keeps from now on (once: a handle that ended stays ended)."""
        ...

    async def get_handle(self, handle_id: str) -> RunHandle | None: ...
    async def open_handle(self, trace_id: str) -> RunHandle | None:
        """The trace's newest run handle (not held) that has not ended, if any."""
        ...

    # -- reads ----------------------------------------------------------------------------------------
    async def get_trace(self, trace_id: str) -> Trace: ...
    async def get_message(self, trace_id: str, sequence: int) -> Message | None: ...
    async def get_children(self, trace_id: str, sequence: int) -> list[Message]: ...
    async def get_path(self, trace_id: str, head: int | None = None) -> list[Message]: ...
    async def get_tree(self, trace_id: str) -> list[Message]: ...
    async def get_tail(self, trace_id: str, count: int) -> list[Message]:
        """The last ``count`` messages of the active path, oldest first, at the cost of ``count``."""
        ...

    async def list_traces(
        self,
        *,
        status: str | None = None,
        uid: str | None = None,
        tag: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> TracePage: ...
    async def running_ids(self) -> list[str]: ...
    async def reflecting_ids(self) -> list[str]:
        """Traces whose run has ended but still holds its claim, in any process: a ``reflect=true`` run
        reflecting on its answer (its lessons are on the way)."""
        ...

    async def stops_requested(self) -> list[str]:
        """The traces this process holds a claim on whose stop another process asked for (a backstop for a
        stop request the change feed did not deliver)."""
        ...

    # -- the change feed ------------------------------------------------------------------------------
    async def last_change_id(self) -> int: ...
    async def changes_after(self, change_id: int, limit: int = 500) -> list[Change]: ...
    async def wait_for_changes(self, timeout: float) -> None:
        """Return when another connection may have committed something, or after ``timeout``."""
        ...

    async def close(self) -> None: ...


def new_token() -> str:
    """A run's claim token: unguessable, unique per claim."""
    return secrets.token_hex(12)


def _machine() -> str:
    """This host, and its pid namespace where there is one: processes with the same hostname but another
    pid namespace (containers sharing the host's network) cannot check each other's pids."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}#{namespace}"


def process_owner() -> str:
    return f"{_machine()}:{os.getpid()}:{secrets.token_hex(4)}"


OPEN_OWNERS: set[str] = set()
"""Owner ids of the stores open in this process (a closed store's claims are orphans)."""


def owner_alive(owner: str | None) -> bool:
    """Whether the process that wrote ``owner`` may still run: its pid exists, when it is on this host.

    Owners on other hosts count as alive: only their lease can tell (a pid check cannot see another machine).
    """
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != _machine() or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    if pid == os.getpid():
        return owner in OPEN_OWNERS
    return pid_alive(pid)


def encode_cursor(trace: Trace) -> str:
    raw = json.dumps([trace.created_at, trace.trace_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        created_at, trace_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return str(created_at), str(trace_id)
    except Exception as exc:
        raise TraceError(
            "The cursor is not one this server returned (list_traces or resources/list); start again without it."
        ) from exc
