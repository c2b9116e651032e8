"""Where model processes may run: the ``max_loaded`` slots and the memory budgets.

A start takes a *place* before it spawns (``ModelRun.run`` calls ``take_place``): a slot under
``max_loaded`` and room for its memory on each of its devices. Waiting for it, the placer stops
idle models and asks busy ones whose time slice is over to yield, as ``placement`` decides; the
start waiting longest for memory on a device goes first. The placer owns the event that says
room may have changed, and every figure it counts comes from the ``MemoryBook``.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import trio

from trioserve.config import Config, check_memory_fits
from trioserve.memory.estimates import apply_estimates, estimate_models
from trioserve.memory.figures import MemoryBook
from trioserve.sizes import format_size
from trioserve.supervision import placement
from trioserve.supervision.lifecycle import State
from trioserve.supervision.model import ManagedModel
from trioserve.supervision.run import CannotPlace, StartAbandoned

__all__ = ["ABANDON_AFTER", "Placer", "PlacerHost"]

_RUNNING = (State.STARTING, State.READY)
# A start waiting for a slot or memory gives its place in line up once no request has waited
# for it this long: it would otherwise stop another model for nobody. Not at once: a client
# that timed out is often about to send again, and its 504 reads why the start waited.
ABANDON_AFTER = 1.0


class PlacerHost(Protocol):
    """What the placer reads of its supervisor."""

    config: Config
    models: dict[str, ManagedModel]

    def holders(self) -> Iterable[tuple[str, ManagedModel]]:
        """Every model whose process exists or is about to, with its name for messages
        (a model a reload removed, still finishing, is "NAME (removed)")."""

    def spawn_task(self, fn: Callable[..., Awaitable[None]], *args: object) -> None: ...


class Placer:
    """Slots and memory for model processes."""

    def __init__(self, host: PlacerHost, memory: MemoryBook) -> None:
        self._host = host
        self.memory = memory
        self._room_changed = trio.Event()
        # Models whose start waits for a place, longest waiting first.
        self._in_line: list[ManagedModel] = []

    def room_changed(self) -> None:
        """A place may have come free, a model became idle or ready, a figure changed."""
        self._room_changed.set()
        self._room_changed = trio.Event()

    async def vet(self, config: Config) -> None:
        """Estimate ``config``'s "auto" models (reading their GGUFs in a thread) and refuse it
        (``ConfigError``) when a model could never fit: at start and before a reload."""
        known = self.memory.estimated_keys()
        estimates = await trio.to_thread.run_sync(estimate_models, config, known)
        apply_estimates(self.memory, estimates)
        check_memory_fits(config, self.memory.needs(config))

    # -- figures -------------------------------------------------------------------------------

    def need(self, model: ManagedModel) -> dict[str, int]:
        """What ``model``'s process needs (or holds) per device, as placement counts it: its
        running process's command's (a reload may have changed the model's since)."""
        config = model.run.config if model.run is not None else model.config
        figures = self.memory.for_model(self._host.config, model.name, config)
        return figures.need(config)

    def devices(self) -> dict[str, dict[str, int]]:
        """Each budgeted device's ``budget``, ``used`` (what placement counts for the models
        holding it) and ``free``, in bytes."""
        holding = [self.need(model) for _, model in self._host.holders()]
        devices: dict[str, dict[str, int]] = {}
        for device, budget in self._host.config.supervisor.memory.items():
            used = sum(need.get(device, 0) for need in holding)
            devices[device] = {"budget": budget, "used": used, "free": budget - used}
        return devices

    # -- taking a place ------------------------------------------------------------------------

    async def take_place(self, model: ManagedModel) -> None:
        """Return once ``model`` may have a process. Raises ``StartAbandoned`` once nobody has
        waited for the start for ``ABANDON_AFTER``, ``CannotPlace`` when its memory never can
        fit."""
        self._in_line.append(model)
        unwanted_since: float | None = None
        try:
            while True:
                now = trio.current_time()
                if model.demand:
                    unwanted_since = None
                elif unwanted_since is None:
                    unwanted_since = now
                elif now >= unwanted_since + ABANDON_AFTER:  # as the deadline is set
                    raise StartAbandoned("no request waits for it any more")
                never = self._never_fits(model)
                if never is not None:
                    raise CannotPlace(never)
                wake_at = math.inf if unwanted_since is None else unwanted_since + ABANDON_AFTER
                holders = [self._holder(name, m) for name, m in self._host.holders()]
                decision = self._decide(model, holders, now)
                ahead = self._ahead(model, holders)
                model.short_on = frozenset(decision.missing)
                # A slot is freed only for a start that can then happen: its memory fits.
                act = ahead is None and model.demand > 0 and decision.fits
                slot_reason = self._slot_taken(model, act=act)
                if slot_reason is None and decision.fits and ahead is None:
                    model.holds_slot = True
                    model.held_since = now
                    return
                if ahead is not None:
                    model.waiting_for = f"waiting for memory behind {ahead.name}"
                elif slot_reason is not None:
                    model.waiting_for = slot_reason
                else:
                    model.waiting_for = f"waiting for memory: {decision.reason}"
                if ahead is None and model.demand:
                    self._make_room(model, decision)
                    if decision.wake_at is not None:
                        wake_at = min(wake_at, decision.wake_at)
                with trio.move_on_at(wake_at):
                    await self._room_changed.wait()
        finally:
            model.waiting_for = None
            model.short_on = frozenset()
            self._in_line.remove(model)
            self.room_changed()  # the next in line may go now

    def _slot_taken(self, model: ManagedModel, *, act: bool) -> str | None:
        """None when a slot under ``max_loaded`` is free; else why not, having asked (when
        ``act``) the least recently used idle unpinned model to stop. Idle: ready, and no
        request in flight, queued, or waiting for its start to be served (a model that just
        became ready is not stopped before those who waited for it lease it). Nothing more
        is stopped while a model is already stopping: its slot is coming back."""
        limit = self._host.config.supervisor.max_loaded
        holders = [m for _, m in self._host.holders()]
        if len(holders) < limit:
            return None
        idle = [m for m in holders if _idle(m) and not m.pinned]
        coming_back = any(m.state not in _RUNNING for m in holders)
        if idle and act and not coming_back:
            victim = min(idle, key=lambda m: m.last_used_clock)
            assert victim.run is not None
            victim.run.stop(f"evicted for {model.name} (max_loaded={limit})")
        held = ", ".join(name for name, _ in self._host.holders())
        return f"waiting for a slot: max_loaded={limit} models hold one ({held})"

    def _decide(
        self, model: ManagedModel, holders: list[placement.Holder], now: float
    ) -> placement.Decision:
        return placement.decide(
            self.need(model),
            self._host.config.supervisor.memory,
            holders,
            now=now,
            swap_after=self._host.config.supervisor.swap_after,
        )

    def _ahead(self, model: ManagedModel, holders: list[placement.Holder]) -> ManagedModel | None:
        """A model waiting longer that goes first: short of memory on a device this one needs
        room on too, or fitting now (it takes its place at its next turn) on a device this one
        needs. One short only on other devices holds nobody back: a start waiting for a GPU
        does not stop a CPU-only one. Worked out afresh each time: what a waiter is short of
        changes as others come and go."""
        budgets = self._host.config.supervisor.memory
        mine = _budgeted(self.need(model), budgets)
        for earlier in self._in_line:
            if earlier is model:
                return None
            need = self.need(earlier)
            short = placement.shortfall(need, budgets, holders).keys()
            if mine & (short or _budgeted(need, budgets)):
                return earlier
        return None

    def _holder(self, name: str, model: ManagedModel) -> placement.Holder:
        admission = model.admission
        return placement.Holder(
            name=name,
            need=self.need(model),
            pinned=model.pinned,
            stopping=model.state not in _RUNNING,
            # Not asked to yield before the requests that waited for its start are served.
            starting=model.state is State.STARTING or model.demand > 0,
            in_use=bool(model.leases or admission.queued or admission.admitted),
            last_used=model.last_used_clock,
            held_since=model.held_since,
        )

    def _make_room(self, model: ManagedModel, decision: placement.Decision) -> None:
        """Stop what ``decision`` says: idle models now, those whose slice is over once their
        requests in flight finish (they take no new ones meanwhile)."""
        holders = dict(self._host.holders())
        for name in decision.evict:
            run = holders[name].run
            if run is not None:
                run.stop(f"stopped to free memory for {model.name} (least recently used)")
        swap_after = self._host.config.supervisor.swap_after
        for name in decision.yield_:
            holder = holders[name]
            run = holder.run
            if run is not None and holder.state in _RUNNING:
                reason = f"yields its memory to {model.name} after its {swap_after:g}s slice"
                run.mark_stopping(reason)
                self._host.spawn_task(run.stop_when_idle, reason)

    def _never_fits(self, model: ManagedModel) -> str | None:
        """Why ``model`` can never fit, or None. The config was checked with what was known
        before anything ran; a model measured well over that can turn out larger than its
        budget (less what pinned models need): that is told at once, not after a
        ``first_byte_timeout`` of waiting."""
        budgets = self._host.config.supervisor.memory
        # Pinned models count whether running or not: once started they never leave.
        pinned = [m for m in self._host.models.values() if m.pinned and m is not model]
        for device, size in self.need(model).items():
            budget = budgets.get(device)
            if budget is None:
                continue
            held = sum(self.need(m).get(device, 0) for m in pinned)
            if size + held > budget:
                besides = f" less the {format_size(held)} of pinned models" if held else ""
                return (
                    f"model {model.name!r} needs {format_size(size)} on {device} (as "
                    f"measured), more than its budget of {format_size(budget)}{besides}: it "
                    "cannot start until the config changes (supervisor.memory, or the "
                    "model's memory, command or devices)"
                )
        return None


def _idle(model: ManagedModel) -> bool:
    admission = model.admission
    return (
        model.state is State.READY
        and model.run is not None
        and not (model.leases or model.demand or admission.queued or admission.admitted)
    )


def _budgeted(need: dict[str, int], budgets: dict[str, int]) -> set[str]:
    return {device for device, size in need.items() if size and device in budgets}
