"""Killing the process groups of proven processes: prove, SIGTERM the group, grace, SIGKILL.

Each model child leads its own process group, so its workers die with it. A process group id is
a number that can be reused once the group is empty, so a group is only signalled while it
still holds a process we proved, or one that was in it continuously since.

These are not our children (a dead daemon's, or found by a scan): there is no pidfd or
``wait()`` to block on, and polling /proc is the honest tool. Blocking, standard library only:
``trioserve cleanup``, the daemon's startup cleanup (from a worker thread) and a small separate
guard process can all use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = ["GroupKill", "GroupMember", "kill_groups"]

# 50 ms keeps a kill snappy and costs one /proc scan per poll.
KILL_POLL = 0.05
# After SIGKILL a process dies as soon as the kernel schedules it; a group still there after
# this is stuck (uninterruptible sleep, another user's process) and reported as not killed.
SIGKILL_WAIT = 5.0


class GroupMember(Protocol):
    """A process to kill with its group: its pid, and the group it was found in."""

    @property
    def pid(self) -> int: ...

    @property
    def pgid(self) -> int: ...


_T = TypeVar("_T", bound=GroupMember)


@dataclass(frozen=True)
class GroupKill(Generic[_T]):
    """What ``kill_groups`` did."""

    signalled: list[_T]  # the targets whose groups were signalled
    hard: set[int]  # groups still alive after the grace, sent SIGKILL
    survivors: set[int]  # groups alive even after SIGKILL


def _scan_groups(pgids: Iterable[int]) -> dict[int, set[tuple[int, int]]]:
    """The live (non-zombie) members of each group, as (pid, start time in clock ticks).

    Read straight from /proc/PID/stat: one read gives state, group and start time, and the
    start time in ticks since boot does not move when the wall clock is set.
    """
    members: dict[int, set[tuple[int, int]]] = {pgid: set() for pgid in pgids}
    if not members:
        return members
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        state, pgrp, start = fields[0], int(fields[2]), int(fields[19])
        if pgrp in members and state not in (b"Z", b"X"):
            members[pgrp].add((int(name), start))
    return members


class _Groups:
    """The process groups being killed, each signalled only while it is provably the same group.

    A group is the same while one of its members has been seen in it before: members we proved
    at the start, or processes that joined while the group was never empty (a pgid is not
    reused while any process is in the group). A group found empty is done for good.
    """

    def __init__(self, pgids: Iterable[int], known: dict[int, set[tuple[int, int]]]) -> None:
        self.known = {pgid: set(known.get(pgid, ())) for pgid in pgids}
        self.done: set[int] = {pgid for pgid, members in self.known.items() if not members}

    def alive(self) -> list[int]:
        return [pgid for pgid in self.known if pgid not in self.done]

    def refresh(self) -> None:
        now = _scan_groups(self.alive())
        for pgid, members in now.items():
            if members & self.known[pgid]:
                self.known[pgid] |= members
            else:
                # Empty, or only strangers: the group we proved is gone (its pgid maybe reused).
                self.done.add(pgid)

    def signal(self, signum: int) -> None:
        me = os.getpgrp()
        for pgid in self.alive():
            if pgid <= 1 or pgid == me:  # never our own group, never init's
                self.done.add(pgid)
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signum)

    def wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.refresh()
            if not self.alive() or time.monotonic() >= deadline:
                return
            time.sleep(KILL_POLL)


def kill_groups(
    targets: Iterable[_T], *, proven: Callable[[_T], bool], grace: float
) -> GroupKill[_T]:
    """Kill the group of each target that is ``proven`` now and still in its group.

    ``proven`` is called right before the kill (a scan may be seconds old). Then SIGTERM to
    every group, ``grace`` seconds for them to exit, SIGKILL to what is left.
    """
    candidates = [item for item in targets if item.pgid > 1 and proven(item)]
    scan = _scan_groups({item.pgid for item in candidates})
    # Each target must still be in its group; its fellow members then belong to it too.
    signalled = [item for item in candidates if any(pid == item.pid for pid, _ in scan[item.pgid])]
    groups = _Groups({item.pgid for item in signalled}, scan)
    groups.signal(signal.SIGTERM)
    groups.wait(grace)
    hard = set(groups.alive())
    if hard:
        groups.signal(signal.SIGKILL)
        groups.wait(SIGKILL_WAIT)
    return GroupKill(signalled, hard, set(groups.alive()))
