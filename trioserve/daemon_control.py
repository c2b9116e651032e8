"""The daemon's signals and the phases of its start-up (``run_daemon`` in ``daemon.py``)."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from trioserve.reload import Reloader, ReloadRefused

__all__ = ["PHASES", "DaemonControl"]

log = logging.getLogger("trioserve")

# The phases of the start-up, in order (``run_daemon``'s ``on_phase``; logged at debug level).
PHASES = ("lock", "record", "reclaim", "guard", "store", "supervisor", "gateway", "listen", "ready")


class DaemonControl:
    """The daemon's signals, from its first moment to its last.

    SIGTERM and SIGINT stop it: during start-up, at once (whatever was started is stopped and
    reaped on the way out); once it runs, gracefully (a second signal stops the models now).
    SIGHUP reloads the config; asked during start-up, the reload runs once start-up is
    complete. Never a signal's default action, which would end the daemon (SIGHUP: when its
    terminal closes) without stopping its children.
    """

    def __init__(
        self,
        on_phase: Callable[[str], Awaitable[None]] | None = None,
        *,
        on_ready: Callable[[], None] | None = None,
        shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        # What the caller of run_daemon asked for (see there).
        self.on_ready = on_ready
        self.shutdown_trigger = shutdown_trigger
        self.stop_requested = trio.Event()
        # Around the whole start-up and run: cancelled by a stop asked before start-up is done.
        self.start_scope = trio.CancelScope()
        self._on_phase = on_phase
        self._reloader: Reloader | None = None
        self._reload_asked = False
        self._nursery: trio.Nursery | None = None
        self._graceful = False  # listening: a stop drains instead of cancelling the start
        self._stop_signalled = False

    async def phase(self, name: str) -> None:
        log.debug("start-up: %s", name)
        if self._on_phase is not None:
            await self._on_phase(name)

    def listening(self) -> None:
        """The listener is up: from now on a stop is the graceful one (drain, STOPPING)."""
        self._graceful = True

    def started(self, reloader: Reloader) -> None:
        """Start-up is complete: reloads run from now on, one asked meanwhile at once."""
        self._reloader = reloader
        if self._reload_asked:
            self._reload_asked = False
            self._spawn_reload()

    async def watch_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        self._nursery = nursery
        async for signum in signals:
            if signum == signal.SIGHUP:
                if self._reloader is None:
                    log.info("received SIGHUP during start-up: reloading once started")
                    self._reload_asked = True
                else:
                    log.info("received SIGHUP: reloading the config")
                    self._spawn_reload()
            elif not self._stop_signalled:
                # Counted apart from stop_requested: a shutdown_trigger may have set that.
                self._stop_signalled = True
                log.info("received %s", signal.Signals(signum).name)
                self.stop_requested.set()
                if not self._graceful:
                    log.info("stopping during start-up")
                    self.start_scope.cancel()
            else:
                log.warning("second signal: stopping models now")
                raise KeyboardInterrupt

    def _spawn_reload(self) -> None:
        # A task of its own: signals are still handled while a reload reads its file.
        if self._nursery is not None:
            self._nursery.start_soon(self._reload)

    async def _reload(self) -> None:
        assert self._reloader is not None
        try:
            await self._reloader.reload()
        except ReloadRefused:
            pass  # logged, and told to systemd
        except Exception:
            # A bug in putting a config in force must not take the running daemon down.
            log.exception("reload failed")
