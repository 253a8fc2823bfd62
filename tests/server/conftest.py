"""Server fixtures: settings in a temp folder, a workspace with files, and a server on scripted models.

Server tests run on the scripted model (``model``): each test says what the model does. The offline
model belongs to the demo and its own tests.
"""

from __future__ import annotations

import pytest

from server.app import build_server
from server.settings import Settings
from tests.fakes import ScriptedModel, call, models_for, reply, turn_script


@pytest.fixture
def settings(tmp_path, workspace) -> Settings:
    return Settings.for_data_dir(tmp_path / "data", model="scripted", workspace=workspace)


@pytest.fixture
def model() -> ScriptedModel:
    """The default model of server tests: reads README.md, then answers (afresh on every user turn)."""
    return ScriptedModel(
        [
            turn_script(
                reply(None, call("read_file", "c1", path="README.md")),
                reply("The README says the answer is 42."),
            )
        ]
    )


@pytest.fixture
def slow_model() -> ScriptedModel:
    """A model that takes an hour to answer: for stop and running-trace tests."""
    return ScriptedModel([reply("too late")], name="slow", delay=3600)


@pytest.fixture
def server(settings, model, slow_model):
    return build_server(settings, models=models_for(scripted=model, slow=slow_model))
