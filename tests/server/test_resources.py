"""Resources through a real client: trace://{id}, trace://{id}/tree, experiences://memory, resources/list."""

from __future__ import annotations

import json

import pytest
from mcp import Client, MCPError

from tests.server.helpers import call, wait_done

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["legacy", "auto"])
async def client(request, server):
    async with Client(server, mode=request.param) as c:
        yield c


def body(result) -> dict:
    return json.loads(result.contents[0].text)


async def test_trace_resources_show_the_active_path_and_the_whole_tree(client):
    tid = (await call(client, "create_trace", prompt="Use read_file to read README.md"))["trace_id"]
    await wait_done(client, tid)
    await call(client, "run_trace", trace_id=tid, insert_after=2)  # regenerate: a second branch
    await wait_done(client, tid)

    active = await client.read_resource(f"trace://{tid}")
    assert active.contents[0].mime_type == "application/json"
    active = body(active)
    tree = body(await client.read_resource(f"trace://{tid}/tree"))
    assert active["trace"]["trace_id"] == tid == tree["trace"]["trace_id"]
    assert [m["sequence"] for m in active["messages"]][:2] == [1, 2]
    assert len(tree["messages"]) > len(active["messages"])
    assert [m["sequence"] for m in tree["messages"]] == list(range(1, len(tree["messages"]) + 1))
    assert active["messages"][-1]["sequence"] == active["trace"]["head_sequence"]


async def test_trace_resources_are_whole_when_they_fit_under_1_mib(client):
    long = "abcdefghij" * 2_000
    tid = (await call(client, "create_trace", prompt=long))["trace_id"]
    await wait_done(client, tid)
    for uri in (f"trace://{tid}", f"trace://{tid}/tree"):
        assert body(await client.read_resource(uri))["messages"][1]["content"] == long


async def test_unknown_trace_resource_is_an_error_naming_it(client):
    with pytest.raises(MCPError) as info:
        await client.read_resource("trace://" + "f" * 32)
    assert "f" * 32 in str(info.value)


async def test_experiences_resource_is_markdown(client, settings):
    empty = await client.read_resource("experiences://memory")
    assert empty.contents[0].mime_type == "text/markdown"
    tid = (await call(client, "create_trace", prompt="hello"))["trace_id"]
    await wait_done(client, tid)
    await call(client, "reflect_trace", trace_id=tid)
    text = (await client.read_resource("experiences://memory")).contents[0].text
    assert f"## {tid} (" in text and text == settings.experiences.read_text(encoding="utf-8")


async def test_an_experiences_path_that_is_a_folder_is_a_sentence_not_an_internal_error(client, settings):
    settings.experiences.parent.mkdir(parents=True, exist_ok=True)
    settings.experiences.mkdir()
    with pytest.raises(MCPError) as info:
        await client.read_resource("experiences://memory")
    assert info.value.error.code == -32602 and "is not a regular file" in info.value.error.message


async def test_resource_list_has_experiences_then_traces_newest_first(client):
    ids = []
    for i in range(3):
        ids.append((await call(client, "create_trace", prompt=f"task {i}", name=f"task {i}"))["trace_id"])
        await wait_done(client, ids[-1])
    listed = await client.list_resources()
    uris = [str(r.uri) for r in listed.resources]
    assert uris[0] == "experiences://memory"
    assert uris[1:] == [f"trace://{i}" for i in reversed(ids)]
    assert listed.resources[1].mime_type == "application/json"
    templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
    assert templates == {
        "trace://{trace_id}",
        "trace://{trace_id}/tree",
        "trace://{trace_id}/messages/{sequence}",
    }


async def test_one_message_resource_is_whole_and_unknown_ones_are_errors(client):
    tid = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
    await wait_done(client, tid)
    message = body(await client.read_resource(f"trace://{tid}/messages/4"))
    assert message["role"] == "tool" and "The answer is 42." in message["content"]
    for bad in (
        f"trace://{tid}/messages/99",
        f"trace://{tid}/messages/abc",
        f"trace://{tid}/messages/99999999999999999999",  # past 2^63: once an OverflowError
        "trace://" + "f" * 32 + "/messages/1",
    ):
        with pytest.raises(MCPError) as refused:
            await client.read_resource(bad)
        assert "Traceback" not in str(refused.value) and "Overflow" not in str(refused.value)
        assert not str(refused.value).startswith("Error ")  # our sentence, not the SDK's catch-all


async def test_resource_list_pages(server, monkeypatch):
    import server.resources as resources

    monkeypatch.setattr(resources, "PAGE_SIZE", 2)
    async with Client(server, mode="legacy") as client:
        ids = []
        for i in range(5):
            ids.append((await call(client, "create_trace", prompt=f"task {i}"))["trace_id"])
            await wait_done(client, ids[-1])
        seen, cursor = [], None
        while True:
            page = await client.list_resources(cursor=cursor)
            seen += [str(r.uri) for r in page.resources]
            cursor = page.next_cursor
            if not cursor:
                break
        assert seen == ["experiences://memory"] + [f"trace://{i}" for i in reversed(ids)]
