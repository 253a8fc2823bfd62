"""What the server's lifespan yields to every request: the engine facade and the notifier."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.engine import Engine
from server.notify import Notifier
from server.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    notifier: Notifier
    notes: list[str] = field(default_factory=list)
    """Sentences for agent_info, e.g. a relay whose settings differ from the shared server's."""


def state_of(lifespan_context: Any) -> ServerState | None:
    """The state, or None before the lifespan has produced it (e.g. during ``initialize`` middleware)."""
    return lifespan_context if isinstance(lifespan_context, ServerState) else None
