"""The daemon: single-instance lock, state store, startup cleanup, supervisor, Hypercorn, systemd.

Shutdown (SIGTERM, SIGINT, ``trioserve stop``, systemd): stop accepting, let in-flight requests
finish within ``shutdown_grace``, then stop every child in parallel, record it, exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import trio

from trioserve.config import Config, is_loopback
from trioserve.gateway.activity import ActivityHistory
from trioserve.gateway.admin import build_admin_app
from trioserve.gateway.app import Gateway
from trioserve.gateway.metrics import Metrics
from trioserve.gateway.relay import Relay
from trioserve.gateway.stream_ends import StreamEnds
from trioserve.gateway.upstream import KeepAlivePool
from trioserve.gateway.usage import UsageBook
from trioserve.host.cleanup import reclaim_leftovers
from trioserve.host.guard_client import Guard, GuardError
from trioserve.host.notify import SystemdNotifier
from trioserve.host.running import live_daemon
from trioserve.host.store import DaemonRow, InstanceLock, InstanceLocked, StateStore, StoreWriter
from trioserve.reload import Reloader, ReloadRefused
from trioserve.reload_plan import ReloadPlan
from trioserve.server.hypercorn_serve import hypercorn_config, serve
from trioserve.supervision.events import EventBus
from trioserve.supervision.process import process_start_time, read_boot_id
from trioserve.supervision.supervisor import Supervisor

from . import __version__

__all__ = ["DaemonError", "DaemonInfo", "run_daemon"]

log = logging.getLogger("trioserve")

_E = TypeVar("_E", bound=BaseException)
# Idle keep-alive connections kept per backend; more concurrent requests open more.
IDLE_PER_BACKEND = 64


class DaemonError(Exception):
    """The daemon refuses to start; the message says why and what to do."""


@dataclass(frozen=True)
class DaemonInfo:
    instance: str
    url: str
    supervisor: Supervisor


def _url_for(bind: str) -> str:
    return bind if bind.startswith("http") else f"http://{bind}"


def _configured_url(config: Config) -> str:
    """The URL before binding (port 0 is corrected once the listener is bound)."""
    host = config.server.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{config.server.port}"


async def run_daemon(
    config: Config,
    *,
    insecure: bool = False,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    on_ready: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[DaemonInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT (or ``shutdown_trigger`` returns).

    ``on_ready`` is called once, in the loop, when the daemon is listening and everything it
    keeps is loaded, before READY and ``task_status.started``. The daemon changes no
    process-wide setting itself; the process's owner (``trioserve start``) tunes it there.
    """
    server = config.server
    if not is_loopback(server.host) and not config.all_api_keys and not insecure:
        raise DaemonError(
            f"refusing to listen on {server.host} with no api_keys: anyone on the network could "
            "use your models. Set [server] api_keys, bind to 127.0.0.1, or pass --insecure."
        )
    state_dir = config.state_dir
    lock = InstanceLock(state_dir)
    try:
        lock.acquire()
    except InstanceLocked as exc:
        message = await trio.to_thread.run_sync(_already_running, state_dir, exc)
        raise DaemonError(message) from None
    except OSError as exc:
        raise DaemonError(f"cannot use state_dir {state_dir}: {exc}") from exc
    try:
        await _run_locked(config, state_dir, shutdown_trigger, on_ready, task_status)
    except BaseExceptionGroup as group:
        # Nurseries (ours and Hypercorn's) wrap everything in groups; a refusal to start or a
        # second Ctrl-C is one plain exception to the caller, so the CLI can print one line.
        for kind in (KeyboardInterrupt, DaemonError):
            leaf = _leaf(group, kind)
            if leaf is not None:
                raise leaf from group
        raise
    finally:
        lock.release()


def _leaf(error: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of ``kind`` in ``error`` or, recursively, in its groups."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _leaf(inner, kind)
            if found is not None:
                return found
    return None


def _already_running(state_dir: Path, exc: InstanceLocked) -> str:
    """Name the daemon that holds the lock: pid, instance and URL from the state store."""
    try:
        row = live_daemon(StateStore(state_dir))
    except Exception:  # a broken store must not hide the real message
        row = None
    if row is None:
        return str(exc)
    return (
        f"state_dir {state_dir} is already used by a running daemon: pid {row.pid}, "
        f"instance {row.instance}, {row.url}; stop it first (trioserve stop) or use another "
        "state_dir"
    )


async def _run_locked(
    config: Config,
    state_dir: Path,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    on_ready: Callable[[], None] | None,
    task_status: trio.TaskStatus[DaemonInfo],
) -> None:
    store = StateStore(state_dir)
    instance = uuid.uuid4().hex[:12]
    notifier = SystemdNotifier.from_env()
    pid = os.getpid()
    started_at = time.time()
    row = DaemonRow(
        instance=instance,
        pid=pid,
        pid_start_time=process_start_time(pid),
        boot_id=read_boot_id(),
        url=_configured_url(config),
        started_at=started_at,
        stopped_at=None,
    )
    # Recorded before anything else, so `trioserve stop` and `cleanup` see this daemon (and
    # leave its children alone) from its first moment; the URL is corrected once bound.
    await trio.to_thread.run_sync(store.record_daemon, row)
    writer = StoreWriter(store)
    try:
        reclaimed = await trio.to_thread.run_sync(
            lambda: reclaim_leftovers(
                store, live_instance=instance, grace=config.supervisor.stop_grace
            )
        )
        for line in reclaimed:
            log.warning("startup cleanup: %s", line)
        # The writer lives in a nursery of its own, outside everything that submits to it:
        # when the rest has finished, it is closed and drains what is queued (children's final
        # states) instead of being cancelled with those writes still pending.
        # The guard outlives everything that spawns: it learns each child before any request
        # can reach it, and is told goodbye only once every child was stopped and reaped.
        guard = Guard(instance=instance, grace=config.supervisor.stop_grace)
        async with trio.open_nursery() as guard_nursery:
            try:
                await guard_nursery.start(guard.run)
            except GuardError as exc:
                raise DaemonError(f"cannot start the guard process: {exc}") from exc
            try:
                async with trio.open_nursery() as store_nursery:
                    await store_nursery.start(writer.run)
                    try:
                        await _serve(
                            config,
                            instance,
                            row,
                            store,
                            writer,
                            notifier,
                            guard,
                            shutdown_trigger,
                            on_ready,
                            task_status,
                        )
                    finally:
                        writer.close()
            finally:
                guard.close()
                await guard.wait_closed()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.daemon_stopped, instance)
    log.info("trioserve stopped")


async def _serve(
    config: Config,
    instance: str,
    row: DaemonRow,
    store: StateStore,
    writer: StoreWriter,
    notifier: SystemdNotifier,
    guard: Guard,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    on_ready: Callable[[], None] | None,
    task_status: trio.TaskStatus[DaemonInfo],
) -> None:
    metrics = Metrics()
    events = EventBus()
    stop_requested = trio.Event()

    async def trigger() -> None:
        if shutdown_trigger is None:
            await stop_requested.wait()
            return
        async with trio.open_nursery() as nursery:

            async def external() -> None:
                await shutdown_trigger()
                stop_requested.set()

            nursery.start_soon(external)
            await stop_requested.wait()
            nursery.cancel_scope.cancel()

    def apply(new: Config, plan: ReloadPlan) -> None:
        """A reload, put in force in one step (no checkpoint)."""
        supervisor.apply_config(new, plan)
        relay.config = gateway.config = new
        usage.set_users(new.users)
        guard.set_grace(new.supervisor.stop_grace)

    reloader = Reloader(config, apply, notifier)
    async with trio.open_nursery() as outer:
        outer.start_soon(_watch_signals, stop_requested, reloader)
        async with trio.open_nursery() as core:
            supervisor = Supervisor(
                config, instance=instance, events=events, store=writer, guard=guard
            )
            supervisor.on_spawn = metrics.spawned
            supervisor.on_failure = metrics.failed
            metrics.watch_models(supervisor.status)
            await core.start(supervisor.run)
            # Concurrency per model is bounded by admission, not by the pool.
            pool = KeepAlivePool(max_idle_per_backend=IDLE_PER_BACKEND, keepalive_expiry=5.0)
            core.start_soon(_sweep_on_model_events, pool, supervisor)
            async with pool:
                usage = UsageBook(metrics.registry, config.users)
                activity = ActivityHistory(supervisor.status, usage)
                await core.start(activity.run)
                stream_ends = StreamEnds()
                admin = build_admin_app(
                    reloader,
                    supervisor,
                    metrics,
                    usage,
                    activity,
                    stream_ends,
                    instance=instance,
                    started_at=row.started_at,
                    version=__version__,
                    pid=row.pid,
                )
                relay = Relay(config, supervisor, pool, metrics, usage)
                gateway = Gateway(config, relay, admin)
                hyper = hypercorn_config(config)
                served = trio.Event()

                async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
                    try:
                        await serve(
                            gateway,
                            hyper,
                            shutdown_trigger=trigger,
                            # Read at the stop: a reload changes it too.
                            drain_quiet=lambda: gateway.config.server.drain_quiet,
                            task_status=task_status,
                        )
                    finally:
                        served.set()

                try:
                    binds = await core.start(run_server)
                except (OSError, BaseExceptionGroup) as exc:
                    bind_error = _leaf(exc, OSError)
                    if bind_error is None:
                        raise
                    raise DaemonError(
                        f"cannot listen on {config.server.host}:{config.server.port}: "
                        f"{bind_error.strerror or bind_error}"
                    ) from exc
                url = _url_for(binds[0]) if binds else row.url
                bound = replace(row, url=url)
                await writer.call(lambda: store.record_daemon(bound))
                log.info("trioserve %s listening on %s (instance %s)", __version__, url, instance)
                if on_ready is not None:
                    # Everything the daemon keeps for its lifetime now exists: modules, apps,
                    # config, supervisor, the listener.
                    on_ready()
                # READY only now: the listener is bound and the startup cleanup is done.
                await notifier.ready(status=_status_line(supervisor))
                await core.start(notifier.run_watchdog)
                core.start_soon(_report_status, notifier, supervisor)
                task_status.started(DaemonInfo(instance, url, supervisor))
                await stop_requested.wait()
                reloader.closed = True
                # Event streams never end by themselves: ended now, they hold no stop.
                stream_ends.close()
                log.info("shutting down: draining requests, then stopping models")
                await notifier.stopping(status="stopping: draining requests, then models")
                # The server drains (/health says 503 "draining" while requests are still
                # served, until none has been in flight for a moment: hypercorn_serve.Drain),
                # then stops accepting; in-flight requests have until shutdown_grace after the
                # stop request. Then the supervisor is cancelled, which stops every child in
                # parallel and reaps it.
                with trio.move_on_after(config.server.shutdown_grace + 1):
                    await served.wait()
                core.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def _watch_signals(stop_requested: trio.Event, reloader: Reloader) -> None:
    """SIGTERM/SIGINT: graceful stop (a second one: stop models now). SIGHUP: reload the
    config — never the default action, which would end the daemon when its terminal closes."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("received SIGHUP: reloading the config")
                with contextlib.suppress(ReloadRefused):  # logged, and told to systemd
                    await reloader.reload()
            elif not stop_requested.is_set():
                log.info("received %s", signal.Signals(signum).name)
                stop_requested.set()
            else:
                log.warning("second signal: stopping models now")
                raise KeyboardInterrupt


def _status_line(supervisor: Supervisor) -> str:
    states: dict[str, int] = {}
    for info in supervisor.status().values():
        states[info.state.value] = states.get(info.state.value, 0) + 1
    ready = states.get("ready", 0)
    return f"{ready} of {len(supervisor.models)} models ready; " + ", ".join(
        f"{count} {state}" for state, count in sorted(states.items())
    )


async def _sweep_on_model_events(pool: KeepAlivePool, supervisor: Supervisor) -> None:
    """A model that stopped or crashed leaves idle connections to a dead port: close them."""
    async with supervisor.events.subscribe() as receive:
        async for _event in receive:
            try:
                await pool.sweep()
            except Exception:
                # Housekeeping: a failure here must not take the daemon down.
                log.exception("closing idle upstream connections failed")


async def _report_status(notifier: SystemdNotifier, supervisor: Supervisor) -> None:
    if not notifier.enabled:
        return
    async with supervisor.events.subscribe() as receive:
        async for _event in receive:
            await notifier.status(_status_line(supervisor))
