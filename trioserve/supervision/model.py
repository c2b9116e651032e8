"""Everything the supervisor keeps about one model: its lifecycle, lock, process and leases."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from trioserve.config import ModelConfig
from trioserve.memory.figures import CommandFigures
from trioserve.sharing.admission import Admission
from trioserve.supervision.events import EventBus
from trioserve.supervision.lifecycle import Lifecycle, State
from trioserve.supervision.process import ChildProcess
from trioserve.supervision.ringbuffer import OutputRing

if TYPE_CHECKING:
    from trioserve.supervision.run import ModelRun

__all__ = ["Endpoint", "Lease", "ManagedModel", "ModelStatus"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    model: str
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class ModelStatus:
    """One model as ``/admin/status`` shows it."""

    state: State
    pid: int | None
    port: int | None
    started_at: float | None  # wall clock
    last_used_at: float | None  # wall clock
    in_flight: int
    queued: int
    restarts: int
    last_error: str | None
    # Bytes per device: {"estimated": {...}, "measured": {...}}, each {} until known.
    memory: dict[str, dict[str, int]] = field(
        default_factory=lambda: {"estimated": {}, "measured": {}}
    )
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    preload: bool = False
    pinned: bool = False
    waiting_for: str | None = None  # why its start waits (memory, a max_loaded slot)
    warnings: list[str] = field(default_factory=list)
    # Its start is short of memory (for /metrics; not in the contract's status object).
    waiting_for_memory: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of the contract, keys in its order."""
        return {
            "state": self.state.value,
            "pid": self.pid,
            "port": self.port,
            "started_at": self.started_at,
            "last_used_at": self.last_used_at,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "memory": self.memory,
            "devices": self.devices,
            "preload": self.preload,
            "pinned": self.pinned,
            "waiting_for": self.waiting_for,
            "warnings": self.warnings,
        }


class Lease:
    """A request's hold on a ready model. While any lease exists the model is not stopped by
    TTL or eviction; a crash cancels every lease's scope so its request ends with 502 at once."""

    def __init__(self, model: ManagedModel, endpoint: Endpoint) -> None:
        self.model = model
        self.endpoint = endpoint
        self.scope = trio.CancelScope()
        self.lost_reason: str | None = None

    def lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.scope.cancel()


@dataclass(eq=False)
class ManagedModel:
    name: str
    # Read when a process is spawned and while it serves (ttl, health_path); a reload may
    # replace it, and the next process uses the new one.
    config: ModelConfig
    admission: Admission
    lifecycle: Lifecycle
    events: EventBus
    output: OutputRing = field(default_factory=OutputRing)
    # Held while this model's process is being started or torn down, so a new process is
    # never spawned before the previous one of the same model is reaped. One per model:
    # different models start in parallel.
    lock: trio.Lock = field(default_factory=trio.Lock)
    # The latest run; the one the state describes. An older run may still be reaping its
    # process (it holds ``lock`` meanwhile), so a new run never spawns before that is done.
    run: ModelRun | None = None
    endpoint: Endpoint | None = None  # set only while ready
    process: ChildProcess | None = None  # the live process, until it is reaped
    leases: set[Lease] = field(default_factory=set)
    lease_changed: trio.Event = field(default_factory=trio.Event)
    # A process of this model exists or is about to: it counts towards max_loaded and holds
    # its memory on its devices.
    holds_slot: bool = False
    held_since: float = 0.0  # trio clock: when it took its slot (its time slice began)
    # Why its start waits for a slot or memory, or None.
    waiting_for: str | None = None
    # The devices its start is short of memory on (for /metrics; the placer works out who
    # waits behind whom afresh each time).
    short_on: frozenset[str] = frozenset()
    # Callers waiting for its start (requests, a load, preload): a start nobody waits for
    # any more gives its place in line up instead of stopping another model for nothing.
    demand: int = 0
    started_at: float | None = None  # wall clock
    last_used_at: float | None = None  # wall clock
    last_used_clock: float = 0.0  # trio clock, for TTL and LRU
    spawns: int = 0

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def pinned(self) -> bool:
        return self.config.pinned

    def move(self, target: State, reason: str) -> None:
        """Move the lifecycle to ``target`` and publish the event."""
        event = self.lifecycle.move(target, at=time.time(), now=trio.current_time(), reason=reason)
        log.info("model %s: %s -> %s (%s)", self.name, event.from_state, target, reason)
        self.events.publish(event)

    def changed_leases(self) -> None:
        self.lease_changed.set()
        self.lease_changed = trio.Event()

    def touch(self) -> None:
        self.last_used_at = time.time()
        self.last_used_clock = trio.current_time()

    def status(self, figures: CommandFigures, budgets: Mapping[str, int]) -> ModelStatus:
        process = self.process
        config = self.config
        return ModelStatus(
            state=self.state,
            pid=process.pid if process is not None else None,
            port=self.endpoint.port if self.endpoint is not None else None,
            started_at=self.started_at,
            last_used_at=self.last_used_at,
            in_flight=len(self.leases),
            queued=self.admission.queued,
            restarts=self.lifecycle.restarts,
            last_error=self.lifecycle.last_error,
            memory={"estimated": figures.estimated(config), "measured": dict(figures.measured)},
            devices=list(config.devices),
            preload=config.preload,
            pinned=config.pinned,
            waiting_for=self.waiting_for,
            warnings=figures.warnings(config, budgets),
            waiting_for_memory=bool(self.short_on),
        )
