"""The Tasks extension (``io.modelcontextprotocol/tasks``, SEP-2663) for 2026-07-28 clients that declare it.

``create_trace`` answers with a task handle whose id is the trace id, ``run_trace`` with a new task
``<trace_id>.run.<hex>`` (an answer or approval goes on with the task it answers), kept in the store's run
handles, so a task survives a restart; ``tasks/get`` reads the trace (``working``, ``input_required`` with
an elicitation for the agent's question or tool approval, ``completed`` with the compact summary,
``cancelled`` once stopped); a task a later run supersedes keeps the view it ended with, so a terminal
task stays terminal; ``tasks/update`` answers or approves and the run goes on; ``tasks/cancel`` stops it
as ``stop_trace`` does. ``reflect_trace`` runs in the background as task ``<trace_id>.reflection.<n>``
(``n``: the sequence of its stored question), read back from the store after a restart.
``subscriptions/listen`` streams that name ``taskIds`` get ``notifications/tasks``: the SDK's listen handler
cannot carry them (its bus knows four event kinds and its ack drops ``taskIds``), so such streams are
served here, standard events included. Everyone else gets today's behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

import anyio
import mcp.types as types
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Extension, MethodBinding, require_client_extension
from mcp.server.subscriptions import SUBSCRIPTION_ID_META_KEY, ServerEvent, SubscriptionBus
from mcp.shared.inbound import MCP_NAME_HEADER, decode_header_value
from mcp.shared.subscriptions import event_matches, event_to_notification
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ConfigDict, model_serializer

from agent import RunConfig, TraceError, defaults
from agent.engine import Engine
from agent.errors import TraceRunning
from agent.experiences import lessons_from_reflection
from agent.reflection.prompt import reflection_prompt
from agent.trace.events import MessageStored, TraceChanged
from agent.trace.models import Message, Status, utc_now
from server.arguments import is_trace_id
from server.state import state_of
from server.task_views import (
    TERMINAL,
    Reply,
    detailed_task,
    pending_requests,
    reflection_status,
    reply_to,
    superseded,
    task_fields,
    task_handle,
    task_status,
)
from server.tools import Reflected, compact
from server.views import TAIL_MESSAGES, elide

log = logging.getLogger(__name__)

TASKS = "io.modelcontextprotocol/tasks"
TASK_TOOLS = frozenset({"create_trace", "run_trace", "reflect_trace"})
MODERN = frozenset(MODERN_PROTOCOL_VERSIONS)
REFLECTION = ".reflection."
RUN = ".run."
AS_PAUSED = "#as-paused"
"""Suffix of the handle that keeps a paused task as a client that cannot elicit was shown it: ended."""
MAX_TASK_ID_CHARS = 120
MAX_LISTENED_TASKS = 100
MAX_TASK_STREAMS = 256
STREAM_BUFFER = 256
KEPT_REFLECTIONS = 500
"""Finished background reflections remembered in memory; older ones are read back from the store."""
REFLECTION_TEXT_CHARS = 4000
REFLECTION_GRACE_SECONDS = defaults.LLM_TIMEOUT_SECONDS * (defaults.LLM_RETRIES + 1) + 60
"""A stored reflection question with no answer younger than this may still be answered by another process."""


class TaskIdParams(types.RequestParams):
    """Checked by ``task_id_of``, not the SDK, whose refusal names nothing ("Invalid request parameters")."""

    task_id: Any = None


class UpdateTaskParams(TaskIdParams):
    input_responses: Any = None


def task_id_of(method: str, params: TaskIdParams) -> str:
    if not isinstance(params.task_id, str) or not params.task_id:
        raise MCPError(
            code=types.INVALID_PARAMS,
            message=f"{method} needs params.taskId: the task id string the tool call answered with.",
        )
    return params.task_id


def responses_of(params: UpdateTaskParams) -> Mapping[str, Any]:
    if not isinstance(params.input_responses, Mapping):
        raise MCPError(
            code=types.INVALID_PARAMS,
            message="tasks/update needs params.inputResponses: an object mapping each key of the task's "
            "inputRequests to its elicitation result.",
        )
    return params.input_responses


class _WireParams(types.NotificationParams):
    """Notification params sent exactly as given: a Task's ``ttlMs`` is required even when null."""

    model_config = ConfigDict(extra="allow")

    @model_serializer(mode="plain")
    def _as_given(self) -> dict[str, Any]:
        wire = dict(self.__pydantic_extra__ or {})
        if self.meta is not None:
            wire["_meta"] = self.meta
        return wire


class TaskStatusNotification(types.Notification[_WireParams, Literal["notifications/tasks"]]):
    method: Literal["notifications/tasks"] = "notifications/tasks"
    params: _WireParams


def not_found(task_id: str) -> MCPError:
    return MCPError(
        code=types.INVALID_PARAMS,
        message=f"Failed to retrieve task: there is no task {elide(task_id, 40)} on this server.",
    )


@dataclass(eq=False)
class _Reflection:
    """A reflection running (or run) in this process as a task."""

    trace_id: str
    created_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    sequence: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancelled: bool = False
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def task_id(self) -> str:
        return f"{self.trace_id}{REFLECTION}{self.sequence}"


@dataclass(eq=False)
class _Listener:
    """One listen stream's task ids and where their notifications go (deduplicated, never blocking)."""

    task_ids: frozenset[str]
    send: MemoryObjectSendStream[ServerEvent | dict[str, Any]]
    elicits: bool = True
    last: dict[str, dict[str, Any]] = field(default_factory=dict)

    def offer(self, task: dict[str, Any], *, initial: bool = False) -> None:
        if self.last.get(task["taskId"]) == task or (initial and task["taskId"] in self.last):
            return
        self.last[task["taskId"]] = task
        try:
            self.send.send_nowait(task)
        except anyio.WouldBlock:
            log.warning("a task listen stream is %d notifications behind; ending it", STREAM_BUFFER)
            self.send.close()
        except anyio.ClosedResourceError:
            pass


class _Runtime:
    """The extension's state for one engine: background reflections, listen streams, the event pump."""

    def __init__(self, engine: Engine, group: TaskGroup):
        self.engine = engine
        self.group = group
        days = engine.settings.retain_days
        self.retain_ms = None if days is None else int(days * 86_400_000)
        self.reflections: dict[str, _Reflection] = {}
        self.listeners: set[_Listener] = set()

    # -- reading tasks -----------------------------------------------------------------------------

    async def detailed(self, task_id: str, elicits: bool = True) -> dict[str, Any]:
        """The task as ``tasks/get`` answers it; MCPError -32602 when there is no such task. For a client
        that cannot elicit (``elicits`` false), a question ends the task (see ``detailed_task``)."""
        if len(task_id) > MAX_TASK_ID_CHARS or AS_PAUSED in task_id:
            raise not_found(task_id)
        trace_id, _, sequence = task_id.partition(REFLECTION)
        if sequence:
            return await self._reflection_task(task_id, trace_id, sequence)
        trace_id = trace_of(task_id)
        handle = await self.engine.handle(task_id)
        paused = None if elicits else await self.engine.handle(task_id + AS_PAUSED)
        if paused is not None and paused.final is not None:
            return paused.final  # to this client it ended at its first pause, whatever came after
        if handle is not None and handle.final is not None:
            return handle.final  # superseded by a later run: as it ended
        if handle is None and task_id != trace_id:
            raise not_found(task_id)
        try:
            trace = await self.engine.get(trace_id)
        except TraceError:
            raise not_found(task_id) from None
        tail = await self.engine.tail(trace_id, TAIL_MESSAGES)
        status = task_status(trace)
        ended = status in TERMINAL or (status == "input_required" and not elicits)
        last_text = await self.engine.last_text(trace_id, tail) if ended else None  # polls stay cheap
        run = handle if handle is not None and task_id != trace_id else None  # a run's own task
        task = detailed_task(
            trace,
            tail,
            last_text,
            self.retain_ms,
            elicits=elicits,
            task_id=task_id if run else None,
            created_at=run.created_at if run else None,
        )
        if not elicits and trace.status is Status.NEEDS_INPUT:
            await self._keep_as_seen(task_id, trace_id, task)
        return task

    async def _keep_as_seen(self, task_id: str, trace_id: str, task: dict[str, Any]) -> None:
        """A client that cannot elicit is shown a paused task as ended (``completed``, with the question):
        keep that view, so it stays ended however the pause ends (SEP-2663: terminal states are final)."""
        try:
            await self.engine.add_handle(task_id + AS_PAUSED, trace_id, held=True)  # held: never "open"
            await self.engine.end_handle(task_id + AS_PAUSED, task)  # the first view kept wins
        except TraceError:
            pass  # deleted meanwhile

    async def current_task(self, trace_id: str) -> str | None:
        """The trace's task that has not ended: the newest run handle, else the trace's own id (the task
        of create_trace) unless a later run superseded it."""
        handle = await self.engine.open_handle(trace_id)
        if handle is not None:
            return handle.handle_id
        own = await self.engine.handle(trace_id)
        return trace_id if own is None or own.final is None else None

    async def _reflection_task(self, task_id: str, trace_id: str, sequence: str) -> dict[str, Any]:
        record = self.reflections.get(task_id)
        if record is not None:
            return self._reflection_wire(record)
        if not sequence.isdigit():
            raise not_found(task_id)
        ended = await self.engine.handle(task_id)
        if ended is not None and ended.final is not None:
            return ended.final  # as it ended (a cancel or an error result leaves nothing in the tree)
        cut_off = ended is not None and self.engine.holder_gone(ended)  # its process ended mid-way
        try:
            question = await self.engine.message(trace_id, int(sequence))
        except TraceError:
            raise not_found(task_id) from None
        if question is None or not question.side or question.role != "user":
            raise not_found(task_id)
        answer = await self._answer_to(trace_id, question.sequence)
        if answer is None and not cut_off and _age_seconds(question.created_at) < REFLECTION_GRACE_SECONDS:
            task = task_fields(task_id, "working", question.created_at, question.created_at, self.retain_ms)
            return task | {"statusMessage": "reflecting", "pollIntervalMs": 2000}
        updated = answer.created_at if answer is not None else question.created_at
        task = task_fields(task_id, "completed", question.created_at, updated, self.retain_ms)
        if answer is None:
            text = "The reflection did not finish (its process ended or the model failed); call reflect_trace again."
            result = _tool_error(text)
        else:
            reflection = answer.content or ""
            lessons = lessons_from_reflection(reflection)
            result = _wire_result(
                compact(Reflected(trace_id=trace_id, reflection=_clip(reflection), lessons=lessons))
            )
        return task | {"statusMessage": reflection_status(result), "result": result}

    async def _answer_to(self, trace_id: str, sequence: int) -> Message | None:
        """The stored reflection answering the side question at ``sequence``, if there is one."""
        return next(
            (
                m
                for m in await self.engine.tree(trace_id)
                if m.parent_sequence == sequence and m.side and m.role == "assistant"
            ),
            None,
        )

    def _reflection_wire(self, record: _Reflection) -> dict[str, Any]:
        if not record.done.is_set():
            task = task_fields(
                record.task_id, "working", record.created_at, record.updated_at, self.retain_ms
            )
            return task | {"statusMessage": "reflecting", "pollIntervalMs": 2000}
        return self._ended_wire(record)

    def _ended_wire(self, record: _Reflection) -> dict[str, Any]:
        if record.cancelled:
            task = task_fields(
                record.task_id, "cancelled", record.created_at, record.updated_at, self.retain_ms
            )
            return task | {"statusMessage": "Cancelled; the lessons were not recorded."}
        if record.error is not None:
            task = task_fields(record.task_id, "failed", record.created_at, record.updated_at, self.retain_ms)
            return task | {"statusMessage": record.error["message"], "error": record.error}
        result = record.result or {"content": []}
        task = task_fields(record.task_id, "completed", record.created_at, record.updated_at, self.retain_ms)
        return task | {"statusMessage": reflection_status(result), "result": result}

    # -- tools/call as a task ----------------------------------------------------------------------

    async def trace_handle(
        self, tool: str, arguments: Mapping[str, Any], result: HandlerResult, elicits: bool = True
    ) -> HandlerResult:
        """create_trace / run_trace have stored and started the trace: answer with its task handle (the
        trace id for create_trace; the task it answers for an answer or approval from a client that can
        elicit; else a new one: the task a non-eliciting client saw complete stays complete)."""
        if not started(result):
            return result  # a refusal stays the plain tool error it always was
        assert isinstance(result, types.CallToolResult)
        trace_id = (result.structured_content or {}).get("trace_id")
        if not isinstance(trace_id, str):
            return result
        task_id = trace_id if tool == "create_trace" else None
        if tool == "run_trace" and answers(arguments) and elicits:
            task_id = await self.current_task(trace_id)
        if task_id is None:
            task_id = f"{trace_id}{RUN}{secrets.token_hex(4)}"
            await self.engine.add_handle(task_id, trace_id)
        return task_handle(await self.detailed(task_id, elicits))

    async def new_run(
        self,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
        arguments: Mapping[str, Any],
        elicits: bool = True,
    ) -> HandlerResult:
        """Any client's run_trace that is not an answer starts a new run: the task the trace had ends
        with the view it has now (a paused or racing one reads ``cancelled``; to a client that cannot
        elicit, a paused one read ``completed`` already, and an answer from it is a new run too)."""
        trace_id = arguments.get("trace_id")
        if (answers(arguments) and elicits) or not isinstance(trace_id, str):
            return await call_next(ctx)
        current = await self.current_task(trace_id) if is_trace_id(trace_id) else None
        before: dict[str, Any] | None = None
        if current is not None:
            with contextlib.suppress(MCPError):
                before = await self.detailed(current, elicits)
        result = await call_next(ctx)
        if current is not None and before is not None and started(result):
            final = before if before["status"] in TERMINAL else superseded(before)
            try:
                await self.engine.add_handle(current, trace_id)
                await self.engine.end_handle(current, final)
            except Exception:  # the run has started: the host must hear so, whatever the bookkeeping
                log.exception("could not record that task %s ended", current)
        return result

    async def reflect(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext, arguments: Mapping[str, Any]
    ) -> HandlerResult:
        """Run reflect_trace in the background; answer with its task handle once its question is stored.

        A reflection refused (or finished) before it stored anything answers as the plain tool would."""
        trace_id = arguments.get("trace_id")
        focus = arguments.get("focus")
        if not isinstance(trace_id, str) or not (focus is None or isinstance(focus, str)):
            return await call_next(ctx)  # the tool says what is wrong with the arguments
        prompt = reflection_prompt(focus)
        record = _Reflection(trace_id)
        async with self.engine.subscribe() as events, anyio.create_task_group() as waiting:

            async def question_stored() -> None:
                async for event in events:
                    if not isinstance(event, MessageStored) or event.trace_id != trace_id:
                        continue
                    message = event.message
                    taken = any(  # a concurrent reflection on this trace with the same focus took it
                        r.trace_id == trace_id and r.sequence == message.sequence
                        for r in self.reflections.values()
                    )
                    if message.side and message.role == "user" and message.content == prompt and not taken:
                        record.sequence = message.sequence
                        record.created_at = record.updated_at = message.created_at  # as read back later
                        self._remember(record)  # before anything can announce it
                        waiting.cancel_scope.cancel()

            async def ended() -> None:
                await record.done.wait()
                waiting.cancel_scope.cancel()

            waiting.start_soon(question_stored)
            waiting.start_soon(ended)
            self.group.start_soon(self._run_reflection, record, ctx, call_next)
        if record.sequence is None:
            await record.done.wait()
            if record.error is not None:
                raise MCPError(code=record.error["code"], message=record.error["message"])
            return types.CallToolResult.model_validate(record.result)
        try:  # held by this process: if it ends before the reflection does, a reader knows at once
            await self.engine.add_handle(record.task_id, trace_id, held=True)
        except Exception:
            log.exception("could not record reflection task %s", record.task_id)
        return task_handle(self._reflection_wire(record))

    async def _run_reflection(
        self, record: _Reflection, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> None:
        with record.scope:
            try:
                record.result = _wire_result(await call_next(ctx))
            except MCPError as exc:
                record.error = exc.error.model_dump(by_alias=True, mode="json", exclude_none=True)
            except Exception:
                log.exception("a background reflection on trace %s failed", record.trace_id)
                record.error = {
                    "code": types.INTERNAL_ERROR,
                    "message": "The reflection failed with an internal error; the server log has the details.",
                }
        record.cancelled = record.scope.cancelled_caught
        record.updated_at = utc_now()
        if record.sequence is not None and record.result is not None and not record.cancelled:
            with contextlib.suppress(TraceError):  # the time a restarted server reads back (gone if deleted)
                answer = await self._answer_to(record.trace_id, record.sequence)
                record.updated_at = answer.created_at if answer is not None else record.updated_at
        if record.sequence is not None:
            try:  # so a restarted server reads it as it ended (an error result leaves no answer in the tree)
                await self.engine.add_handle(record.task_id, record.trace_id)
                await self.engine.end_handle(record.task_id, self._ended_wire(record))
            except Exception:
                log.exception("could not record how reflection task %s ended", record.task_id)
        record.done.set()
        if record.sequence is not None:
            await self.announce(record.task_id)

    def _remember(self, record: _Reflection) -> None:
        self.reflections[record.task_id] = record
        finished = [k for k, r in self.reflections.items() if r.done.is_set()]
        for key in finished[: max(0, len(finished) - KEPT_REFLECTIONS)]:
            del self.reflections[key]

    # -- tasks/update and tasks/cancel -------------------------------------------------------------

    async def update(self, task_id: str, responses: Mapping[str, Any]) -> None:
        """Apply the answers to outstanding requests; others are ignored, as SEP-2663 asks."""
        task = await self.detailed(task_id)  # -32602 for an unknown task
        if REFLECTION in task_id or task["status"] != "input_required":
            return
        trace_id = trace_of(task_id)
        trace = await self.engine.get(trace_id)
        outstanding = {
            r.key: r for r in pending_requests(trace, await self.engine.tail(trace_id, TAIL_MESSAGES))
        }
        replies: dict[str, tuple[str, Reply]] = {}
        for key, response in responses.items():
            request = outstanding.get(key)
            if request is None:
                continue  # answered already, or never asked
            reply = reply_to(request, response)
            if reply is None:
                raise MCPError(
                    code=types.INVALID_PARAMS,
                    message=f"inputResponses[{elide(key, 40)}] is not an elicitation result: send "
                    '{"action": "accept", "content": {…}}, or "decline" or "cancel".',
                )
            replies[request.kind] = (key, reply)
        approval, question = replies.get("approval"), replies.get("question")
        first = approval or question
        if first is None:
            return
        await self._resume(trace_id, first[1])
        if approval is not None and question is not None:  # the run pauses again for the question
            self.group.start_soon(self._answer_when_paused, trace_id, *question)

    async def _resume(self, trace_id: str, reply: Reply) -> bool:
        try:
            await self.engine.continue_(trace_id, [], RunConfig(answer=reply.answer, approve=reply.approve))
        except TraceRunning:
            return False  # someone else answered first: this response is no longer outstanding
        except TraceError as exc:
            raise MCPError(code=types.INVALID_PARAMS, message=str(exc)) from None
        return True

    async def _answer_when_paused(self, trace_id: str, key: str, reply: Reply) -> None:
        try:
            trace = await self.engine.wait(trace_id, math.inf)
            tail = await self.engine.tail(trace_id, TAIL_MESSAGES)
            if any(r.key == key for r in pending_requests(trace, tail)):
                await self._resume(trace_id, reply)
        except Exception:
            log.exception("could not deliver a deferred answer to trace %s", trace_id)

    async def cancel(self, task_id: str, elicits: bool = True) -> None:
        task = await self.detailed(task_id, elicits)
        if task["status"] in TERMINAL:
            return
        record = self.reflections.get(task_id)
        if record is not None:
            record.scope.cancel()
        elif REFLECTION not in task_id:
            await self.engine.stop(trace_of(task_id))

    # -- notifications/tasks -----------------------------------------------------------------------

    async def pump(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Engine events -> ``notifications/tasks`` for the listen streams naming that trace's tasks."""
        async with self.engine.subscribe() as events:
            task_status.started()
            async for event in events:
                if not self.listeners:
                    continue
                if isinstance(event, TraceChanged) or (
                    isinstance(event, MessageStored) and not event.message.side
                ):
                    await self.announce(*self._listened(event.trace_id))

    def _listened(self, trace_id: str) -> set[str]:
        return {
            task_id
            for listener in self.listeners
            for task_id in listener.task_ids
            if trace_of(task_id) == trace_id and REFLECTION not in task_id
        }

    async def announce(self, *task_ids: str) -> None:
        for task_id in task_ids:
            listening = [listener for listener in self.listeners if task_id in listener.task_ids]
            for elicits in {listener.elicits for listener in listening}:
                try:
                    task = await self.detailed(task_id, elicits)
                except MCPError:
                    break  # deleted meanwhile
                except Exception:
                    log.exception("could not read task %s for its listeners", task_id)
                    break
                for listener in listening:
                    if listener.elicits == elicits:
                        listener.offer(task)


def client_elicits(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether the request's client declared elicitation: only then may a task ask it through
    ``inputRequests`` (the Inspector declares none, and would wait on an input_required task forever)."""
    capabilities = ctx.session.client_capabilities
    return bool(capabilities and capabilities.elicitation is not None)


class TasksExtension(Extension):
    """SEP-2663 over the trace engine; ``serve(engine)`` runs beside each engine in the lifespan."""

    identifier = TASKS

    def __init__(self, bus: SubscriptionBus):
        self._bus = bus
        self._runtimes: dict[Engine, _Runtime] = {}

    def methods(self) -> list[MethodBinding]:
        versions = frozenset(MODERN)
        return [
            MethodBinding("tasks/get", TaskIdParams, self._get, protocol_versions=versions),
            MethodBinding("tasks/update", UpdateTaskParams, self._update, protocol_versions=versions),
            MethodBinding("tasks/cancel", TaskIdParams, self._cancel, protocol_versions=versions),
        ]

    async def serve(self, engine: Engine, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Hold the runtime for ``engine`` until cancelled (the lifespan's task group cancels it)."""
        async with anyio.create_task_group() as group:
            runtime = _Runtime(engine, group)
            self._runtimes[engine] = runtime
            try:
                await group.start(runtime.pump)
                task_status.started()
                await anyio.sleep_forever()
            finally:
                self._runtimes.pop(engine, None)

    def _runtime(self, ctx: ServerRequestContext[Any, Any]) -> _Runtime:
        state = state_of(ctx.lifespan_context)
        runtime = self._runtimes.get(state.engine) if state is not None else None
        if runtime is None:
            raise MCPError(code=types.INTERNAL_ERROR, message="Tasks are not available yet; try again.")
        return runtime

    @staticmethod
    def offered(ctx: ServerRequestContext[Any, Any]) -> bool:
        """A task may answer only a 2026-07-28 request whose own capabilities declare the extension."""
        if ctx.protocol_version not in MODERN:
            return False  # the Inspector declares it on legacy connections too
        capabilities = ctx.session.client_capabilities
        return bool(capabilities and capabilities.extensions and TASKS in capabilities.extensions)

    async def intercept_tool_call(
        self, params: types.CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        arguments = params.arguments or {}
        if params.name == "run_trace" and not self.offered(ctx):  # any client's new run ends the task
            state = state_of(ctx.lifespan_context)
            runtime = self._runtimes.get(state.engine) if state is not None else None
            return await (runtime.new_run(ctx, call_next, arguments) if runtime else call_next(ctx))
        if params.name not in TASK_TOOLS or not self.offered(ctx):
            return await call_next(ctx)
        runtime = self._runtime(ctx)
        if params.name == "reflect_trace":
            return await runtime.reflect(ctx, call_next, params.arguments or {})
        elicits = client_elicits(ctx)
        if params.name == "run_trace":
            started_run = await runtime.new_run(ctx, call_next, arguments, elicits)
            return await runtime.trace_handle(params.name, arguments, started_run, elicits)
        return await runtime.trace_handle(params.name, arguments, await call_next(ctx), elicits)

    # -- tasks/* -----------------------------------------------------------------------------------

    def _check(self, ctx: ServerRequestContext[Any, Any], task_id: str) -> _Runtime:
        require_client_extension(ctx, TASKS)
        headers = getattr(ctx.request, "headers", None)
        named = headers.get(MCP_NAME_HEADER) if headers is not None else None
        if named is not None and decode_header_value(named) != task_id:  # fastmcp-tasks sends none
            raise MCPError(
                code=types.HEADER_MISMATCH, message="The Mcp-Name header must be the request's taskId."
            )
        return self._runtime(ctx)

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        task_id = task_id_of("tasks/get", params)
        return await self._check(ctx, task_id).detailed(task_id, client_elicits(ctx))

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> dict[str, Any]:
        task_id = task_id_of("tasks/update", params)
        await self._check(ctx, task_id).update(task_id, responses_of(params))
        return {}

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        task_id = task_id_of("tasks/cancel", params)
        await self._check(ctx, task_id).cancel(task_id, client_elicits(ctx))
        return {}

    # -- subscriptions/listen with taskIds ---------------------------------------------------------

    async def listen_middleware(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """Serve ``subscriptions/listen`` streams that name ``taskIds``; the SDK serves all the others."""
        notifications = (ctx.params or {}).get("notifications")
        if (
            ctx.method != "subscriptions/listen"
            or ctx.protocol_version not in MODERN
            or not isinstance(notifications, Mapping)
            or "taskIds" not in notifications
        ):
            return await call_next(ctx)
        require_client_extension(ctx, TASKS)
        requested = notifications["taskIds"]
        if not isinstance(requested, list) or not all(isinstance(t, str) for t in requested):
            raise MCPError(
                code=types.INVALID_PARAMS, message="notifications.taskIds must be a list of task ids."
            )
        if len(requested) > MAX_LISTENED_TASKS:
            raise MCPError(
                code=types.INVALID_PARAMS,
                message=f"One stream may follow at most {MAX_LISTENED_TASKS} tasks.",
            )
        try:
            wanted = types.SubscriptionFilter.model_validate(notifications)
        except ValueError:
            raise MCPError(
                code=types.INVALID_PARAMS, message="notifications is not a subscription filter."
            ) from None
        runtime = self._runtime(ctx)
        if len(runtime.listeners) >= MAX_TASK_STREAMS:
            raise MCPError(code=types.INTERNAL_ERROR, message="Subscription limit reached")
        return await self._stream(ctx, runtime, wanted, list(dict.fromkeys(requested)))

    async def _stream(
        self,
        ctx: ServerRequestContext[Any, Any],
        runtime: _Runtime,
        wanted: types.SubscriptionFilter,
        requested: list[str],
    ) -> dict[str, Any]:
        subscription_id = ctx.request_id
        if subscription_id is None:
            raise MCPError(code=types.INVALID_REQUEST, message="subscriptions/listen requires a request id")
        meta = {SUBSCRIPTION_ID_META_KEY: subscription_id}
        standard = types.SubscriptionFilter(
            tools_list_changed=True if wanted.tools_list_changed else None,
            prompts_list_changed=True if wanted.prompts_list_changed else None,
            resources_list_changed=True if wanted.resources_list_changed else None,
            resource_subscriptions=list(wanted.resource_subscriptions)
            if wanted.resource_subscriptions
            else None,
        )
        uris = frozenset(standard.resource_subscriptions or ())
        send, receive = anyio.create_memory_object_stream[ServerEvent | dict[str, Any]](STREAM_BUFFER)
        listener = _Listener(frozenset(requested), send, elicits=client_elicits(ctx))

        def deliver(event: ServerEvent) -> None:
            if event_matches(standard, uris, event):
                try:
                    send.send_nowait(event)
                except anyio.WouldBlock:
                    send.close()  # a client that stopped reading: end its stream, it re-listens
                except anyio.ClosedResourceError:
                    pass

        # listening before the snapshots are read, so no change between the two is missed
        unsubscribe = self._bus.subscribe(deliver)
        runtime.listeners.add(listener)
        try:
            snapshots: dict[str, dict[str, Any]] = {}
            for task_id in requested:  # honoured: the ids that are tasks
                with contextlib.suppress(MCPError):
                    snapshots[task_id] = await runtime.detailed(task_id, listener.elicits)
            honored = standard.model_copy(update={"taskIds": list(snapshots)})
            await ctx.session.send_notification(
                types.SubscriptionsAcknowledgedNotification(
                    params=types.SubscriptionsAcknowledgedNotificationParams(
                        notifications=honored, _meta=meta
                    )
                ),
                related_request_id=subscription_id,
            )
            for task in snapshots.values():  # where each task stands now (unless a change already said)
                listener.offer(task, initial=True)
            async for item in receive:
                if isinstance(item, dict):
                    # the session only serialises what it sends, so an extension's notification type is fine
                    note = cast(
                        types.ServerNotification,
                        TaskStatusNotification(params=_WireParams(**item, _meta=meta)),
                    )
                else:
                    note = event_to_notification(item, meta)
                await ctx.session.send_notification(note, related_request_id=subscription_id)
        finally:
            unsubscribe()
            runtime.listeners.discard(listener)
            send.close()
            receive.close()
        return {"_meta": meta}


def trace_of(task_id: str) -> str:
    """The trace a task id names (``<trace_id>``, ``<trace_id>.run.<hex>``, ``<trace_id>.reflection.<n>``)."""
    return task_id.partition(".")[0]


def answers(arguments: Mapping[str, Any]) -> bool:
    """A run_trace that answers a question or an approval: it goes on with the paused task."""
    return arguments.get("answer") is not None or arguments.get("approve") is not None


def started(result: HandlerResult) -> bool:
    return isinstance(result, types.CallToolResult) and not result.is_error


def _wire_result(result: HandlerResult) -> dict[str, Any]:
    if isinstance(result, dict):
        return result
    if result is None:
        return {"content": []}
    wire = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    wire.pop("resultType", None)
    return wire


def _tool_error(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": True}


def _clip(text: str) -> str:
    return text if len(text) <= REFLECTION_TEXT_CHARS else text[:REFLECTION_TEXT_CHARS] + "… [cut]"


def _age_seconds(timestamp: str) -> float:
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(timestamp)).total_seconds()
    except ValueError:
        return math.inf


__all__ = ["TASKS", "TaskStatusNotification", "TasksExtension"]
