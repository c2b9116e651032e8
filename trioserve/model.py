"""Everything the supervisor keeps about one model: its lifecycle, lock, process and leases."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from .admission import Admission
from .config import ModelConfig
from .errors import TrioserveError
from .lifecycle import Lifecycle, State
from .process import ChildProcess
from .ringbuffer import OutputRing

__all__ = ["Endpoint", "Lease", "ManagedModel", "StartAttempt"]


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
    attempt: StartAttempt | None = None
    endpoint: Endpoint | None = None
    process: ChildProcess | None = None
    # Cancels the task that owns the running child (unload, eviction, shutdown).
    child_scope: trio.CancelScope | None = None
    stop_reason: str = ""
    stop_grace: float | None = None
    stopped: trio.Event = field(default_factory=trio.Event)
    leases: set[Lease] = field(default_factory=set)
    lease_changed: trio.Event = field(default_factory=trio.Event)
    holds_slot: bool = False
    failed_at: float | None = None  # trio clock
    started_at: float | None = None  # wall clock
    last_used_at: float | None = None  # wall clock
    last_used_clock: float = 0.0  # trio clock, for TTL and LRU
    store_row: int | None = None
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
