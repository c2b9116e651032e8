"""The last ten minutes of each model's activity, for the status page's chart.

One sample a second per model (requests in flight, queued, completion tokens per second), kept
in a fixed-length ring: memory is bounded by the number of models, whatever the uptime. Tokens
per second come from the upstream's ``usage``, counted when a request ends, so a long stream's
tokens land in the second it finished (a model that reports no usage shows none).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from trioserve.gateway.usage import UsageBook
from trioserve.supervision.model import ModelStatus

__all__ = ["HISTORY_SECONDS", "SAMPLE_INTERVAL", "ActivityHistory", "Sample"]

SAMPLE_INTERVAL = 1.0
HISTORY_SECONDS = 600


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    in_flight: int
    queued: int
    tokens_per_s: float


class ActivityHistory:
    """Samples ``status()`` and the usage book once a second; ``snapshot()`` for the page."""

    def __init__(
        self,
        status: Callable[[], Mapping[str, ModelStatus]],
        usage: UsageBook,
        *,
        interval: float = SAMPLE_INTERVAL,
        keep_seconds: float = HISTORY_SECONDS,
    ) -> None:
        self._status = status
        self._usage = usage
        self.interval = interval
        self._length = max(1, math.ceil(keep_seconds / interval))
        self._rings: dict[str, collections.deque[Sample]] = {}
        self._tokens_seen: dict[str, int] = {}
        self.last_at = 0.0  # wall clock of the newest sample
        # Set after each sample, then replaced: a waiter sees the next one.
        self._sampled = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample until cancelled; started once the first sample is there."""
        # trio.sleep_until keeps the one-second grid: sampling never drifts however long a
        # pass over the models takes.
        deadline = trio.current_time()
        self.sample(time.time())
        task_status.started()
        while True:
            deadline += self.interval
            await trio.sleep_until(deadline)
            self.sample(time.time())

    def sample(self, at: float) -> None:
        status = self._status()
        self.last_at = at
        # A model removed by a reload leaves the chart with its history.
        for gone in self._rings.keys() - status.keys():
            del self._rings[gone]
            self._tokens_seen.pop(gone, None)
        for name, model in status.items():
            total = self._usage.completion_by_model.get(name, 0)
            tokens = total - self._tokens_seen.get(name, total)
            self._tokens_seen[name] = total
            ring = self._rings.get(name)
            if ring is None:
                ring = self._rings[name] = collections.deque(maxlen=self._length)
            ring.append(Sample(at, model.in_flight, model.queued, round(tokens / self.interval, 1)))
        self._sampled.set()
        self._sampled = trio.Event()

    async def next_sample(self) -> None:
        await self._sampled.wait()

    def tokens_per_s(self) -> dict[str, float]:
        """Each model's tokens/s in its newest sample (the live feed adds it to the status)."""
        return {name: ring[-1].tokens_per_s for name, ring in self._rings.items() if ring}

    def snapshot(self) -> dict[str, object]:
        """The whole history, one array per field per model (compact for the page)."""
        return {
            "interval": self.interval,
            "seconds": self._length * self.interval,
            "models": {name: _columns(list(ring)) for name, ring in self._rings.items()},
        }


def _columns(samples: list[Sample]) -> dict[str, object]:
    return {
        "at": [round(each.at, 3) for each in samples],
        "in_flight": [each.in_flight for each in samples],
        "queued": [each.queued for each in samples],
        "tokens_per_s": [each.tokens_per_s for each in samples],
    }
