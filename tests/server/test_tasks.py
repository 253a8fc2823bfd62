"""The Tasks extension (SEP-2663) through real clients: a Python ``Client`` with a small tasks
``ClientExtension`` (in-process and over HTTP), the Inspector CLI in the modern era, legacy and undeclared
clients that must see no change, and task ids polled after the server restarted."""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import anyio
import httpx2
import mcp.types as types
import pytest
from mcp import Client, MCPError
from mcp.client.extension import ClaimContext, ClientExtension, NotificationBinding, ResultClaim
from pydantic import ConfigDict

from agent.errors import ModelCallError
from server.app import build_server
from server.task_views import detailed_task
from tests.fake_openai import completion
from tests.fake_openai import tool_call as fake_tool_call
from tests.fakes import ScriptedModel, models_for, reply, slow_reflection, turn_script
from tests.fakes import call as tool_call
from tests.npm_tools import inspector
from tests.processes import HttpServer, relay_params, run_cli, server_pids, stop_shared_servers
from tests.server.helpers import call, wait_done

pytestmark = pytest.mark.anyio

TASKS = "io.modelcontextprotocol/tasks"
TERMINAL = {"completed", "failed", "cancelled"}


# -- a small tasks client: the claim that polls, and the three methods ----------------------------------


class TaskHandle(types.Result):
    result_type: Literal["task"] = "task"
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None


class TaskIdParams(types.RequestParams):
    task_id: str


class UpdateParams(TaskIdParams):
    input_responses: dict[str, Any]


class GetTask(types.Request[TaskIdParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    params: TaskIdParams
    name_param = "taskId"


class UpdateTask(types.Request[UpdateParams, Literal["tasks/update"]]):
    method: Literal["tasks/update"] = "tasks/update"
    params: UpdateParams
    name_param = "taskId"


class CancelTask(types.Request[TaskIdParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    params: TaskIdParams
    name_param = "taskId"


class Wire(types.Result):
    """Any result, kept as its wire fields."""

    model_config = ConfigDict(extra="allow")


class TaskNote(types.NotificationParams):
    model_config = ConfigDict(extra="allow")


class Tasks(ClientExtension):
    """Declares the extension, resolves task handles by polling, and collects ``notifications/tasks``."""

    identifier = TASKS

    def __init__(self) -> None:
        self.notes: list[dict[str, Any]] = []
        self.heard = anyio.Event()

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=TaskHandle, resolve=self.resolve)]

    def notifications(self) -> list[NotificationBinding[Any]]:
        return [NotificationBinding(method="notifications/tasks", params_type=TaskNote, handler=self.hear)]

    async def resolve(self, handle: TaskHandle, ctx: ClaimContext) -> types.CallToolResult:
        with anyio.fail_after(30):
            while True:
                task = await get_task(ctx.session, handle.task_id)
                if task["status"] == "completed":
                    return types.CallToolResult.model_validate(task["result"])
                assert task["status"] in ("working", "input_required"), task
                await anyio.sleep(task.get("pollIntervalMs", 1000) / 1000 / 20)  # tests poll faster

    async def hear(self, params: TaskNote) -> None:
        self.notes.append(params.model_dump(by_alias=True))
        self.heard.set()


async def never_asked(context: Any, params: Any) -> types.ElicitResult:
    """Declares elicitation: a task's questions reach a client through inputRequests only if it can elicit
    (the answers travel back in tasks/update, not through this callback)."""
    raise AssertionError("the server sent an elicitation request of its own")


def tasks_client(target: Any, **options: Any) -> Client:
    """A client that speaks Tasks and declares elicitation (so questions reach it as inputRequests)."""
    return Client(target, extensions=[Tasks()], elicitation_callback=never_asked, **options)


async def get_task(session: Any, task_id: str) -> dict[str, Any]:
    got = await session.send_request(GetTask(params=TaskIdParams(task_id=task_id)), Wire)
    return got.model_dump(by_alias=True)


async def update_task(session: Any, task_id: str, responses: dict[str, Any]) -> dict[str, Any]:
    params = UpdateParams(task_id=task_id, input_responses=responses)
    return (await session.send_request(UpdateTask(params=params), Wire)).model_dump(by_alias=True)


async def cancel_task(session: Any, task_id: str) -> dict[str, Any]:
    got = await session.send_request(CancelTask(params=TaskIdParams(task_id=task_id)), Wire)
    return got.model_dump(by_alias=True)


async def start_task(client: Client, tool: str, **arguments: Any) -> TaskHandle:
    handle = await client.session.call_tool(tool, arguments, allow_claimed=True)
    assert isinstance(handle, TaskHandle), handle
    return handle


async def poll_until(client: Client, task_id: str, *statuses: str) -> dict[str, Any]:
    with anyio.fail_after(30):
        while (task := await get_task(client.session, task_id))["status"] not in statuses:
            assert task["status"] not in TERMINAL, task
            await anyio.sleep(0.02)
    return task


ASKS = turn_script(
    reply(None, tool_call("ask_host", "q1", question="Which file should I read?")),
    reply("I read notes.txt, as you said."),
)


ASKS_OVER_HTTP = [
    ("json", completion(None, [fake_tool_call("ask_host", "q1", question="Which file?")])),
    ("json", completion("I read notes.txt as you said.")),
]


# -- in-process, 2026-07-28 --------------------------------------------------------------------------


async def test_a_declaring_modern_client_gets_a_task_and_the_final_summary(server, model):
    model.delay = 0.3  # the handle comes back at once, while the run still works
    async with tasks_client(server) as client:
        handle = await start_task(client, "create_trace", prompt="What does the README say?")
        assert len(handle.task_id) == 32 and handle.status == "working" and handle.poll_interval_ms
        final = await client.call_tool("create_trace", {"prompt": "What does the README say?"})
        assert not final.is_error
        body = final.structured_content
        assert body["answer"] == "The README says the answer is 42."
        assert body["trace"]["outcome"] == "answered" and body["trace_id"] == body["trace"]["trace_id"]
        text = final.content[0]
        assert isinstance(text, types.TextContent) and json.loads(text.text) == body
        done = await poll_until(client, handle.task_id, "completed")
        assert done["resultType"] == "complete" and done["ttlMs"] is None
        assert done["result"]["structuredContent"]["answer"] == "The README says the answer is 42."


async def test_legacy_and_undeclared_clients_see_todays_answers(server):
    async with tasks_client(server, mode="legacy") as legacy:
        started = await call(legacy, "create_trace", prompt="hello")
        assert started["status"] == "started"
        with pytest.raises(MCPError) as refused:
            await get_task(legacy.session, started["trace_id"])
        assert refused.value.error.code == types.METHOD_NOT_FOUND
    async with Client(server) as plain:
        assert plain.protocol_version == "2026-07-28"
        started = await call(plain, "create_trace", prompt="hello")
        assert started["status"] == "started" and "get_trace" in started["message"]
        with pytest.raises(MCPError) as refused:
            await get_task(plain.session, started["trace_id"])
        assert refused.value.error.code == types.MISSING_REQUIRED_CLIENT_CAPABILITY
        assert TASKS in (plain.server_capabilities.extensions or {})


async def test_a_question_is_an_elicitation_answered_with_tasks_update(server, model):
    model.steps = [ASKS]
    async with tasks_client(server) as client:
        handle = await start_task(client, "create_trace", prompt="Summarise a file")
        waiting = await poll_until(client, handle.task_id, "input_required")
        ((key, request),) = waiting["inputRequests"].items()
        assert request["method"] == "elicitation/create"
        assert request["params"]["message"] == "Which file should I read?"
        assert request["params"]["requestedSchema"]["required"] == ["answer"]
        assert "Which file" in waiting["statusMessage"]
        again = await get_task(client.session, handle.task_id)
        assert list(again["inputRequests"]) == [key]  # the same request under the same key until answered

        ignored = await update_task(client.session, handle.task_id, {"no-such-key": {"action": "accept"}})
        assert ignored["resultType"] == "complete"
        assert (await get_task(client.session, handle.task_id))["status"] == "input_required"

        answer = {"action": "accept", "content": {"answer": "notes.txt"}}
        await update_task(client.session, handle.task_id, {key: answer})
        done = await poll_until(client, handle.task_id, "completed")
        assert done["result"]["structuredContent"]["answer"] == "I read notes.txt, as you said."
        assert model.calls[-1]["messages"][-1] == {
            "role": "tool",
            "content": "notes.txt",
            "tool_call_id": "q1",
        }


async def test_a_client_that_cannot_elicit_gets_the_question_as_the_tasks_result(server, model):
    """The Inspector declares Tasks but not elicitation: inputRequests would be a request it never said it
    could answer (it waited forever). Its task ends with the summary, question and run_trace included."""
    model.steps = [ASKS]
    async with Client(server, extensions=[Tasks()]) as client:
        handle = await start_task(client, "create_trace", prompt="Summarise a file")
        done = await poll_until(client, handle.task_id, "completed")
        assert "inputRequests" not in done
        body = done["result"]["structuredContent"]
        assert body["question"] == "Which file should I read?" and body["trace"]["outcome"] == "needs_input"
        assert "run_trace" in body["next"] and not done["result"]["isError"]
        answered = await start_task(client, "run_trace", trace_id=handle.task_id, answer="notes.txt")
        assert answered.task_id != handle.task_id  # a new task: the one it saw complete stays complete
        assert (await get_task(client.session, handle.task_id)) == done
        finished = await poll_until(client, answered.task_id, "completed")
        assert finished["result"]["structuredContent"]["answer"] == "I read notes.txt, as you said."
        await cancel_task(client.session, handle.task_id)  # terminal: nothing to cancel
        assert (await get_task(client.session, handle.task_id)) == done
        final = await client.call_tool("create_trace", {"prompt": "Summarise another file"})
        assert final.structured_content["question"] == "Which file should I read?"


async def test_a_task_that_ended_for_a_client_that_cannot_elicit_stays_ended_when_another_answers(
    server, model
):
    """SEP-2663: a terminal state is final. The Inspector read the paused task ``completed``; an eliciting
    client answering it (tasks/update, or run_trace(answer)) goes on with it, but not in the Inspector's eyes."""
    model.steps = [ASKS]
    async with Client(server, extensions=[Tasks()]) as inspector, tasks_client(server) as eliciting:
        handle = await start_task(inspector, "create_trace", prompt="Summarise a file")
        seen = await poll_until(inspector, handle.task_id, "completed")
        waiting = await poll_until(eliciting, handle.task_id, "input_required")
        (key,) = waiting["inputRequests"]
        await update_task(
            eliciting.session, handle.task_id, {key: {"action": "accept", "content": {"answer": "x"}}}
        )
        done = await poll_until(eliciting, handle.task_id, "completed")
        assert done["result"]["structuredContent"]["answer"] == "I read notes.txt, as you said."
        assert await get_task(inspector.session, handle.task_id) == seen


@pytest.mark.parametrize("how", ["stop_trace", "tasks/cancel", "run_trace"])
async def test_a_paused_task_a_client_that_cannot_elicit_saw_end_stays_ended_when_it_is_stopped_or_run(
    server, model, how
):
    model.steps = [ASKS]
    async with Client(server, extensions=[Tasks()]) as inspector, tasks_client(server) as eliciting:
        handle = await start_task(inspector, "create_trace", prompt="Summarise a file")
        seen = await poll_until(inspector, handle.task_id, "completed")
        await poll_until(eliciting, handle.task_id, "input_required")
        async with Client(server, mode="legacy") as plain:
            if how == "stop_trace":
                assert (await call(plain, "stop_trace", trace_ids=handle.task_id))["stopping"] == [
                    handle.task_id
                ]
            elif how == "tasks/cancel":
                await cancel_task(eliciting.session, handle.task_id)
            else:
                more = [{"role": "user", "content": "never mind, read README.md"}]
                await call(plain, "run_trace", trace_id=handle.task_id, messages=more)
            await wait_done(plain, handle.task_id)
        assert (await get_task(eliciting.session, handle.task_id))["status"] == "cancelled"
        assert await get_task(inspector.session, handle.task_id) == seen


async def test_a_client_that_cannot_elicit_and_looks_late_sees_the_question_pending_now(server, model):
    """Only a view a client was shown is kept: one that first looks at the second pause sees the second
    question, not the first, which another client answered before it looked."""
    model.steps = [
        turn_script(
            reply(None, tool_call("ask_host", "q1", question="Which file?")),
            reply(None, tool_call("ask_host", "q2", question="Which line?")),
            reply("Line 3 of notes.txt."),
        )
    ]
    async with Client(server, extensions=[Tasks()]) as inspector, tasks_client(server) as eliciting:
        handle = await start_task(eliciting, "create_trace", prompt="Find a line")
        (key,) = (await poll_until(eliciting, handle.task_id, "input_required"))["inputRequests"]
        await update_task(
            eliciting.session, handle.task_id, {key: {"action": "accept", "content": {"answer": "x"}}}
        )
        with anyio.fail_after(10):
            while "Which line?" not in (await get_task(eliciting.session, handle.task_id)).get(
                "statusMessage", ""
            ):
                await anyio.sleep(0.02)
        seen = await get_task(inspector.session, handle.task_id)
        assert seen["status"] == "completed"
        assert seen["result"]["structuredContent"]["question"] == "Which line?"


async def test_malformed_tasks_params_are_refused_with_a_sentence(server, model):
    model.steps = [ASKS]
    async with tasks_client(server) as client:
        handle = await start_task(client, "create_trace", prompt="Summarise a file")
        (key,) = (await poll_until(client, handle.task_id, "input_required"))["inputRequests"]
        for method, params, named in [
            ("tasks/get", {}, "params.taskId"),
            ("tasks/cancel", {"taskId": 5}, "params.taskId"),
            ("tasks/update", {"taskId": handle.task_id}, "params.inputResponses"),
            ("tasks/update", {"taskId": handle.task_id, "inputResponses": {key: "notes.txt"}}, key),
        ]:
            with pytest.raises(MCPError) as refused:
                await client.session.send_request(Loose(method=method, params=LooseParams(**params)), Wire)
            assert refused.value.error.code == types.INVALID_PARAMS and named in refused.value.error.message
        assert (await get_task(client.session, handle.task_id))["status"] == "input_required"


class LooseParams(types.RequestParams):
    model_config = ConfigDict(extra="allow")


class Loose(types.Request[LooseParams, str]):
    """Any tasks/* request with any params, as a careless client sends it."""

    method: str
    params: LooseParams


async def test_a_tool_approval_approved_then_declined(server, model):
    model.steps = [
        turn_script(reply(None, tool_call("read_file", "r1", path="README.md")), reply("Done reading."))
    ]
    async with tasks_client(server) as client:
        handle = await start_task(client, "create_trace", prompt="read it", confirm_tools=["read_file"])
        waiting = await poll_until(client, handle.task_id, "input_required")
        ((key, request),) = waiting["inputRequests"].items()
        assert key.startswith("approval-") and "read_file" in request["params"]["message"]
        await update_task(
            client.session, handle.task_id, {key: {"action": "accept", "content": {"approve": True}}}
        )
        done = await poll_until(client, handle.task_id, "completed")
        assert done["result"]["structuredContent"]["answer"] == "Done reading."
        assert "The answer is 42." in model.calls[-1]["messages"][-1]["content"]

        again = await start_task(
            client, "run_trace", trace_id=handle.task_id, messages=[{"role": "user", "content": "once more"}]
        )
        assert again.task_id.startswith(handle.task_id + ".run.")  # a new run is a new task
        assert again.last_updated_at >= again.created_at
        assert await get_task(client.session, handle.task_id) == done  # the first stays as it ended
        waiting = await poll_until(client, again.task_id, "input_required")
        (key2,) = waiting["inputRequests"]
        assert key2 != key  # keys are never reused over a trace's life
        await update_task(client.session, again.task_id, {key2: {"action": "decline"}})
        second = await poll_until(client, again.task_id, "completed")
        assert model.calls[-1]["messages"][-1]["content"] == "declined: declined by the host"
        assert second["taskId"] == again.task_id and second["createdAt"] >= done["createdAt"]

        more = [{"role": "user", "content": "and again"}]
        third = await start_task(client, "run_trace", trace_id=handle.task_id, messages=more)
        paused = await poll_until(client, third.task_id, "input_required")
        answered = await start_task(client, "run_trace", trace_id=handle.task_id, approve=True)
        assert answered.task_id == third.task_id  # an approval goes on with the task it answers
        await poll_until(client, third.task_id, "completed")
        assert (await get_task(client.session, again.task_id)) == second
        assert paused["status"] == "input_required"

        fourth = await start_task(client, "run_trace", trace_id=handle.task_id, messages=more)
        await poll_until(client, fourth.task_id, "input_required")
        async with Client(server) as plain:  # a client that does not speak Tasks rewinds the trace
            await call(plain, "run_trace", trace_id=handle.task_id, insert_after=2, messages=[])
        superseded = await get_task(client.session, fourth.task_id)
        assert superseded["status"] == "cancelled" and "Superseded" in superseded["statusMessage"]
        assert "inputRequests" not in superseded
        await update_task(client.session, fourth.task_id, {"approval-1": {"action": "accept"}})  # ignored
        assert await get_task(client.session, fourth.task_id) == superseded
        with pytest.raises(MCPError) as unknown:
            await get_task(client.session, handle.task_id + ".run.00000000")
        assert unknown.value.error.code == types.INVALID_PARAMS


async def test_tasks_cancel_stops_the_trace(server):
    async with tasks_client(server) as client:
        handle = await start_task(client, "create_trace", prompt="take your time", model="slow")
        assert (await cancel_task(client.session, handle.task_id))["resultType"] == "complete"
        cancelled = await poll_until(client, handle.task_id, "cancelled")
        assert "result" not in cancelled and "inputRequests" not in cancelled
        trace = await call(client, "get_trace", trace_id=handle.task_id)
        assert trace["trace"]["status"] == "stopped"
        await cancel_task(client.session, handle.task_id)  # cancelling a finished task is acknowledged
        with pytest.raises(MCPError) as unknown:
            await cancel_task(client.session, "0" * 32)
        assert unknown.value.error.code == types.INVALID_PARAMS


async def test_unknown_tasks_and_refused_calls(server):
    async with tasks_client(server) as client:
        for task_id in ("0" * 32, "x" * 5000, f"{'0' * 32}.reflection.7"):
            with pytest.raises(MCPError) as unknown:
                await get_task(client.session, task_id)
            assert unknown.value.error.code == types.INVALID_PARAMS
            assert (
                "Failed to retrieve task" in unknown.value.error.message
                and "x" * 100 not in unknown.value.error.message
            )
        refused = await client.session.call_tool("create_trace", {}, allow_claimed=True)
        assert isinstance(refused, types.CallToolResult) and refused.is_error  # no task for a refusal


async def test_a_reflection_runs_as_a_task_and_reads_back_after_a_restart(settings, model, slow_model):
    models = models_for(scripted=model, slow=slow_model)
    async with tasks_client(build_server(settings, models=models)) as client:
        tid = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
        await poll_until(client, tid, "completed")
        handle = await start_task(client, "reflect_trace", trace_id=tid)
        assert handle.task_id.startswith(f"{tid}.reflection.")
        done = await poll_until(client, handle.task_id, "completed")
        lessons = done["result"]["structuredContent"]["lessons"]
        assert lessons and "read_file" in lessons[0]
        refused = await client.session.call_tool("reflect_trace", {"trace_id": "f" * 32}, allow_claimed=True)
        assert isinstance(refused, types.CallToolResult) and refused.is_error
    async with tasks_client(build_server(settings, models=models)) as client:
        again = await get_task(client.session, handle.task_id)
        assert again["status"] == "completed" and again["result"]["structuredContent"]["lessons"] == lessons


async def reflecting_for_an_hour(client: Client) -> tuple[str, TaskHandle]:
    """A finished trace and a reflection task on it that will not end by itself."""
    tid = (await call(client, "create_trace", prompt="x"))["trace_id"]
    await poll_until(client, tid, "completed")
    return tid, await start_task(client, "reflect_trace", trace_id=tid)


async def test_a_cancelled_reflection_reads_cancelled_after_a_restart(settings):
    models = models_for(scripted=ScriptedModel([slow_reflection("answer", "- A lesson.", 3600)]))
    async with tasks_client(build_server(settings, models=models)) as client:
        _, handle = await reflecting_for_an_hour(client)
        await cancel_task(client.session, handle.task_id)
        cancelled = await poll_until(client, handle.task_id, "cancelled")
    async with tasks_client(build_server(settings, models=models)) as client:
        assert await get_task(client.session, handle.task_id) == cancelled  # not "working" for minutes


async def test_a_reflection_cut_off_by_its_server_ending_reads_ended_at_once_after_a_restart(settings):
    """Its process is gone, so nobody can finish it: not 'working' for the minutes another might need."""
    models = models_for(scripted=ScriptedModel([slow_reflection("answer", "- A lesson.", 3600)]))
    async with tasks_client(build_server(settings, models=models)) as client:
        tid, handle = await reflecting_for_an_hour(client)
        assert (await get_task(client.session, handle.task_id))["status"] == "working"
    async with tasks_client(build_server(settings, models=models)) as client:
        cut = await get_task(client.session, handle.task_id)
        assert cut["status"] == "completed" and cut["result"]["isError"] is True
        assert "did not finish" in cut["statusMessage"]
        assert (await get_task(client.session, tid))["status"] == "completed"  # the trace's own task


async def test_a_failed_reflection_says_so_and_stays_ended_after_a_restart(settings):
    failing = ScriptedModel([reply("answer"), ModelCallError("the provider is down")])
    models = models_for(scripted=failing)
    async with tasks_client(build_server(settings, models=models)) as client:
        tid = (await call(client, "create_trace", prompt="x"))["trace_id"]
        await poll_until(client, tid, "completed")
        handle = await start_task(client, "reflect_trace", trace_id=tid)
        failed = await poll_until(client, handle.task_id, "completed")
        assert failed["result"]["isError"] is True
        assert failed["statusMessage"].startswith("Failed: The reflection on trace") and (
            "the provider is down" in failed["statusMessage"]
        )
    async with tasks_client(build_server(settings, models=models)) as client:
        assert await get_task(client.session, handle.task_id) == failed  # not "working" for minutes


async def test_two_reflections_at_once_are_two_tasks(settings):
    """Same trace, same focus, same moment: each task names its own side question."""
    models = models_for(scripted=ScriptedModel([slow_reflection("answer", "- A lesson.", 0.3)]))
    async with tasks_client(build_server(settings, models=models)) as client:
        tid = (await call(client, "create_trace", prompt="x"))["trace_id"]
        await poll_until(client, tid, "completed")
        handles: list[TaskHandle] = []

        async def reflect() -> None:
            handles.append(await start_task(client, "reflect_trace", trace_id=tid))

        async with anyio.create_task_group() as group:
            group.start_soon(reflect)
            group.start_soon(reflect)
        assert len({h.task_id for h in handles}) == 2
        for handle in handles:
            assert (await poll_until(client, handle.task_id, "completed"))["result"]["structuredContent"][
                "lessons"
            ]


USER_AGAIN = {"role": "user", "content": "Summarise another"}


async def test_a_task_outlives_its_server(settings, model, slow_model):
    """Task ids are stored with the trace: a new server on the same data dir reads the same task, paused
    question included, and takes its answer; a later run's task, and the one it superseded, read the same
    after another restart; a run cut by a restart reads as an interrupted (error) result."""
    model.steps = [ASKS]
    models = models_for(scripted=model, slow=slow_model)
    async with tasks_client(build_server(settings, models=models)) as client:
        asking = await start_task(client, "create_trace", prompt="Summarise a file")
        before = await poll_until(client, asking.task_id, "input_required")
        slow = await start_task(client, "create_trace", prompt="slowly", model="slow")
    async with tasks_client(build_server(settings, models=models)) as client:
        after = await get_task(client.session, asking.task_id)
        assert after["inputRequests"] == before["inputRequests"] and after["createdAt"] == before["createdAt"]
        (key,) = after["inputRequests"]
        await update_task(
            client.session, asking.task_id, {key: {"action": "accept", "content": {"answer": "a"}}}
        )
        answered = await poll_until(client, asking.task_id, "completed")
        assert answered["result"]["isError"] is False
        again = await start_task(client, "run_trace", trace_id=asking.task_id, messages=[USER_AGAIN])
        ran = await poll_until(client, again.task_id, "input_required")
    async with tasks_client(build_server(settings, models=models)) as client:
        assert await get_task(client.session, asking.task_id) == answered  # ended, and stays so
        assert (await get_task(client.session, again.task_id))["inputRequests"] == ran["inputRequests"]
        cut = await get_task(client.session, slow.task_id)
        assert cut["status"] == "completed" and cut["result"]["isError"] is True
        assert cut["result"]["structuredContent"]["trace"]["outcome"] == "interrupted"


async def test_listen_streams_naming_task_ids_get_notifications_tasks(server, model):
    tasks = Tasks()
    acks: list[types.SubscriptionsAcknowledgedNotification] = []

    async def handler(message: Any) -> None:
        if isinstance(message, types.SubscriptionsAcknowledgedNotification):
            acks.append(message)

    async with Client(
        server, extensions=[tasks], message_handler=handler, elicitation_callback=never_asked
    ) as client:
        model.steps = [ASKS]
        handle = await start_task(client, "create_trace", prompt="Summarise a file")
        listen = types.SubscriptionsListenRequest(
            params=types.SubscriptionsListenRequestParams(
                notifications=types.SubscriptionFilter(taskIds=[handle.task_id, "0" * 32])
            )
        )
        async with anyio.create_task_group() as group:
            group.start_soon(client.session.send_request, listen, types.SubscriptionsListenResult)
            with anyio.fail_after(10):
                while not any(n["status"] == "input_required" for n in tasks.notes):
                    await tasks.heard.wait()
                    tasks.heard = anyio.Event()
            assert acks and acks[0].params.notifications.model_dump(by_alias=True)["taskIds"] == [
                handle.task_id
            ]
            key = next(n for n in tasks.notes if n["status"] == "input_required")["inputRequests"]
            await update_task(
                client.session,
                handle.task_id,
                {k: {"action": "accept", "content": {"answer": "x"}} for k in key},
            )
            with anyio.fail_after(10):
                while not any(n["status"] == "completed" for n in tasks.notes):
                    await tasks.heard.wait()
                    tasks.heard = anyio.Event()
            group.cancel_scope.cancel()
        final = next(n for n in tasks.notes if n["status"] == "completed")
        assert final["taskId"] == handle.task_id and final["ttlMs"] is None
        assert final["result"]["structuredContent"]["answer"] == "I read notes.txt, as you said."
    async with Client(server) as undeclared:
        with pytest.raises(MCPError) as refused:
            await undeclared.session.send_request(listen, types.SubscriptionsListenResult)
        assert refused.value.error.code == types.MISSING_REQUIRED_CLIENT_CAPABILITY


def test_the_wire_shapes_follow_sep_2663(settings):
    from agent.trace.models import Status, Trace

    running = Trace(trace_id="a" * 32, model="m")
    task = detailed_task(running, [], None, None)
    assert task == {
        "taskId": "a" * 32,
        "status": "working",
        "createdAt": running.created_at,
        "lastUpdatedAt": running.updated_at,
        "ttlMs": None,
        "statusMessage": "started",
        "pollIntervalMs": 1000,
    }
    failed = running.model_copy(update={"status": Status.FAILED, "error": "The provider said no."})
    result = detailed_task(failed, [], None, 86_400_000)
    assert (
        result["status"] == "completed" and result["result"]["isError"] is True
    )  # failed is for JSON-RPC errors
    assert result["ttlMs"] == 86_400_000 and "The provider said no." in result["statusMessage"]
    lived = failed.model_copy(update={"updated_at": "2026-01-01T00:00:10+00:00"})
    lived.created_at = "2026-01-01T00:00:00+00:00"
    assert (
        detailed_task(lived, [], None, 86_400_000)["ttlMs"] == 86_410_000
    )  # from creation, as SEP-2663 counts
    paused = lived.model_copy(update={"status": Status.NEEDS_INPUT})
    assert detailed_task(paused, [], None, 86_400_000, elicits=False)["ttlMs"] is None  # kept while it waits
    later = detailed_task(
        running, [], None, None, task_id="a" * 32 + ".run.1", created_at="2999-01-01T00:00:00+00:00"
    )
    assert later["lastUpdatedAt"] == later["createdAt"] == "2999-01-01T00:00:00+00:00"


# -- real transports ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_inspector_cli_creates_a_trace_as_a_task_and_prints_its_answer(tmp_path, workspace):
    cli = inspector()
    if cli is None:
        pytest.skip("no MCP Inspector CLI and no npm to install it: set AGENT_TRACE_INSPECTOR to its binary")
    server = HttpServer(tmp_path, workspace)
    env = {
        **os.environ,
        "MCP_CATALOG_PATH": str(tmp_path / "inspector.json"),
        "MCP_CLIENT_CONFIG_PATH": str(tmp_path / "inspector-client.json"),
    }
    try:
        outputs = {}
        for era in ("modern", "legacy"):
            argv = [cli, "--cli", "--server-url", server.url, "--transport", "http", "--protocol-era", era]
            argv += ["--method", "tools/call", "--tool-name", "create_trace", "--format", "json", "-q"]
            argv += ["--tool-arg", "prompt=Use read_file to read README.md and tell me what it says"]
            done = await anyio.run_process(argv, env=env, check=False)
            assert done.returncode == 0, done.stderr.decode()[-2000:]
            outputs[era] = json.loads(done.stdout)["result"]["structuredContent"]
    finally:
        server.close()
    assert outputs["modern"]["trace"]["outcome"] == "answered"
    assert "The answer is 42." in outputs["modern"]["answer"]
    assert outputs["legacy"]["status"] == "started"  # the legacy era never sees a task


@pytest.mark.slow
async def test_over_http_a_paused_task_survives_a_server_restart(tmp_path, workspace, fake_openai):
    fake_openai.script = list(ASKS_OVER_HTTP)  # the fake pops what it plays
    env = fake_openai.env
    args = ("--model", "openai:gpt-test")
    first = HttpServer(tmp_path, workspace, *args, env=env)
    try:
        async with tasks_client(first.url) as client:
            handle = await start_task(client, "create_trace", prompt="Summarise a file")
            waiting = await poll_until(client, handle.task_id, "input_required")
            await assert_mcp_name_is_required(first.url, handle.task_id)
    finally:
        first.close()
    second = HttpServer(tmp_path, workspace, *args, env=env)
    try:
        async with tasks_client(second.url) as client:
            assert (await get_task(client.session, handle.task_id))["inputRequests"] == waiting[
                "inputRequests"
            ]
            (key,) = waiting["inputRequests"]
            answer = {"action": "accept", "content": {"answer": "notes.txt"}}
            await update_task(client.session, handle.task_id, {key: answer})
            done = await poll_until(client, handle.task_id, "completed")
    finally:
        second.close()
    assert done["result"]["structuredContent"]["answer"] == "I read notes.txt as you said."
    assert fake_openai.requests[-1]["body"]["messages"][-1]["content"] == "notes.txt"


@pytest.mark.slow
async def test_through_the_relay_a_paused_task_survives_a_restart_of_the_shared_server(
    tmp_path, workspace, fake_openai
):
    fake_openai.script = list(ASKS_OVER_HTTP)  # the fake pops what it plays
    env = fake_openai.env
    host = relay_params(tmp_path, workspace, "--model", "openai:gpt-test", **env)
    try:
        async with tasks_client(host) as client:
            assert client.protocol_version == "2026-07-28"
            handle = await start_task(client, "create_trace", prompt="Summarise a file")
            waiting = await poll_until(client, handle.task_id, "input_required")
        stopped = run_cli(tmp_path, "stop-server")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        async with tasks_client(host) as client:  # a new shared server on the same data dir
            assert (await get_task(client.session, handle.task_id))["inputRequests"] == waiting[
                "inputRequests"
            ]
            (key,) = waiting["inputRequests"]
            answer = {"action": "accept", "content": {"answer": "notes.txt"}}
            await update_task(client.session, handle.task_id, {key: answer})
            done = await poll_until(client, handle.task_id, "completed")
        assert done["result"]["structuredContent"]["answer"] == "I read notes.txt as you said."
        assert len(server_pids(tmp_path / "data")) == 2  # it really was another server
    finally:
        stop_shared_servers(tmp_path)


async def assert_mcp_name_is_required(url: str, task_id: str) -> None:
    """A tasks/* POST whose Mcp-Name is not its taskId is refused (SEP-2663 routing header); one that sends
    none is served."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {TASKS: {}}},
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": {"taskId": task_id, "_meta": meta}}
    headers = {
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tasks/get",
        "Accept": "application/json, text/event-stream",
    }
    async with httpx2.AsyncClient() as http:
        wrong = await http.post(url, json=body, headers={**headers, "Mcp-Name": "f" * 32})
        right = await http.post(url, json=body, headers={**headers, "Mcp-Name": task_id})
        unnamed = await http.post(url, json=body, headers=headers)  # fastmcp-tasks 4.1 sends none
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == types.HEADER_MISMATCH
    assert right.status_code == 200 and right.json()["result"]["taskId"] == task_id
    assert unnamed.status_code == 200 and unnamed.json()["result"]["taskId"] == task_id
