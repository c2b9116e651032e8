"""Everything the supervisor keeps about one model: its lifecycle, lock, process and leases."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from trioserve.config import ModelConfig
from trioserve.errors import TrioserveError
from trioserve.gateway.admission import Admission
from trioserve.supervision.lifecycle import Lifecycle, State
from trioserve.supervision.process import ChildProcess
from trioserve.supervision.ringbuffer import OutputRing

__all__ = ["ChildRun", "Endpoint", "Lease", "ManagedModel", "StartAttempt"]


@dataclass(frozen=True)
class Endpoint:
    model: str
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


class StartAttempt:
    """One start of one model, shared by every caller waiting for it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.endpoint: Endpoint | None = None
        self.error: TrioserveError | None = None

    def succeed(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.done.set()

    def fail(self, error: TrioserveError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class ChildRun:
    """One process of one model, from the start request until it is reaped.

    Owned by one ``_run_child`` task in the supervisor's nursery; everything other tasks need
    from it (the start to wait for, the scope to cancel, the event that says it is gone) lives
    here, so a run that ends late can never touch the books of the run that follows it.
    """

    def __init__(self) -> None:
        self.attempt = StartAttempt()
        # Cancels the owning task: unload, eviction, TTL. Shutdown cancels the whole nursery.
        self.scope = trio.CancelScope()
        # Set once the process is reaped and its port, slot and store row are given back.
        self.stopped = trio.Event()
        self.child: ChildProcess | None = None
        self.port: int | None = None
        self.store_row: int | None = None
        self.holds_slot = False
        # Why it is being stopped on purpose, and how gently (None: the configured stop_grace).
        self.stop_reason = ""
        self.grace: float | None = None
        # The state already left starting/ready: waiters and leases have been told.
        self.over = False


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
    config: ModelConfig
    admission: Admission
    lifecycle: Lifecycle
    output: OutputRing = field(default_factory=OutputRing)
    # Held while this model's process is being started or torn down, so a new process is
    # never spawned before the previous one of the same model is reaped. One per model:
    # different models start in parallel.
    lock: trio.Lock = field(default_factory=trio.Lock)
    # The latest run; the one the state describes. An older run may still be reaping its
    # process (it holds ``lock`` meanwhile), so a new run never spawns before that is done.
    run: ChildRun | None = None
    endpoint: Endpoint | None = None  # set only while ready
    process: ChildProcess | None = None  # the live process, until it is reaped
    leases: set[Lease] = field(default_factory=set)
    lease_changed: trio.Event = field(default_factory=trio.Event)
    # A process of this model exists or is about to (counts towards max_loaded).
    holds_slot: bool = False
    failed_at: float | None = None  # trio clock
    started_at: float | None = None  # wall clock
    last_used_at: float | None = None  # wall clock
    last_used_clock: float = 0.0  # trio clock, for TTL and LRU
    spawns: int = 0

    @property
    def state(self) -> State:
        return self.lifecycle.state

    def changed_leases(self) -> None:
        self.lease_changed.set()
        self.lease_changed = trio.Event()

    def touch(self) -> None:
        self.last_used_at = time.time()
        self.last_used_clock = trio.current_time()
