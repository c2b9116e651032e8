"""The lifecycle event bus: outside listeners that fall behind are dropped, visibly; the
daemon's own listeners never are, however far behind they fall."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from tests.support.config import make_config
from tests.support.daemon import running_daemon
from tests.support.notify import NotifyPeer
from trioserve.supervision.events import LAGGED, EventBus
from trioserve.supervision.lifecycle import State, Transition


def transition(n: int, model: str = "m") -> Transition:
    return Transition(model, State.STOPPED, State.STARTING, float(n), f"event {n}")


async def test_a_watch_that_fell_behind_reads_lagged_then_the_newer_events() -> None:
    bus = EventBus(buffer=4)
    async with bus.watch() as watch:
        for n in range(100):  # no checkpoint: the watch cannot read meanwhile
            bus.publish(transition(n))
        assert await watch.__anext__() is LAGGED
        # It is still subscribed: later events arrive, in order.
        bus.publish(transition(100))
        bus.publish(transition(101))
        seen = [await watch.__anext__(), await watch.__anext__()]
        assert [e.reason for e in seen if e is not LAGGED] == ["event 100", "event 101"]
        # Missed events are not kept: memory stays bounded by the buffer.
        assert len(watch._pending) == 0


async def test_a_watch_that_keeps_up_sees_every_event_and_ends_when_the_bus_closes() -> None:
    bus = EventBus(buffer=4)
    received: list[str] = []
    async with bus.watch() as watch, trio.open_nursery() as nursery:

        async def listen() -> None:
            async for event in watch:
                assert event is not LAGGED
                received.append(event.reason)

        nursery.start_soon(listen)
        for n in range(20):
            bus.publish(transition(n))
            await trio.testing.wait_all_tasks_blocked()
        bus.close()
    assert received == [f"event {n}" for n in range(20)]


async def test_an_outside_listener_that_falls_behind_is_dropped_and_its_stream_ends() -> None:
    bus = EventBus(buffer=4)
    async with bus.subscribe() as receive:
        for n in range(10):
            bus.publish(transition(n))
        got = [await receive.receive() for _ in range(4)]
        assert [e.reason for e in got] == [f"event {n}" for n in range(4)]
        with pytest.raises(trio.EndOfChannel):
            await receive.receive()


async def status_lines_until(peer: NotifyPeer, wanted: str, timeout: float = 20) -> list[str]:
    """The STATUS values received until one contains ``wanted``."""
    statuses: list[str] = []
    with trio.fail_after(timeout):
        while not any(wanted in status for status in statuses):
            await trio.lowlevel.wait_readable(peer.sock)
            for datagram in peer.drain():
                for line in datagram.decode().split("\n"):
                    if line.startswith("STATUS="):
                        statuses.append(line.removeprefix("STATUS="))
    return statuses


async def test_the_daemons_status_reporter_survives_a_flood_of_events(
    state_dir: Path, notify_peer: NotifyPeer
) -> None:
    config = make_config(state_dir)
    async with running_daemon(config, admin=True) as (info, client):
        await status_lines_until(notify_peer, "0 of 1 models ready")
        # Far more events than any buffer, while the reporter cannot run (no checkpoint).
        for n in range(5000):
            info.supervisor.events.publish(transition(n, "echo"))
        # The reporter works off what it took of the flood (its sends block while systemd's
        # queue is full: we read it), until nothing more comes: then the real change.
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if not notify_peer.drain():
                break
        response = await client.post("/admin/models/echo/load")
        assert response.status_code == 200, response.text
        # The reporter is still there: the real change after the flood reaches systemd.
        await status_lines_until(notify_peer, "1 of 1 models ready; 1 ready")
