"""``agent-trace-mcp demo``: a complete trace on the offline model, driven through a real MCP client.

No key, no network, no server to start: the server runs in-process and the demo talks to it exactly as a
host would (the 2025-11-25 era, like Claude Desktop): create, watch with progress, rewind, reflect, recall.
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcp import Client

from server.app import build_server
from server.relay import console_script
from server.settings import Settings

README = """\
# Acme Rockets

A tiny flight computer for hobby rockets. It reads the altimeter 100 times a second,
fires the parachute at apogee, and logs the flight to `flights/`.
"""
LAUNCH_NOTES = """\
# Launch checklist

1. Charge the battery. 2. Arm the parachute charge. 3. Check the altimeter reads zero.
"""

ROLE_WIDTH = 9


def _say(text: str = "") -> None:
    print(text, flush=True)


def _short(text: str | None, width: int = 70) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _describe(message: dict[str, Any]) -> str:
    if message.get("tool_calls"):
        calls = []
        for c in message["tool_calls"]:
            args = json.loads(c["function"]["arguments"] or "{}")
            shown = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items())
            calls.append(f"{c['function']['name']}({shown})")
        return "→ " + "; ".join(calls)
    return _short(message.get("content"))


def render_tree(trace: dict[str, Any], messages: list[dict[str, Any]], active: set[int]) -> list[str]:
    """The message tree, branches indented at the points where they split; ● marks the active path."""
    children: dict[int | None, list[dict[str, Any]]] = {}
    for m in messages:
        children.setdefault(m["parent_sequence"], []).append(m)
    lines: list[str] = []

    def line(m: dict[str, Any], prefix: str) -> str:
        mark = "●" if m["sequence"] in active else "○"
        return f"{prefix}{mark} {m['sequence']:>2} {m['role']:<{ROLE_WIDTH}} {_describe(m)}"

    def walk(m: dict[str, Any], first_prefix: str, rest_prefix: str) -> None:
        lines.append(line(m, first_prefix))
        kids = children.get(m["sequence"], [])
        if len(kids) == 1 and (kids[0]["sequence"] in active or m["sequence"] not in active):
            walk(kids[0], rest_prefix, rest_prefix)
            return
        for i, kid in enumerate(kids):
            last = i == len(kids) - 1
            walk(kid, rest_prefix + ("└─" if last else "├─"), rest_prefix + ("  " if last else "│ "))

    for root in children.get(None, []):
        walk(root, "", "")
    return lines


def _text(blocks: Sequence[Any]) -> str:
    """The text of the first text block of a tool result or resource."""
    return next((b.text for b in blocks if isinstance(getattr(b, "text", None), str)), "")


async def _call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error or result.structured_content is None:
        raise SystemExit(f"demo: {tool} failed: {_text(result.content)}")
    return result.structured_content


async def _wait(client: Client, trace_id: str, after: int) -> dict[str, Any]:
    """Wait as a host does, showing each step after message ``after`` (those stored before the wait
    began too: the offline model is quick)."""

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        _say(f"   · {message}")

    while True:  # each wait is bounded (--max-wait): a host polls again until the trace is done
        arguments = {"trace_id": trace_id, "wait_seconds": 30, "after_sequence": after}
        result = await client.call_tool("get_trace", arguments, progress_callback=progress)
        summary = result.structured_content or {}
        after = summary.get("last_sequence") or after
        if summary.get("trace", {}).get("outcome") != "running":
            return summary


def _prepare(data_dir: Path) -> Settings:
    workspace = data_dir / "workspace"
    (workspace / "notes").mkdir(parents=True, exist_ok=True)
    (workspace / "README.md").write_text(README, encoding="utf-8")
    (workspace / "notes" / "launch.md").write_text(LAUNCH_NOTES, encoding="utf-8")
    return Settings.for_data_dir(data_dir, model="offline", workspace=workspace)


async def run_demo(args: argparse.Namespace | None = None) -> int:
    given = getattr(args, "data_dir", None) if args is not None else None
    data_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="agent-trace-demo-"))
    settings = _prepare(data_dir)
    server = build_server(settings)
    _say("agent-trace-mcp demo — the offline model, a real MCP client, no key and no network\n")
    async with Client(server, mode="legacy") as client:
        tools = [t.name for t in (await client.list_tools()).tools]
        _say(f"Connected. The server offers {len(tools)} tools: {', '.join(tools)}\n")

        _say("1. create_trace: “Use read_file to read README.md and tell me what this project does.”")
        started = await _call(
            client, "create_trace", name="demo: read the README",
            prompt="Use read_file to read README.md and tell me what this project does.",
        )  # fmt: skip
        tid = started["trace_id"]
        _say(f"   trace {tid} started; waiting with get_trace(wait_seconds=30):")
        first = await _wait(client, tid, after=2)  # 1 the system prompt, 2 the task
        first_view = await _call(client, "get_trace", trace_id=tid, view="full")
        steps = first_view["messages"]
        call_seq = next(m["sequence"] for m in steps if m.get("tool_calls"))
        _say(f"   {first['trace']['outcome']} ({first['trace']['stop_reason']}). Answer:")
        _say(textwrap.indent(textwrap.fill(first["answer"] or "", 96), "     "))

        _say(
            f"\n2. run_trace(insert_after={call_seq}): rewind to the tool call and ask something else instead"
        )
        await _call(
            client, "run_trace", trace_id=tid, insert_after=call_seq,
            messages=[{"role": "user", "content": 'Now use search_files to search for "parachute".'}],
        )  # fmt: skip
        second = await _wait(client, tid, after=first["last_sequence"] + 1)  # past the new question
        _say("   Answer on the new branch:")
        _say(textwrap.indent(textwrap.fill(second["answer"] or "", 96), "     "))

        _say("\n3. reflect_trace: lessons on a side branch; the head stays where it was")
        reflection = await _call(client, "reflect_trace", trace_id=tid, focus="how the tools were used")
        _say(textwrap.indent(reflection["reflection"], "     "))
        _say(f"   appended to {settings.experiences}")

        tree = json.loads(_text((await client.read_resource(f"trace://{tid}/tree")).contents))
        active = {
            m["sequence"]
            for m in json.loads(_text((await client.read_resource(f"trace://{tid}")).contents))["messages"]
        }
        trace = tree["trace"]
        _say(f"\n4. The trace tree (trace://{tid}/tree) — ● active path, ○ other branches")
        for row in render_tree(trace, tree["messages"], active):
            _say("   " + row)
        usage = trace["usage"]
        _say(
            f"   {len(tree['messages'])} messages, head at {trace['head_sequence']}, "
            f"{usage['llm_calls']} model calls, {usage['tool_calls']} tool calls, status {trace['status']}"
        )

        _say("\n5. A later trace on a similar task starts with those lessons in its system prompt")
        later = await _call(client, "create_trace", prompt='Use search_files to search for "altimeter".')
        await _wait(client, later["trace_id"], after=2)
        done = await _call(client, "get_trace", trace_id=later["trace_id"], view="full")
        earlier = len(first_view["trace"]["lessons"])
        _say(
            "   before — the first trace's system prompt"
            + (f" (this data directory had {earlier} lesson(s) already):" if earlier else ":")
        )
        _say(textwrap.indent(steps[0]["content"], "     │ ", lambda _: True))
        _say(f"   after — trace {later['trace_id']} recalled {len(done['trace']['lessons'])} lesson(s):")
        _say(textwrap.indent(done["messages"][0]["content"], "     │ ", lambda _: True))

    _say(f"\nDone. Trace id: {tid}")
    _say(f"Data (database, experiences.md, workspace) is in {data_dir}")
    command = [console_script(), "--data-dir", str(data_dir), "--workspace", str(data_dir / "workspace")]
    _say("Serve it to a host with: " + shlex.join([*command, "--model", "offline"]))
    return 0
