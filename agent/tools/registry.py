"""The tool registry: what the runner may offer a model, by name, with whitelists by tool or by group.

A tool is anything with a name, a description, a JSON schema and an async ``call``; built-in workspace
tools and other MCP servers' tools plug in the same way. Tools may come and go at runtime (an MCP server
restarts, its tool list changes), so lookups are always by name at call time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from agent.errors import UnknownToolError


@runtime_checkable
class Tool(Protocol):
    """One callable tool.

    ``group`` is the name a whitelist can use for a whole family (an MCP server's name), or None.
    ``call`` returns the text the model reads; it raises ``ToolCallError`` (or any exception) to report a
    failure, which the runner turns into a tool message. It must be cancellable at any await.
    """

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def input_schema(self) -> dict[str, Any]: ...
    @property
    def group(self) -> str | None: ...

    async def call(self, arguments: dict[str, Any]) -> str: ...


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        self.why_unavailable: Callable[[str], str | None] = lambda name: None
        """Why a configured MCP server of that name has no tools now (set by the servers' supervisor)."""
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        self._tools[tool.name] = tool

    def remove(self, name: str) -> None:
        self._tools.pop(name, None)

    def remove_group(self, group: str) -> None:
        for name in [n for n, t in self._tools.items() if t.group == group]:
            del self._tools[name]

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def groups(self) -> list[str]:
        return sorted({t.group for t in self._tools.values() if t.group})

    def check_whitelist(self, whitelist: list[str] | None, *, argument: str = "tools") -> None:
        """Refuse a whitelist entry that matches no tool and no group, listing what exists."""
        if whitelist is None:
            return
        known = set(self._tools) | set(self.groups()) | {"ask_host"}
        unknown = [w for w in whitelist if w not in known]
        for name in unknown:
            reason = self.why_unavailable(name)
            if reason is not None:
                raise UnknownToolError(
                    f"MCP server {name!r} in {argument} is unavailable: it failed ({reason}); agent_info "
                    "shows its state."
                )
        if unknown:
            available = ", ".join(self.names() + [f"{g} (server)" for g in self.groups()]) or "none"
            named = ", ".join(repr(name[:80]) for name in unknown[:5]) + (" …" if len(unknown) > 5 else "")
            raise UnknownToolError(
                f"Unknown tool or server name(s) {named} in {argument}; available: {available} "
                "(agent_info describes each)."
            )

    def select(self, whitelist: list[str] | None) -> list[Tool]:
        """The tools a trace may use now: all when whitelist is None, else those named or in a named group.

        Entries that match nothing at this moment are skipped here (a server may be restarting);
        ``check_whitelist`` is where unknown names are refused, when the trace is created.
        """
        if whitelist is None:
            return [self._tools[n] for n in sorted(self._tools)]
        wanted = set(whitelist)
        return [t for n, t in sorted(self._tools.items()) if n in wanted or (t.group and t.group in wanted)]


def openai_tool_schema(tool: Tool) -> dict[str, Any]:
    """A tool as an OpenAI function tool schema (the format providers receive)."""
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.input_schema},
    }
