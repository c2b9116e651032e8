"""Finding and killing model processes left behind by a daemon that is no longer running.

A process is only ever killed when its identity is proven (``identity.py``):

* a state-store row whose pid is alive with the same process start time on the same boot, or
* the ``TRIOSERVE_INSTANCE`` marker in the process's environment, naming an instance of *this*
  state dir (``TRIOSERVE_STATE_DIR``) whose daemon is not running.

A pid that was reused by another program has a different start time and no marker: it is
reported and left alone. The children of a running daemon are never touched: neither those of
an instance whose recorded daemon process is alive, nor any process whose parent is the daemon
holding the state dir's lock (in case it has not recorded itself yet).

Killing is by process group, SIGTERM, ``grace``, SIGKILL (``groupkill.py``).

Everything here is blocking (psutil, sqlite); the daemon calls it from a worker thread, the CLI
directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from trioserve.host.groupkill import kill_groups
from trioserve.host.identity import (
    START_TIME_TOLERANCE,
    create_time,
    parent_pid,
    pgid_of,
    read_boot_id,
    read_marker,
    reused,
    same_dir,
    same_process,
)
from trioserve.host.running import alive_daemons, lock_holder
from trioserve.host.store import StateStore

__all__ = [
    "GONE",
    "KILLED",
    "KILLED_HARD",
    "NOT_KILLED",
    "SKIPPED",
    "Leftover",
    "find_leftovers",
    "kill_leftovers",
    "reclaim_leftovers",
]

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


# -- finding ---------------------------------------------------------------------------------


def _listening_port(process: psutil.Process) -> int | None:
    try:
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr:
                return int(conn.laddr.port)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return None
    return None


def find_leftovers(store: StateStore, *, live: str | None) -> list[Leftover]:
    """Every model process of this state dir that no running daemon owns.

    ``live`` is the instance id of the daemon asking (or the one the CLI found running); any
    other instance whose daemon process is provably alive is treated as live too. Store rows
    whose process is gone are listed (``alive=False``) so the caller can close them.
    """
    boot_id = read_boot_id()
    daemons = alive_daemons(store)
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
            if parent_pid(row.pid) in protected_parents:
                continue
            pgid = pgid_of(row.pid)
        proven = pgid is not None and same_process(row.pid, row.start_time, row.boot_id)
        if proven:
            note = "left by a daemon that is gone"
            by_pid[row.pid] = len(found)
        elif row.boot_id != boot_id:
            note = "gone (the machine was rebooted since)"
        elif reused(row.pid, row.start_time):
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
        marker = read_marker(process)
        if marker is None or not same_dir(marker.state_dir, store.state_dir):
            continue
        if marker.instance in protected_instances:
            continue
        if parent_pid(process.pid) in protected_parents:
            continue
        start_time = create_time(process)
        pgid = pgid_of(process.pid)
        if start_time is None or pgid is None:
            continue
        index = by_pid.get(process.pid)
        if index is not None:
            known = found[index]
            if (
                known.start_time is not None
                and abs(known.start_time - start_time) <= START_TIME_TOLERANCE
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
        marker = read_marker(process)
        return (
            marker is not None
            and marker.instance == item.instance
            and same_dir(marker.state_dir, state_dir)
            and item.start_time is not None
            and abs((create_time(process) or 0) - item.start_time) <= START_TIME_TOLERANCE
        )
    # item.start_time is the recorded one; the boot id was checked when it was found.
    return same_process(item.pid, item.start_time, read_boot_id())


def kill_leftovers(
    store: StateStore, leftovers: Iterable[Leftover], *, grace: float
) -> list[Leftover]:
    """SIGTERM each proven group, wait ``grace``, SIGKILL what is left; update the store.

    Returns every item with ``outcome`` set: killed, killed (SIGKILL), FAILED to kill,
    not touched (identity not proven) or already gone.
    """
    items = list(leftovers)
    killed = kill_groups(
        [item for item in items if item.proven and item.alive],
        proven=lambda item: _still_proven(item, store.state_dir),
        grace=grace,
    )
    target_ids = {id(item) for item in killed.signalled}

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
        if item.pgid in killed.survivors:
            results.append(replace(item, outcome=NOT_KILLED))
            continue
        if item.row_id is not None:
            store.child_stopped(item.row_id, None, state="reclaimed")
        outcome = KILLED_HARD if item.pgid in killed.hard else KILLED
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
