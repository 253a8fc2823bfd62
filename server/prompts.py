"""Prompts a host can offer its user: ready-made plans for delegating to background agents."""

from __future__ import annotations

import json
import secrets
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from agent import defaults
from server.arguments import is_trace_id
from server.views import elide, suggested_wait


def register_prompts(mcp: MCPServer, max_wait: float = defaults.MAX_WAIT_SECONDS) -> None:
    """The prompts; the waits they suggest stay within the server's --max-wait."""
    wait = suggested_wait(max_wait)

    @mcp.prompt(title="Delegate a task")
    def delegate(task: Annotated[str, Field(description="What the background agent should do")]) -> str:
        """Hand one task to a background agent and report its answer."""
        return (
            f"Delegate this task to a background agent with the agent-trace tools:\n\n{task}\n\n"
            "1. Call agent_info once if you need to know which tools the agent has.\n"
            "2. Call create_trace with the task as prompt.\n"
            f"3. Call get_trace(trace_id, wait_seconds={wait}) until trace.outcome is no longer 'running'. "
            "If the outcome is 'needs_input', answer its question with run_trace(trace_id, answer=...) "
            "(or approve=true/false for a tool approval) and keep waiting.\n"
            "4. Report the answer (or the error) in a few sentences."
        )

    @mcp.prompt(title="Fan out and collect")
    def fan_out(
        tasks: Annotated[str, Field(description="The tasks, one per line")],
        tag: Annotated[
            str | None, Field(description="A tag to group these traces by (none: a new one for this batch)")
        ] = None,
    ) -> str:
        """Run several tasks as parallel background agents and collect every answer."""
        lines = [t.strip() for t in tasks.splitlines() if t.strip()]
        if not lines:
            raise ValueError("fan_out needs at least one task in tasks, one per line.")
        listing = "\n".join(f"- {t}" for t in lines)
        quoted = json.dumps(tag or f"fan-out-{secrets.token_hex(4)}")  # a fixed one would collect old batches
        return (
            f"Run each of these tasks as its own background agent, in parallel:\n{listing}\n\n"
            f"1. Call create_trace once per task, each with tags=[{quoted}].\n"
            f"2. Call await_traces(tag={quoted}, mode='all', wait_seconds={wait}) until running is empty; "
            "each finished row carries its answer.\n"
            "3. Summarise the answers task by task."
        )

    @mcp.prompt(title="Review a trace")
    def review_trace(trace_id: Annotated[str, Field(description="The trace to review")]) -> str:
        """Review what a background agent did and record the lessons."""
        if not is_trace_id(trace_id):
            raise ValueError(f"trace_id must be a trace id (32 hex characters); got {elide(trace_id)}.")
        return (
            f"Review trace {trace_id}.\n"
            f"1. Call get_trace(trace_id='{trace_id}', view='messages') and read the steps (long tool results "
            "are cut; read trace://<id>/messages/<sequence> for one whole).\n"
            "2. Say what went well, what went wrong and what the agent should do differently.\n"
            f"3. Call reflect_trace(trace_id='{trace_id}') so later traces recall the lessons."
        )
