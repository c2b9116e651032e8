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

from .admission import Admission
from .config import Config, placeholder_values, render
from .errors import ModelNotFound, ModelUnavailable, TrioserveError, UpstreamError
from .events import EventBus
from .lifecycle import Lifecycle, State
from .model import Endpoint, Lease, ManagedModel, StartAttempt
from .ports import NoFreePort, PortAllocator
from .process import ChildProcess, child_env, process_start_time, read_boot_id
from .store import StateStore, StoreWriter

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
        self._probe: httpx.AsyncClient | None = None
        # Hooks for metrics; called with the model name.
        self.on_spawn: Callable[[str], None] = lambda name: None
        self.on_failure: Callable[[str, str], None] = lambda name, reason: None

    # -- running -------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until cancelled; on cancellation every child is stopped (in parallel) and reaped."""
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with httpx.AsyncClient(trust_env=False, limits=limits) as probe:
            self._probe = probe
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started(self)
                    await trio.sleep_forever()
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
            if state is State.READY and model.endpoint is not None:
                return model.endpoint
            if state is State.STOPPING:
                await model.stopped.wait()
                continue
            if state is State.STARTING and model.attempt is not None:
                attempt = model.attempt
            else:
                self._check_cooldown(model)
                attempt = self._begin_start(model, "requested")
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
        """Stop ``name``: after its in-flight requests finish, or at once with ``force``."""
        model = self.resolve(name)
        state = model.state
        if state is State.STOPPED:
            return
        if state is State.FAILED:
            # Unload is how an operator clears a failure: the next request starts afresh.
            self._move(model, State.STOPPED, "unloaded")
            model.lifecycle.consecutive_failures = 0
            model.failed_at = None
            return
        reason = "unloaded (force)" if force else "unloaded"
        stopped = model.stopped
        if state in (State.STARTING, State.READY):
            self._move(model, State.STOPPING, reason)
            model.stop_reason = reason
        if force:
            model.stop_grace = 0.0
            for lease in list(model.leases):
                lease.lose(f"model {model.name!r} was unloaded with force")
            self._cancel_child(model)
        else:
            # A start has nothing to drain; a ready model finishes what it is doing.
            while model.leases:
                await model.lease_changed.wait()
            self._cancel_child(model)
        await stopped.wait()

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

    def _begin_start(self, model: ManagedModel, reason: str) -> StartAttempt:
        if self._nursery is None:
            raise ModelUnavailable("trioserve is shutting down", retry_after=1)
        self._move(model, State.STARTING, reason)
        attempt = StartAttempt()
        model.attempt = attempt
        model.stopped = trio.Event()
        model.child_scope = trio.CancelScope()
        model.stop_reason = ""
        model.stop_grace = None
        self._nursery.start_soon(self._run_child, model, attempt, model.child_scope)
        return attempt

    def _cancel_child(self, model: ManagedModel) -> None:
        if model.child_scope is not None:
            model.child_scope.cancel()

    def _notify_room(self) -> None:
        self._room_changed.set()
        self._room_changed = trio.Event()

    async def _take_slot(self, model: ManagedModel) -> None:
        """Wait until fewer than ``max_loaded`` models hold a slot, evicting the least recently
        used idle model if there is one; a model with a lease is never evicted."""
        limit = self.config.supervisor.max_loaded
        while True:
            holders = [m for m in self.models.values() if m.holds_slot]
            if len(holders) < limit:
                model.holds_slot = True
                return
            idle = [m for m in holders if m.state is State.READY and not m.leases]
            if idle:
                victim = min(idle, key=lambda m: m.last_used_clock)
                reason = f"evicted for {model.name} (max_loaded={limit})"
                self._move(victim, State.STOPPING, reason)
                victim.stop_reason = reason
                self._cancel_child(victim)
            await self._room_changed.wait()

    async def _run_child(
        self, model: ManagedModel, attempt: StartAttempt, scope: trio.CancelScope
    ) -> None:
        failure: str | None = None
        child: ChildProcess | None = None
        port: int | None = None
        async with model.lock:
            try:
                with scope:
                    await self._take_slot(model)
                    port = self.ports.allocate()
                    async with trio.open_nursery() as child_nursery:
                        # Errors are caught inside the nursery: trio would wrap them in an
                        # ExceptionGroup on the way out.
                        try:
                            child = await self._spawn(model, child_nursery, port)
                            await self._wait_ready(model, child, port)
                            self._became_ready(model, attempt, port)
                            failure = await self._serve(model, child)
                        except _StartFailed as exc:
                            failure = exc.reason
                        except OSError as exc:  # the program is missing or not executable
                            failure = f"could not start {model.config.cmd[0]!r}: {exc}"
                        finally:
                            if child is not None:
                                grace = model.stop_grace
                                if grace is None:
                                    grace = self.config.supervisor.stop_grace
                                await child.stop(grace)
                            child_nursery.cancel_scope.cancel()
            except NoFreePort as exc:
                failure = str(exc)
            finally:
                self._finish_child(model, attempt, child, port, failure)

    async def _spawn(self, model: ManagedModel, nursery: trio.Nursery, port: int) -> ChildProcess:
        values = placeholder_values(self.config, model.name, port)
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
        model.process = child
        model.spawns += 1
        model.started_at = time.time()
        self.on_spawn(model.name)
        start_time = await trio.to_thread.run_sync(process_start_time, child.pid)
        if self.store is not None:
            store: StateStore = self.store.store
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
            model.store_row = int(row_id)
        return child

    async def _wait_ready(self, model: ManagedModel, child: ChildProcess, port: int) -> None:
        """Probe the health path until 200, while watching the process exit (pidfd)."""
        cfg = self.config.supervisor
        url = f"http://{CHILD_HOST}:{port}{model.config.health_path}"
        deadline = trio.current_time() + cfg.start_timeout
        while True:
            if child.exited.is_set():
                raise _StartFailed(
                    f"process exited with code {child.returncode} before it became healthy"
                    + self._tail(model)
                )
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise _StartFailed(
                    f"not healthy within start_timeout ({cfg.start_timeout:g}s) at {url}"
                    + self._tail(model)
                )
            if await self._healthy(url, limit=min(remaining, 5.0)):
                return
            with trio.move_on_after(min(START_PROBE_INTERVAL, max(remaining, 0))):
                await child.exited.wait()

    async def _healthy(self, url: str, *, limit: float) -> bool:
        assert self._probe is not None
        with trio.move_on_after(limit):
            try:
                response = await self._probe.get(url)
            except httpx.HTTPError:
                return False
            return response.status_code == 200
        return False

    def _became_ready(self, model: ManagedModel, attempt: StartAttempt, port: int) -> None:
        endpoint = Endpoint(model.name, CHILD_HOST, port)
        model.endpoint = endpoint
        model.touch()
        self._move(model, State.READY, "healthy")
        model.failed_at = None
        attempt.succeed(endpoint)
        if self.store is not None and model.store_row is not None:
            row, store = model.store_row, self.store.store
            self.store.submit(lambda: store.child_state(row, State.READY.value))

    async def _serve(self, model: ManagedModel, child: ChildProcess) -> str | None:
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
                end(
                    f"process exited with code {child.returncode} while serving" + self._tail(model)
                )

            async def watch_health() -> None:
                cfg = self.config.supervisor
                url = (
                    f"{model.endpoint.base_url if model.endpoint else ''}{model.config.health_path}"
                )
                failures = 0
                while True:
                    await trio.sleep(cfg.health_interval)
                    if await self._healthy(url, limit=min(cfg.health_interval, 5.0)):
                        failures = 0
                        continue
                    failures += 1
                    if failures >= cfg.unhealthy_after:
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
                        model.stop_reason = reason
                        end(None)
                        return

            nursery.start_soon(watch_exit)
            nursery.start_soon(watch_health)
            nursery.start_soon(watch_idle)
        return outcome[0] if outcome else None

    def _finish_child(
        self,
        model: ManagedModel,
        attempt: StartAttempt,
        child: ChildProcess | None,
        port: int | None,
        failure: str | None,
    ) -> None:
        """Bookkeeping after the child is gone (it has been reaped by now)."""
        for lease in list(model.leases):
            lease.lose(failure or f"model {model.name!r} stopped: {model.stop_reason}")
        if port is not None:
            self.ports.release(port)
        model.holds_slot = False
        model.process = None
        model.endpoint = None
        state = model.state
        if failure is not None and state in (State.STARTING, State.READY):
            self._move(model, State.FAILED, failure)
            model.failed_at = trio.current_time()
            self.on_failure(model.name, failure)
            store_state = "failed"
        else:
            if state in (State.STARTING, State.READY):
                self._move(model, State.STOPPING, model.stop_reason or "shutdown")
            if model.state is State.STOPPING:
                self._move(model, State.STOPPED, model.stop_reason or "stopped")
            store_state = "stopped"
        if failure is not None:
            attempt.fail(UpstreamError(f"model {model.name!r} failed to start: {failure}"))
        else:
            attempt.fail(
                UpstreamError(
                    f"model {model.name!r} was stopped while starting: "
                    f"{model.stop_reason or 'shutdown'}"
                )
            )
        model.attempt = None
        model.child_scope = None
        if self.store is not None and model.store_row is not None:
            row, store = model.store_row, self.store.store
            code = child.returncode if child is not None else None
            self.store.submit(lambda: store.child_stopped(row, code, store_state))
        model.store_row = None
        model.stopped.set()
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
