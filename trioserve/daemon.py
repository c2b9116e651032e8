"""The daemon: single-instance lock, state store, startup cleanup, supervisor, Hypercorn, systemd.

Shutdown (SIGTERM, SIGINT, ``trioserve stop``, systemd): stop accepting, let in-flight requests
finish within ``shutdown_grace``, then stop every child in parallel, record it, exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import trio
from hypercorn.trio import serve

from . import __version__
from .admin import build_admin_app
from .cleanup import reclaim_leftovers
from .config import Config, is_loopback
from .events import EventBus
from .gateway import Gateway
from .http_server import hypercorn_config
from .metrics import Metrics
from .notify import SystemdNotifier
from .process import process_start_time, read_boot_id
from .relay import Relay
from .store import DaemonRow, InstanceLock, StateStore, StoreWriter
from .supervisor import Supervisor

__all__ = ["DaemonError", "DaemonInfo", "run_daemon"]

log = logging.getLogger("trioserve")


class DaemonError(Exception):
    """The daemon refuses to start; the message says why and what to do."""


@dataclass(frozen=True)
class DaemonInfo:
    instance: str
    url: str
    supervisor: Supervisor


def _url_for(bind: str) -> str:
    return bind if bind.startswith("http") else f"http://{bind}"


async def run_daemon(
    config: Config,
    *,
    insecure: bool = False,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[DaemonInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT (or ``shutdown_trigger`` returns)."""
    server = config.server
    if not is_loopback(server.host) and not server.api_keys and not insecure:
        raise DaemonError(
            f"refusing to listen on {server.host} with no api_keys: anyone on the network could "
            "use your models. Set [server] api_keys, bind to 127.0.0.1, or pass --insecure."
        )
    state_dir = config.state_dir
    lock = InstanceLock(state_dir)
    try:
        lock.acquire()
    except OSError as exc:
        raise DaemonError(f"cannot use state_dir {state_dir}: {exc}") from exc
    try:
        await _run_locked(config, state_dir, shutdown_trigger, task_status)
    finally:
        lock.release()


async def _run_locked(
    config: Config,
    state_dir: os.PathLike[str] | str,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    task_status: trio.TaskStatus[DaemonInfo],
) -> None:
    from pathlib import Path

    store = StateStore(Path(state_dir))
    instance = uuid.uuid4().hex[:12]
    notifier = SystemdNotifier.from_env()
    reclaimed = await trio.to_thread.run_sync(
        lambda: reclaim_leftovers(store, live_instance=instance, grace=config.supervisor.stop_grace)
    )
    for line in reclaimed:
        log.warning("startup cleanup: %s", line)

    metrics = Metrics()
    events = EventBus()
    writer = StoreWriter(store)
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

    async with trio.open_nursery() as outer:
        await outer.start(writer.run)
        outer.start_soon(_watch_signals, stop_requested)
        async with trio.open_nursery() as core:
            supervisor = Supervisor(config, instance=instance, events=events, store=writer)
            supervisor.on_spawn = metrics.spawned
            supervisor.on_failure = metrics.failed
            metrics.watch_models(supervisor.status)
            await core.start(supervisor.run)
            pool = sum(m.max_concurrency for m in config.models.values()) + 16
            limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
            # Generation can take minutes: the relay's own cancel scopes are the deadlines,
            # so httpx's are off.
            async with httpx.AsyncClient(
                trust_env=False, limits=limits, timeout=httpx.Timeout(None)
            ) as http:
                started_at = time.time()
                admin = build_admin_app(
                    config,
                    supervisor,
                    metrics,
                    instance=instance,
                    started_at=started_at,
                    version=__version__,
                    pid=os.getpid(),
                )
                gateway = Gateway(config, Relay(config, supervisor, http, metrics), admin)
                hyper = hypercorn_config(config)
                served = trio.Event()

                async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
                    try:
                        await serve(
                            gateway,  # type: ignore[arg-type]  # hypercorn's TypedDict scopes
                            hyper,
                            shutdown_trigger=trigger,
                            task_status=task_status,
                        )
                    finally:
                        served.set()

                try:
                    binds = await core.start(run_server)
                except OSError as exc:
                    raise DaemonError(
                        f"cannot listen on {config.server.host}:{config.server.port}: "
                        f"{exc.strerror or exc}"
                    ) from exc
                url = _url_for(binds[0]) if binds else f"http://{config.server.host}"
                pid = os.getpid()
                row = DaemonRow(
                    instance=instance,
                    pid=pid,
                    pid_start_time=process_start_time(pid),
                    boot_id=read_boot_id(),
                    url=url,
                    started_at=started_at,
                    stopped_at=None,
                )
                await writer.call(lambda: store.record_daemon(row))
                log.info("trioserve %s listening on %s (instance %s)", __version__, url, instance)
                await notifier.ready(status=_status_line(supervisor))
                await core.start(notifier.run_watchdog)
                core.start_soon(_report_status, notifier, supervisor)
                task_status.started(DaemonInfo(instance, url, supervisor))
                await stop_requested.wait()
                log.info("shutting down: draining requests, then stopping models")
                await notifier.stopping()
                # Hypercorn stops accepting and drains for graceful_timeout; then the supervisor
                # is cancelled, which stops every child in parallel and reaps it.
                with trio.move_on_after(config.server.shutdown_grace + 1):
                    await served.wait()
                core.cancel_scope.cancel()
        await writer.call(lambda: store.daemon_stopped(instance))
        writer.close()
        outer.cancel_scope.cancel()
    log.info("trioserve stopped")


async def _watch_signals(stop_requested: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if not stop_requested.is_set():
                log.info("received %s", signal.Signals(signum).name)
                stop_requested.set()
            else:
                log.warning("second signal: stopping models now")
                raise KeyboardInterrupt


def _status_line(supervisor: Supervisor) -> str:
    states: dict[str, int] = {}
    for info in supervisor.status().values():
        states[info["state"]] = states.get(info["state"], 0) + 1
    ready = states.get("ready", 0)
    return f"{ready} of {len(supervisor.models)} models ready; " + ", ".join(
        f"{count} {state}" for state, count in sorted(states.items())
    )


async def _report_status(notifier: SystemdNotifier, supervisor: Supervisor) -> None:
    if not notifier.enabled:
        return
    async with supervisor.events.subscribe() as receive:
        async for _event in receive:
            await notifier.status(_status_line(supervisor))
