"""What a relay remembers of its host's session, and replays on a new shared server (no processes here:
the relay's own tests in test_shared_server.py kill real servers under real hosts)."""

from __future__ import annotations

import json

import mcp.types as types

from server.relay_session import CLOSING, REPLAYED_ID_PREFIX, HostSession, Lines, closing_note


def frame(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\n"


def sdk_frame(message: types.JSONRPCResponse | types.JSONRPCError) -> bytes:
    """A server frame exactly as the transport writes it."""
    return message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n"


def test_the_handshake_subscriptions_level_and_listens_are_replayed_and_their_answers_kept_back():
    session = HostSession()
    initialize = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25"},
    }
    for message in (
        initialize,
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 1, "method": "resources/subscribe", "params": {"uri": "trace://a"}},
        {"jsonrpc": "2.0", "id": 2, "method": "resources/subscribe", "params": {"uri": "trace://b"}},
        {"jsonrpc": "2.0", "id": 3, "method": "resources/unsubscribe", "params": {"uri": "trace://a"}},
        {"jsonrpc": "2.0", "id": 4, "method": "logging/setLevel", "params": {"level": "info"}},
        {"jsonrpc": "2.0", "id": "l", "method": "subscriptions/listen", "params": {}},
    ):
        session.from_host(frame(message))
    for request_id in (0, 1, 2, 3, 4):
        assert session.from_server(sdk_frame(types.JSONRPCResponse(jsonrpc="2.0", id=request_id, result={})))
    replayed = [json.loads(line) for line in session.replay()]
    assert [m["method"] for m in replayed] == [
        "initialize",
        "notifications/initialized",
        "logging/setLevel",
        "resources/subscribe",
        "subscriptions/listen",
    ]
    assert replayed[0]["params"] == initialize["params"] and replayed[3]["params"] == {"uri": "trace://b"}
    assert replayed[4]["id"] == "l"  # a listen goes again under its own id: its notifications reach the host
    ids = [m["id"] for m in replayed if "id" in m and m["id"] != "l"]
    assert all(str(i).startswith(REPLAYED_ID_PREFIX) for i in ids)
    for request_id in ids:  # their answers are the relay's alone
        assert not session.from_server(
            sdk_frame(types.JSONRPCResponse(jsonrpc="2.0", id=request_id, result={}))
        )
    assert session.orphans() == []  # everything the host asked was answered


def test_requests_left_unanswered_get_an_error_and_cancelled_ones_none():
    session = HostSession()
    for request_id in (7, "x", 8):
        session.from_host(frame({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {}}))
    session.from_host(
        frame({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 8}})
    )
    error = types.JSONRPCError(jsonrpc="2.0", id="x", error=types.ErrorData(code=-1, message="no"))
    assert session.from_server(sdk_frame(error))  # an answer (an error is one too) goes to the host
    [orphan] = [json.loads(line) for line in session.orphans()]
    assert orphan["id"] == 7 and "went away before answering" in orphan["error"]["message"]
    assert session.orphans() == []


def test_the_servers_closing_note_is_kept_back_and_says_whether_to_go_on():
    session = HostSession()
    assert session.reconnect  # a server that vanishes without a word crashed: go on with the next
    assert not session.from_server(closing_note(reconnect=False, reason="stop-server --now"))
    assert not session.reconnect and session.noted


def test_after_a_closing_note_what_went_unanswered_was_never_read_and_goes_again_as_it_was():
    session = HostSession()
    sent = frame({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "list_traces"}})
    session.from_host(sent)
    assert not session.from_server(
        closing_note(reconnect=True, reason="drained for a relay of another version")
    )
    assert session.reconnect and session.unread() == [sent] and not session.noted
    assert session.from_server(sdk_frame(types.JSONRPCResponse(jsonrpc="2.0", id=9, result={})))
    assert session.orphans() == []  # answered by the next server
    other = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": CLOSING}}
    assert session.from_server(frame(other))  # a log line that merely names it is the host's


def test_lines_come_whole_however_the_bytes_arrive():
    lines = Lines()
    assert lines.feed(b'{"a"') == [] and lines.feed(b":1}\n{") == [b'{"a":1}\n']
    assert lines.feed(b"}\n\n") == [b"{}\n", b"\n"] and lines.feed(b"") == []
