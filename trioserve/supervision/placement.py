"""Placement by memory: whether a model fits on its devices now, and if not, whom to stop.

Pure: the supervisor describes the models that hold memory (``Holder``) and acts on the
``Decision``. The rules, in order:

1. It fits when, on every device with a budget, what the holders need plus what it needs is
   within the budget. Models already stopping count until they are gone: their memory is
   coming back, nothing more is stopped for it.
2. Idle models stop first, least recently used first, only as many as needed.
3. A model with work keeps its memory for ``swap_after`` seconds from when it took it (its time
   slice); after that it yields: it takes no new request and stops once those in flight end.
   A model still starting, or whose waiting requests have not all been served yet, never yields.
   Under alternating demand that makes one swap per slice instead of one per request, like a
   CPU scheduler's quantum. Among those whose slice is over, the one holding longest yields first.
4. Pinned models never stop for memory.

Nothing stops unless stopping it (with the others chosen) makes the model fit: an idle model is
not sacrificed for a start that still could not happen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from trioserve.sizes import format_size

__all__ = ["BACK_TO_BACK", "Decision", "Holder", "decide", "shortfall"]

# A model whose last request ended this recently still has work: its client is about to send
# the next one (a chat's turns, an agent's calls). Without this, the moment between two
# back-to-back requests would look idle and the model would be swapped out mid-conversation.
BACK_TO_BACK = 1.0


@dataclass(frozen=True)
class Holder:
    """A model that holds memory: starting, ready or stopping."""

    name: str
    need: Mapping[str, int]
    pinned: bool
    stopping: bool
    # Starting, or ready with requests that waited for its start not yet served: it is not
    # asked to yield before those are (with swap_after = 0 it would otherwise start and stop
    # again without serving anyone). The supervisor hears when that ends.
    starting: bool
    in_use: bool  # requests in flight or queued for it
    last_used: float  # trio clock
    held_since: float  # trio clock: when it took its memory

    def busy(self, now: float) -> bool:
        # Compared as the deadline is set (``last_used + BACK_TO_BACK``): a subtraction could
        # round the other way and leave a waiter waking at once, again and again.
        return self.starting or self.in_use or now < self.last_used + BACK_TO_BACK

    def label(self, now: float) -> str:
        if self.pinned:
            return "pinned"
        if self.stopping:
            return "stopping"
        if self.starting:
            return "starting"
        return "busy" if self.busy(now) else "idle"


@dataclass(frozen=True)
class Decision:
    fits: bool
    evict: tuple[str, ...] = ()  # idle: stop now
    yield_: tuple[str, ...] = ()  # slice over: stop once their requests in flight end
    wake_at: float | None = None  # a holder's slice ends then: decide again
    reason: str | None = None  # why the model waits, for status, progress and the 504
    missing: tuple[str, ...] = ()  # the devices it is short on


def shortfall(
    need: Mapping[str, int], budgets: Mapping[str, int], holders: Sequence[Holder]
) -> dict[str, int]:
    """Bytes missing per budgeted device (only devices where something is missing)."""
    missing: dict[str, int] = {}
    for device, size in need.items():
        budget = budgets.get(device)
        if budget is None or size <= 0:
            continue
        used = sum(holder.need.get(device, 0) for holder in holders)
        if used + size > budget:
            missing[device] = used + size - budget
    return missing


def decide(
    need: Mapping[str, int],
    budgets: Mapping[str, int],
    holders: Sequence[Holder],
    *,
    now: float,
    swap_after: float,
) -> Decision:
    """Whether a model needing ``need`` fits beside ``holders``; if not, whom to stop."""
    missing = shortfall(need, budgets, holders)
    if not missing:
        return Decision(fits=True)
    reason = _reason(need, budgets, holders, missing, now)
    short = tuple(missing)
    # Memory already on its way back.
    left = _after(missing, [h for h in holders if h.stopping])
    if not left:
        return Decision(fits=False, reason=reason, missing=short)
    movable = [h for h in holders if not h.pinned and not h.stopping and _holds(h, left)]
    idle = sorted((h for h in movable if not h.busy(now)), key=lambda h: h.last_used)
    busy = [h for h in movable if h.busy(now)]
    over = sorted(
        (h for h in busy if not h.starting and now >= h.held_since + swap_after),
        key=lambda h: h.held_since,
    )
    evict = _enough(left, idle)
    if evict is not None:
        return Decision(fits=False, evict=_names(evict), reason=reason, missing=short)
    chosen = _enough(left, [*idle, *over])
    if chosen is not None:
        return Decision(
            fits=False,
            evict=_names(h for h in chosen if h in idle),
            yield_=_names(h for h in chosen if h not in idle),
            reason=reason,
            missing=short,
        )
    # Decide again when a slice ends, or when a model between two requests counts as idle.
    wakes = [h.held_since + swap_after for h in busy if not h.starting and h not in over]
    wakes += [h.last_used + BACK_TO_BACK for h in busy if not (h.in_use or h.starting)]
    return Decision(fits=False, wake_at=min(wakes, default=None), reason=reason, missing=short)


def _holds(holder: Holder, missing: Mapping[str, int]) -> bool:
    return any(holder.need.get(device, 0) > 0 for device in missing)


def _after(missing: Mapping[str, int], going: Sequence[Holder]) -> dict[str, int]:
    """What is still missing once ``going`` are gone."""
    left = {
        device: size - sum(h.need.get(device, 0) for h in going) for device, size in missing.items()
    }
    return {device: size for device, size in left.items() if size > 0}


def _enough(missing: Mapping[str, int], candidates: Sequence[Holder]) -> list[Holder] | None:
    """The shortest prefix of ``candidates`` (those that free a missing device) whose
    stopping covers ``missing``; None when all of them would not."""
    chosen: list[Holder] = []
    left = dict(missing)
    for holder in candidates:
        if not left:
            break
        if _holds(holder, left):
            chosen.append(holder)
            left = _after(left, [holder])
    return chosen if not left else None


def _names(holders: Iterable[Holder]) -> tuple[str, ...]:
    return tuple(h.name for h in holders)


def _reason(
    need: Mapping[str, int],
    budgets: Mapping[str, int],
    holders: Sequence[Holder],
    missing: Mapping[str, int],
    now: float,
) -> str:
    device = next(iter(missing))
    free = budgets[device] - sum(h.need.get(device, 0) for h in holders)
    on_it = [h for h in holders if h.need.get(device, 0) > 0]
    held = ", ".join(f"{h.name} ({h.label(now)})" for h in on_it) or "nothing"
    return (
        f"needs {format_size(need[device])} on {device}, {format_size(max(free, 0))} free, "
        f"held by {held}"
    )
