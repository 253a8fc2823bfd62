"""What a relay remembers of its host's MCP session, so that a new shared server can take it over.

The shared server may go away under a connected host: a relay of a newer version drained it, or it
crashed. Hosts do not reconnect a stdio server on their own (Claude Desktop shows it failed), so the relay
does: it connects to the next server and replays what the session had set up — the handshake (``initialize``
and ``notifications/initialized``), resource subscriptions, the log level and open ``subscriptions/listen``
streams — swallowing the answers to what it replays. A server that closes with its note has answered all
it read and read nothing after, so what it left unanswered goes to the next server as it was; after a crash
those requests get an error the host's model can act on (check, then call again) — never sent twice, so no
trace is created twice.

The server says why it closes a relay's session in a last ``CLOSING`` notification (swallowed here): a
stop (``stop-server``, SIGTERM) means the relay exits with it; an upgrade drain, or no notice at all (a
crash), means it reconnects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

CLOSING = "notifications/agent-trace-mcp/closing"
"""The shared server's last word on a relay's session: ``{"reconnect": bool, "reason": str}``."""
REPLAYED_ID_PREFIX = "agent-trace-relay:"
ORPHAN_CODE = -32603
ORPHAN_MESSAGE = (
    "The shared server went away before answering this request, which may or may not have taken effect "
    "(list_traces shows the traces that exist): check before calling it again."
)
_RESPONSE_HEAD = re.compile(rb'^\{"jsonrpc":"2\.0","id":("(?:[^"\\]|\\.)*"|-?\d+),"(?:result|error)"')
"""A response as the SDK writes it (keys in this order, no spaces): its id, read without parsing it whole."""
_PARSE_LIMIT = 64 * 1024
"""Frames from the server larger than this are answers or notifications, never a closing note: left unparsed."""


def _key(request_id: Any) -> str:
    return json.dumps(request_id)


@dataclass
class HostSession:
    """The host's session as the relay has seen it go by, one JSON-RPC line at a time."""

    initialize: dict[str, Any] | None = None
    initialized: bool = False
    subscriptions: dict[str, None] = field(default_factory=dict)  # URIs in order (a dict is an ordered set)
    log_level: dict[str, Any] | None = None
    listens: dict[str, dict[str, Any]] = field(default_factory=dict)  # id key -> the listen request
    pending: dict[str, tuple[Any, bytes]] = field(default_factory=dict)  # id key -> (raw id, its frame)
    reconnect: bool = True  # until the server says it is stopping on purpose
    noted: bool = False  # the server closed with its note: it answered all it read, read nothing after
    _replayed: int = 0

    def from_host(self, line: bytes) -> None:
        """Note what a host frame sets up or asks (anything unreadable is the server's to answer)."""
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return
        if not isinstance(message, dict) or not isinstance(message.get("method"), str):
            return
        method, params = message["method"], message.get("params")
        if "id" in message and message["id"] is not None:
            key = _key(message["id"])
            if method == "subscriptions/listen":
                self.listens[key] = message
            else:
                self.pending[key] = (message["id"], line)
        if method == "initialize":
            self.initialize = message
        elif method == "notifications/initialized":
            self.initialized = True
        elif method == "notifications/cancelled" and isinstance(params, dict):
            self.pending.pop(_key(params.get("requestId")), None)
            self.listens.pop(_key(params.get("requestId")), None)
        elif method in ("resources/subscribe", "resources/unsubscribe") and isinstance(params, dict):
            uri = params.get("uri")
            if isinstance(uri, str):
                if method == "resources/subscribe":
                    self.subscriptions[uri] = None
                else:
                    self.subscriptions.pop(uri, None)
        elif method == "logging/setLevel":
            self.log_level = message

    def from_server(self, line: bytes) -> bool:
        """Note a server frame; False when it is for the relay alone (an answer to a replayed request, or
        the closing note), not to be passed on."""
        head = _RESPONSE_HEAD.match(line)
        if head is not None:
            request_id = json.loads(head.group(1))
            if isinstance(request_id, str) and request_id.startswith(REPLAYED_ID_PREFIX):
                return False
            self.pending.pop(_key(request_id), None)
            self.listens.pop(_key(request_id), None)  # a listen stream that ended with an answer
            return True
        if len(line) > _PARSE_LIMIT or CLOSING.encode() not in line:
            return True
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return True
        if isinstance(message, dict) and message.get("method") == CLOSING:
            params = message.get("params") or {}
            self.reconnect = bool(params.get("reconnect")) if isinstance(params, dict) else False
            self.noted = True
            return False
        return True

    def replay(self) -> list[bytes]:
        """The lines that set this session up again on a new server (their answers are swallowed); the
        listen streams go again under their own ids, so their notifications reach the host as before."""
        lines: list[bytes] = []
        if self.initialize is not None:
            lines.append(self._replayed_request(self.initialize))
            if self.initialized:
                lines.append(_line({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        if self.log_level is not None:
            lines.append(self._replayed_request(self.log_level))
        for uri in self.subscriptions:
            request = {"jsonrpc": "2.0", "method": "resources/subscribe", "params": {"uri": uri}}
            lines.append(self._replayed_request(request))
        lines += [_line(listen) for listen in self.listens.values()]
        return lines

    def unread(self) -> list[bytes]:
        """After a server that closed with its note: the requests it never read, to send to the next one
        as they were (it answered all it read, so none of these took effect)."""
        self.noted = False
        return [frame for _, frame in self.pending.values()]

    def orphans(self) -> list[bytes]:
        """After a server that vanished (a crash): error answers for the requests it left unanswered, which
        it may or may not have carried out (then forgotten)."""
        errors = [
            _line({"jsonrpc": "2.0", "id": raw, "error": {"code": ORPHAN_CODE, "message": ORPHAN_MESSAGE}})
            for raw, _ in self.pending.values()
        ]
        self.pending.clear()
        return errors

    def _replayed_request(self, message: dict[str, Any]) -> bytes:
        self._replayed += 1
        return _line({**message, "id": f"{REPLAYED_ID_PREFIX}{self._replayed}"})


def closing_note(*, reconnect: bool, reason: str) -> bytes:
    """The server's last line on a relay's session."""
    return _line({"jsonrpc": "2.0", "method": CLOSING, "params": {"reconnect": reconnect, "reason": reason}})


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Lines:
    """Bytes in, whole lines out (a frame may arrive in pieces, or several in one read; pieces are joined
    once, so a 4 MiB frame in 64 KiB reads costs its length, not its square)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def feed(self, data: bytes) -> list[bytes]:
        pieces = data.split(b"\n")
        if len(pieces) == 1:
            self._parts.append(data)
            return []
        first = b"".join([*self._parts, pieces[0]])
        self._parts = [pieces[-1]] if pieces[-1] else []
        return [first + b"\n", *(piece + b"\n" for piece in pieces[1:-1])]
