"""Per-connection outboxes: a client that stops reading is dropped without delaying anyone else."""

from __future__ import annotations

import anyio
import pytest

from server import connections
from server.connections import Connections

pytestmark = pytest.mark.anyio


class Session:
    """Stands in for the SDK's per-connection session: only what an outbox calls."""

    def __init__(self, stuck: bool = False):
        self.stuck, self.got = stuck, []

    async def send(self, what: str) -> None:
        if self.stuck:
            await anyio.sleep_forever()
        self.got.append(what)


def deliver(what: str):
    async def send(session: Session) -> None:
        await session.send(what)

    return send


async def test_a_stuck_connection_is_dropped_and_the_others_hear_at_once(monkeypatch):
    monkeypatch.setattr(connections, "SEND_SECONDS", 0.2)
    registry = Connections(lambda outbox: outbox)
    stuck, healthy = Session(stuck=True), Session()
    async with anyio.create_task_group() as group:
        registry.serve(group)
        registry.get(stuck)  # type: ignore[arg-type]
        registry.get(healthy)  # type: ignore[arg-type]
        with anyio.fail_after(5):
            for n in range(5):
                for outbox in registry.records():
                    outbox.post(deliver(f"n{n}"))
                await anyio.sleep(0)
            while len(healthy.got) < 5:
                await anyio.sleep(0.01)
            assert healthy.got == [f"n{n}" for n in range(5)]  # in order, not held up behind the stuck one
            while len(registry) > 1:
                await anyio.sleep(0.01)
        assert registry.records()[0].session is healthy
        group.cancel_scope.cancel()


async def test_a_connection_that_falls_too_far_behind_is_dropped(monkeypatch):
    monkeypatch.setattr(connections, "OUTBOX_LENGTH", 3)
    registry = Connections(lambda outbox: outbox)
    session = Session(stuck=True)
    outbox, new = registry.get(session)  # type: ignore[arg-type]
    assert new and registry.get(session)[1] is False  # type: ignore[arg-type]
    for n in range(4):  # no sender yet: the fourth overflows
        outbox.post(deliver(f"n{n}"))
    assert outbox.dropped and len(registry) == 0
