"""The activity history behind the status page's chart: one sample a second, bounded."""

from __future__ import annotations

import trio
import trio.testing
from prometheus_client import CollectorRegistry

from trioserve.gateway.activity import ActivityHistory
from trioserve.gateway.usage import UsageBook
from trioserve.sharing.identity import User
from trioserve.supervision.lifecycle import State
from trioserve.supervision.model import ModelStatus


def status(in_flight: int = 0, queued: int = 0) -> ModelStatus:
    return ModelStatus(
        state=State.READY,
        pid=1,
        port=2,
        started_at=0.0,
        last_used_at=None,
        in_flight=in_flight,
        queued=queued,
        restarts=0,
        last_error=None,
    )


class Models:
    def __init__(self) -> None:
        self.now: dict[str, ModelStatus] = {"echo": status()}

    def __call__(self) -> dict[str, ModelStatus]:
        return self.now


async def test_one_sample_a_second_of_each_model(autojump_clock: trio.testing.MockClock) -> None:
    models = Models()
    history = ActivityHistory(models, UsageBook(CollectorRegistry(), []))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(history.run)
        await history.next_sample()
        start = trio.current_time()
        models.now = {"echo": status(in_flight=3, queued=2)}
        for _ in range(4):
            await history.next_sample()
        assert trio.current_time() - start == 4.0
        nursery.cancel_scope.cancel()
    echo = history.snapshot()["models"]["echo"]  # type: ignore[index]
    assert echo["in_flight"] == [0, 3, 3, 3, 3]
    assert echo["queued"] == [0, 2, 2, 2, 2]
    assert history.tokens_per_s() == {"echo": 0.0}


def test_history_keeps_only_its_window() -> None:
    history = ActivityHistory(Models(), UsageBook(CollectorRegistry(), []), keep_seconds=5)
    for second in range(20):
        history.sample(float(second))
    at = history.snapshot()["models"]["echo"]["at"]  # type: ignore[index]
    assert at == [15.0, 16.0, 17.0, 18.0, 19.0]


def test_tokens_per_second_come_from_the_usage_of_finished_requests() -> None:
    usage = UsageBook(CollectorRegistry(), [])
    history = ActivityHistory(Models(), usage, interval=2.0)
    history.sample(0.0)
    user = User(key="address:127.0.0.1")
    usage.finished(user, "echo", 200, (10, 30))
    usage.finished(user, "echo", 200, (10, 10))
    usage.finished(user, "other", 200, (10, 500))
    history.sample(2.0)
    assert history.tokens_per_s() == {"echo": 20.0}  # "other" is no model here
    history.sample(4.0)
    assert history.snapshot()["models"]["echo"]["tokens_per_s"] == [0.0, 20.0, 0.0]  # type: ignore[index]


def test_a_removed_model_leaves_the_history() -> None:
    models = Models()
    history = ActivityHistory(models, UsageBook(CollectorRegistry(), []))
    history.sample(0.0)
    models.now = {"other": status()}
    history.sample(1.0)
    assert list(history.snapshot()["models"]) == ["other"]  # type: ignore[call-overload]
