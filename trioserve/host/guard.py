"""The guard: stops a dead daemon's model processes. Run as ``python -m trioserve.host.guard``.

The daemon starts it at launch, in a session of its own (a signal to the daemon's process group
or terminal does not reach it), and keeps the write end of a pipe that is the guard's stdin.
On it the guard learns, one JSON object per line:

* ``{"op":"hello","instance":ID,"grace":S,"daemon_pid":P,"daemon_pgid":G}``: the daemon's
  instance id, ``stop_grace``, its pid and process group (told, not read from our parent: a
  daemon that died before the guard was up has left it re-parented);
* ``{"op":"grace","grace":S}``: a new ``stop_grace``;
* ``{"op":"track","pid":P,"pgid":G,"start_time":T,"model":M}``: a model child was spawned;
  ``start_time`` is psutil's ``create_time()`` rounded to 1/100 s, as the state store keeps it;
* ``{"op":"untrack","pid":P}``: the daemon stopped that child's group and reaped it;
* ``{"op":"bye"}``: a clean shutdown, the daemon stopped its children itself: exit, kill nothing.

The end of the pipe without ``bye`` means the daemon died: the kernel closes the write end
however it died. Then the guard SIGTERMs every group it can prove is the daemon's, waits up to
the grace for the groups to empty, SIGKILLs what is left, and exits 0.

Identity, as ``trioserve cleanup`` proves it: a tracked child is proven by its pid and its start
time (checked against ``start_time`` when it is learned, then kept in clock ticks since boot, so
a wall clock set meanwhile changes nothing; the guard lives within one boot). A process the
guard was never told of (the daemon died between spawn and ``track``, or a worker left its group
with ``setsid()``) is proven by the ``TRIOSERVE_INSTANCE`` marker in its environment. A group
is signalled only while it still holds the proven leader (alive or a zombie: a zombie keeps its
pid, so the group id cannot be reused), a member seen in it before, or a member with the marker.

Stdlib only and no trio: it is a tiny process that must start fast and do one thing.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time

__all__ = ["Registry", "Tracked", "main", "stop_all"]

# Start times are compared to 1/100 s (psutil derives them from clock ticks; the daemon sends
# them rounded to 2 decimals), with the same tolerance as `trioserve cleanup`.
_START_TIME_TOLERANCE = 0.05
# During the grace the groups are not our children, so there is no pidfd to wait on for all of
# them: we look at the process table this often, only to finish early. The SIGKILL itself is
# timed to the deadline, not to a poll.
_POLL = 0.02
# After SIGKILL a process dies as soon as the kernel schedules it; we wait this long for it
# only to report the outcome.
_SIGKILL_WAIT = 5.0
_READ_SIZE = 65536
_MARKER = "TRIOSERVE_INSTANCE"


def _log(message: str) -> None:
    """One line to stderr (the daemon's log), dropped rather than ever blocking.

    A reader that stopped reading (a paused pager, a full pipe) must not keep the guard from
    its work: write only when the kernel says one line fits now.
    """
    line = f"trioserve guard[{os.getpid()}]: {message}\n".encode(errors="replace")[:4000]
    try:
        poller = select.poll()
        poller.register(2, select.POLLOUT)
        if poller.poll(0):
            os.write(2, line)
    except (OSError, ValueError):  # stderr closed, or a terminal that went away
        pass


# -- the process table -----------------------------------------------------------------------


class Proc:
    """One line of the process table, read from ``/proc/PID/stat``."""

    __slots__ = ("pgrp", "pid", "ticks", "zombie")

    def __init__(self, pid: int, zombie: bool, pgrp: int, ticks: int) -> None:
        self.pid = pid
        self.zombie = zombie
        self.pgrp = pgrp
        self.ticks = ticks  # start time in clock ticks since boot: never moves

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.ticks)


def read_proc(pid: int) -> Proc | None:
    """The process ``pid`` (a zombie too), or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return Proc(pid, fields[0] in (b"Z", b"X"), int(fields[2]), int(fields[19]))


def scan() -> list[Proc]:
    """Every process we can see."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            proc = read_proc(int(name))
            if proc is not None:
                found.append(proc)
    return found


def start_time_of(ticks: int) -> float:
    """``ticks`` as psutil's ``create_time()`` computes it: boot time + ticks / CLK_TCK."""
    boot = 0.0
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                boot = float(line.split()[1])
                break
    return float(ticks) / os.sysconf("SC_CLK_TCK") + boot


def has_marker(pid: int, instance: str) -> bool:
    """True when ``pid`` was started with ``TRIOSERVE_INSTANCE=instance`` in its environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:  # gone, or another user's
        return False
    return f"{_MARKER}={instance}".encode() in environ.split(b"\0")


def _killpg(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone, or no longer ours
        os.killpg(pgid, signum)


# -- what the daemon told us -----------------------------------------------------------------


class Tracked:
    """A model child the daemon told us of, its identity proven when we learned it."""

    __slots__ = ("model", "pgid", "pid", "ticks")

    def __init__(self, pid: int, pgid: int, ticks: int, model: str) -> None:
        self.pid = pid
        self.pgid = pgid
        self.ticks = ticks
        self.model = model

    def __repr__(self) -> str:
        return f"{self.model} pid {self.pid}"


class Registry:
    """The guard's state, fed one protocol line at a time."""

    def __init__(self, *, daemon_pgid: int | None = None) -> None:
        self.tracked: dict[int, Tracked] = {}
        self.instance: str | None = None
        self.grace = 10.0
        self.bye = False
        # The daemon's own process group is never a model's: signalling it after the daemon's
        # death could hit what shares its job in a shell (`trioserve start | tee log`).
        self.daemon_pgid = daemon_pgid
        self.daemon_pid: int | None = None

    def feed(self, line: bytes) -> None:
        """Apply one line; a line that is not a valid message is logged and ignored."""
        line = line.strip()
        if not line:
            return
        try:
            message = json.loads(line)
            op = message["op"]
            if op == "hello":
                self.instance = str(message["instance"]) or None
                self.grace = _grace(message["grace"])
                if "daemon_pid" in message:
                    self.daemon_pid = int(message["daemon_pid"])
                if "daemon_pgid" in message:
                    self.daemon_pgid = int(message["daemon_pgid"])
            elif op == "grace":
                self.grace = _grace(message["grace"])
            elif op == "track":
                self._track(
                    int(message["pid"]),
                    int(message["pgid"]),
                    float(message["start_time"]),
                    str(message.get("model", "?")),
                )
            elif op == "untrack":
                self.tracked.pop(int(message["pid"]), None)
            elif op == "bye":
                self.bye = True
            else:
                _log(f"ignoring unknown op {op!r}")
        except (ValueError, KeyError, TypeError) as exc:
            _log(f"ignoring a line that is not a message ({exc!r}): {line[:200]!r}")

    def _track(self, pid: int, pgid: int, start_time: float, model: str) -> None:
        proc = read_proc(pid)
        if proc is None:
            # Already reaped: the daemon stopped its group first; its `untrack` follows.
            return
        seen = round(start_time_of(proc.ticks), 2)
        if abs(seen - start_time) > _START_TIME_TOLERANCE:
            _log(
                f"{model} pid {pid}: started at {seen}, not at {start_time}: the pid is another "
                "program's now; not guarded"
            )
            return
        if pgid <= 1 or pgid != proc.pgrp or pgid == self.daemon_pgid:
            _log(f"{model} pid {pid}: process group {pgid} is not its own (it is in "
                 f"{proc.pgrp}); not guarded")  # fmt: skip
            return
        self.tracked[pid] = Tracked(pid, pgid, proc.ticks, model)


def _grace(value: object) -> float:
    grace = float(value)  # type: ignore[arg-type]  # a bad value raises, and is logged
    if not grace >= 0:  # also refuses NaN
        raise ValueError(f"grace must be >= 0, not {value!r}")
    return grace


# -- the daemon died: stop what it left ------------------------------------------------------


class _Group:
    """One process group being stopped, and what proves it is still the one we mean."""

    __slots__ = ("done", "known", "leader", "pgid")

    def __init__(self, pgid: int, leader: Tracked | None) -> None:
        self.pgid = pgid
        self.leader = leader
        self.known: set[tuple[int, int]] = set()  # (pid, ticks) seen in it while proven
        self.done = False

    def proven(self, members: list[Proc], instance: str | None) -> bool:
        if self.leader is not None:
            proc = read_proc(self.leader.pid)
            if proc is not None and proc.ticks == self.leader.ticks:
                return True
        if any(member.key in self.known for member in members):
            return True
        return instance is not None and any(has_marker(m.pid, instance) for m in members)


def _refresh(groups: dict[int, _Group], instance: str | None) -> list[_Group]:
    """Mark groups with no live member (or no longer ours) done; return those still alive."""
    members: dict[int, list[Proc]] = {pgid: [] for pgid, g in groups.items() if not g.done}
    if not members:
        return []
    for proc in scan():
        if proc.pgrp in members and not proc.zombie:  # a zombie is gone for our purposes
            members[proc.pgrp].append(proc)
    alive = []
    for pgid, found in members.items():
        group = groups[pgid]
        if not found:
            group.done = True
        elif group.proven(found, instance):
            group.known.update(member.key for member in found)
            alive.append(group)
        else:
            _log(f"process group {pgid}: only strangers left in it; not touched")
            group.done = True
    return alive


def _targets(registry: Registry) -> dict[int, _Group]:
    """The groups of the tracked children whose identity still holds."""
    groups: dict[int, _Group] = {}
    for child in registry.tracked.values():
        proc = read_proc(child.pid)
        if proc is None or proc.ticks != child.ticks:
            # Reaped (its untrack is lost with the daemon), and the pid maybe reused: not
            # signalled by pid. What is left of its group carries our marker, if anything.
            _log(f"{child} is gone already")
            continue
        groups.setdefault(child.pgid, _Group(child.pgid, child))
    return groups


def _sweep(registry: Registry, groups: dict[int, _Group], forbidden: set[int]) -> list[int]:
    """One pass over the process table: remember the members of our groups, and add the groups
    of processes carrying our marker that we were never told of. Returns the new groups."""
    added = []
    me = os.getpid()
    for proc in scan():
        if proc.zombie or proc.pid == me:
            continue
        group = groups.get(proc.pgrp)
        if group is not None:
            group.known.add(proc.key)
        elif (
            registry.instance is not None
            and proc.pgrp not in forbidden
            and has_marker(proc.pid, registry.instance)
        ):
            group = groups[proc.pgrp] = _Group(proc.pgrp, None)
            group.known.add(proc.key)
            added.append(proc.pgrp)
    return added


def stop_all(registry: Registry) -> tuple[int, int]:
    """SIGTERM every proven group, wait up to the grace, SIGKILL what is left.

    Returns (groups stopped by SIGTERM, groups that needed SIGKILL).
    """
    deadline = time.monotonic() + registry.grace
    forbidden = {0, 1, os.getpgrp()}
    if registry.daemon_pgid is not None:
        forbidden.add(registry.daemon_pgid)
    groups = {pgid: g for pgid, g in _targets(registry).items() if pgid not in forbidden}
    # The tracked groups first, before anything slower: each millisecond counts towards the bound.
    for pgid in groups:
        _killpg(pgid, signal.SIGTERM)
    for pgid in _sweep(registry, groups, forbidden):
        _log(f"process group {pgid} carries our instance marker but was not tracked: stopping it")
        _killpg(pgid, signal.SIGTERM)
    while alive := _refresh(groups, registry.instance):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(_POLL, left))
    hard = [group.pgid for group in alive]
    for pgid in hard:
        _killpg(pgid, signal.SIGKILL)
    give_up = time.monotonic() + _SIGKILL_WAIT
    while (survivors := _refresh(groups, registry.instance)) and time.monotonic() < give_up:
        time.sleep(_POLL)
    for group in survivors:
        _log(f"process group {group.pgid} survived SIGKILL (uninterruptible sleep?)")
    return len(groups) - len(hard), len(hard)


# -- the process -----------------------------------------------------------------------------


def _announce_ready() -> None:
    """Tell the daemon we are up (one line on stdout), then let go of stdout for good."""
    with contextlib.suppress(OSError):
        os.write(1, b"ready\n")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def main() -> int:
    # First of all: from here on, Ctrl-C in the daemon's terminal (were it to reach us), a
    # closed terminal or a stray `kill` do not take the guard away. Only SIGKILL does.
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    registry = Registry()
    os.set_blocking(0, True)  # the read below is how we wait; it must block
    _announce_ready()
    pending = b""
    while True:
        # A blocking read: the daemon's death wakes us at once (the pipe ends), no polling.
        chunk = os.read(0, _READ_SIZE)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            registry.feed(line)
            if registry.bye:
                if registry.tracked:
                    _log(f"bye with {len(registry.tracked)} children still tracked; not touched")
                return 0
    if pending:
        _log(f"ignoring a partial last line: {pending[:200]!r}")
    termed, killed = stop_all(registry)
    daemon = registry.daemon_pid or "?"
    _log(
        f"daemon pid {daemon} is gone: stopped {termed + killed} process groups "
        f"({killed} needed SIGKILL after {registry.grace:g}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
