"""``stream_idle_timeout``: the longest a backend may stay silent between two reads."""

from __future__ import annotations

import trio

__all__ = ["IDLE_SLACK", "IdleDeadline"]

# At most this late (and at most 1/8 of the timeout) a stalled upstream is noticed.
IDLE_SLACK = 0.5


class IdleDeadline:
    """A cancel scope that expires ``idle`` seconds after the last ``touch()``, give or take
    ``slack``.

    One scope for the whole answer, its deadline moved at most once per ``slack``: a scope per
    read, or a deadline moved per read, costs more than relaying what the read brought. The
    deadline moves only when less than ``idle`` is left, so a stall is noticed between ``idle``
    and ``idle + slack`` after the last touch.
    """

    __slots__ = ("_idle", "_slack", "scope")

    def __init__(self, idle: float) -> None:
        self._idle = idle
        self._slack = min(IDLE_SLACK, idle / 8)
        self.scope = trio.CancelScope(deadline=trio.current_time() + idle + self._slack)

    def __enter__(self) -> IdleDeadline:
        self.scope.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> bool:
        return self.scope.__exit__(*exc_info)  # type: ignore[arg-type]

    def touch(self) -> None:
        """The backend (or the client we waited for) just made progress."""
        now = trio.current_time()
        if self.scope.deadline < now + self._idle:
            self.scope.deadline = now + self._idle + self._slack

    @property
    def expired(self) -> bool:
        return self.scope.cancelled_caught
