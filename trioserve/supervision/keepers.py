"""Preload models: started with the daemon, restarted after a crash.

One keeper task per preload model, in the supervisor's nursery. It asks for the model like a
request does (``ensure_ready``: the start is shared, counts as demand, takes its place), then
waits for the process to end; after a crash it starts it again (the failure count and
``failure_cooldown`` apply), after a stop on purpose (unload, ttl, memory, a reload) it is done.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from trioserve.config import Config
from trioserve.errors import ModelUnavailable, TrioserveError
from trioserve.reload_plan import ReloadPlan
from trioserve.supervision.lifecycle import State
from trioserve.supervision.model import Endpoint, ManagedModel

__all__ = ["Keepers", "KeepersHost"]

log = logging.getLogger(__name__)


class KeepersHost(Protocol):
    models: dict[str, ManagedModel]

    async def ensure_ready(self, name: ManagedModel | str) -> Endpoint: ...


class Keepers:
    """The keepers of the preload models, by model name."""

    def __init__(self, host: KeepersHost) -> None:
        self._host = host
        self._scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Keep every preload model, in ``nursery`` (the supervisor's)."""
        self._nursery = nursery
        for model in self._host.models.values():
            if model.config.preload:
                self.keep(model)

    def close(self) -> None:
        """No new keepers (the supervisor is shutting down)."""
        self._nursery = None

    def keep(self, model: ManagedModel) -> None:
        """Start ``model``'s keeper, unless it has one."""
        if model.name in self._scopes or self._nursery is None:
            return
        scope = self._scopes[model.name] = trio.CancelScope()
        self._nursery.start_soon(self._keep_loaded, model, scope)

    def drop(self, name: str) -> None:
        scope = self._scopes.pop(name, None)
        if scope is not None:
            scope.cancel()

    def apply(self, old: Config, plan: ReloadPlan) -> None:
        """After a reload: preload models it adds, makes preload, or whose command it changes
        are started; models no longer preload lose their keeper. (A preload model unloaded by
        hand and untouched by the reload stays stopped.)"""
        for name in plan.removed:
            self.drop(name)
        for name, model in self._host.models.items():
            if not model.config.preload:
                self.drop(name)
                continue
            was = old.models.get(name)
            if name in plan.replaced:
                self.drop(name)  # its next process is the new command's
            if was is None or not was.preload or name in plan.replaced:
                self.keep(model)

    async def _keep_loaded(self, model: ManagedModel, scope: trio.CancelScope) -> None:
        try:
            with scope:
                while True:
                    try:
                        await self._host.ensure_ready(model)
                    except ModelUnavailable as exc:  # failed too often: after the cooldown
                        log.warning("preload model %s: %s", model.name, exc.message)
                        await trio.sleep(exc.retry_after or 1.0)
                    except TrioserveError as exc:
                        log.warning("preload model %s: %s", model.name, exc.message)
                    else:
                        run = model.run
                        assert run is not None
                        await run.stopped.wait()
                    # Unloaded (a failed model too), or stopped by ttl or for memory: done.
                    if model.state is not State.FAILED:
                        return
                    log.info("preload model %s failed: starting it again", model.name)
        finally:
            if self._scopes.get(model.name) is scope:
                del self._scopes[model.name]
