"""Finding and killing model processes left behind by a daemon that is no longer running.

A process is only ever killed when its identity is proven:

* a state-store row whose pid is alive with the same process start time on the same boot, or
* the ``TRIOSERVE_INSTANCE`` marker in the process's environment, naming an instance of *this*
  state dir (``TRIOSERVE_STATE_DIR``) whose daemon is not running.

A pid that was reused by another program has a different start time and no marker: it is
reported and left alone. The children of a running daemon are never touched: neither those of
an instance whose recorded daemon process is alive, nor any process whose parent is the daemon
holding the state dir's lock (in case it has not recorded itself yet).

Killing is by process group (each model child leads its own), SIGTERM, ``grace``, SIGKILL. A
process group id is a number that can be reused once the group is empty, so a group is only
signalled while it still holds a process we proved, or one that was in it continuously since.

Everything here is blocking (psutil, sqlite); the daemon calls it from a worker thread, the CLI
directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from trioserve.host.store import DaemonRow, InstanceLock, StateStore
from trioserve.supervision.process import read_boot_id

__all__ = [
    "Leftover",
    "find_leftovers",
    "kill_leftovers",
    "live_daemon",
    "live_instance",
    "lock_holder",
    "reclaim_leftovers",
    "same_process",
]

# Start times are compared to 1/100 s: psutil derives them from clock ticks since boot, and the
# store keeps them rounded to 2 decimals.
_START_TIME_TOLERANCE = 0.05
# These are not our children, so there is no pidfd or wait() to block on: polling is the honest
# tool. 50 ms keeps a cleanup snappy and costs one /proc scan per poll.
_KILL_POLL = 0.05
# After SIGKILL a process dies as soon as the kernel schedules it; a group still there after
# this is stuck (uninterruptible sleep, another user's process) and reported as not killed.
_SIGKILL_WAIT = 5.0

# Outcomes of kill_leftovers, also shown by `trioserve cleanup`.
KILLED = "killed"
KILLED_HARD = "killed (SIGKILL)"
NOT_KILLED = "FAILED to kill"
SKIPPED = "not touched"
GONE = "already gone"


@dataclass(frozen=True)
class Leftover:
    """A process (or a store row for one) that a daemon no longer running left behind."""

    model: str
    pid: int
    pgid: int
    port: int | None
    instance: str
    source: str  # "store", "marker" or "store+marker"
    alive: bool  # the recorded process is still running (identity proven)
    proven: bool  # it may be killed
    note: str
    start_time: float | None = None
    row_id: int | None = None
    outcome: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- who is alive ----------------------------------------------------------------------------


def same_process(pid: int, start_time: float | None, boot_id: str) -> bool:
    """True when ``pid`` is a live (non-zombie) process started at ``start_time`` this boot."""
    if start_time is None or boot_id != read_boot_id():
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = float(process.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return abs(round(created, 2) - start_time) <= _START_TIME_TOLERANCE


def _reused(pid: int, start_time: float | None) -> bool:
    """True when ``pid`` is now some other live process (not ours, not our unreaped zombie)."""
    try:
        process = psutil.Process(pid)
        zombie = process.status() == psutil.STATUS_ZOMBIE
        created = round(float(process.create_time()), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    ours = start_time is not None and abs(created - start_time) <= _START_TIME_TOLERANCE
    return not (zombie and ours)


def lock_holder(state_dir: Path) -> int | None:
    """The pid written in the instance lock, when a live process holds the lock; else None.

    The pid is what the holder wrote after taking the lock; 0 when it has not written it yet.
    """
    lock = InstanceLock(state_dir)
    if not lock.held_by_someone():
        return None
    try:
        text = lock.path.read_text()
    except OSError:
        return 0
    words = text.split()
    if len(words) >= 2 and words[0] == "pid" and words[1].isdigit():
        return int(words[1])
    return 0


def _alive_daemons(store: StateStore) -> list[DaemonRow]:
    """Daemon rows whose process is still running (proven by pid, start time and boot id)."""
    if not store.exists():
        return []
    return [
        row for row in store.daemons() if same_process(row.pid, row.pid_start_time, row.boot_id)
    ]


def live_daemon(store: StateStore) -> DaemonRow | None:
    """The daemon running on this state dir, or None.

    Live means: a process holds the instance lock, and a recorded daemon's pid is alive with the
    recorded start time. The newest such row wins.
    """
    if lock_holder(store.state_dir) is None:
        return None
    alive = [row for row in _alive_daemons(store) if row.stopped_at is None]
    return alive[-1] if alive else None


def live_instance(store: StateStore) -> str | None:
    """The instance id of the daemon running on this state dir, or None."""
    row = live_daemon(store)
    return row.instance if row is not None else None


# -- finding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Marker:
    instance: str
    state_dir: str
    model: str


def _marker(process: psutil.Process) -> _Marker | None:
    try:
        env = process.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return None
    instance = env.get("TRIOSERVE_INSTANCE")
    if not instance:
        return None
    return _Marker(instance, env.get("TRIOSERVE_STATE_DIR", ""), env.get("TRIOSERVE_MODEL", "?"))


def _same_dir(a: str, b: Path) -> bool:
    return bool(a) and os.path.realpath(a) == os.path.realpath(b)


def _listening_port(process: psutil.Process) -> int | None:
    try:
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr:
                return int(conn.laddr.port)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return None
    return None


def _create_time(process: psutil.Process) -> float | None:
    try:
        return round(float(process.create_time()), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _parent_pid(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).ppid())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def find_leftovers(store: StateStore, *, live: str | None) -> list[Leftover]:
    """Every model process of this state dir that no running daemon owns.

    ``live`` is the instance id of the daemon asking (or the one the CLI found running); any
    other instance whose daemon process is provably alive is treated as live too. Store rows
    whose process is gone are listed (``alive=False``) so the caller can close them.
    """
    boot_id = read_boot_id()
    daemons = _alive_daemons(store)
    protected_instances = {row.instance for row in daemons}
    if live is not None:
        protected_instances.add(live)
    # Children of a running daemon have it as their parent (trio spawns them directly). The lock
    # holder is protected even if its row is missing, e.g. in the first milliseconds of a start.
    protected_parents = {row.pid for row in daemons}
    holder = lock_holder(store.state_dir)
    if holder:
        protected_parents.add(holder)

    found: list[Leftover] = []
    by_pid: dict[int, int] = {}  # pid -> index in found, for rows whose process is proven
    rows = store.children(live_only=True) if store.exists() else []
    for row in rows:
        if row.instance in protected_instances:
            continue
        pgid: int | None = row.pgid
        if same_process(row.pid, row.start_time, row.boot_id):
            if _parent_pid(row.pid) in protected_parents:
                continue
            pgid = _pgid(row.pid)
        proven = pgid is not None and same_process(row.pid, row.start_time, row.boot_id)
        if proven:
            note = "left by a daemon that is gone"
            by_pid[row.pid] = len(found)
        elif row.boot_id != boot_id:
            note = "gone (the machine was rebooted since)"
        elif _reused(row.pid, row.start_time):
            note = "pid now belongs to another program (start time differs): not touched"
        else:
            note = "gone"
        found.append(
            Leftover(
                model=row.model,
                pid=row.pid,
                pgid=pgid if pgid is not None else row.pgid,
                port=row.port,
                instance=row.instance,
                source="store",
                alive=proven,
                proven=proven,
                note=note,
                start_time=row.start_time,
                row_id=row.id,
            )
        )

    covered_groups = {item.pgid for item in found if item.alive}
    me = os.getpid()
    for process in psutil.process_iter(["pid"]):
        if process.pid == me:
            continue
        marker = _marker(process)
        if marker is None or not _same_dir(marker.state_dir, store.state_dir):
            continue
        if marker.instance in protected_instances:
            continue
        if _parent_pid(process.pid) in protected_parents:
            continue
        start_time = _create_time(process)
        pgid = _pgid(process.pid)
        if start_time is None or pgid is None:
            continue
        index = by_pid.get(process.pid)
        if index is not None:
            known = found[index]
            if (
                known.start_time is not None
                and abs(known.start_time - start_time) <= _START_TIME_TOLERANCE
            ):
                found[index] = replace(known, source="store+marker")
                continue
        if pgid in covered_groups:
            # A worker of a model process already listed: killing that group covers it.
            continue
        covered_groups.add(pgid)
        found.append(
            Leftover(
                model=marker.model,
                pid=process.pid,
                pgid=pgid,
                port=_listening_port(process),
                instance=marker.instance,
                source="marker",
                alive=True,
                proven=True,
                note="left by a daemon that is gone (found by its marker)",
                start_time=start_time,
            )
        )
    return sorted(found, key=lambda item: (not item.alive, item.model, item.pid))


# -- killing ---------------------------------------------------------------------------------


def _still_proven(item: Leftover, state_dir: Path) -> bool:
    """Check identity again right before a kill: the scan may be seconds old (a prompt)."""
    if item.source == "marker":
        try:
            process = psutil.Process(item.pid)
        except psutil.NoSuchProcess:
            return False
        marker = _marker(process)
        return (
            marker is not None
            and marker.instance == item.instance
            and _same_dir(marker.state_dir, state_dir)
            and item.start_time is not None
            and abs((_create_time(process) or 0) - item.start_time) <= _START_TIME_TOLERANCE
        )
    # item.start_time is the recorded one; the boot id was checked when it was found.
    return same_process(item.pid, item.start_time, read_boot_id())


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
            time.sleep(_KILL_POLL)


def kill_leftovers(
    store: StateStore, leftovers: Iterable[Leftover], *, grace: float
) -> list[Leftover]:
    """SIGTERM each proven group, wait ``grace``, SIGKILL what is left; update the store.

    Returns every item with ``outcome`` set: killed, killed (SIGKILL), FAILED to kill,
    not touched (identity not proven) or already gone.
    """
    items = list(leftovers)
    targets = [
        item
        for item in items
        if item.proven and item.alive and item.pgid > 1 and _still_proven(item, store.state_dir)
    ]
    scan = _scan_groups({item.pgid for item in targets})
    # Each target must still be in its group; its fellow members then belong to it too.
    targets = [item for item in targets if any(pid == item.pid for pid, _ in scan[item.pgid])]
    target_ids = {id(item) for item in targets}
    groups = _Groups({item.pgid for item in targets}, scan)
    groups.signal(signal.SIGTERM)
    groups.wait(grace)
    hard = set(groups.alive())
    if hard:
        groups.signal(signal.SIGKILL)
        groups.wait(_SIGKILL_WAIT)
    survivors = set(groups.alive())

    results: list[Leftover] = []
    for item in items:
        if id(item) not in target_ids:
            if not item.proven or not item.alive:
                outcome = SKIPPED if item.note.endswith("not touched") else GONE
            elif psutil.pid_exists(item.pid):
                outcome = SKIPPED
                item = replace(item, note="changed since it was found: not touched")
            else:
                outcome = GONE  # it exited between the scan and now
            if item.row_id is not None and not same_process(
                item.pid, item.start_time, read_boot_id()
            ):
                # The recorded process is gone (a reused pid is someone else's): close the row.
                store.child_stopped(item.row_id, None, state="gone")
            results.append(replace(item, outcome=outcome, alive=outcome == SKIPPED and item.alive))
            continue
        if item.pgid in survivors:
            results.append(replace(item, outcome=NOT_KILLED))
            continue
        if item.row_id is not None:
            store.child_stopped(item.row_id, None, state="reclaimed")
        outcome = KILLED_HARD if item.pgid in hard else KILLED
        results.append(replace(item, outcome=outcome, alive=False))
    return results


def reclaim_leftovers(store: StateStore, *, live_instance: str, grace: float) -> list[str]:
    """What ``trioserve start`` runs before it binds: kill what a dead predecessor left.

    Returns one line per process it acted on (for the log); stale rows are closed silently.
    """
    leftovers = find_leftovers(store, live=live_instance)
    if not leftovers:
        return []
    results = kill_leftovers(store, leftovers, grace=grace)
    return list(_describe(results))


def _describe(results: Iterable[Leftover]) -> Iterator[str]:
    for item in results:
        if item.outcome == GONE:
            continue
        port = f"port {item.port}, " if item.port is not None else ""
        yield (
            f"{item.model} pid {item.pid} ({port}instance {item.instance}): {item.outcome}"
            + (f" - {item.note}" if item.outcome == SKIPPED else "")
        )
