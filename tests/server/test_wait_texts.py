"""Every text the server writes that suggests a wait suggests one within --max-wait (and so ≤ 45 s): the
instructions, tools/list, the prompts and every answer a host reads while it follows a trace."""

from __future__ import annotations

import re

import anyio
import pytest
from mcp import Client

from server.app import build_server
from tests.fakes import ScriptedModel, models_for, reply
from tests.fakes import call as tool_call
from tests.server.helpers import call, wait_done

pytestmark = pytest.mark.anyio

SUGGESTION = re.compile(r"wait_seconds\W{0,6}(\d+(?:\.\d+)?)|max-wait\W{0,3}(\d+(?:\.\d+)?) s")


def strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return []


@pytest.mark.parametrize("max_wait", [45, 2, 0.5])
async def test_every_suggested_wait_is_within_max_wait(settings, model, slow_model, max_wait):
    settings.max_wait = max_wait
    asks = ScriptedModel([reply(None, tool_call("ask_host", "q1", question="Which file?")), reply("done")])
    texts: list[str] = []
    server = build_server(settings, models=models_for(scripted=model, slow=slow_model, asks=asks))
    async with Client(server) as client:
        texts.append(client.instructions or "")
        texts += strings([t.model_dump() for t in (await client.list_tools()).tools])
        for prompt in (await client.list_prompts()).prompts:
            args = {a.name: "a" * 32 if a.name == "trace_id" else "x" for a in prompt.arguments or []}
            texts += strings((await client.get_prompt(prompt.name, args)).model_dump())

        started = await call(client, "create_trace", prompt="slow", model="slow", tags=["t"])
        texts.append(started["message"])
        running = started["trace_id"]
        texts += strings(await call(client, "get_trace", trace_id=running))
        with anyio.fail_after(10):
            texts += strings(await call(client, "get_trace", trace_id=running, wait_seconds=0.1))
            texts += strings(await call(client, "await_traces", tag="t", wait_seconds=0.1))
            if max_wait < 10:  # a wait cut at the cap says so (waiting out 45 s here would be slow)
                texts += strings(await call(client, "get_trace", trace_id=running, wait_seconds=3600))
        texts += strings(await call(client, "list_running"))
        await call(client, "stop_trace", trace_id=running)

        paused = (await call(client, "create_trace", prompt="ask", model="asks"))["trace_id"]
        texts += strings(await wait_done(client, paused))
        texts += strings(await call(client, "run_trace", trace_id=paused, answer="README.md"))
        texts += strings(await wait_done(client, paused))
        texts += strings(await call(client, "list_traces"))

    suggested = [float(a or b) for text in texts for a, b in SUGGESTION.findall(text)]
    assert len(suggested) >= 8  # the scan sees the suggestions (instructions, tools, prompts, answers)
    assert min(suggested) > 0 and max(suggested) <= max_wait, [t for t in texts if SUGGESTION.search(t)]
