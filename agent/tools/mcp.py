"""Other MCP servers' tools as agent tools: the tool wrapper and the connection supervisor.

Connections are opened once, when our server starts, and shared by every trace: starting a subprocess
per call would be slow and would lose server state. Each server gets a supervisor task that connects,
registers the tools as ``<server>__<tool>``, follows tool-list changes and reconnects with backoff, so
one broken server only takes its own tools away. Tools look the live connection up at call time, so a
trace that picked its tools before a reconnect still reaches the new connection.

Only a lost transport (the process exited, its stdout ended, the HTTP connection failed; the transports
report it) restarts a server. An error reply of any code, -32000 included, is a tool error the model
reads: restarting for it would lose the server's state and cut every other trace's calls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Self

import anyio
import httpx2
from mcp import Client, MCPError, types
from mcp.client.stdio import get_default_environment
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost
from pydantic import BaseModel, ConfigDict

from agent.defaults import TOOL_TIMEOUT_SECONDS
from agent.errors import ToolCallError
from agent.tools.mcp_config import HttpServerSpec, ServerSpec, StdioServerSpec, load_mcp_config
from agent.tools.mcp_format import normalize_input_schema, result_to_text, tool_name
from agent.tools.mcp_stdio import REPLY_PROBLEM, StderrTail, stdio_transport
from agent.tools.mcp_transport import LossWatchingTransport, describe_error
from agent.tools.registry import ToolRegistry

logger = logging.getLogger(__name__)

__all__ = [
    "HttpServerSpec",
    "McpServers",
    "McpTool",
    "ServerSpec",
    "ServerState",
    "StdioServerSpec",
    "load_mcp_config",
]

DEFAULT_CALL_TIMEOUT = TOOL_TIMEOUT_SECONDS
_MAX_PAGES = 100  # a paginator that never ends must not hang a refresh
_STDERR_TAIL = 4000  # characters of a child's stderr quoted in a log line
_MAX_ERROR_TEXT = 500  # characters of a server's error message a model reads


class ToolCaller(Protocol):
    """What an McpTool calls through: the supervisor of its server (a fake in unit tests)."""

    name: str

    async def call_tool(self, tool: str, arguments: dict[str, Any]) -> types.CallToolResult: ...


class McpTool:
    """One downstream MCP tool, offered to the model under a provider-safe name."""

    def __init__(
        self,
        server: ToolCaller,
        tool: types.Tool,
        *,
        name: str | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
    ):
        self._server = server
        self.tool_name = tool.name  # the original name: what tools/call must send
        self.name = name or tool_name(server.name, tool.name)
        self.group: str | None = server.name
        self.description = tool.description or f"Tool {tool.name} of MCP server {server.name}"
        self.input_schema = normalize_input_schema(tool.input_schema)
        self.timeout = timeout
        # The server's own claim (MCP annotations are hints): absent means it may change things.
        self.read_only = bool(tool.annotations and tool.annotations.read_only_hint)

    async def call(self, arguments: dict[str, Any]) -> str:
        """Call the tool over the shared connection; tool errors and timeouts become ToolCallError."""
        with anyio.move_on_after(self.timeout) as scope:
            result = await self._server.call_tool(self.tool_name, arguments)
        if scope.cancelled_caught:
            raise ToolCallError(f"Tool {self.name} timed out after {self.timeout:g} s.")
        text = result_to_text(result)
        if result.is_error:
            raise ToolCallError(text)
        return text


@dataclass(eq=False)
class _Connection:
    """One session with a server: ``lost`` ends it, ``changed`` asks for a tool-list re-read."""

    client: Client | None = None
    lost: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)
    reason: str = "it closed the connection"

    def fail(self, reason: str) -> None:
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()

    async def on_message(self, message: Any) -> None:
        """Handshake-era servers announce tool-list changes as notifications."""
        if isinstance(message, types.ToolListChangedNotification):
            self.changed.set()
        elif isinstance(message, Exception):
            logger.debug("MCP transport error: %s", describe_error(message))


class _StartFailure(Exception):
    """A connection attempt that never got to serving tools; the text is a sentence for status()."""


class ServerState(BaseModel):
    """One configured server as ``agent_info`` shows it: is it up, and if not, why."""

    model_config = ConfigDict(frozen=True)
    name: str
    state: Literal["up", "connecting", "failed"]
    reason: str | None = None  # a sentence without its period, when failed
    stderr_last_line: str | None = None  # of its process's stderr, this session's or the failed one's
    tools: list[str] = []  # the names registered for it now


def _elide(text: str, limit: int = _MAX_ERROR_TEXT) -> str:
    text = text.strip().rstrip(".")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Server:
    """Supervises one configured server: connect, register tools, follow changes, reconnect."""

    def __init__(self, name: str, spec: ServerSpec, registry: ToolRegistry, options: _Options):
        self.name = name
        self.spec = spec
        self._registry = registry
        self._opts = options
        self._conn: _Connection | None = None  # set only while connected and serving
        self._tools_seen: list[dict[str, Any]] | None = None
        self._tools: list[str] = []  # the names registered now
        self._stderr: StderrTail | None = None  # the current (or last) session's process
        self._failed_stderr: StderrTail | None = None  # the one of the session that failed last
        self._served, self._lost_reason = False, ""
        self.state: Literal["up", "connecting", "failed"] = "connecting"
        self.reason: str | None = None
        self.first_attempt_done = anyio.Event()

    @property
    def status(self) -> str:
        """ "connected" | "connecting" | "failed: <sentence>" (the older form of ``describe``)."""
        return {"up": "connected", "connecting": "connecting"}.get(self.state, f"failed: {self.reason}")

    def describe(self) -> ServerState:
        stderr = self._failed_stderr if self.state == "failed" else self._stderr  # retries start afresh
        last_line = stderr.last_line() if stderr is not None else None
        return ServerState(
            name=self.name,
            state=self.state,
            reason=self.reason,
            stderr_last_line=last_line,
            tools=self._tools,
        )

    async def call_tool(self, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
        """Send tools/call on the live connection; error replies and lost connections become ToolCallError."""
        conn = self._conn
        if conn is None or conn.client is None:
            raise ToolCallError(f"MCP server {self.name!r} is unavailable ({self.status}); try again later.")
        try:
            return await conn.client.call_tool(tool, arguments)
        except Exception as exc:
            if conn.lost.is_set():  # the transport said so before the session failed the call
                raise ToolCallError(
                    f"MCP server {self.name!r} is unavailable: it lost its connection during the call to "
                    f"{tool!r} ({conn.reason}); it is being restarted, try again later."
                ) from None
            if isinstance(exc, MCPError) and exc.data == REPLY_PROBLEM:
                raise ToolCallError(
                    f"MCP server {self.name!r} sent a reply to {tool!r} {exc.message}; the call may or may "
                    "not have taken effect."
                ) from None
            if isinstance(exc, MCPError):
                raise ToolCallError(
                    f"MCP server {self.name!r} answered the call to {tool!r} with an error: "
                    f"{_elide(exc.message) or f'code {exc.code}'}."
                ) from None
            raise ToolCallError(
                f"Calling {tool!r} on MCP server {self.name!r} failed: {describe_error(exc)}."
            ) from None

    async def supervise(self) -> None:
        """Keep the server connected until cancelled; never raises, so one server cannot stop the others."""
        delay = self._opts.backoff_initial
        failures = 0
        try:
            while True:
                started = anyio.current_time()
                self._served, self._lost_reason = False, ""
                try:
                    reason = await self._session()
                except Exception as exc:
                    reason = str(exc) if isinstance(exc, _StartFailure) else self._describe(exc)
                    if self._lost_reason:  # closing a lost session failed too: the loss is the news
                        logger.debug("MCP server %r: closing its session failed: %s", self.name, reason)
                        reason = self._lost_reason
                self._forget()
                if self._served:
                    failures = 0
                    if anyio.current_time() - started >= self._opts.backoff_max:
                        delay = self._opts.backoff_initial
                failures += 1
                self.state, self.reason, self._failed_stderr = "failed", reason, self._stderr
                self._log_failure(reason, failures)
                self.first_attempt_done.set()
                await anyio.sleep(delay)
                delay = min(delay * 2, self._opts.backoff_max)
        finally:
            self._forget()  # shutting down: the registry must not offer tools of a closed connection

    def _describe(self, exc: BaseException) -> str:
        return describe_error(exc, self.spec.command if isinstance(self.spec, StdioServerSpec) else None)

    def _log_failure(self, reason: str, failures: int) -> None:
        tail = self._stderr.text(_STDERR_TAIL) if self._stderr is not None else ""
        detail = f"\n--- stderr of MCP server {self.name} ---\n{tail}" if tail else ""
        if self._served:
            logger.warning("MCP server %r disconnected: %s; reconnecting.%s", self.name, reason, detail)
        elif failures == 1:
            logger.error(
                "MCP server %r failed to start: %s; its tools are unavailable.%s", self.name, reason, detail
            )
        else:  # keep retrying quietly: the first failure was logged in full
            logger.debug("MCP server %r still failing (attempt %d): %s", self.name, failures, reason)

    async def _session(self) -> str:
        """One session: connect within the startup timeout, register tools, serve until lost.

        Returns why a served session ended; raises when it never got that far. A start that runs out
        of time is reported failed at once, not after the bounded shutdown of its process.
        """
        deadline = anyio.current_time() + self._opts.startup_timeout
        outcome: str | Exception = ""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._flag_late_start, deadline)
            try:
                outcome = await self._attempt(deadline)
            except Exception as exc:  # kept out of the task group, which would wrap it in a group
                outcome = exc
            tg.cancel_scope.cancel()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _late_start(self) -> str:
        return f"it did not answer within {self._opts.startup_timeout:g} s"

    async def _flag_late_start(self, deadline: float) -> None:
        await anyio.sleep_until(deadline)
        if not self._served:
            self.state, self.reason, self._failed_stderr = "failed", self._late_start(), self._stderr
            self.first_attempt_done.set()

    async def _attempt(self, deadline: float) -> str:
        with anyio.CancelScope(deadline=deadline) as attempt:
            conn = _Connection()
            async with self._client(conn) as client:
                conn.client = client
                await self._refresh(conn)
                attempt.deadline = math.inf
                self._conn, self._served = conn, True
                self.state, self.reason = "up", None
                self.first_attempt_done.set()
                logger.info("MCP server %r connected (protocol %s).", self.name, client.protocol_version)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._follow_changes, conn)
                    tg.start_soon(self._poll, conn)
                    await conn.lost.wait()
                    self._lost_reason = conn.reason
                    self._forget()  # before the (possibly slow) close: no new calls to a dead server
                    tg.cancel_scope.cancel()
                return conn.reason
        raise _StartFailure(self._late_start())

    @asynccontextmanager
    async def _client(self, conn: _Connection) -> AsyncIterator[Client]:
        """A connected Client for the spec, over a transport that reports its own loss to ``conn``."""
        options: dict[str, Any] = {
            "mode": self._opts.protocol_mode,
            "cache": None,
            "message_handler": conn.on_message,
        }
        spec = self.spec
        self._stderr = None
        if isinstance(spec, StdioServerSpec):
            self._stderr = StderrTail()
            transport = stdio_transport(
                spec.command,
                spec.args,
                env=get_default_environment() | spec.env,
                cwd=spec.cwd,
                stderr=self._stderr,
                lost=conn.fail,
            )
            async with Client(transport, **options) as client:
                yield client
        else:
            timeout = httpx2.Timeout(30.0, read=300.0)  # the SDK's defaults: long reads for SSE streams
            async with (
                httpx2.AsyncClient(
                    headers=spec.headers, timeout=timeout, transport=LossWatchingTransport(conn.fail)
                ) as http,
                Client(streamable_http_client(spec.url, http_client=http), **options) as client,
            ):
                yield client

    async def _follow_changes(self, conn: _Connection) -> None:
        """Re-read the tool list whenever asked; an error reply keeps the tools we have, silence ends it."""
        refused = False
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._listen, conn)
            while True:
                await conn.changed.wait()
                conn.changed = anyio.Event()
                try:
                    with anyio.fail_after(self._opts.call_timeout):
                        await self._refresh(conn)
                    refused = False
                except MCPError as exc:
                    if conn.lost.is_set():
                        continue  # the supervisor is already closing this session
                    level = logging.DEBUG if refused else logging.WARNING  # once until it works again
                    logger.log(
                        level,
                        "MCP server %r: re-reading its tools failed: %s; keeping the ones it had.",
                        self.name,
                        self._describe(exc),
                    )
                    refused = True
                except Exception as exc:  # no answer within the call timeout: a wedged server
                    conn.fail(f"re-reading its tools failed: {self._describe(exc)}")

    async def _listen(self, conn: _Connection) -> None:
        """2026-era servers announce tool-list changes on a subscriptions/listen stream."""
        assert conn.client is not None
        while not conn.lost.is_set():
            try:
                async with conn.client.listen(tools_list_changed=True) as sub:
                    if not sub.honored.tools_list_changed:
                        return  # the server will not tell us; the periodic re-read covers it
                    conn.changed.set()  # no replay: re-read once for changes made before the stream opened
                    async for _event in sub:
                        conn.changed.set()
            except ListenNotSupportedError:
                return  # handshake era: notifications arrive through on_message
            except MCPError as exc:  # a lost transport is reported by the transport itself
                if not conn.lost.is_set():
                    logger.debug("MCP server %r refused subscriptions/listen: %s", self.name, exc.message)
                return
            except (SubscriptionLost, TimeoutError):
                pass
            conn.changed.set()  # the stream ended: re-read, which also checks the server is still there
            await anyio.sleep(self._opts.backoff_initial)

    async def _poll(self, conn: _Connection) -> None:
        """Re-read the tools now and then: catches missed changes and notices a silently wedged server."""
        while True:
            await anyio.sleep(self._opts.refresh_interval)
            conn.changed.set()

    async def _refresh(self, conn: _Connection) -> None:
        """List every page of tools and swap them into the registry in one step (no await in between)."""
        assert conn.client is not None
        listed: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            page = await conn.client.list_tools(cursor=cursor, cache_mode="bypass")
            listed.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        seen = [t.model_dump(mode="json", include={"name", "description", "input_schema"}) for t in listed]
        if seen == self._tools_seen or conn.lost.is_set():
            return
        timeout = self.spec.timeout or self._opts.call_timeout
        tools: dict[str, McpTool] = {}
        for item in listed:
            tool = McpTool(self, item, timeout=timeout)
            if tool.name in tools:  # two names that differ only in characters we replaced
                tool.name = tool_name(self.name, item.name, force_hash=True)
            other = self._registry.get(tool.name)
            if other is not None and other.group != self.name:
                logger.warning(
                    "MCP tool %r of server %r skipped: the name %r is taken.", item.name, self.name, tool.name
                )
                continue
            tools[tool.name] = tool
        self._registry.remove_group(self.name)
        for tool in tools.values():
            self._registry.add(tool)
        self._tools_seen, self._tools = seen, list(tools)
        logger.info("MCP server %r offers %d tools.", self.name, len(tools))

    def _forget(self) -> None:
        """Take the server's tools away: calls in the meantime get a clear 'unavailable'."""
        self._conn = None
        self._tools_seen, self._tools = None, []
        self._registry.remove_group(self.name)


@dataclass(frozen=True)
class _Options:
    call_timeout: float
    startup_timeout: float
    backoff_initial: float
    backoff_max: float
    refresh_interval: float
    protocol_mode: str


class McpServers:
    """All configured servers, connected for the lifetime of an ``async with`` block.

    Entering starts one supervisor per server and returns once each has connected or failed once
    (at most ``startup_timeout`` later), so the tools are registered before we serve. Exiting closes
    every connection and stops every subprocess.
    """

    def __init__(
        self,
        specs: Mapping[str, ServerSpec],
        registry: ToolRegistry,
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        startup_timeout: float = 20.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        refresh_interval: float = 60.0,
        protocol_mode: Literal["auto", "legacy"] | str = "auto",
    ):
        options = _Options(
            call_timeout, startup_timeout, backoff_initial, backoff_max, refresh_interval, protocol_mode
        )
        self._servers = {name: _Server(name, spec, registry, options) for name, spec in specs.items()}
        self._startup_timeout = startup_timeout
        registry.why_unavailable = self._why_unavailable
        self._stack: AsyncExitStack | None = None

    def status(self) -> dict[str, str]:
        """Server name → "connected" | "connecting" | "failed: <sentence>"."""
        return {name: server.status for name, server in self._servers.items()}

    def _why_unavailable(self, name: str) -> str | None:
        """Why the configured server ``name`` offers no tools now, when it failed; None otherwise."""
        server = self._servers.get(name)
        return server.reason if server is not None and server.state == "failed" else None

    def describe(self) -> list[ServerState]:
        """Every configured server in config order: up, connecting, or failed with why (for ``agent_info``)."""
        return [server.describe() for server in self._servers.values()]

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)  # runs first on exit: stop the supervisors
            for server in self._servers.values():
                tg.start_soon(server.supervise, name=f"mcp-server-{server.name}")
            with anyio.move_on_after(self._startup_timeout + 1):
                for server in self._servers.values():
                    await server.first_attempt_done.wait()
            for name, status in self.status().items():
                if status == "connecting":
                    logger.warning(
                        "MCP server %r is still starting; its tools will appear when it is ready.", name
                    )
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the supervisors (closing their connections); the caller's own exception passes unwrapped."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
