"""Config reload: SIGHUP, ``POST /admin/reload`` and ``trioserve reload`` all end here.

The file is read and validated exactly as at start; an invalid file, or one that changes what
only a restart can (``server.host``, ``port``, ``state_dir``), changes nothing. Otherwise the
new config is put in force in one step with no checkpoint in between, so every request sees
either the old config or the new one (``ReloadTargets.apply``). Reloads are serialised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from trioserve.config import Config, load_config
from trioserve.errors import ConfigError
from trioserve.host.notify import SystemdNotifier
from trioserve.reload_plan import ReloadPlan, plan_reload

__all__ = ["LastReload", "ReloadRefused", "Reloader"]

log = logging.getLogger("trioserve.reload")


class ReloadRefused(Exception):
    """The new config was not taken; the message says why (nothing changed)."""


@dataclass(frozen=True)
class LastReload:
    """What ``/admin/status`` says of the last reload: ``{"at", "ok", "error"}``."""

    at: float
    ok: bool
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"at": self.at, "ok": self.ok, "error": self.error}


class Reloader:
    """Re-reads the daemon's config file and puts it in force.

    ``apply(new, plan)`` does the putting in force: synchronous, so nothing runs between the
    first and the last component switched over.
    """

    def __init__(
        self,
        config: Config,
        apply: Callable[[Config, ReloadPlan], None],
        notifier: SystemdNotifier | None = None,
        *,
        vet: Callable[[Config], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self._apply = apply
        # Checks that need more than the file (GGUF estimates, measured memory): raises
        # ConfigError to refuse the new config.
        self._vet = vet
        self._notifier = notifier
        self._lock = trio.Lock()
        self.closed = False
        self.last: LastReload | None = None

    async def reload(self) -> ReloadPlan:
        """Read and apply the config file; returns what changed or raises ``ReloadRefused``.

        systemd hears of it: ``RELOADING=1`` first, ``READY=1`` once the new config is in
        force or refused, with ``STATUS=`` saying when it was refused."""
        if self.closed:
            log.warning("reload refused: trioserve is shutting down")
            raise ReloadRefused("trioserve is shutting down")
        async with self._lock:
            if self.closed:
                log.warning("reload refused: trioserve is shutting down")
                raise ReloadRefused("trioserve is shutting down")
            await self._notify(
                "RELOADING=1",
                f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
            )
            try:
                plan = await self._reload()
            except ReloadRefused as exc:
                await self._ready(f"last reload failed: {exc}")
                raise
            await self._ready(f"reloaded: {plan.summary()}")
            return plan

    async def _ready(self, status: str) -> None:
        # ready() makes the status one line: a reason may hold a newline (a quoted TOML key).
        if self._notifier is not None:
            await self._notifier.ready(status=status)

    async def _notify(self, *fields: str) -> None:
        if self._notifier is not None:
            await self._notifier.notify(*fields)

    async def _reload(self) -> ReloadPlan:
        path = Path(self.config.source)
        try:
            new = await trio.to_thread.run_sync(load_config, path)
            plan = plan_reload(self.config, new)
            if plan.refused is not None:
                raise ReloadRefused(f"{path}: {plan.refused}")
            if self._vet is not None:
                await self._vet(new)
        except (ConfigError, ReloadRefused) as exc:
            self.last = LastReload(at=time.time(), ok=False, error=str(exc))
            log.error("reload refused, nothing changed: %s", exc)
            raise ReloadRefused(str(exc)) from None
        self._apply(new, plan)
        self.config = new
        self.last = LastReload(at=time.time(), ok=True)
        log.info("reloaded %s: %s", path, plan.summary())
        return plan
