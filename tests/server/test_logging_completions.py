"""Protocol logging (handshake era: logging/setLevel per connection, lifecycle events and warnings at
their level, nothing secret) and completion/complete for trace ids, through real clients."""

from __future__ import annotations

import json
from typing import Any

import anyio
import mcp.types as types
import pytest
from mcp import Client, MCPError

from server.app import build_server
from server.settings import Settings
from tests.fake_openai import completion
from tests.fakes import ModelCallError, ScriptedModel, models_for, reply, turn_script
from tests.fakes import call as tool_call
from tests.processes import HttpServer
from tests.server.helpers import call, wait_done

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore:The logging capability is deprecated")]

FAILURE = "The provider refused the request."


@pytest.fixture
def log_server(settings, model, slow_model):
    failing = ScriptedModel([ModelCallError(FAILURE)], name="failing")
    return build_server(settings, models=models_for(scripted=model, slow=slow_model, failing=failing))


class Heard:
    """A logging_callback that keeps every entry and wakes whoever waits for one."""

    def __init__(self) -> None:
        self.entries: list[types.LoggingMessageNotificationParams] = []
        self._wake = anyio.Event()

    async def __call__(self, params: types.LoggingMessageNotificationParams) -> None:
        self.entries.append(params)
        self._wake.set()

    def events(self, trace_id: str | None = None) -> list[str]:
        return [
            e.data["event"] for e in self.entries if trace_id is None or e.data.get("trace_id") == trace_id
        ]

    async def wait_for(
        self, event: str, trace_id: str | None = None
    ) -> types.LoggingMessageNotificationParams:
        with anyio.fail_after(10):
            while True:
                for entry in self.entries:
                    if entry.data["event"] == event and (
                        trace_id is None or entry.data.get("trace_id") == trace_id
                    ):
                        return entry
                await self._wake.wait()
                self._wake = anyio.Event()


async def test_set_level_filters_the_lifecycle_of_traces(log_server):
    heard = Heard()
    async with Client(log_server, mode="legacy", logging_callback=heard) as client:
        assert client.server_capabilities.logging is not None
        assert await client.set_logging_level("info") is not None
        first = (await call(client, "create_trace", prompt="What does the README say?", name="readme"))[
            "trace_id"
        ]
        finished = await heard.wait_for("finished", first)
        assert finished.level == "info" and finished.logger == "agent-trace"
        assert "readme" in (await heard.wait_for("started", first)).data["message"]
        assert "tool_called" not in heard.events(first)  # tool calls are debug entries

        await client.set_logging_level("error")
        second = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
        await wait_done(client, second)
        failing = (await call(client, "create_trace", prompt="x", model="failing"))["trace_id"]
        failed = await heard.wait_for(
            "failed", failing
        )  # the fence: it comes after anything about the second
        assert failed.level == "error" and FAILURE in failed.data["message"]
        assert heard.events(second) == []
        assert "started" not in heard.events(failing)


async def test_a_connection_that_never_set_a_level_hears_warnings_and_failures_only(log_server):
    heard = Heard()
    async with Client(log_server, mode="legacy", logging_callback=heard) as client:
        quiet = (await call(client, "create_trace", prompt="What does the README say?"))["trace_id"]
        await wait_done(client, quiet)
        failing = (await call(client, "create_trace", prompt="x", model="failing"))["trace_id"]
        await heard.wait_for("failed", failing)
        assert heard.events(quiet) == []


async def test_debug_entries_name_tools_never_their_arguments(log_server, model):
    model.steps = [
        turn_script(reply(None, tool_call("read_file", "c1", path="sk-secret-123.txt")), reply("no"))
    ]
    heard = Heard()
    async with Client(log_server, mode="legacy", logging_callback=heard) as client:
        await client.set_logging_level("debug")
        tid = (await call(client, "create_trace", prompt="read the key file"))["trace_id"]
        called = await heard.wait_for("tool_called", tid)
        assert called.level == "debug" and "read_file" in called.data["message"]
        await heard.wait_for("finished", tid)
        assert "sk-secret-123" not in json.dumps([e.data for e in heard.entries])


async def test_a_question_is_a_notice_and_stopping_it_logs_no_run(log_server, model):
    model.steps = [turn_script(reply(None, tool_call("ask_host", "q1", question="Which file?")), reply("ok"))]
    heard = Heard()
    async with Client(log_server, mode="legacy", logging_callback=heard) as client:
        await client.set_logging_level("debug")
        tid = (await call(client, "create_trace", prompt="summarise"))["trace_id"]
        asked = await heard.wait_for("needs_input", tid)
        assert asked.level == "notice" and "Which file?" in asked.data["message"]
        assert (await call(client, "stop_trace", trace_id=tid))["status"] == "stopping"
        await heard.wait_for("stopped", tid)
        assert heard.events(tid) == ["started", "tool_called", "needs_input", "stopped"]  # no "running again"


async def test_the_modern_era_has_no_logging(log_server):
    async with Client(log_server) as client:
        assert client.protocol_version == "2026-07-28"
        assert client.server_capabilities.logging is None
        with pytest.raises(MCPError) as refused:
            await client.session.send_request(
                types.SetLevelRequest(params=types.SetLevelRequestParams(level="info")), types.EmptyResult
            )
        assert refused.value.error.code == types.METHOD_NOT_FOUND


async def test_a_downstream_server_that_failed_to_start_is_a_warning(tmp_path, workspace, model):
    config = tmp_path / "mcp_servers.json"
    config.write_text(json.dumps({"mcpServers": {"broken": {"command": str(tmp_path / "no-such-program")}}}))
    settings = Settings.for_data_dir(
        tmp_path / "data", model="scripted", workspace=workspace, mcp_config=config
    )
    server = build_server(settings, models=models_for(scripted=model))
    told, asked = Heard(), Heard()
    async with Client(server, mode="legacy", logging_callback=told) as client:
        await client.list_tools()  # any first request of a connection carries the standing warnings
        warning = await told.wait_for("server_failed")
        assert warning.level == "warning" and "'broken'" in warning.data["message"]
    async with Client(server, mode="legacy", logging_callback=asked) as client:
        await client.set_logging_level("error")  # its first request: notifications/initialized sent nothing
        await client.list_tools()
        assert asked.events() == []
        await client.set_logging_level("warning")  # now it passes the level: sent on this request
        assert "'broken'" in (await asked.wait_for("server_failed")).data["message"]
        assert asked.events().count("server_failed") == 1


@pytest.mark.slow
async def test_over_http_each_session_keeps_its_own_level(tmp_path, workspace, fake_openai):
    fake_openai.script = [
        ("json", completion(None, [{"id": "c1", "type": "function",
                                     "function": {"name": "read_file", "arguments": '{"path": "README.md"}'}}])),
        ("json", completion("It says 42.")),
    ]  # fmt: skip
    env = fake_openai.env
    server = HttpServer(tmp_path, workspace, "--model", "openai:gpt-test", env=env)
    loud, quiet = Heard(), Heard()
    try:
        async with (
            Client(server.url, mode="legacy", logging_callback=loud) as a,
            Client(server.url, mode="legacy", logging_callback=quiet) as b,
        ):
            await a.set_logging_level("debug")
            await b.set_logging_level("error")
            tid = (await call(a, "create_trace", prompt="read the README"))["trace_id"]
            await loud.wait_for("finished", tid)
            assert loud.events(tid)[:2] == ["started", "tool_called"]
            fake_openai.script = [("error", (400, "The model is not available."))]
            failing = (await call(b, "create_trace", prompt="x"))["trace_id"]
            failed = await quiet.wait_for("failed", failing)
            assert "not available" in failed.data["message"] and "sk-test" not in failed.data["message"]
            assert quiet.events(tid) == []
    finally:
        server.close()


# -- completion/complete -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_trace_ids_complete_by_prefix_newest_first(server, mode):
    template = types.ResourceTemplateReference(uri="trace://{trace_id}")
    async with Client(server, mode=mode) as client:
        assert client.server_capabilities.completions is not None
        ids = [
            (await call(client, "create_trace", prompt="hi", name=n))["trace_id"] for n in ("alpha", "beta")
        ]
        every = (await client.complete(template, {"name": "trace_id", "value": ""})).completion
        assert every.values[:2] == ids[::-1] and every.total == 2
        by_id = (
            await client.complete(template, {"name": "trace_id", "value": ids[0][:6].upper()})
        ).completion
        assert by_id.values[0] == ids[0]
        by_name = (await client.complete(template, {"name": "trace_id", "value": "bet"})).completion
        assert by_name.values == [ids[1]]
        prompt = types.PromptReference(name="review_trace")
        assert (await client.complete(prompt, {"name": "trace_id", "value": "alp"})).completion.values == [
            ids[0]
        ]
        none = await client.complete(
            types.PromptReference(name="test_prompt"), {"name": "arg1", "value": "x"}
        )
        assert none.completion.values == []  # not ours: an empty answer, not an error

        await wait_done(client, ids[0])
        messages = types.ResourceTemplateReference(uri="trace://{trace_id}/messages/{sequence}")
        seqs = await client.complete(messages, {"name": "sequence", "value": ""}, {"trace_id": ids[0]})
        assert seqs.completion.values[:2] == ["5", "4"]
        unknown = await client.complete(messages, {"name": "sequence", "value": ""}, {"trace_id": "0" * 32})
        assert unknown.completion.values == []


async def test_a_malformed_completion_is_invalid_params(server):
    async with Client(server, mode="legacy") as client:
        with pytest.raises(MCPError) as refused:
            await client.session.send_request(
                _RawComplete(params=types.RequestParams()), types.CompleteResult
            )
        assert refused.value.error.code == types.INVALID_PARAMS and "ref" in refused.value.error.message


class _RawComplete(types.Request[types.RequestParams, Any]):
    method: Any = "completion/complete"
    params: types.RequestParams
