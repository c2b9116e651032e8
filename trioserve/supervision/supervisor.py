"""The supervisor: what is about all models. Each model process's own life is a ``ModelRun``.

Here: finding a model by name or alias, starting one on demand (``ensure_ready``), leases,
load/unload, the ``max_loaded`` slots (least recently used idle model evicted first), status.
Requests never own a process: they wait on a run's shared start and hold a ``Lease`` while they
use the model, so a request that goes away never interrupts a start the others are waiting for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import httpx
import trio

from trioserve.config import Config, ModelConfig
from trioserve.errors import ModelNotFound, ModelUnavailable, UpstreamError
from trioserve.host.guard_client import Guard
from trioserve.host.identity import read_boot_id
from trioserve.host.store import StoreWriter
from trioserve.memory.figures import MemoryBook
from trioserve.memory.nvml import NvmlReader
from trioserve.reload_plan import ReloadPlan
from trioserve.sharing.admission import Admission
from trioserve.supervision.events import EventBus
from trioserve.supervision.keepers import Keepers
from trioserve.supervision.lifecycle import Lifecycle, State
from trioserve.supervision.model import Endpoint, Lease, ManagedModel, ModelStatus
from trioserve.supervision.placer import Placer
from trioserve.supervision.ports import PortAllocator
from trioserve.supervision.probe import HealthProbe
from trioserve.supervision.process import listens_on
from trioserve.supervision.run import CHILD_HOST, ModelRun

__all__ = ["Supervisor"]

_RUNNING = (State.STARTING, State.READY)


class Supervisor:
    """Owns every model process. Start it with ``await nursery.start(supervisor.run)``."""

    def __init__(
        self,
        config: Config,
        *,
        instance: str,
        events: EventBus | None = None,
        store: StoreWriter | None = None,
        guard: Guard | None = None,
    ) -> None:
        self.config = config
        self.guard = guard
        self.instance = instance
        self.events = events or EventBus()
        self.store = store
        self.boot_id = read_boot_id()
        first, last = config.supervisor.port_range
        self.ports = PortAllocator(first, last, CHILD_HOST)
        self.models: dict[str, ManagedModel] = {
            name: self._new_model(name, model) for name, model in config.models.items()
        }
        # Every command's memory figures (estimated, measured); NVML for GPU models.
        self.memory = MemoryBook()
        self.nvml = NvmlReader()
        self.placer = Placer(self, self.memory)
        self.keepers = Keepers(self)
        # Models a reload removed whose requests or process are not done yet.
        self._retiring: set[ManagedModel] = set()
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._probe: HealthProbe | None = None
        # Hooks for metrics: on_spawn(model), on_failure(model, reason).
        self.on_spawn: Callable[[str], None] = lambda name: None
        self.on_failure: Callable[[str, str], None] = lambda name, reason: None

    def _new_model(self, name: str, config: ModelConfig) -> ManagedModel:
        """A model as it first appears: stopped. Its admission gate is made here, only."""
        return ManagedModel(
            name=name,
            config=config,
            admission=Admission(name, config.max_concurrency, config.max_queue),
            lifecycle=Lifecycle(name),
            events=self.events,
        )

    # -- running -------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Before ``run``: measured figures from the state store, the GGUF estimates; raises
        ``ConfigError`` for a model that could never fit its devices' budgets."""
        if self.store is not None:
            store = self.store.store
            self.memory.load(await self.store.call(store.measured_memory))
        await self.vet(self.config)

    async def vet(self, config: Config) -> None:
        """Refuse ``config`` (``ConfigError``) if a model could never fit: at start and
        before a reload."""
        await self.placer.vet(config)

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until cancelled; on cancellation every child is stopped (in parallel) and reaped."""
        # No keep-alive: a probe connection left open when a child dies is closed by the child's
        # side first, which parks the model's port in TIME_WAIT (FIN_WAIT2) for up to a minute,
        # so the port could not be bound again. A fresh loopback connect per probe is cheap.
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(trust_env=False, limits=limits) as client:
            self._probe = HealthProbe(client, owns_port=listens_on)
            try:
                # Each run's task is in this nursery: cancelling it stops them all at once,
                # each with its own stop_grace, rather than one after the other.
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.keepers.start(nursery)
                    task_status.started(self)
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._closing = True
                        self.keepers.close()
            finally:
                self._nursery = None
                self.events.close()
                self.nvml.close()

    @property
    def probe(self) -> HealthProbe:
        assert self._probe is not None, "the supervisor is not running"
        return self._probe

    def resolve(self, name: str) -> ManagedModel:
        real = self.config.resolve_name(name)
        if real is None:
            raise ModelNotFound(name, self.config.known_names())
        return self.models[real]

    # -- requests ------------------------------------------------------------------------------

    def _model(self, model: ManagedModel | str) -> ManagedModel:
        # A request holds its model object: one a reload removed still finishes its requests.
        return model if isinstance(model, ManagedModel) else self.resolve(model)

    async def ensure_ready(self, name: ManagedModel | str) -> Endpoint:
        """Return the endpoint of a ready ``name``, starting it if needed.

        Any number of concurrent callers share one start. Cancelling a caller only stops it
        waiting: the start goes on in the supervisor's nursery for the others.
        """
        model = self._model(name)
        while True:
            state = model.state
            run = model.run
            if state is State.READY and model.endpoint is not None:
                return model.endpoint
            if state is State.STOPPING and run is not None:
                await run.stopped.wait()
                continue
            if state is State.STARTING and run is not None:
                attempt = run.attempt
            else:
                self._check_cooldown(model)
                attempt = self._begin_start(model, "requested").attempt
            model.demand += 1
            if model.demand == 1:
                self.room_changed()  # a start that nobody wanted is wanted again: decide now
            try:
                await attempt.done.wait()
            finally:
                model.demand -= 1
                if not model.demand:
                    self.room_changed()  # a start nobody waits for may give up its place
            if attempt.error is not None:
                raise attempt.error

    @asynccontextmanager
    async def lease(self, name: ManagedModel | str) -> AsyncIterator[Lease]:
        """Hold ``name`` ready for the body. If the model dies meanwhile, the body is cancelled
        and ``UpstreamError`` is raised."""
        model = self._model(name)
        while True:
            endpoint = await self.ensure_ready(model)
            # No checkpoint between the check and taking the lease, so TTL or eviction cannot
            # slip in between.
            if model.state is State.READY:
                break
        lease = Lease(model, endpoint)
        model.leases.add(lease)
        model.touch()
        model.changed_leases()
        try:
            with lease.scope:
                yield lease
        finally:
            model.leases.discard(lease)
            model.touch()
            model.changed_leases()
            self.room_changed()
        if lease.lost_reason is not None:
            raise UpstreamError(lease.lost_reason)

    # -- admin ---------------------------------------------------------------------------------

    async def load(self, name: str) -> Endpoint:
        return await self.ensure_ready(name)

    async def unload(self, name: str, *, force: bool = False) -> None:
        """Stop ``name``: after its in-flight requests finish, or at once with ``force``.

        ``force`` also ends a model stuck starting or stopping (a child ignoring SIGTERM):
        its process group is killed now, whatever grace a stop already in progress allows.
        Unloading a failed model clears its failure: the next request starts it afresh.
        """
        model = self.resolve(name)
        run = model.run
        state = model.state
        if state is State.STOPPED:
            return
        if state is State.FAILED:
            model.move(State.STOPPED, "unloaded")
        if run is None:
            return
        if force:
            run.kill("unloaded (force)", f"model {model.name!r} was unloaded with force")
        elif state is not State.FAILED:
            await run.stop_when_idle("unloaded")
        # A failed model's process may still be going away: unload returns once it is gone.
        await run.stopped.wait()

    def apply_config(self, new: Config, plan: ReloadPlan) -> None:
        """Put a reloaded config in force, with no checkpoint: requests see the old models or
        the new ones. New models appear stopped; a removed model's requests (in flight and
        queued) finish, then its process stops; a model whose process settings changed keeps
        serving its in-flight requests on the old process, which stops once they finish (the
        next request starts the new command); limits apply at once. Preload models the reload
        adds (or makes preload, or whose command it changes) are started."""
        old = self.config
        for name in plan.removed:
            self._retire(self.models.pop(name))
        for name in plan.added:
            self.models[name] = self._new_model(name, new.models[name])
        for name in (*plan.replaced, *plan.retuned):
            model = self.models[name]
            model.config = settings = new.models[name]
            model.admission.reconfigure(settings.max_concurrency, settings.max_queue)
            model.changed_leases()  # wakes the running process's TTL watch: ttl may differ
            run = model.run
            if name in plan.replaced and run is not None and model.state in _RUNNING:
                # `stopping` now, before any other task runs: no request leases the old
                # process after the reload returned.
                run.mark_stopping("config changed (reload)")
                self.spawn_task(run.stop_when_idle, "config changed (reload)")
        if new.supervisor.port_range != self.config.supervisor.port_range:
            first, last = new.supervisor.port_range
            self.ports.set_range(first, last)
        self.config = new
        self.keepers.apply(old, plan)
        self.room_changed()

    def _retire(self, model: ManagedModel) -> None:
        """A model removed by a reload: out of ``models`` (404 for new requests) at once; its
        process stops once its requests, in flight and queued, are done."""
        self._retiring.add(model)

        async def stop_when_done() -> None:
            try:
                while model.admission.queued or model.admission.admitted or model.leases:
                    # Leases end with a lease_changed event, requests leave admission with
                    # a departure (a queued one that gives up holds no lease).
                    await _either(model.lease_changed, model.admission.departure())
                run = model.run
                if run is not None and model.state in _RUNNING:
                    await run.stop_when_idle("removed from the config (reload)")
                if run is not None:
                    await run.stopped.wait()
            finally:
                self._retiring.discard(model)

        self.spawn_task(stop_when_done)

    def spawn_task(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        if self._nursery is not None and not self._closing:
            self._nursery.start_soon(fn, *args)

    def status(self) -> dict[str, ModelStatus]:
        budgets = self.config.supervisor.memory
        return {
            name: model.status(self.memory.for_model(self.config, name, model.config), budgets)
            for name, model in self.models.items()
        }

    def devices(self) -> dict[str, dict[str, int]]:
        """Each budgeted device's ``budget``, ``used`` and ``free`` (bytes)."""
        return self.placer.devices()

    # -- what runs and the placer ask of the supervisor (``RunHost``, ``PlacerHost``) ----------

    def holders(self) -> Iterator[tuple[str, ManagedModel]]:
        """Every model whose process exists or is about to, named for messages."""
        for name, model in self.models.items():
            if model.holds_slot:
                yield name, model
        for model in self._retiring:
            if model.holds_slot:
                yield f"{model.name} (removed)", model

    async def take_place(self, model: ManagedModel) -> None:
        await self.placer.take_place(model)

    def room_changed(self) -> None:
        self.placer.room_changed()

    # -- internals -----------------------------------------------------------------------------

    def _check_cooldown(self, model: ManagedModel) -> None:
        cfg = self.config.supervisor
        lifecycle = model.lifecycle
        remaining = lifecycle.cooldown_left(
            trio.current_time(),
            max_start_failures=cfg.max_start_failures,
            cooldown=cfg.failure_cooldown,
        )
        if remaining > 0:
            raise ModelUnavailable(
                f"model {model.name!r} failed {lifecycle.consecutive_failures} times in a "
                f"row and is cooling down for {remaining:.0f}s more; last error: "
                f"{lifecycle.last_error}",
                retry_after=remaining,
            )

    def _begin_start(self, model: ManagedModel, reason: str) -> ModelRun:
        if self._nursery is None or self._closing:
            raise ModelUnavailable("trioserve is shutting down", retry_after=1)
        model.move(State.STARTING, reason)
        run = ModelRun(model, self)
        model.run = run
        self._nursery.start_soon(run.run)
        return run


async def _either(first: trio.Event, second: trio.Event) -> None:
    """Return once either event is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait, first)
        nursery.start_soon(wait, second)
