"""One run of one model process, from the start request until the process is reaped.

Read ``ModelRun.run`` top to bottom for the whole life: the model's lock, a slot under
``max_loaded``, a port, the spawn (recorded), the wait for health, serving (exit, health checks,
idle TTL), the stop, the reap (recorded). One task runs it, in the supervisor's nursery; other
tasks only wait for its start, ask it to stop, or wait until it is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import psutil
import trio

from trioserve.config import Config, ModelConfig, placeholder_values, render
from trioserve.errors import ModelUnavailable, TrioserveError, UpstreamError
from trioserve.host.child_env import child_env
from trioserve.host.guard_client import Guard
from trioserve.host.identity import process_start_time
from trioserve.host.store import StoreWriter
from trioserve.memory.figures import CommandFigures, MemoryBook, command_key
from trioserve.memory.nvml import NvmlReader
from trioserve.memory.usage import measure_group
from trioserve.supervision.lifecycle import State
from trioserve.supervision.model import Endpoint, ManagedModel
from trioserve.supervision.ports import NoFreePort, PortAllocator
from trioserve.supervision.probe import (
    PROBE_LIMIT,
    HealthProbe,
    Readiness,
    StartFailed,
    output_tail,
)
from trioserve.supervision.process import ChildProcess

__all__ = [
    "CHILD_HOST",
    "CannotPlace",
    "ModelRun",
    "RunHost",
    "StartAbandoned",
    "StartAttempt",
    "child_command",
]

log = logging.getLogger(__name__)

CHILD_HOST = "127.0.0.1"
# PSS moves by a few pages from one measurement to the next: growth below this changes no
# figure, so placement is not woken and the store not written at every health check.
_GROWTH_STEP = 0.02


class StartAbandoned(Exception):
    """A start given up before its process was spawned (nobody waits for it any more)."""


class CannotPlace(Exception):
    """A start refused before its process was spawned: the model's memory, as measured, can
    never fit its devices' budgets. Its waiters get a 503 saying so; it is not a failure of
    the model's (nothing ran), so it counts towards no ``max_start_failures``."""


class RunHost(Protocol):
    """What a run needs from its supervisor: the settings and what all models share."""

    config: Config
    instance: str
    boot_id: str
    ports: PortAllocator
    store: StoreWriter | None
    memory: MemoryBook
    nvml: NvmlReader
    # Told of every child at spawn and at reap, to stop them if the daemon dies (or None).
    guard: Guard | None
    on_spawn: Callable[[str], None]
    on_failure: Callable[[str, str], None]

    @property
    def probe(self) -> HealthProbe: ...

    async def take_place(self, model: ManagedModel) -> None:
        """Return once ``model`` holds one of the ``max_loaded`` slots and its memory fits;
        raise ``StartAbandoned`` when nobody waits for it any more, ``CannotPlace`` when its
        memory never can fit."""

    def room_changed(self) -> None:
        """A slot may have come free, or a model became idle."""


def child_command(
    host: RunHost, name: str, config: ModelConfig, port: int
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a process of model ``name``, placeholders filled in."""
    values = placeholder_values(host.config, name, port)
    argv = [render(arg, values) for arg in config.cmd]
    gpus = [device.removeprefix("cuda:") for device in config.devices if device != "cpu"]
    # A CUDA model sees only its devices, unless its env chooses them itself. "cuda:N" is
    # NVML's index N (what we measure and budget); CUDA numbers devices the same way only in
    # PCI bus order, not its default "fastest first".
    visible = {}
    if gpus and "CUDA_VISIBLE_DEVICES" not in config.env:
        visible = {"CUDA_VISIBLE_DEVICES": ",".join(gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    env = child_env(
        {
            **visible,
            **{key: render(value, values) for key, value in config.env.items()},
            "TRIOSERVE_INSTANCE": host.instance,
            "TRIOSERVE_MODEL": name,
            "TRIOSERVE_STATE_DIR": str(host.config.state_dir),
        }
    )
    return argv, env


async def _store_child(host: RunHost, run: ModelRun, argv: list[str]) -> int:
    """Write the state store's row for ``run``'s new child; returns the row's id."""
    child, port, start_time = run.child, run.port, run.start_time
    assert host.store is not None and child is not None and port is not None
    store = host.store.store
    row_id = await host.store.call(
        lambda: store.record_child(
            instance=host.instance,
            model=run.model.name,
            pid=child.pid,
            pgid=child.pgid,
            port=port,
            start_time=start_time,
            boot_id=host.boot_id,
            argv=argv,
            state=State.STARTING.value,
        )
    )
    return int(row_id)


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


class ModelRun:
    """One process of one model. ``run`` is its one task; everything other tasks need from it
    (the start to wait for, the ways to stop it, the event that says it is gone) is here, so a
    run that ends late can never touch the books of the run that follows it."""

    def __init__(self, model: ManagedModel, host: RunHost) -> None:
        self.model = model
        # The model's config as this run started it: a reload may replace the model's, and
        # the next run uses the new one while this process keeps serving.
        self.config: ModelConfig = model.config
        self._host = host
        self.attempt = StartAttempt()
        # Cancels the owning task: unload, eviction, TTL. Shutdown cancels the whole nursery.
        self.scope = trio.CancelScope()
        # Set once the process is reaped and its port, slot and store row are given back.
        self.stopped = trio.Event()
        self.child: ChildProcess | None = None
        self.start_time: float | None = None  # the child's, as psutil reports it
        self.port: int | None = None
        self.store_row: int | None = None
        self.holds_slot = False
        # Why it is being stopped on purpose, and how gently (None: the configured stop_grace).
        self.stop_reason = ""
        self.grace: float | None = None
        # The state already left starting/ready: waiters and leases have been told.
        self.over = False
        # The largest memory measured of this process, per device; what was measured of the
        # command before it (None until the first measurement); what the store has of this run.
        self.peak: dict[str, int] = {}
        self._before: dict[str, int] | None = None
        self._stored: dict[str, int] = {}

    @property
    def current(self) -> bool:
        """This is the model's latest run, the one its state describes."""
        return self.model.run is self

    # -- stopping it, from other tasks ---------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Stop now, on purpose (eviction, TTL): SIGTERM, ``stop_grace``, SIGKILL, reap."""
        self._stopping(reason)
        self.scope.cancel()

    async def stop_when_idle(self, reason: str) -> None:
        """Stop once no request holds the model. The state is ``stopping`` at once, so new
        requests wait for the next process while those in flight finish on this one."""
        self._stopping(reason)
        # A start has nothing to drain; a ready model finishes what it is doing.
        while self.model.leases and not self.over:
            await self.model.lease_changed.wait()
        self.scope.cancel()

    def kill(self, reason: str, message: str) -> None:
        """End now: requests using it fail with ``message``, its group gets SIGKILL."""
        self._stopping(reason)
        self.grace = 0.0
        if self.current:
            for lease in list(self.model.leases):
                lease.lose(message)
        self.scope.cancel()
        if self.child is not None:
            self.child.kill_now()

    def mark_stopping(self, reason: str) -> None:
        """The model is ``stopping`` from now on: new requests wait for the next process."""
        self._stopping(reason)

    def _stopping(self, reason: str) -> None:
        if self.current and self.model.state in (State.STARTING, State.READY):
            self.model.move(State.STOPPING, reason)
            self.stop_reason = reason

    # -- its task ------------------------------------------------------------------------------

    async def run(self) -> None:
        """The one task that owns this run: slot, port, spawn, readiness, serving, stop, reap."""
        failure: str | None = None
        try:
            # The lock is held from spawn to reap, so a model never has two processes. It is
            # taken outside ``scope`` so that even a cancelled run waits for its predecessor
            # to be reaped before it closes its books.
            async with self.model.lock:
                with self.scope:
                    try:
                        await self._host.take_place(self.model)
                        self.holds_slot = True
                        self.port = self._host.ports.allocate()
                    except NoFreePort as exc:
                        failure = str(exc)
                    except StartAbandoned as exc:
                        self._stopping(str(exc))
                    except CannotPlace as exc:
                        retry = self._host.config.supervisor.failure_cooldown
                        self.attempt.fail(ModelUnavailable(str(exc), retry_after=retry or 1))
                        self._stopping("its memory cannot fit")
                    else:
                        await self._run_process()
        finally:
            self._end(failure)
            self._reaped()

    async def _run_process(self) -> None:
        failure: str | None = None
        async with trio.open_nursery() as child_nursery:
            # Errors are caught inside the nursery: trio would wrap them in an ExceptionGroup
            # on the way out.
            try:
                child = await self._spawn(child_nursery)
                await self._wait_ready(child)
                # Measured before it is ready: whoever waited for it (a load, a test, the
                # next placement) sees the figure.
                await self._measure(child)
                # An unload may have landed while the last readiness step ran in a worker
                # thread (not cancellable): let its cancellation take effect before `ready`.
                await trio.lowlevel.checkpoint()
                if self.model.state is not State.STARTING:
                    return  # stopped on purpose, not a failed start: `finally` stops it
                self._became_ready()
                failure = await self._serve(child)
            except StartFailed as exc:
                failure = exc.reason
            except OSError as exc:  # the program is missing or not executable
                failure = f"could not start {self.config.cmd[0]!r}: {exc}"
            finally:
                # Users learn that the model is gone before we wait for its process: new
                # requests see `failed` (or `stopping`) now, not after a stop_grace.
                self._end(failure)
                if self.child is not None:
                    grace = self.grace
                    if grace is None:
                        grace = self._host.config.supervisor.stop_grace
                    await self.child.stop(grace)
                child_nursery.cancel_scope.cancel()

    async def _spawn(self, nursery: trio.Nursery) -> ChildProcess:
        assert self.port is not None
        argv, env = child_command(self._host, self.model.name, self.config, self.port)
        self.model.output.feed(f"--- trioserve: starting {self.model.name}: {argv}\n".encode())
        child = await ChildProcess.spawn(nursery, argv, env, self.model.output)
        await self._record_spawn(child, argv)
        return child

    async def _record_spawn(self, child: ChildProcess, argv: list[str]) -> None:
        """The one place a spawned child is recorded: on this run, on its model, in the store.
        Anything else that must know every child (pid, pgid, start time) learns of it here,
        and of its end in ``_reaped``."""
        # Before the next checkpoint: from here on, however this task ends, the process is
        # stopped and reaped.
        model = self.model
        self.child = model.process = child
        model.spawns += 1
        model.started_at = time.time()
        self._host.on_spawn(model.name)
        # Shielded, and bounded (one psutil call, one SQLite insert): a child that exists has
        # a row, so `cleanup` can find it and the row is closed when it is reaped.
        with trio.CancelScope(shield=True):
            self.start_time = await trio.to_thread.run_sync(process_start_time, child.pid)
            guard = self._host.guard
            if guard is not None and self.start_time is not None:
                guard.track(child.pid, child.pgid, self.start_time, model.name)
            if self._host.store is not None:
                self.store_row = await _store_child(self._host, self, argv)

    async def _wait_ready(self, child: ChildProcess) -> None:
        """Return once the child answers its health check; raise ``StartFailed`` when it exits
        first or ``start_timeout`` passes."""
        assert self.port is not None
        start_timeout = self._host.config.supervisor.start_timeout
        readiness = Readiness(self._host.probe, child, self.port, self._health_url())
        with trio.move_on_after(start_timeout):
            await readiness.wait()
        if not readiness.healthy:
            raise await readiness.failure(start_timeout)

    def _health_url(self) -> str:
        return f"http://{CHILD_HOST}:{self.port}{self.config.health_path}"

    def _became_ready(self) -> None:
        assert self.port is not None
        model = self.model
        endpoint = Endpoint(model.name, CHILD_HOST, self.port)
        model.endpoint = endpoint
        model.touch()
        # Its time slice counts from here: a load as long as swap_after must not use it up.
        model.held_since = trio.current_time()
        model.move(State.READY, "healthy")
        self.attempt.succeed(endpoint)
        store, row = self._host.store, self.store_row
        if store is not None and row is not None:
            store.submit(lambda: store.store.child_state(row, State.READY.value))
        # A start waiting for memory decides again: this one may now be idle, or its slice
        # may end (nothing else wakes it when nobody waited for this start).
        self._host.room_changed()

    # -- serving -------------------------------------------------------------------------------

    async def _serve(self, child: ChildProcess) -> str:
        """Serve while ready; returns why it failed (crash, unresponsive). A stop on purpose
        (TTL, unload, eviction, shutdown) cancels it instead."""
        reasons: list[str] = []
        async with trio.open_nursery() as nursery:

            async def fails_when(watch: Callable[[], Awaitable[str]]) -> None:
                reasons.append(await watch())
                nursery.cancel_scope.cancel()

            nursery.start_soon(fails_when, lambda: self._exited(child))
            nursery.start_soon(fails_when, self._unresponsive)
            nursery.start_soon(self._stop_after_ttl)
            nursery.start_soon(self._keep_measuring, child)
        return reasons[0]

    async def _exited(self, child: ChildProcess) -> str:
        await child.exited.wait()
        await child.last_words()
        return f"process exited with code {child.returncode} while serving" + output_tail(child)

    async def _unresponsive(self) -> str:
        """Return once ``unhealthy_after`` health checks in a row failed."""
        cfg = self._host.config.supervisor
        url = self._health_url()
        failures = 0
        while failures < cfg.unhealthy_after:
            await trio.sleep(cfg.health_interval)
            if await self._host.probe.healthy(url, limit=min(cfg.health_interval, PROBE_LIMIT)):
                failures = 0
            else:
                failures += 1
        # Alive but wedged: it would not honour SIGTERM either.
        self.grace = 0.0
        return "unresponsive"

    async def _stop_after_ttl(self) -> None:
        """Stop the model once no lease has held it for its ``ttl`` (0: never). The model's
        current ``ttl`` is read each time: a reload changes it for the running process (and
        wakes this with ``changed_leases``)."""
        model = self.model
        while True:
            ttl = model.config.ttl
            if ttl <= 0 or model.pinned or model.leases or model.state is not State.READY:
                await model.lease_changed.wait()
                continue
            with trio.move_on_at(model.last_used_clock + ttl):
                await model.lease_changed.wait()
                continue
            if model.state is State.READY and not model.leases:
                self.stop(f"idle for {ttl:g}s (ttl)")
                return

    # -- memory --------------------------------------------------------------------------------

    def _figures(self) -> CommandFigures:
        return self._host.memory.for_model(self._host.config, self.model.name, self.config)

    async def _measure(self, child: ChildProcess) -> None:
        """Measure the process group's memory. Placement counts the largest of this run's
        peak and what earlier runs of the command were measured to use; the store keeps this
        run's peak (so one run's spike is forgotten after the next run)."""
        gpus = [device for device in self.config.devices if device != "cpu"]
        try:
            sample = await trio.to_thread.run_sync(measure_group, child.pgid, gpus, self._host.nvml)
        except (OSError, psutil.Error) as exc:  # /proc changing under us: the next one will do
            log.debug("measuring %s: %s", self.model.name, exc)
            return
        figures = self._figures()
        figures.unmeasured = sample.gaps
        if self._before is None:
            self._before = dict(figures.measured)
        for device, size in sample.used.items():
            self.peak[device] = max(self.peak.get(device, 0), size)
        counted = {**self._before}
        for device, size in self.peak.items():
            counted[device] = max(counted.get(device, 0), size)
        if _grown(counted, figures.measured):
            self._count(figures, counted)
        if _grown(self.peak, self._stored):
            self._store_peak()

    def _count(self, figures: CommandFigures, counted: dict[str, int]) -> None:
        """Placement counts ``counted`` from now on; a new warning is logged."""
        budgets = self._host.config.supervisor.memory
        warned = set(figures.warnings(self.config, budgets))
        figures.measured = counted
        for warning in figures.warnings(self.config, budgets):
            if warning not in warned:
                log.warning("model %s: %s", self.model.name, warning)
        self._host.room_changed()

    def _store_peak(self) -> None:
        self._stored = dict(self.peak)
        store = self._host.store
        if store is not None:
            key = command_key(self._host.config, self.model.name, self.config)
            peak = self._stored
            store.submit(lambda: store.store.record_memory(key, peak))

    async def _keep_measuring(self, child: ChildProcess) -> None:
        """Measure again at the pace of the health checks: memory grows as requests touch a
        model's KV cache, and a process-group scan is a few milliseconds of a worker thread."""
        while True:
            await trio.sleep(self._host.config.supervisor.health_interval)
            await self._measure(child)

    # -- the end -------------------------------------------------------------------------------

    def _end(self, failure: str | None) -> None:
        """The run is over for its users: the state leaves starting/ready, waiters get their
        answer, lease holders are cancelled. Its process may still be stopping."""
        if self.over:
            return
        self.over = True
        model = self.model
        stop_reason = self.stop_reason or "shutdown"
        if self.current:
            model.endpoint = None
            if model.state in (State.STARTING, State.READY):
                if failure is not None:
                    model.move(State.FAILED, failure)
                    self._host.on_failure(model.name, failure)
                else:
                    model.move(State.STOPPING, stop_reason)
            lost = failure or f"model {model.name!r} stopped: {stop_reason}"
            for lease in list(model.leases):
                lease.lose(lost)
        if failure is not None:
            error = f"model {model.name!r} failed to start: {failure}"
        else:
            error = f"model {model.name!r} was stopped while starting: {stop_reason}"
        self.attempt.fail(UpstreamError(error))

    def _reaped(self) -> None:
        """The one place a reaped child (or a run that never spawned one) is recorded: port,
        slot and store row given back, the model ``stopped``, ``stopped`` set."""
        model, child = self.model, self.child
        if self.port is not None:
            self._host.ports.release(self.port)
        if self.holds_slot:
            model.holds_slot = self.holds_slot = False
        if child is not None and model.process is child:
            model.process = None
        guard = self._host.guard
        if guard is not None and child is not None and child.returncode is not None:
            # Its group was stopped and the child reaped: nothing of it is left to guard.
            guard.untrack(child.pid)
        if self.peak:
            # The next start counts what this run was measured to use, as the store does
            # (a device this run could not measure keeps its earlier figure, there too).
            self._figures().measured = {**(self._before or {}), **self.peak}
        if self.current and model.state is State.STOPPING:
            model.move(State.STOPPED, self.stop_reason or "stopped")
        store, row = self._host.store, self.store_row
        if store is not None and row is not None:
            code = child.returncode if child is not None else None
            state = "failed" if self.current and model.state is State.FAILED else "stopped"
            store.submit(lambda: store.store.child_stopped(row, code, state))
        self.stopped.set()
        model.changed_leases()
        self._host.room_changed()


def _grown(new: dict[str, int], old: dict[str, int]) -> bool:
    """A device is new, or grew by more than ``_GROWTH_STEP``."""
    return any(size > old.get(device, 0) * (1 + _GROWTH_STEP) for device, size in new.items())
