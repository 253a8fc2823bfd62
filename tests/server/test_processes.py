"""Two real server processes on one data directory behave as one server (issue: runs owned by the store).

Host A's process runs a trace; host B's process refuses a second run of it, lists it as running, waits on
it with progress for A's messages, hears A's changes through a subscription, and stops it.
"""

from __future__ import annotations

import anyio
import mcp.types as types
import pytest
from mcp import Client

from tests.fake_openai import completion
from tests.processes import stdio_params
from tests.server.helpers import call, call_error

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:resources/.*subscribe is removed"),
]


async def test_two_stdio_servers_on_one_data_dir_share_every_run(tmp_path, workspace, fake_openai):
    list_call = {"id": "call_1", "type": "function", "function": {"name": "list_files", "arguments": "{}"}}
    fake_openai.script = [("slow", (3.0, completion(None, tool_calls=[list_call]))), ("hang", None)]
    params = stdio_params(tmp_path, workspace, "--model", "openai:gpt-test", **fake_openai.env)
    updates: list[str] = []
    progress: list[str] = []

    async def on_message(message):
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))

    async def on_progress(value, total, message):
        progress.append(message)

    async with (
        Client(params, mode="auto") as host_a,
        Client(params, mode="legacy", message_handler=on_message) as host_b,
    ):
        tid = (await call(host_a, "create_trace", prompt="Look around"))["trace_id"]
        await host_b.session.subscribe_resource(f"trace://{tid}")
        # B refuses a second run of A's trace, and lists it as running
        refusal = await call_error(
            host_b, "run_trace", trace_id=tid, messages=[{"role": "user", "content": "me"}]
        )
        assert "already running" in refusal
        assert tid in (await call(host_b, "list_running"))["running"]

        async with anyio.create_task_group() as tg:
            waited: dict = {}

            async def wait_on_b() -> None:
                result = await host_b.call_tool(
                    "get_trace",
                    {"trace_id": tid, "wait_seconds": 30, "after_sequence": 2},
                    progress_callback=on_progress,
                )
                waited.update(result.structured_content)

            tg.start_soon(wait_on_b)
            with anyio.fail_after(20):  # A's model answers after 3 s: its tool call and result reach B
                while not any(p.startswith("list_files returned") for p in progress):
                    await anyio.sleep(0.05)
            assert (await call(host_b, "stop_trace", trace_id=tid))["status"] == "stopping"
        assert waited["trace"]["status"] == "stopped"

    assert progress[0] == "assistant called list_files()"
    assert f"trace://{tid}" in updates
    assert len(fake_openai.requests) == 2  # only A's process ever called the model
    assert waited["trace"]["outcome"] == "stopped"
    # the hanging model call was cancelled: the run ends on the tool result, no half-stored step
    assert waited["recent"][-2].startswith("#3 assistant called list_files") and waited["recent"][
        -1
    ].startswith("#4 list_files returned")
