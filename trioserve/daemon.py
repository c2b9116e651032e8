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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from trioserve.config import Config, is_loopback
from trioserve.daemon_control import DaemonControl
from trioserve.daemon_watchers import report_status, status_line, sweep_on_model_events
from trioserve.errors import ConfigError
from trioserve.gateway.activity import ActivityHistory
from trioserve.gateway.admin import AdminContext, build_admin_app
from trioserve.gateway.admin_access import AdminAccess
from trioserve.gateway.app import Gateway
from trioserve.gateway.metrics import Metrics
from trioserve.gateway.relay import Relay
from trioserve.gateway.stream_ends import StreamEnds
from trioserve.gateway.upstream import KeepAlivePool
from trioserve.gateway.usage import UsageBook
from trioserve.gateway.usage_keeper import UsageKeeper
from trioserve.host.admin_files import AdminFileError, write_admin_token
from trioserve.host.cleanup import reclaim_leftovers
from trioserve.host.guard_client import Guard, GuardError
from trioserve.host.identity import process_start_time, read_boot_id
from trioserve.host.notify import SystemdNotifier
from trioserve.host.running import live_daemon
from trioserve.host.store import DaemonRow, InstanceLock, InstanceLocked, StateStore, StoreWriter
from trioserve.reload import Reloader
from trioserve.reload_plan import ReloadPlan
from trioserve.server.hypercorn_serve import ListenError, hypercorn_config, retune, serve
from trioserve.supervision.events import EventBus
from trioserve.supervision.supervisor import Supervisor

from . import __version__

if TYPE_CHECKING:
    from trioserve.mcp import McpEndpoint

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
    hypercorn: Any  # the running server's hypercorn.config.Config (a reload retunes it)


def _url_for(bind: str) -> str:
    return bind if bind.startswith("http") else f"http://{bind}"


def _configured_url(config: Config) -> str:
    """The URL before binding (port 0 is corrected once the listener is bound)."""
    host = config.server.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if config.tls else "http"
    return f"{scheme}://{host}:{config.server.port}"


async def run_daemon(
    config: Config,
    *,
    insecure: bool = False,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    on_ready: Callable[[], None] | None = None,
    on_phase: Callable[[str], Awaitable[None]] | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[DaemonInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT (or ``shutdown_trigger`` returns).

    ``on_ready`` is called once, in the loop, when the daemon is listening and everything it
    keeps is loaded, before READY and ``task_status.started``. The daemon changes no
    process-wide setting itself; the process's owner (``trioserve start``) tunes it there.
    ``on_phase`` is awaited as each phase of the start-up begins (``PHASES``), for callers that
    want to watch it.

    A program that embeds the daemon and owns the process's signals, or runs it off the main
    thread (where trio cannot receive signals), passes ``handle_signals=False`` and stops it
    with ``shutdown_trigger``: the daemon then handles no signal, and SIGHUP reloads nothing
    (``POST /admin/reload`` still does).
    """
    server = config.server
    if not is_loopback(server.host) and not config.all_api_keys and not insecure:
        raise DaemonError(
            f"refusing to listen on {server.host} with no api_keys: anyone on the network could "
            "use your models. Set [server] api_keys, bind to 127.0.0.1, or pass --insecure."
        )
    if (
        not is_loopback(server.host)
        and server.admin_over_tcp == "open"
        and not server.admin_keys
        and not insecure
    ):
        raise DaemonError(
            f'refusing to listen on {server.host} with admin_over_tcp = "open" and no '
            "admin_keys: anyone on the network could unload models and reload the config. Set "
            '[server] admin_keys, admin_over_tcp = "keys", bind to 127.0.0.1, or pass --insecure.'
        )
    control = DaemonControl(on_phase, on_ready=on_ready, shutdown_trigger=shutdown_trigger)
    # The signals are ours before the daemon owns anything (lock, guard, leftovers): until a
    # handler is installed, SIGHUP's default action would end the daemon, and SIGTERM's would
    # skip the stopping of its children.
    receiver: AbstractContextManager[AsyncIterator[int] | None] = (
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        if handle_signals
        else nullcontext()
    )
    try:
        with receiver as signals:
            async with trio.open_nursery() as nursery:
                if signals is not None:
                    nursery.start_soon(control.watch_signals, signals, nursery)
                with control.start_scope:
                    await _run_owned(config, control, task_status)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Nurseries (ours and Hypercorn's) wrap everything in groups; a refusal to start or a
        # second Ctrl-C is one plain exception to the caller, so the CLI can print one line.
        for kind in (KeyboardInterrupt, DaemonError):
            leaf = _leaf(group, kind)
            if leaf is not None:
                raise leaf from group
        raise


async def _run_owned(
    config: Config,
    control: DaemonControl,
    task_status: trio.TaskStatus[DaemonInfo],
) -> None:
    await control.phase("lock")
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
        await _run_locked(config, state_dir, control, task_status)
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


@dataclass(frozen=True)
class _Owned:
    """What the host side of a run owns, for the serving part."""

    config: Config
    row: DaemonRow
    store: StateStore
    writer: StoreWriter
    notifier: SystemdNotifier
    guard: Guard


async def _run_locked(
    config: Config,
    state_dir: Path,
    control: DaemonControl,
    task_status: trio.TaskStatus[DaemonInfo],
) -> None:
    store = StateStore(state_dir)
    instance = uuid.uuid4().hex[:12]
    pid = os.getpid()
    row = DaemonRow(
        instance=instance,
        pid=pid,
        pid_start_time=process_start_time(pid),
        boot_id=read_boot_id(),
        url=_configured_url(config),
        started_at=time.time(),
        stopped_at=None,
    )
    # Recorded before anything else, so `trioserve stop` and `cleanup` see this daemon (and
    # leave its children alone) from its first moment; the URL is corrected once bound.
    await control.phase("record")
    await trio.to_thread.run_sync(store.record_daemon, row)
    try:
        await control.phase("reclaim")
        reclaimed = await trio.to_thread.run_sync(
            lambda: reclaim_leftovers(
                store, live_instance=instance, grace=config.supervisor.stop_grace
            )
        )
        for line in reclaimed:
            log.warning("startup cleanup: %s", line)
        # The guard outlives everything that spawns: it learns each child before any request
        # can reach it, and is told goodbye only once every child was stopped and reaped.
        await control.phase("guard")
        guard = Guard(instance=instance, grace=config.supervisor.stop_grace)
        async with trio.open_nursery() as guard_nursery:
            # Closed however the start ends: a stop during start-up may cancel it half-way.
            try:
                try:
                    await guard_nursery.start(guard.run)
                except GuardError as exc:
                    raise DaemonError(f"cannot start the guard process: {exc}") from exc
                owned = _Owned(
                    config, row, store, StoreWriter(store), SystemdNotifier.from_env(), guard
                )
                await control.phase("store")
                async with _store_writer(owned.writer):
                    await _serve(owned, control, task_status)
            finally:
                guard.close()
                await guard.wait_closed()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.daemon_stopped, instance)
    log.info("trioserve stopped")


@asynccontextmanager
async def _store_writer(writer: StoreWriter) -> AsyncIterator[None]:
    """The writer lives in a nursery of its own, outside everything that submits to it: when
    the rest has finished, it is closed and drains what is queued (children's final states)
    instead of being cancelled with those writes still pending."""
    async with trio.open_nursery() as store_nursery:
        await store_nursery.start(writer.run)
        try:
            yield
        finally:
            writer.close()


class _Reloadable:
    """Everything a reload switches over, in one step with no checkpoint (``apply``)."""

    def __init__(self, supervisor: Supervisor, usage: UsageBook, guard: Guard, hyper: Any) -> None:
        self.supervisor = supervisor
        self.usage = usage
        self.guard = guard
        self.hyper = hyper
        self.configured: list[Any] = []  # objects with a ``config`` attribute: relay, gateway

    def apply(self, new: Config, plan: ReloadPlan) -> None:
        self.supervisor.apply_config(new, plan)
        for part in self.configured:
            part.config = new
        self.usage.set_users(new.users)
        self.guard.set_grace(new.supervisor.stop_grace)
        retune(self.hyper, new)


async def _serve(
    owned: _Owned,
    control: DaemonControl,
    task_status: trio.TaskStatus[DaemonInfo],
) -> None:
    config, notifier = owned.config, owned.notifier
    metrics = Metrics()
    async with trio.open_nursery() as core:
        await control.phase("supervisor")
        supervisor = Supervisor(
            config,
            instance=owned.row.instance,
            events=EventBus(),
            store=owned.writer,
            guard=owned.guard,
        )
        supervisor.on_spawn = metrics.spawned
        supervisor.on_failure = metrics.failed
        metrics.watch_models(supervisor.status)
        metrics.watch_devices(supervisor.devices)
        try:
            await supervisor.prepare()
        except ConfigError as exc:  # a model that could never fit its memory budgets
            raise DaemonError(str(exc)) from None
        await core.start(supervisor.run)
        await control.phase("gateway")
        # Concurrency per model is bounded by admission, not by the pool.
        pool = KeepAlivePool(max_idle_per_backend=IDLE_PER_BACKEND, keepalive_expiry=5.0)
        core.start_soon(sweep_on_model_events, pool, supervisor)
        async with pool:
            usage = UsageBook(metrics.registry, config.users)
            # Today's totals feed the day budgets; then a write each second, one at the stop.
            keeper = UsageKeeper(usage, owned.writer)
            await keeper.load()
            await core.start(keeper.run)
            activity = ActivityHistory(supervisor.status, usage)
            await core.start(activity.run)
            hyper = hypercorn_config(config)
            live = _Reloadable(supervisor, usage, owned.guard, hyper)
            reloader = Reloader(config, live.apply, notifier, vet=supervisor.vet)
            stream_ends = StreamEnds()
            access = AdminAccess(await _admin_token(config))
            relay = Relay(config, supervisor, pool, metrics, usage, access)
            mcp = await _start_mcp(core, config, relay, supervisor, access)
            if mcp is not None:
                metrics.watch_mcp(mcp.counts)
                live.configured.append(mcp)
            admin = build_admin_app(
                AdminContext(
                    access,
                    reloader,
                    supervisor,
                    metrics,
                    usage,
                    activity,
                    stream_ends,
                    instance=owned.row.instance,
                    started_at=owned.row.started_at,
                    version=__version__,
                    pid=owned.row.pid,
                    mcp_counts=mcp.counts if mcp is not None else None,
                )
            )
            gateway = Gateway(config, relay, admin, mcp)
            live.configured += [relay, gateway]
            await control.phase("listen")
            served = trio.Event()
            url = await _listen(
                core, owned, gateway, hyper, control, served, mcp.stop if mcp else None
            )
            control.listening()
            if control.on_ready is not None:
                # Everything the daemon keeps for its lifetime now exists: modules, apps,
                # config, supervisor, the listener.
                control.on_ready()
            await control.phase("ready")
            # READY only now: the listener is bound and the startup cleanup is done.
            await notifier.ready(status=status_line(supervisor, reloader))
            await core.start(notifier.run_watchdog)
            core.start_soon(report_status, notifier, supervisor, reloader)
            control.started(reloader)
            task_status.started(DaemonInfo(owned.row.instance, url, supervisor, hyper))
            await control.stop_requested.wait()
            await _shut_down(reloader, stream_ends, notifier, served, config)
            core.cancel_scope.cancel()


async def _start_mcp(
    core: trio.Nursery, config: Config, relay: Relay, supervisor: Supervisor, access: AdminAccess
) -> McpEndpoint | None:
    """The MCP endpoint, running, when ``[mcp] enabled``; None otherwise (then the SDK, ~0.5 s
    of imports, is not even loaded, and /mcp answers 404)."""
    if not config.mcp.enabled:
        return None
    from trioserve.mcp import McpEndpoint

    mcp = McpEndpoint(config, relay, supervisor, access)
    await core.start(mcp.run)
    return mcp


async def _admin_token(config: Config) -> str:
    """A new local admin token in ``{state_dir}/admin.token``, for this run."""
    try:
        return await trio.to_thread.run_sync(
            write_admin_token, config.state_dir, config.server.admin_group
        )
    except (OSError, AdminFileError) as exc:
        raise DaemonError(f"cannot write the local admin token: {exc}") from exc


async def _listen(
    core: trio.Nursery,
    owned: _Owned,
    gateway: Gateway,
    hyper: Any,
    control: DaemonControl,
    served: trio.Event,
    on_drained: Callable[[], None] | None,
) -> str:
    """Start Hypercorn; returns the bound URL, recorded in the store. ``served`` is set once
    the server has stopped."""

    shutdown_trigger = control.shutdown_trigger

    async def trigger() -> None:
        if shutdown_trigger is None:
            await control.stop_requested.wait()
            return
        async with trio.open_nursery() as nursery:

            async def external() -> None:
                await shutdown_trigger()
                control.stop_requested.set()

            nursery.start_soon(external)
            await control.stop_requested.wait()
            nursery.cancel_scope.cancel()

    async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await serve(
                gateway,
                hyper,
                shutdown_trigger=trigger,
                # Read at the stop: a reload changes it too.
                drain_quiet=lambda: gateway.config.server.drain_quiet,
                # These three need a restart to change (reload_plan.RESTART_ONLY).
                admin_socket=owned.config.admin_socket_path,
                admin_group=owned.config.server.admin_group,
                health_port=owned.config.server.health_port,
                on_drained=on_drained,
                task_status=task_status,
            )
        finally:
            served.set()

    server = owned.config.server
    try:
        binds = await core.start(run_server)
    except (OSError, ListenError, BaseExceptionGroup) as exc:
        # Our own sockets (admin socket, health port) and the TLS files say what failed.
        own_error = _leaf(exc, ListenError)
        if own_error is not None:
            raise DaemonError(str(own_error)) from exc
        bind_error = _leaf(exc, OSError)
        if bind_error is None:
            raise
        raise DaemonError(
            f"cannot listen on {server.host}:{server.port}: {bind_error.strerror or bind_error}"
        ) from exc
    url = _url_for(binds[0]) if binds else owned.row.url
    bound = replace(owned.row, url=url)
    await owned.writer.call(lambda: owned.store.record_daemon(bound))
    log.info("trioserve %s listening on %s (instance %s)", __version__, url, owned.row.instance)
    return url


async def _shut_down(
    reloader: Reloader,
    stream_ends: StreamEnds,
    notifier: SystemdNotifier,
    served: trio.Event,
    config: Config,
) -> None:
    """The graceful part of a stop; the caller then cancels the supervisor, which stops every
    child in parallel and reaps it."""
    reloader.closed = True
    # Event streams never end by themselves: ended now, they hold no stop.
    stream_ends.close()
    log.info("shutting down: draining requests, then stopping models")
    await notifier.stopping(status="stopping: draining requests, then models")
    # The server drains (/health says 503 "draining" while requests are still served, until
    # none has been in flight for a moment: hypercorn_serve.Drain), then stops accepting;
    # in-flight requests have until shutdown_grace after the stop request.
    with trio.move_on_after(config.server.shutdown_grace + 1):
        await served.wait()
