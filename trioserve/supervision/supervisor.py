"""The supervisor: starts model processes on demand, keeps them healthy, stops them, reaps them.

Each running child is owned by one task in the supervisor's nursery (``_run_child``), which holds
the model's lock from spawn to reap. Requests never own a process: they wait on a shared
``StartAttempt`` and hold a ``Lease`` while they use the model, so a request that goes away never
interrupts a start the others are waiting for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from trioserve.config import Config, placeholder_values, render
from trioserve.errors import ModelNotFound, ModelUnavailable, TrioserveError, UpstreamError
from trioserve.gateway.admission import Admission
from trioserve.host.store import StateStore, StoreWriter
from trioserve.supervision.events import EventBus
from trioserve.supervision.lifecycle import Lifecycle, State
from trioserve.supervision.model import ChildRun, Endpoint, Lease, ManagedModel
from trioserve.supervision.ports import NoFreePort, PortAllocator
from trioserve.supervision.process import (
    ChildProcess,
    child_env,
    listens_on,
    process_start_time,
    read_boot_id,
)

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

# How often a starting child's health endpoint is probed. Short, because the time from "the
# backend is ready" to "the first request is forwarded" is this interval at worst; a probe is
# one keep-alive HTTP request, cheap next to a model load.
START_PROBE_INTERVAL = 0.025
# Lines of child output quoted in an error.
ERROR_TAIL_LINES = 20
CHILD_HOST = "127.0.0.1"


class _StartFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Supervisor:
    """Owns every model process. Start it with ``await nursery.start(supervisor.run)``."""

    def __init__(
        self,
        config: Config,
        *,
        instance: str,
        events: EventBus | None = None,
        store: StoreWriter | None = None,
    ) -> None:
        self.config = config
        self.instance = instance
        self.events = events or EventBus()
        self.store = store
        self.boot_id = read_boot_id()
        first, last = config.supervisor.port_range
        self.ports = PortAllocator(first, last, CHILD_HOST)
        self.models: dict[str, ManagedModel] = {
            name: ManagedModel(
                name=name,
                config=model,
                admission=Admission(name, model.max_concurrency, model.max_queue),
                lifecycle=Lifecycle(name),
            )
            for name, model in config.models.items()
        }
        self._room_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._probe: httpx.AsyncClient | None = None
        # Hooks for metrics; called with the model name.
        self.on_spawn: Callable[[str], None] = lambda name: None
        self.on_failure: Callable[[str, str], None] = lambda name, reason: None

    # -- running -------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until cancelled; on cancellation every child is stopped (in parallel) and reaped."""
        # No keep-alive: a probe connection left open when a child dies is closed by the child's
        # side first, which parks the model's port in TIME_WAIT (FIN_WAIT2) for up to a minute,
        # so the port could not be bound again. A fresh loopback connect per probe is cheap.
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(trust_env=False, limits=limits) as probe:
            self._probe = probe
            try:
                # Each child's task is in this nursery: cancelling it stops them all at once,
                # each with its own stop_grace, rather than one after the other.
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started(self)
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._closing = True
            finally:
                self._nursery = None
                self.events.close()

    def resolve(self, name: str) -> ManagedModel:
        real = self.config.resolve_name(name)
        if real is None:
            raise ModelNotFound(name, self.config.known_names())
        return self.models[real]

    # -- requests ------------------------------------------------------------------------------

    async def ensure_ready(self, name: str) -> Endpoint:
        """Return the endpoint of a ready ``name``, starting it if needed.

        Any number of concurrent callers share one start. Cancelling a caller only stops it
        waiting: the start goes on in the supervisor's nursery for the others.
        """
        model = self.resolve(name)
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
            await attempt.done.wait()
            if attempt.error is not None:
                raise attempt.error

    @asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Lease]:
        """Hold ``name`` ready for the body. If the model dies meanwhile, the body is cancelled
        and ``UpstreamError`` is raised."""
        model = self.resolve(name)
        while True:
            endpoint = await self.ensure_ready(model.name)
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
            self._notify_room()
        if lease.lost_reason is not None:
            raise UpstreamError(lease.lost_reason)

    # -- admin ---------------------------------------------------------------------------------

    async def load(self, name: str) -> Endpoint:
        return await self.ensure_ready(name)

    async def unload(self, name: str, *, force: bool = False) -> None:
        """Stop ``name``: after its in-flight requests finish, or at once with ``force``.

        ``force`` also ends a model stuck starting or stopping (a child ignoring SIGTERM):
        its process group is killed now, whatever grace a stop already in progress allows.
        """
        model = self.resolve(name)
        run = model.run
        state = model.state
        if state is State.STOPPED:
            return
        if state is State.FAILED:
            # Unload is how an operator clears a failure: the next request starts afresh.
            self._move(model, State.STOPPED, "unloaded")
            model.lifecycle.consecutive_failures = 0
            model.failed_at = None
        else:
            assert run is not None, f"{model.name} is {state} without a run"
            reason = "unloaded (force)" if force else "unloaded"
            if state in (State.STARTING, State.READY):
                self._move(model, State.STOPPING, reason)
                run.stop_reason = reason
            if not force:
                # A start has nothing to drain; a ready model finishes what it is doing.
                while model.leases and not run.over:
                    await model.lease_changed.wait()
                run.scope.cancel()
        if run is None:
            return
        if force:
            self._kill(model, run, f"model {model.name!r} was unloaded with force")
        # A failed model's process may still be going away: unload returns once it is gone.
        await run.stopped.wait()

    def status(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = {}
        for name, model in self.models.items():
            process = model.process
            result[name] = {
                "state": model.state.value,
                "pid": process.pid if process is not None else None,
                "port": model.endpoint.port if model.endpoint is not None else None,
                "started_at": model.started_at,
                "last_used_at": model.last_used_at,
                "in_flight": len(model.leases),
                "queued": model.admission.queued,
                "restarts": model.lifecycle.restarts,
                "last_error": model.lifecycle.last_error,
            }
        return result

    # -- internals -----------------------------------------------------------------------------

    def _move(self, model: ManagedModel, target: State, reason: str) -> None:
        event = model.lifecycle.move(target, at=time.time(), reason=reason)
        log.info("model %s: %s -> %s (%s)", model.name, event.from_state, target, reason)
        self.events.publish(event)

    def _check_cooldown(self, model: ManagedModel) -> None:
        cfg = self.config.supervisor
        if not model.lifecycle.exhausted(cfg.max_start_failures) or model.failed_at is None:
            return
        remaining = model.failed_at + cfg.failure_cooldown - trio.current_time()
        if remaining > 0:
            raise ModelUnavailable(
                f"model {model.name!r} failed {model.lifecycle.consecutive_failures} times in a "
                f"row and is cooling down for {remaining:.0f}s more; last error: "
                f"{model.lifecycle.last_error}",
                retry_after=remaining,
            )

    def _begin_start(self, model: ManagedModel, reason: str) -> ChildRun:
        if self._nursery is None or self._closing:
            raise ModelUnavailable("trioserve is shutting down", retry_after=1)
        self._move(model, State.STARTING, reason)
        run = ChildRun()
        model.run = run
        self._nursery.start_soon(self._run_child, model, run)
        return run

    def _kill(self, model: ManagedModel, run: ChildRun, reason: str) -> None:
        """End ``run`` now: its task is cancelled and its process group SIGKILLed."""
        run.grace = 0.0
        if model.run is run:
            for lease in list(model.leases):
                lease.lose(reason)
        run.scope.cancel()
        if run.child is not None:
            run.child.kill_now()

    def _notify_room(self) -> None:
        self._room_changed.set()
        self._room_changed = trio.Event()

    async def _take_slot(self, model: ManagedModel, run: ChildRun) -> None:
        """Wait until fewer than ``max_loaded`` models hold a slot, evicting the least recently
        used idle model if there is one; a model with a lease is never evicted."""
        limit = self.config.supervisor.max_loaded
        while True:
            holders = [m for m in self.models.values() if m.holds_slot]
            if len(holders) < limit:
                model.holds_slot = run.holds_slot = True
                return
            idle = [
                m for m in holders if m.state is State.READY and not m.leases and m.run is not None
            ]
            if idle:
                victim = min(idle, key=lambda m: m.last_used_clock)
                assert victim.run is not None
                reason = f"evicted for {model.name} (max_loaded={limit})"
                self._move(victim, State.STOPPING, reason)
                victim.run.stop_reason = reason
                victim.run.scope.cancel()
            await self._room_changed.wait()

    async def _run_child(self, model: ManagedModel, run: ChildRun) -> None:
        """The one task that owns ``run``: slot, port, spawn, readiness, serving, stop, reap."""
        failure: str | None = None
        try:
            # The lock is held from spawn to reap, so a model never has two processes. It is
            # taken outside ``run.scope`` so that even a cancelled run waits for its
            # predecessor to be reaped before it closes its books.
            async with model.lock:
                with run.scope:
                    try:
                        await self._take_slot(model, run)
                        run.port = self.ports.allocate()
                    except NoFreePort as exc:
                        failure = str(exc)
                    else:
                        await self._run_process(model, run)
        finally:
            self._end_run(model, run, failure)
            self._finish_run(model, run)

    async def _run_process(self, model: ManagedModel, run: ChildRun) -> None:
        failure: str | None = None
        async with trio.open_nursery() as child_nursery:
            # Errors are caught inside the nursery: trio would wrap them in an ExceptionGroup
            # on the way out.
            try:
                child = await self._spawn(model, child_nursery, run)
                await self._wait_ready(model, child, run)
                # An unload may have landed while the last readiness step ran in a worker
                # thread (not cancellable): let its cancellation take effect before `ready`.
                await trio.lowlevel.checkpoint()
                if model.state is not State.STARTING:
                    return  # stopped on purpose, not a failed start: `finally` stops it
                self._became_ready(model, run)
                failure = await self._serve(model, child, run)
            except _StartFailed as exc:
                failure = exc.reason
            except OSError as exc:  # the program is missing or not executable
                failure = f"could not start {model.config.cmd[0]!r}: {exc}"
            finally:
                # Users learn that the model is gone before we wait for its process: new
                # requests see `failed` (or `stopping`) now, not after a stop_grace.
                self._end_run(model, run, failure)
                if run.child is not None:
                    grace = (
                        run.grace if run.grace is not None else self.config.supervisor.stop_grace
                    )
                    await run.child.stop(grace)
                child_nursery.cancel_scope.cancel()

    async def _spawn(
        self, model: ManagedModel, nursery: trio.Nursery, run: ChildRun
    ) -> ChildProcess:
        assert run.port is not None
        values = placeholder_values(self.config, model.name, run.port)
        argv = [render(arg, values) for arg in model.config.cmd]
        env = child_env(
            {
                **{key: render(value, values) for key, value in model.config.env.items()},
                "TRIOSERVE_INSTANCE": self.instance,
                "TRIOSERVE_MODEL": model.name,
                "TRIOSERVE_STATE_DIR": str(self.config.state_dir),
            }
        )
        model.output.feed(f"--- trioserve: starting {model.name}: {argv}\n".encode())
        child = await ChildProcess.spawn(nursery, argv, env, model.output)
        # Recorded before the next checkpoint: from here on, however this task ends, the
        # process is stopped and reaped.
        run.child = child
        model.process = child
        model.spawns += 1
        model.started_at = time.time()
        self.on_spawn(model.name)
        # Shielded, and bounded (one psutil call, one SQLite insert): a child that exists has
        # a row, so `cleanup` can find it and the row is closed when it is reaped.
        with trio.CancelScope(shield=True):
            await self._record(model, child, run, argv)
        return child

    async def _record(
        self, model: ManagedModel, child: ChildProcess, run: ChildRun, argv: list[str]
    ) -> None:
        if self.store is None:
            return
        start_time = await trio.to_thread.run_sync(process_start_time, child.pid)
        store: StateStore = self.store.store
        port = run.port
        assert port is not None
        row_id = await self.store.call(
            lambda: store.record_child(
                instance=self.instance,
                model=model.name,
                pid=child.pid,
                pgid=child.pgid,
                port=port,
                start_time=start_time,
                boot_id=self.boot_id,
                argv=argv,
                state=State.STARTING.value,
            )
        )
        run.store_row = int(row_id)

    async def _wait_ready(self, model: ManagedModel, child: ChildProcess, run: ChildRun) -> None:
        """Probe the health path until our child answers 200, while watching its exit (pidfd)."""
        cfg = self.config.supervisor
        url = f"http://{CHILD_HOST}:{run.port}{model.config.health_path}"
        deadline = trio.current_time() + cfg.start_timeout
        impostor = ""
        while True:
            if child.exited.is_set():
                await self._gone(child)
                raise _StartFailed(
                    f"process exited with code {child.returncode} before it became healthy"
                    + self._tail(model)
                )
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise _StartFailed(
                    f"not healthy within start_timeout ({cfg.start_timeout:g}s) at {url}"
                    + impostor
                    + self._tail(model)
                )
            if await self._healthy(url, limit=min(remaining, 5.0)):
                # Between our bind test and the child's bind, another program may have taken
                # the port: a 200 counts only if the child's own process tree listens there.
                port = run.port
                assert port is not None
                if await trio.to_thread.run_sync(listens_on, child.pid, port):
                    return
                impostor = (
                    f"; port {port} answers, but another program holds it, not the model's process"
                )
            with trio.move_on_after(min(START_PROBE_INTERVAL, max(remaining, 0))):
                await child.exited.wait()

    async def _gone(self, child: ChildProcess) -> None:
        """The leader exited on its own: kill what is left of its group (it will be killed
        anyway) so the output pipe ends, then wait for its last words."""
        child.kill_now()
        await child.drain_output()

    async def _healthy(self, url: str, *, limit: float) -> bool:
        assert self._probe is not None
        with trio.move_on_after(limit):
            try:
                response = await self._probe.get(url)
            except httpx.HTTPError:
                return False
            return response.status_code == 200
        return False

    def _became_ready(self, model: ManagedModel, run: ChildRun) -> None:
        assert run.port is not None
        endpoint = Endpoint(model.name, CHILD_HOST, run.port)
        model.endpoint = endpoint
        model.touch()
        self._move(model, State.READY, "healthy")
        model.failed_at = None
        run.attempt.succeed(endpoint)
        if self.store is not None and run.store_row is not None:
            row, store = run.store_row, self.store.store
            self.store.submit(lambda: store.child_state(row, State.READY.value))

    async def _serve(self, model: ManagedModel, child: ChildProcess, run: ChildRun) -> str | None:
        """Wait while the model is ready. Returns a failure reason (crash, unresponsive), or
        None when the model was stopped on purpose (TTL)."""
        outcome: list[str | None] = []
        async with trio.open_nursery() as nursery:

            def end(reason: str | None) -> None:
                if not outcome:
                    outcome.append(reason)
                nursery.cancel_scope.cancel()

            async def watch_exit() -> None:
                await child.exited.wait()
                await self._gone(child)
                end(
                    f"process exited with code {child.returncode} while serving" + self._tail(model)
                )

            async def watch_health() -> None:
                cfg = self.config.supervisor
                url = f"http://{CHILD_HOST}:{run.port}{model.config.health_path}"
                failures = 0
                while True:
                    await trio.sleep(cfg.health_interval)
                    if await self._healthy(url, limit=min(cfg.health_interval, 5.0)):
                        failures = 0
                        continue
                    failures += 1
                    if failures >= cfg.unhealthy_after:
                        # Alive but wedged: it would not honour SIGTERM either.
                        run.grace = 0.0
                        end("unresponsive")

            async def watch_idle() -> None:
                ttl = model.config.ttl
                if ttl <= 0:
                    return
                while True:
                    if model.leases or model.state is not State.READY:
                        await model.lease_changed.wait()
                        continue
                    with trio.move_on_at(model.last_used_clock + ttl):
                        await model.lease_changed.wait()
                        continue
                    if model.state is State.READY and not model.leases:
                        reason = f"idle for {ttl:g}s (ttl)"
                        self._move(model, State.STOPPING, reason)
                        run.stop_reason = reason
                        end(None)
                        return

            nursery.start_soon(watch_exit)
            nursery.start_soon(watch_health)
            nursery.start_soon(watch_idle)
        return outcome[0] if outcome else None

    def _end_run(self, model: ManagedModel, run: ChildRun, failure: str | None) -> None:
        """The run is over for its users: the state leaves starting/ready, waiters get their
        answer, lease holders are cancelled. Its process may still be stopping."""
        if run.over:
            return
        run.over = True
        stop_reason = run.stop_reason or "shutdown"
        if model.run is run:
            model.endpoint = None
            if model.state in (State.STARTING, State.READY):
                if failure is not None:
                    self._move(model, State.FAILED, failure)
                    model.failed_at = trio.current_time()
                    self.on_failure(model.name, failure)
                else:
                    self._move(model, State.STOPPING, stop_reason)
            lost = failure or f"model {model.name!r} stopped: {stop_reason}"
            for lease in list(model.leases):
                lease.lose(lost)
        if failure is not None:
            run.attempt.fail(UpstreamError(f"model {model.name!r} failed to start: {failure}"))
        else:
            run.attempt.fail(
                UpstreamError(f"model {model.name!r} was stopped while starting: {stop_reason}")
            )

    def _finish_run(self, model: ManagedModel, run: ChildRun) -> None:
        """Bookkeeping once the process is reaped: port, slot, store row, `stopped`."""
        child = run.child
        if run.port is not None:
            self.ports.release(run.port)
        if run.holds_slot:
            model.holds_slot = run.holds_slot = False
        if child is not None and model.process is child:
            model.process = None
        if model.run is run and model.state is State.STOPPING:
            self._move(model, State.STOPPED, run.stop_reason or "stopped")
        if self.store is not None and run.store_row is not None:
            row, store = run.store_row, self.store.store
            code = child.returncode if child is not None else None
            state = "failed" if model.run is run and model.state is State.FAILED else "stopped"
            self.store.submit(lambda: store.child_stopped(row, code, state))
        run.stopped.set()
        model.changed_leases()
        self._notify_room()

    def _tail(self, model: ManagedModel) -> str:
        lines = model.output.tail(ERROR_TAIL_LINES)
        if not lines:
            return ""
        return "; last output:\n" + "\n".join(lines)

    def model_error(self, name: str) -> TrioserveError | None:
        model = self.resolve(name)
        if model.state is State.FAILED and model.lifecycle.last_error:
            return UpstreamError(model.lifecycle.last_error)
        return None
