"""Change notifications actually received, in both protocol eras."""

from __future__ import annotations

import anyio
import mcp.types as types
import pytest
from mcp import Client

from tests.server.helpers import call, wait_done

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore:resources/.*subscribe is removed")]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_both_eras_say_alike_what_changes(server, mode):
    async with Client(server, mode=mode) as client:
        caps = client.server_capabilities
        assert caps.resources.subscribe is True and caps.resources.list_changed is True
        assert caps.tools.list_changed is False and caps.prompts.list_changed is False  # they never change


async def test_legacy_subscriber_gets_updates_during_a_run_and_list_changed(server):
    got: list = []

    async def handler(message):
        if isinstance(message, Exception):
            raise message
        got.append(message)

    async with Client(server, mode="legacy", message_handler=handler) as client:
        caps = client.server_capabilities
        assert caps.resources.subscribe is True and caps.resources.list_changed is True
        # a list_changed on create reaches a client that has made requests
        tid = (await call(client, "create_trace", prompt="hello", model="slow"))["trace_id"]
        await client.session.subscribe_resource(f"trace://{tid}")
        await call(client, "stop_trace", trace_id=tid)
        await wait_done(client, tid)
        with anyio.fail_after(5):
            while not any(
                isinstance(m, types.ResourceUpdatedNotification) and str(m.params.uri) == f"trace://{tid}"
                for m in got
            ):
                await anyio.sleep(0.02)
        assert any(isinstance(m, types.ResourceListChangedNotification) for m in got)

        # after unsubscribe, a new run sends no update for that URI
        await client.session.unsubscribe_resource(f"trace://{tid}")
        got.clear()
        await call(client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "again"}])
        await call(client, "stop_trace", trace_id=tid)
        await wait_done(client, tid)
        await anyio.sleep(0.1)
        assert not any(isinstance(m, types.ResourceUpdatedNotification) for m in got)


async def test_legacy_subscription_to_the_tree_uri(server):
    updates: list[str] = []

    async def handler(message):
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))

    async with Client(server, mode="legacy", message_handler=handler) as client:
        tid = (await call(client, "create_trace", prompt="Use read_file to read README.md"))["trace_id"]
        await wait_done(client, tid)
        await client.session.subscribe_resource(f"trace://{tid}/tree")
        await call(client, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "more"}])
        await wait_done(client, tid)
        with anyio.fail_after(5):
            while len(updates) < 3:  # status running, user message, answer, status completed
                await anyio.sleep(0.02)
        assert set(updates) == {f"trace://{tid}/tree"}


async def test_modern_listener_gets_resource_updates_and_list_changed(server):
    async with Client(server) as client:
        async with client.listen(resources_list_changed=True) as listing:
            tid = (await call(client, "create_trace", prompt="hello", model="slow"))["trace_id"]
            with anyio.fail_after(5):
                event = await listing.__anext__()
            assert type(event).__name__ == "ResourcesListChanged"
        async with client.listen(resource_subscriptions=[f"trace://{tid}"]) as sub:
            await call(client, "stop_trace", trace_id=tid)
            with anyio.fail_after(5):
                event = await sub.__anext__()
            assert event.uri == f"trace://{tid}"
        await wait_done(client, tid)


async def test_modern_resources_subscribe_is_refused_with_what_to_use(server):
    from mcp import MCPError

    async with Client(server) as client:
        assert client.protocol_version == "2026-07-28"
        with pytest.raises(MCPError) as info:
            await client.session.subscribe_resource("trace://" + "0" * 32)
        assert "subscriptions/listen" in info.value.error.message


async def test_experiences_memory_subscribers_hear_of_a_reflection(server):
    got: list[str] = []

    async def handler(message):
        if isinstance(message, types.ResourceUpdatedNotification):
            got.append(str(message.params.uri))

    async with Client(server, mode="legacy", message_handler=handler) as client:
        tid = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
        await wait_done(client, tid)
        await client.session.subscribe_resource("experiences://memory")
        await call(client, "reflect_trace", trace_id=tid)
        with anyio.fail_after(5):
            while "experiences://memory" not in got:
                await anyio.sleep(0.02)
    async with (
        Client(server) as modern,
        modern.listen(resource_subscriptions=["experiences://memory"]) as sub,
    ):
        tid = (await call(modern, "create_trace", prompt="What does the README say?"))["trace_id"]
        await wait_done(modern, tid)
        await call(modern, "reflect_trace", trace_id=tid)
        with anyio.fail_after(5):
            event = await sub.__anext__()
        assert event.uri == "experiences://memory"


async def test_a_hand_edit_of_the_experiences_file_notifies_once(server, settings):
    """The file is watched: an edit by hand (or by another process) updates experiences://memory, and a
    reflection's own write is announced once, not once by the store's change log and again by the watcher."""
    got: list[str] = []

    async def handler(message):
        if isinstance(message, types.ResourceUpdatedNotification):
            got.append(str(message.params.uri))

    async with Client(server, mode="legacy", message_handler=handler) as client:
        await client.session.subscribe_resource("experiences://memory")
        settings.experiences.parent.mkdir(parents=True, exist_ok=True)
        settings.experiences.write_text(
            "# Experiences\n\n## " + "a" * 32 + " (2026-01-01 10:00)\n- A lesson written by hand.\n",
            encoding="utf-8",
        )
        with anyio.fail_after(5):
            while "experiences://memory" not in got:
                await anyio.sleep(0.02)
        assert (
            "A lesson written by hand."
            in (await client.read_resource("experiences://memory")).contents[0].text
        )
        tid = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
        await wait_done(client, tid)
        got.clear()
        await call(client, "reflect_trace", trace_id=tid)
        with anyio.fail_after(5):
            while "experiences://memory" not in got:
                await anyio.sleep(0.02)
        await anyio.sleep(0.5)  # long enough for a second announcement of the same write to arrive
        assert got.count("experiences://memory") == 1
