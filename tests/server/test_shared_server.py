"""One shared server per data directory: hosts launch relays, runs outlive the host that started them.

Real processes throughout: relays launched as hosts launch them, the shared server they start, ``status``
and ``stop-server``, the Inspector CLI; only the model is faked (tests/fake_openai.py). Every test ends by
stopping each shared server its data directory ever had (``stop-server --now``, then by pid).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
from contextlib import suppress
from pathlib import Path

import anyio
import mcp.types as types
import pytest
from mcp import Client
from mcp.client.stdio import stdio_client

from agent.pids import pid_alive
from server.relay import CONTROL_KEY, ServerAddress, ask_once, try_lock
from server.shared import ANSWER_GRACE_SECONDS
from server.version import VERSION
from tests.fake_openai import completion
from tests.npm_tools import inspector
from tests.processes import (
    console_script,
    relay_params,
    run_cli,
    server_args,
    server_pids,
    stdio_params,
    stop_shared_servers,
)
from tests.server.helpers import call, wait_done

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:resources/.*subscribe is removed"),
]


@pytest.fixture(autouse=True)
def no_server_left(tmp_path):
    yield
    stop_shared_servers(tmp_path)
    alive = [pid for pid in server_pids(tmp_path / "data") if pid_alive(pid)]
    assert not alive, f"shared server(s) {alive} outlived the test"


def model_host(tmp_path, workspace, fake, *extra: str, **env: str):
    """A host's relay whose server runs traces on the fake OpenAI server."""
    return relay_params(tmp_path, workspace, "--model", "openai:gpt-test", *extra, **fake.env, **env)


def status(tmp_path) -> dict:
    """The shared server's status control request, asked over its socket as ``status`` asks it."""
    reply = ask_once(ServerAddress.of(tmp_path / "data"), {CONTROL_KEY: "status"})
    assert reply is not None, "no shared server answers"
    return reply


def updated_uris(updates: list[str]):
    async def handler(message):
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))

    return handler


async def wait_until(predicate, seconds: float = 30) -> None:
    with anyio.fail_after(seconds):
        while not predicate():
            await anyio.sleep(0.05)


async def wait_gone(pid: int, seconds: float = 30) -> None:
    await wait_until(lambda: not pid_alive(pid), seconds)


async def no_server_starts(tmp_path, seconds: float = 5) -> None:
    """Nothing answers on the data directory's socket for ``seconds`` (a server takes ~1.5 s to start)."""
    for _ in range(int(seconds / 0.1)):
        assert ask_once(ServerAddress.of(tmp_path / "data"), {CONTROL_KEY: "status"}) is None
        await anyio.sleep(0.1)


# -- runs outlive hosts -------------------------------------------------------------------------------


async def test_a_run_outlives_its_host_and_a_later_host_sees_it_complete(tmp_path, workspace, fake_openai):
    fake_openai.script = [("hang", None)]  # the model answers once the test releases it
    async with Client(model_host(tmp_path, workspace, fake_openai), mode="auto") as host_a:
        tid = (await call(host_a, "create_trace", prompt="Look around"))["trace_id"]
        await wait_until(lambda: len(fake_openai.requests) == 1)
    running = status(tmp_path)
    assert [run["trace_id"] for run in running["running"]] == [tid]  # host A is gone, its run is not
    assert running["sessions"] == 0

    updates: list[str] = []
    progress: list[str] = []

    async def on_progress(value, total, message):
        progress.append(message)

    params = model_host(tmp_path, workspace, fake_openai)
    async with Client(params, mode="legacy", message_handler=updated_uris(updates)) as host_b:
        await host_b.session.subscribe_resource(f"trace://{tid}")
        async with anyio.create_task_group() as tg:
            waited: dict = {}

            async def wait_on_b() -> None:
                # after_sequence: messages stored before the wait began are reported too (no race)
                result = await host_b.call_tool(
                    "get_trace",
                    {"trace_id": tid, "wait_seconds": 30, "after_sequence": 1},
                    progress_callback=on_progress,
                )
                waited.update(result.structured_content)

            tg.start_soon(wait_on_b)
            await wait_until(lambda: bool(progress))  # the wait has begun: it reported the task, message 2
            assert status(tmp_path)["sessions"] == 1
            fake_openai.release.set()
        await wait_until(lambda: f"trace://{tid}" in updates)
    assert waited["trace"]["status"] == "completed"
    assert waited["answer"] == "too late"
    assert any(p.startswith("assistant answered") for p in progress)
    assert len(server_pids(tmp_path / "data")) == 1  # both hosts were served by one server


async def test_two_hosts_started_at_once_share_one_server(tmp_path, workspace):
    params = relay_params(tmp_path, workspace)
    both_in, leave = anyio.Event(), anyio.Event()
    connected: list[int] = []

    async def host() -> None:
        async with Client(params, mode="legacy") as client:
            connected.append(len((await client.list_tools()).tools))
            if len(connected) == 2:
                both_in.set()
            await leave.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(host)
        tg.start_soon(host)
        with anyio.fail_after(60):
            await both_in.wait()
        shared = status(tmp_path)
        leave.set()
    assert shared["sessions"] == 2
    assert server_pids(tmp_path / "data") == {shared["pid"]}


async def test_a_killed_server_is_replaced_and_its_runs_read_interrupted_and_resume(
    tmp_path, workspace, fake_openai
):
    fake_openai.script = [("hang", None), ("json", completion("Back on track."))]
    with suppress(Exception):  # host A's session dies with the server under it
        async with Client(model_host(tmp_path, workspace, fake_openai), mode="legacy") as host_a:
            tid = (await call(host_a, "create_trace", prompt="Look around"))["trace_id"]
            await wait_until(lambda: len(fake_openai.requests) == 1)
            first = status(tmp_path)["pid"]
            os.kill(first, signal.SIGKILL)
            await wait_gone(first)
    async with Client(model_host(tmp_path, workspace, fake_openai), mode="legacy") as host_b:
        second = status(tmp_path)["pid"]
        assert second != first
        with anyio.fail_after(30):
            while (await call(host_b, "get_trace", trace_id=tid))["trace"]["status"] == "running":
                await anyio.sleep(0.1)
        view = await call(host_b, "get_trace", trace_id=tid)
        assert view["trace"]["status"] == "interrupted"
        fake_openai.release.set()  # the dead server's call is still parked on the fake: let it go
        await call(host_b, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "go on"}])
        view = await wait_done(host_b, tid)
    assert view["trace"]["status"] == "completed"
    assert view["answer"] == "Back on track."


async def test_a_host_goes_on_when_its_server_crashes_and_keeps_its_subscriptions(
    tmp_path, workspace, fake_openai
):
    """The relay takes the session to a new server and replays it there: the handshake and the
    subscription go again; the request the dead server never answered gets an error saying so."""
    fake_openai.script = [("json", completion("First.")), ("hang", None), ("json", completion("Again."))]
    updates: list[str] = []
    params = model_host(tmp_path, workspace, fake_openai)
    async with Client(params, mode="legacy", message_handler=updated_uris(updates)) as host:
        tid = (await call(host, "create_trace", prompt="Look around"))["trace_id"]
        assert (await wait_done(host, tid))["answer"] == "First."
        await host.session.subscribe_resource(f"trace://{tid}")
        first = status(tmp_path)["pid"]
        await call(host, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "more"}])
        await wait_until(lambda: len(fake_openai.requests) == 2)
        outcome: list[str] = []

        async def wait_on_it() -> None:
            try:
                await host.call_tool("get_trace", {"trace_id": tid, "wait_seconds": 30})
                outcome.append("answered")
            except Exception as exc:  # the JSON-RPC error the relay sends in the dead server's place
                outcome.append(str(exc))

        async with anyio.create_task_group() as group:
            group.start_soon(wait_on_it)
            await anyio.sleep(0.5)
            os.kill(first, signal.SIGKILL)
        assert "went away before answering" in outcome[0] and "check before calling it again" in outcome[0]
        second = status(tmp_path)["pid"]
        assert second != first
        fake_openai.release.set()  # the dead server's call is still parked on the fake: let it go
        with anyio.fail_after(30):
            while (await call(host, "get_trace", trace_id=tid))["trace"]["status"] == "running":
                await anyio.sleep(0.1)
        assert (await call(host, "get_trace", trace_id=tid))["trace"]["status"] == "interrupted"
        updates.clear()
        await call(host, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "go on"}])
        assert (await wait_done(host, tid))["answer"] == "Again."
        await wait_until(lambda: f"trace://{tid}" in updates)  # the subscription was replayed


async def test_a_server_that_dies_with_a_request_unread_is_replaced_too(tmp_path, workspace):
    """Killed with the host's request still in its socket, the server's end reads as a reset, not an end
    of file: the relay goes on to the next server all the same, and answers that request with the error."""
    async with Client(relay_params(tmp_path, workspace), mode="legacy") as host:
        await call(host, "list_traces")
        first = status(tmp_path)["pid"]
        os.kill(first, signal.SIGSTOP)  # it reads nothing more…
        outcome: list[str] = []

        async def ask() -> None:
            try:
                await host.call_tool("list_traces", {})
                outcome.append("answered")
            except Exception as exc:
                outcome.append(str(exc))

        async with anyio.create_task_group() as group:
            group.start_soon(ask)
            await anyio.sleep(0.5)  # …so this request waits unread in its socket
            os.kill(first, signal.SIGKILL)
        assert "went away before answering" in outcome[0]
        assert (await call(host, "list_traces"))["traces"] == []  # on the next server
        assert status(tmp_path)["pid"] != first


async def test_a_host_on_a_server_a_newer_relay_drained_goes_on_with_the_new_one(
    tmp_path, workspace, fake_openai
):
    fake_openai.script = [("hang", None), ("json", completion("Done."))]
    old_host = model_host(tmp_path, workspace, fake_openai, AGENT_TRACE_TEST_VERSION="0.0.1")
    async with Client(old_host, mode="auto") as host_a:
        first = (await call(host_a, "create_trace", prompt="Take your time"))["trace_id"]
        await wait_until(lambda: len(fake_openai.requests) == 1)
        old = status(tmp_path)["pid"]
        async with Client(model_host(tmp_path, workspace, fake_openai), mode="legacy") as host_b:
            await wait_until(lambda: status(tmp_path)["sessions"] == 2)  # host A moved, its run still going
            assert pid_alive(old)  # draining: the old server finishes the run it has
            tid = (await call(host_a, "create_trace", prompt="Look around"))["trace_id"]  # on the new one
            assert (await wait_done(host_a, tid))["answer"] == "Done."
            assert status(tmp_path)["pid"] != old
            assert tid in [t["trace_id"] for t in (await call(host_b, "list_traces"))["traces"]]
            fake_openai.release.set()
            assert (await wait_done(host_a, first))["trace"]["status"] == "completed"  # finished by the old
            await wait_gone(old)


# -- exits ----------------------------------------------------------------------------------------


async def test_idle_server_exits_after_idle_exit_seconds(tmp_path, workspace):
    async with Client(relay_params(tmp_path, workspace, "--idle-exit", "1"), mode="legacy") as host:
        tid = (await call(host, "create_trace", prompt="hello"))["trace_id"]
        await wait_done(host, tid)
        pid = status(tmp_path)["pid"]
    await wait_gone(pid)
    address = ServerAddress.of(tmp_path / "data")
    assert not address.socket.exists() and not address.record.exists()
    assert "idle for 1 s" in address.log.read_text()


async def test_removing_the_socket_stops_the_server_and_its_runs_end_stopped(
    tmp_path, workspace, fake_openai
):
    fake_openai.script = [("hang", None)]
    async with Client(model_host(tmp_path, workspace, fake_openai), mode="legacy") as host:
        tid = (await call(host, "create_trace", prompt="Look around"))["trace_id"]
        await wait_until(lambda: len(fake_openai.requests) == 1)
    pid = status(tmp_path)["pid"]
    ServerAddress.of(tmp_path / "data").socket.unlink()
    await wait_gone(pid)
    async with Client(stdio_params(tmp_path, workspace), mode="legacy") as reader:
        view = await call(reader, "get_trace", trace_id=tid)
    assert view["trace"]["status"] == "stopped"


async def test_socket_is_private_and_a_long_data_dir_gets_a_short_socket(tmp_path, workspace):
    async with Client(relay_params(tmp_path, workspace), mode="legacy") as host:
        await host.list_tools()
        address = ServerAddress.of(tmp_path / "data")
        assert stat.S_IMODE(address.socket.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(address.socket.stat().st_mode) and address.socket.stat().st_uid == os.getuid()
        assert stat.S_IMODE(address.data_dir.stat().st_mode) == 0o700  # a new data dir is private
        assert stat.S_IMODE(address.log.stat().st_mode) == 0o600

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    params = relay_params(tmp_path, workspace, "--data-dir", str(deep))  # the last --data-dir wins
    try:
        async with Client(params, mode="legacy") as host:
            await host.list_tools()
            address = ServerAddress.of(deep)
            assert address.socket.parent != deep and len(os.fsencode(address.socket)) <= 103
            folder = address.socket.parent.stat()
            assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
            assert stat.S_IMODE(address.socket.stat().st_mode) == 0o600
            assert json.loads(address.record.read_text())["socket"] == str(address.socket)
    finally:
        subprocess.run([*console_script(), "stop-server", "--now", "--data-dir", str(deep)], timeout=60)
        for pid in server_pids(deep):
            await wait_gone(pid)


# -- versions, settings, commands -------------------------------------------------------------------


async def test_a_relay_of_another_version_drains_the_old_server(tmp_path, workspace, fake_openai):
    fake_openai.script = [("hang", None)]
    old_host = model_host(tmp_path, workspace, fake_openai, AGENT_TRACE_TEST_VERSION="0.0.1")
    async with Client(old_host, mode="legacy") as host_a:
        tid = (await call(host_a, "create_trace", prompt="Look around"))["trace_id"]
        await wait_until(lambda: len(fake_openai.requests) == 1)
    old = status(tmp_path)
    assert old["version"] == "0.0.1"

    errlog = tmp_path / "relay-b.stderr"
    with errlog.open("w") as stderr:
        host_b_params = stdio_client(model_host(tmp_path, workspace, fake_openai), errlog=stderr)
        async with Client(host_b_params, mode="legacy") as host_b:
            new = status(tmp_path)
            assert new["pid"] != old["pid"] and new["version"] != "0.0.1"
            assert pid_alive(old["pid"])  # draining: its run goes on
            shown = run_cli(tmp_path, "status").stdout
            assert f"Draining: the server of version 0.0.1 (pid {old['pid']})" in shown
            assert tid in (await call(host_b, "list_running"))["running"]
            fake_openai.release.set()
            view = await wait_done(host_b, tid)
            assert view["trace"]["status"] == "completed"  # finished by the old server, seen from the new
            await wait_gone(old["pid"])
    assert "runs version 0.0.1" in errlog.read_text() and "asking it to drain" in errlog.read_text()


async def test_a_drained_server_is_unreachable_once_it_has_answered(tmp_path, workspace, fake_openai):
    """The drain reply comes after the socket file is gone: the relay that asked starts the new server at
    once instead of greeting the old one again (which takes no sessions) and waiting out its hello."""
    fake_openai.script = [("hang", None)]
    async with Client(model_host(tmp_path, workspace, fake_openai), mode="legacy") as host:
        tid = (await call(host, "create_trace", prompt="Look around"))["trace_id"]
        await wait_until(lambda: len(fake_openai.requests) == 1)
        address = ServerAddress.of(tmp_path / "data")
        reply = ask_once(address, {CONTROL_KEY: "drain"})
        assert reply is not None and reply["state"] == "draining" and reply["running"] == [tid]
        assert not address.socket.exists()
        assert ask_once(address, {CONTROL_KEY: "hello", "version": VERSION, "session": True}) is None
        assert (await call(host, "get_trace", trace_id=tid))["trace"]["status"] == "running"  # sessions go on
        fake_openai.release.set()
        await wait_gone(reply["pid"])  # its run finished: then it closed its sessions and exited
    async with Client(model_host(tmp_path, workspace, fake_openai), mode="legacy") as later:
        assert (await wait_done(later, tid))["trace"]["status"] == "completed"


async def test_a_host_with_other_settings_is_served_and_told(tmp_path, workspace):
    async with Client(relay_params(tmp_path, workspace), mode="legacy") as first:
        await first.list_tools()
        errlog = tmp_path / "relay-b.stderr"
        with errlog.open("w") as stderr:
            other = relay_params(tmp_path, workspace, "--model", "openai:gpt-other")
            async with Client(stdio_client(other, errlog=stderr), mode="legacy") as second:
                tid = (await call(second, "create_trace", prompt="hello"))["trace_id"]
                view = await wait_done(second, tid)
                told = await call(second, "agent_info")
                notes = status(tmp_path)["notes"]
        assert view["trace"]["model"] == "offline"  # the server's start-up model
        assert "--model differ" in errlog.read_text()
        assert len(notes) == 1 and "--model" in notes[0] and "stop-server --data-dir" in notes[0]
        assert told["notes"] == notes  # what the differing host's model reads
        await wait_until(lambda: status(tmp_path)["notes"] == [])  # that host has left: status says no more
        async with Client(relay_params(tmp_path, workspace), mode="legacy") as third:
            info = await call(third, "agent_info")
        assert "notes" not in info  # a host whose settings match is told nothing
        assert "notes" not in await call(first, "agent_info")


def _few_descriptors() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


async def test_running_out_of_descriptors_refuses_connections_not_the_server(tmp_path, workspace):
    """A burst of connections past the descriptor limit (macOS's default is 256) is refused, and the server
    goes on serving once they close."""
    errlog = (tmp_path / "server.stderr").open("w")
    server = subprocess.Popen(
        [*console_script(), "server", *server_args(tmp_path, workspace)],
        stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog, preexec_fn=_few_descriptors,
    )  # fmt: skip
    try:
        address = ServerAddress.of(tmp_path / "data")
        await wait_until(lambda: (ask_once(address, {CONTROL_KEY: "status"}) or {}).get("pid") == server.pid)
        async with Client(relay_params(tmp_path, workspace), mode="legacy") as first:
            await call(first, "list_running")  # the engine is open: its descriptors are taken
        burst = []
        for _ in range(100):
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(address.socket))  # the backlog takes them; accept runs out of descriptors
            burst.append(client)
        try:
            await anyio.sleep(1)
        finally:
            for client in burst:
                client.close()
        assert server.poll() is None, (tmp_path / "server.stderr").read_text()[-3000:]
        async with Client(relay_params(tmp_path, workspace), mode="legacy") as host:
            tid = (await call(host, "create_trace", prompt="hello"))["trace_id"]
            assert (await wait_done(host, tid))["trace"]["status"] == "completed"
        assert "could not accept a connection" in (tmp_path / "server.stderr").read_text()
    finally:
        server.terminate()
        server.wait(30)
        errlog.close()


async def test_stop_server_while_a_relay_starts_one_stops_that_one(tmp_path, workspace):
    address = ServerAddress.of(tmp_path / "data")
    address.prepare()
    held = try_lock(address.start_lock)  # as a relay holds it while the server it spawned comes up
    assert held is not None
    stopping = subprocess.Popen(
        [*console_script(), "stop-server", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    server = subprocess.Popen(
        [*console_script(), "server", *server_args(tmp_path, workspace)], stderr=subprocess.DEVNULL
    )
    try:
        await wait_until(lambda: ask_once(address, {CONTROL_KEY: "status"}) is not None)
        os.close(held)
        out, _ = stopping.communicate(timeout=60)
        assert "No shared server is running" not in out
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()


async def test_status_and_stop_server(tmp_path, workspace, fake_openai):
    none = run_cli(tmp_path, "status")
    assert none.returncode == 1 and "No shared server is running" in none.stdout
    none_json = run_cli(tmp_path, "status", "--json")  # a program asking gets JSON either way
    assert none_json.returncode == 1 and json.loads(none_json.stdout)["state"] == "not running"
    assert run_cli(tmp_path, "stop-server").returncode == 0

    fake_openai.script = [("hang", None)]
    async with Client(model_host(tmp_path, workspace, fake_openai), mode="legacy") as host:
        tid = (await call(host, "create_trace", prompt="Look around", name="looker"))["trace_id"]
        await wait_until(lambda: len(fake_openai.requests) == 1)
        shown = run_cli(tmp_path, "status")
        assert shown.returncode == 0
        pid = json.loads(run_cli(tmp_path, "status", "--json").stdout)["pid"]
        for part in (
            f"pid {pid}",
            f"version {VERSION}",
            "1 host session(s)",
            "Running traces: 1",
            tid,
            "looker",
        ):
            assert part in shown.stdout
        in_process = model_host(tmp_path, workspace, fake_openai, "--in-process")
        async with Client(in_process, mode="legacy") as other:  # a run the shared server does not own
            elsewhere = (await call(other, "create_trace", prompt="Also look"))["trace_id"]
            await wait_until(lambda: len(fake_openai.requests) == 2)
            shown = run_cli(tmp_path, "status").stdout
            assert "Running traces: 2" in shown and f"{elsewhere}  (run by another process)" in shown
    stopped = run_cli(tmp_path, "stop-server", "--now")
    assert stopped.returncode == 0 and "has stopped" in stopped.stdout
    assert not pid_alive(pid)
    async with Client(stdio_params(tmp_path, workspace), mode="legacy") as reader:
        assert (await call(reader, "get_trace", trace_id=tid))["trace"]["status"] == "stopped"


async def test_stop_server_drains_by_default(tmp_path, workspace, fake_openai):
    fake_openai.script = [("hang", None)]
    async with Client(model_host(tmp_path, workspace, fake_openai), mode="legacy") as host:
        tid = (await call(host, "create_trace", prompt="Look around"))["trace_id"]
        await wait_until(lambda: len(fake_openai.requests) == 1)
    pid = status(tmp_path)["pid"]
    stopping = subprocess.Popen(
        [*console_script(), "stop-server", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        first_line = await anyio.to_thread.run_sync(stopping.stdout.readline)
        assert "Draining the shared server" in first_line and "1 running trace" in first_line
        assert pid_alive(pid) and stopping.poll() is None  # it waits for the run
        fake_openai.release.set()
        rest = await anyio.to_thread.run_sync(stopping.communicate, None, 60)
    finally:
        with suppress(ProcessLookupError):
            stopping.kill()
    assert stopping.returncode == 0 and "has stopped" in rest[0]
    assert not pid_alive(pid)
    async with Client(stdio_params(tmp_path, workspace), mode="legacy") as reader:
        assert (await call(reader, "get_trace", trace_id=tid))["trace"]["status"] == "completed"


async def test_a_host_waiting_when_the_server_stops_gets_its_answer_first(tmp_path, workspace, fake_openai):
    fake_openai.script = [("hang", None)]
    async with Client(model_host(tmp_path, workspace, fake_openai), mode="legacy") as host:
        tid = (await call(host, "create_trace", prompt="Look around"))["trace_id"]
        await wait_until(lambda: len(fake_openai.requests) == 1)
        answers: list[dict] = []

        async def wait_on_it() -> None:
            answers.append(await call(host, "get_trace", trace_id=tid, wait_seconds=30))

        async with anyio.create_task_group() as group:
            group.start_soon(wait_on_it)
            await anyio.sleep(0.5)
            stopped = await anyio.to_thread.run_sync(lambda: run_cli(tmp_path, "stop-server", "--now"))
        assert stopped.returncode == 0 and "has stopped" in stopped.stdout
        assert answers[0]["trace"]["status"] == "stopped"  # answered before the session closed
        await no_server_starts(tmp_path)  # a stop is meant: the relay does not start another in its place


async def test_a_stop_past_the_answer_grace_still_ends_the_hosts_session_for_good(
    tmp_path, workspace, fake_openai
):
    """A host waiting on a run of another process does not hold a stop up past the grace; its session is
    closed with the stop's note, so its relay exits rather than start a server in the stopped one's place."""
    fake_openai.script = [("hang", None)]
    in_process = model_host(tmp_path, workspace, fake_openai, "--in-process")
    async with Client(in_process, mode="legacy") as other:
        tid = (await call(other, "create_trace", prompt="Look around"))["trace_id"]
        await wait_until(lambda: len(fake_openai.requests) == 1)
        stopped: list[subprocess.CompletedProcess[str]] = []

        async def wait_on_it(host: Client) -> None:
            with suppress(Exception):  # the session closes under the wait
                await host.call_tool("get_trace", {"trace_id": tid, "wait_seconds": 30})

        with suppress(Exception):  # and the host's client with it
            async with Client(relay_params(tmp_path, workspace), mode="legacy") as host:
                async with anyio.create_task_group() as group:
                    group.start_soon(wait_on_it, host)
                    await anyio.sleep(0.5)
                    with anyio.fail_after(ANSWER_GRACE_SECONDS + 10):  # not held up by the 30 s wait
                        stop = await anyio.to_thread.run_sync(
                            lambda: run_cli(tmp_path, "stop-server", "--now")
                        )
                    stopped.append(stop)
        assert stopped and stopped[0].returncode == 0
        await no_server_starts(tmp_path)
        fake_openai.release.set()


async def test_a_server_that_does_not_answer_is_named_and_stop_server_now_ends_it(tmp_path, workspace):
    async with Client(relay_params(tmp_path, workspace), mode="legacy") as host:
        await call(host, "list_traces")
        pid = status(tmp_path)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        shown = await anyio.to_thread.run_sync(lambda: run_cli(tmp_path, "status"))
        assert shown.returncode == 1 and f"(pid {pid}) runs but does not answer" in shown.stdout
        assert "No shared server" not in shown.stdout and "--now` ends it" in shown.stdout
        errlog = tmp_path / "stuck-relay.stderr"
        with (
            errlog.open("w") as stderr,
            anyio.fail_after(25),
        ):  # a host launched now is served at once, itself
            async with Client(stdio_client(relay_params(tmp_path, workspace), errlog=stderr)) as host:
                tid = (await call(host, "create_trace", prompt="hello"))["trace_id"]
                assert (await wait_done(host, tid))["trace"]["status"] == "completed"
        said = errlog.read_text()
        assert f"(pid {pid})" in said and "serving this host in its own process meanwhile" in said
        stopped = await anyio.to_thread.run_sync(lambda: run_cli(tmp_path, "stop-server", "--now"))
        assert stopped.returncode == 0 and "does not answer: ending it" in stopped.stdout
        await wait_gone(pid, 10)
    finally:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# -- the relay as a transport ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_relay_passes_both_protocol_eras(tmp_path, workspace, mode):
    updates: list[str] = []
    params = relay_params(tmp_path, workspace)
    async with Client(params, mode=mode, message_handler=updated_uris(updates)) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"create_trace", "get_trace", "stop_trace"} <= names
        tid = (await call(client, "create_trace", prompt="Use read_file to read README.md"))["trace_id"]
        view = await wait_done(client, tid)
        assert view["trace"]["status"] == "completed"
        again = [{"role": "user", "content": "again"}]
        if mode == "legacy":
            await client.session.subscribe_resource(f"trace://{tid}")
            await call(client, "run_trace", trace_id=tid, messages=again)
            await wait_until(lambda: f"trace://{tid}" in updates)
        else:
            async with client.listen(resource_subscriptions=[f"trace://{tid}"]) as events:
                await call(client, "run_trace", trace_id=tid, messages=again)
                with anyio.fail_after(20):
                    assert (await events.__anext__()).uri == f"trace://{tid}"
        await wait_done(client, tid)
        listed = [str(r.uri) for r in (await client.list_resources()).resources]
        assert f"trace://{tid}" in listed


INVALID_FRAMES = [
    (b"not json", None, -32700),
    (b'[{"jsonrpc":"2.0","id":7,"method":"ping"}]', 7, -32600),
    (b'{"jsonrpc":"2.0","id":2,"method":"tools/list","params":"x"}', 2, -32602),
    (b'{"jsonrpc":"2.0","id":"three","method":5}', "three", -32600),
    (b'{"jsonrpc":"1.0","id":4,"method":"ping"}', 4, -32600),
    (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', None, -32600),
    (b'{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":5}}', 6, -32602),
    (b'{"jsonrpc":"2.0","id":8,"method":"tools/list"', 8, -32700),  # cut short: its id is still read
    (b'{"jsonrpc":"2.0","id":"nine","method":"ping","params":{"x":"\xff"}}', "nine", -32700),  # not UTF-8
    (
        b'{"jsonrpc":"2.0","id":10,"method":"ping","params":{"x":' + b"[" * 5000 + b"]" * 5000 + b"}}",
        10,
        -32700,
    ),
]
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}


@pytest.mark.parametrize("how", ["in-process", "relay"])
async def test_every_frame_with_an_id_gets_a_reply(tmp_path, workspace, how):
    params = stdio_params(tmp_path, workspace) if how == "in-process" else relay_params(tmp_path, workspace)
    async with await anyio.open_process(
        [params.command, *params.args], env=params.env, stderr=subprocess.DEVNULL
    ) as process:
        assert process.stdin is not None and process.stdout is not None
        lines = anyio.streams.text.TextReceiveStream(process.stdout)
        buffer = ""

        async def reply_to(frame: bytes) -> dict:
            nonlocal buffer
            await process.stdin.send(frame + b"\n")
            with anyio.fail_after(30):
                while "\n" not in buffer:
                    buffer += await lines.receive()
            line, buffer = buffer.split("\n", 1)
            return json.loads(line)

        assert "result" in await reply_to(json.dumps(INITIALIZE).encode())
        await process.stdin.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        for frame, request_id, code in INVALID_FRAMES:
            reply = await reply_to(frame)
            assert (reply["id"], reply["error"]["code"]) == (request_id, code), frame
            assert reply["error"]["message"].endswith(".") or reply["error"]["message"]
        too_large = await reply_to(
            b'{"jsonrpc":"2.0","id":8,"method":"ping","params":{"x":"' + b"a" * 34_000_000 + b'"}}'
        )
        assert (too_large["id"], too_large["error"]["code"]) == (None, -32600)
        assert "result" in await reply_to(b'{"jsonrpc":"2.0","id":9,"method":"ping"}\r')  # CRLF framing
        listed = await reply_to(b'{"jsonrpc":"2.0","id":99,"method":"tools/list"}')
        assert listed["id"] == 99 and listed["result"]["tools"]  # the session lived through it all
        await process.stdin.aclose()
        with anyio.fail_after(20):
            assert await process.wait() == 0


@pytest.mark.parametrize("how", ["in-process", "relay"])
async def test_requests_piped_in_before_the_end_of_input_are_all_answered(tmp_path, workspace, how):
    """``printf '…' | agent-trace-mcp``: stdin ends right after the requests, yet each gets its answer and
    the trace it created is stored (through the relay, it runs to its end in the shared server)."""
    params = stdio_params(tmp_path, workspace) if how == "in-process" else relay_params(tmp_path, workspace)
    frames = [
        INITIALIZE,
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "create_trace", "arguments": {"prompt": "hi"}},
        },
        {"jsonrpc": "2.0", "id": 3, "method": "tools/list"},
    ]
    piped = b"".join(json.dumps(f).encode() + b"\n" for f in frames)
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [params.command, *params.args], input=piped, env=params.env, stderr=subprocess.DEVNULL
        )
    replies = {m["id"]: m for m in map(json.loads, done.stdout.splitlines()) if "id" in m}
    assert sorted(replies) == [1, 2, 3] and "result" in replies[2], replies
    trace_id = json.loads(replies[2]["result"]["content"][0]["text"])["trace_id"]
    with sqlite3.connect(tmp_path / "data" / "traces.db") as db:
        assert db.execute("SELECT count(*) FROM traces WHERE trace_id = ?", (trace_id,)).fetchone() == (1,)


async def test_a_request_its_client_cancelled_is_not_waited_for_at_the_end_of_input(
    tmp_path, workspace, fake_openai
):
    """The SDK never answers a cancelled request: the end of input must not wait the drain out for it."""
    fake_openai.script = [("hang", None)]
    params = model_host(tmp_path, workspace, fake_openai, "--in-process")
    create = {"name": "create_trace", "arguments": {"prompt": "think"}}
    frames = [
        INITIALIZE,
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": create},
    ]
    async with await anyio.open_process(
        [params.command, *params.args], env=params.env, stderr=subprocess.DEVNULL
    ) as process:
        assert process.stdin is not None and process.stdout is not None
        await process.stdin.send(b"".join(json.dumps(f).encode() + b"\n" for f in frames))
        seen = b""
        with anyio.fail_after(30):
            while b'"id":2' not in seen:
                seen += await process.stdout.receive()
        created = next(m for m in map(json.loads, seen.splitlines()) if m.get("id") == 2)
        trace_id = json.loads(created["result"]["content"][0]["text"])["trace_id"]
        wait = {"name": "get_trace", "arguments": {"trace_id": trace_id, "wait_seconds": 40}}
        await process.stdin.send(
            json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": wait}).encode() + b"\n"
        )
        await anyio.sleep(0.5)
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 3}}
        await process.stdin.send(json.dumps(cancel).encode() + b"\n")
        await process.stdin.aclose()
        with anyio.fail_after(15):  # not the 60 s drain, nor the 40 s wait
            await process.wait()
    fake_openai.release.set()


async def test_the_relay_exits_cleanly_on_eof_and_on_sigterm(tmp_path, workspace):
    params = relay_params(tmp_path, workspace)
    for ending in ("eof", "sigterm"):
        async with await anyio.open_process(
            [params.command, *params.args], env=params.env, stderr=subprocess.DEVNULL
        ) as relay:
            assert relay.stdin is not None and relay.stdout is not None
            await relay.stdin.send(json.dumps(INITIALIZE).encode() + b"\n")
            with anyio.fail_after(30):
                assert b'"id":1' in await relay.stdout.receive()
            if ending == "eof":
                await relay.stdin.aclose()
            else:
                relay.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                assert await relay.wait() == 0
    await wait_until(lambda: status(tmp_path)["sessions"] == 0, 5)  # the server lives on without its hosts


# -- the Inspector CLI -----------------------------------------------------------------------------------


async def test_the_inspector_cli_leaves_a_trace_that_completes_after_it_exits(
    tmp_path, workspace, fake_openai
):
    binary = inspector()
    if binary is None:
        pytest.skip("no MCP Inspector CLI and no npm to install it: set AGENT_TRACE_INSPECTOR to its binary")
    fake_openai.script = [("hang", None)]
    command, *args = console_script()
    server = [command, *args, *server_args(tmp_path, workspace), "--model", "openai:gpt-test"]
    env_args = [arg for name, value in fake_openai.env.items() for arg in ("-e", f"{name}={value}")]
    cli = [binary, "--cli", "--format", "json", "-q", *env_args, "--method", "tools/call",
           "--tool-name", "create_trace", "--tool-arg", "prompt=Use list_files to look around", "--", *server]  # fmt: skip
    state = tmp_path / "inspector"
    state.mkdir()
    env = {
        **os.environ,
        "MCP_CATALOG_PATH": str(state / "mcp.json"),
        "MCP_CLIENT_CONFIG_PATH": str(state / "c.json"),
    }
    done = await anyio.run_process(cli, env=env, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    result = json.loads(done.stdout)["result"]
    tid = (
        result.get("structuredContent", {}).get("trace_id")
        or json.loads(result["content"][0]["text"])["trace_id"]
    )
    assert [run["trace_id"] for run in status(tmp_path)["running"]] == [tid]  # the Inspector has exited
    fake_openai.release.set()
    async with Client(model_host(tmp_path, workspace, fake_openai), mode="legacy") as host:
        view = await wait_done(host, tid)
    assert view["trace"]["status"] == "completed"


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(FileNotFoundError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def test_nothing_listens_on_a_network_port(tmp_path, workspace):
    """The shared server opens a Unix socket only: no TCP or UDP socket in its process."""
    with subprocess.Popen(
        [*console_script(), *server_args(tmp_path, workspace)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as relay:  # fmt: skip
        assert relay.stdin is not None and relay.stdout is not None
        relay.stdin.write(json.dumps(INITIALIZE).encode() + b"\n")
        relay.stdin.flush()
        assert b'"id":1' in relay.stdout.readline()
        pid = status(tmp_path)["pid"]
        inodes = socket_inodes(pid)
        assert inodes  # the Unix socket and its connections
        for table in ("tcp", "tcp6", "udp", "udp6"):
            with suppress(FileNotFoundError):
                rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
                assert not inodes & {row.split()[9] for row in rows}, table
        relay.stdin.close()
        relay.wait(10)
