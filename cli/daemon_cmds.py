"""``trioserve start`` and ``trioserve stop``: running the daemon, and stopping it through the
state store."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from typing import Annotated

import trio
import typer

from trioserve.config import Config
from trioserve.host.identity import same_process
from trioserve.host.running import live_daemon, lock_holder
from trioserve.host.store import DaemonRow, StateStore

from .common import EXIT_FAILURE, ConfigOption, die, load_or_exit, make_console, store_errors

__all__ = ["register", "tune_process"]

# Waiting for a process that is not our child, when pidfd is not available (Linux < 5.3).
_EXIT_POLL = 0.1
# Beyond the config's own shutdown_grace + stop_grace: interpreter exit, store writes.
_STOP_SLACK = 10.0
# Young collections every 10,000 allocations instead of 700: requests leave no reference
# cycles (tests/test_gateway_garbage.py), so a collection finds little, yet walks (holding the
# GIL) everything young, e.g. while 1,000 streams start.
GC_THRESHOLDS = (10_000, 20, 20)
# The /health thread (trioserve/server/listener.py) needs the GIL a few times per probe and
# each time waits up to this for the busy loop to let go of it (the default 5 ms made probes
# under load several times slower: docs/performance.md, "the GIL"). Only a thread that asks
# for the GIL makes the loop yield it.
SWITCH_INTERVAL = 0.001


def _with_overrides(config: Config, host: str | None, port: int | None) -> Config:
    server = config.server.model_copy(
        update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    )
    updated = config.model_copy(update={"server": server})
    updated._source = config.source
    return updated


def start(
    config_file: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="listen address (overrides the config)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (overrides the config)")] = None,
    insecure: Annotated[
        bool, typer.Option(help="allow a non-loopback host without api_keys")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the daemon in the foreground (systemd notify when NOTIFY_SOCKET is set)."""
    # Imported here: the server stack (Quart, Hypercorn) is heavy, and no other command needs it.
    from trioserve.daemon import DaemonError, run_daemon

    config = _with_overrides(load_or_exit(config_file), host, port)
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        die(f"--log-level: unknown level {log_level!r}", 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # python-multipart logs a warning for each malformed upload: any client could fill the
    # log with them. The client gets its 400 with the reason.
    logging.getLogger("python_multipart").setLevel(max(level, logging.ERROR))
    try:
        trio.run(lambda: run_daemon(config, insecure=insecure, on_ready=tune_process))
    except DaemonError as exc:
        die(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        # A second Ctrl-C: children were still stopped by their shielded cleanup.
        raise typer.Exit(130) from None


def tune_process() -> None:
    """Process-wide settings for a busy daemon; ``start`` owns the process, so it sets them,
    once the daemon has loaded everything (``run_daemon``'s ``on_ready``). Never undone: the
    process ends with the daemon. See docs/performance.md for the measurements."""
    # What is alive now (modules, apps, config) lives as long as the daemon: frozen, it is
    # never walked again by a full collection, which holds the GIL and /health with it.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL)


class _NotAllowed(Exception):
    def __init__(self, pid: int) -> None:
        super().__init__(
            f"not allowed to signal trioserve pid {pid} (it runs as another user); "
            "run this as that user or root, or use: systemctl stop trioserve"
        )


async def _terminate(row: DaemonRow) -> None:
    """SIGTERM the daemon of ``row`` and return once it has exited (the caller sets the limit).

    The pid is pinned with a pidfd before its identity is checked, so the signal cannot reach
    a process that reused the pid in between.
    """
    try:
        pidfd = os.pidfd_open(row.pid)
    except ProcessLookupError:
        return
    except (OSError, AttributeError):  # Linux < 5.3
        await _terminate_by_polling(row)
        return
    try:
        if not same_process(row.pid, row.pid_start_time, row.boot_id):
            return  # exited (and the pid maybe reused) since we looked it up
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            return
        except PermissionError:
            raise _NotAllowed(row.pid) from None
        # A pidfd becomes readable when the process exits: an event, not a poll.
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


async def _terminate_by_polling(row: DaemonRow) -> None:
    if not same_process(row.pid, row.pid_start_time, row.boot_id):
        return
    try:
        os.kill(row.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        raise _NotAllowed(row.pid) from None
    # Not our child and no pidfd: there is nothing to wait on but the process table.
    while same_process(row.pid, row.pid_start_time, row.boot_id):  # noqa: ASYNC110
        await trio.sleep(_EXIT_POLL)


def stop(
    config_file: ConfigOption = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="seconds to wait for it to exit [default: shutdown_grace + stop_grace + 10]",
            show_default=False,
            min=0,
        ),
    ] = None,
) -> None:
    """Stop the running daemon (found through the state store) and wait until it has exited."""
    config = load_or_exit(config_file)
    state_dir = config.state_dir
    with store_errors(state_dir):
        row = live_daemon(StateStore(state_dir))
    if row is None:
        holder = lock_holder(state_dir)
        if holder:
            die(
                f"pid {holder} holds {state_dir / 'trioserve.lock'} but no running daemon is "
                f"recorded in the state store; if it is trioserve, stop it with: kill {holder}"
            )
        die(f"no daemon is running for state_dir {state_dir}")
    limit = timeout
    if limit is None:
        limit = config.server.shutdown_grace + config.supervisor.stop_grace + _STOP_SLACK
    out = make_console()
    out.print(
        f"stopping trioserve pid {row.pid} ({row.url}, instance {row.instance})…", markup=False
    )
    try:
        stopped, elapsed = trio.run(_timed_terminate, row, limit)
    except _NotAllowed as exc:
        die(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if not stopped:
        die(
            f"trioserve pid {row.pid} is still running after {limit:g}s (it may still be "
            f"stopping models); force it with: kill -KILL {row.pid}, then: trioserve cleanup"
        )
    out.print(f"trioserve pid {row.pid} stopped ({elapsed:.1f}s)", markup=False)


async def _timed_terminate(row: DaemonRow, limit: float) -> tuple[bool, float]:
    begin = trio.current_time()
    with trio.move_on_after(limit):
        await _terminate(row)
        return True, trio.current_time() - begin
    return False, limit


def register(app: typer.Typer) -> None:
    app.command("start")(start)
    app.command("stop")(stop)
