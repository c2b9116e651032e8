"""The model lifecycle as a pure state machine: no trio, no I/O, every rule in this file.

``stopped → starting → ready → stopping → stopped``; a failed start or a crash goes to
``failed``, from which a new start is allowed once the cooldown has passed. The rules about
failures live here too: what counts as one, what resets the count, when a cooldown starts and
whether it is over. Times are passed in, so the caller picks the clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TRANSITIONS", "InvalidTransition", "Lifecycle", "State", "Transition"]


class State(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


# What may follow what. Anything not listed is a bug in the caller and raises.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    # A start ends ready or failed; a forced unload or shutdown during a start stops it.
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPING}),
    # A ready model is stopped on purpose, or crashes / wedges (failed).
    State.READY: frozenset({State.STOPPING, State.FAILED}),
    # A model that dies while we stop it is still just stopped: we meant it to exit.
    State.STOPPING: frozenset({State.STOPPED}),
    # After the cooldown a failed model may start again; unload clears it to stopped.
    State.FAILED: frozenset({State.STARTING, State.STOPPED}),
}


class InvalidTransition(RuntimeError):
    def __init__(self, model: str, current: State, target: State) -> None:
        super().__init__(f"model {model!r}: {current} -> {target} is not allowed")
        self.current = current
        self.target = target


@dataclass(frozen=True)
class Transition:
    """One lifecycle event, as published on ``/admin/events``."""

    model: str
    from_state: State
    to_state: State
    at: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "from": self.from_state.value,
            "to": self.to_state.value,
            "at": self.at,
            "reason": self.reason,
        }


@dataclass
class Lifecycle:
    """The state of one model and the bookkeeping that goes with it."""

    model: str
    state: State = State.STOPPED
    consecutive_failures: int = 0
    restarts: int = 0
    last_error: str | None = None
    # When the model last became failed, on the caller's monotonic clock (``now`` of
    # ``move``); None unless it is failed. The cooldown counts from here.
    failed_at: float | None = None
    history: list[Transition] = field(default_factory=list, repr=False)

    def can(self, target: State) -> bool:
        return target in TRANSITIONS[self.state]

    def move(self, target: State, *, at: float, now: float, reason: str) -> Transition:
        """Go to ``target`` or raise ``InvalidTransition``; returns the event.

        ``at`` is the wall-clock time the event carries; ``now`` the monotonic time the
        cooldown is measured on.
        """
        if not self.can(target):
            raise InvalidTransition(self.model, self.state, target)
        event = Transition(self.model, self.state, target, at, reason)
        if target is State.READY:
            self.consecutive_failures = 0
            self.last_error = None
            self.failed_at = None
        elif target is State.FAILED:
            self.consecutive_failures += 1
            self.last_error = reason
            self.failed_at = now
        elif target is State.STOPPED and self.state is State.FAILED:
            # Unload is how an operator clears a failure: the next request starts afresh,
            # with no cooldown. The last error stays visible.
            self.consecutive_failures = 0
            self.failed_at = None
        elif target is State.STARTING and self.history:
            self.restarts += 1
        self.state = target
        # Bounded: the history is for debugging, not an audit log.
        self.history = [*self.history[-63:], event]
        return event

    def exhausted(self, max_start_failures: int) -> bool:
        """True when enough consecutive failures happened that a cooldown applies."""
        return self.state is State.FAILED and self.consecutive_failures >= max_start_failures

    def cooldown_left(self, now: float, *, max_start_failures: int, cooldown: float) -> float:
        """Seconds a new start must still wait at ``now``; 0.0 when one is allowed."""
        if not self.exhausted(max_start_failures) or self.failed_at is None:
            return 0.0
        return max(0.0, self.failed_at + cooldown - now)
