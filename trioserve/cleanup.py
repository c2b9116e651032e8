"""Finding and killing model processes left behind by a daemon that is no longer running.

A process is only ever killed when its identity is proven:

* a state-store row whose pid is alive with the same process start time on the same boot, or
* the ``TRIOSERVE_INSTANCE`` marker in the process's environment, naming an instance of *this*
  state dir (``TRIOSERVE_STATE_DIR``) that is not the live daemon.

A pid that was reused by another program has a different start time and no marker: it is
reported and left alone. Everything here is blocking (psutil, sqlite); the daemon calls it from a
worker thread, the CLI directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import psutil

from .process import read_boot_id
from .store import ChildRow, StateStore

__all__ = ["Leftover", "find_leftovers", "kill_leftovers", "live_instance", "reclaim_leftovers"]

# Start times are compared to 1/100 s: psutil derives them from clock ticks since boot.
_START_TIME_TOLERANCE = 0.05
_KILL_POLL = 0.05


@dataclass(frozen=True)
class Leftover:
    model: str
    pid: int
    pgid: int
    port: int | None
    instance: str
    source: str  # "store", "marker" or "store+marker"
    alive: bool
    proven: bool
    note: str
    row_id: int | None = None
    outcome: str = ""


def live_instance(store: StateStore) -> str | None:
    """The instance id of the daemon running on this state dir, or None.

    Live means: it holds the instance lock, and its recorded pid is alive with the recorded
    start time.
    """
    from .store import InstanceLock

    if not InstanceLock(store.state_dir).held_by_someone() or not store.exists():
        return None
    for row in reversed(store.daemons()):
        if row.stopped_at is None and _same_process(row.pid, row.pid_start_time, row.boot_id):
            return row.instance
    return None


def _same_process(pid: int, start_time: float | None, boot_id: str) -> bool:
    if boot_id != read_boot_id() or start_time is None:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = float(process.create_time())
        return abs(round(created, 2) - start_time) <= _START_TIME_TOLERANCE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _marker(process: psutil.Process) -> tuple[str, str, str] | None:
    try:
        env = process.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return None
    instance = env.get("TRIOSERVE_INSTANCE")
    if not instance:
        return None
    return instance, env.get("TRIOSERVE_STATE_DIR", ""), env.get("TRIOSERVE_MODEL", "?")


def find_leftovers(store: StateStore, *, live: str | None) -> list[Leftover]:
    """Every model process of this state dir not owned by the ``live`` instance."""
    found: dict[int, Leftover] = {}
    rows: list[ChildRow] = store.children(live_only=True) if store.exists() else []
    for row in rows:
        if row.instance == live:
            continue
        alive = psutil.pid_exists(row.pid)
        proven = _same_process(row.pid, row.start_time, row.boot_id)
        if proven:
            note = "left by a daemon that is gone"
        elif alive and row.boot_id == read_boot_id():
            note = "pid now belongs to another program (start time differs): not touched"
        else:
            note = "already gone"
        found[row.pid] = Leftover(
            model=row.model,
            pid=row.pid,
            pgid=row.pgid,
            port=row.port,
            instance=row.instance,
            source="store",
            alive=alive and proven,
            proven=proven,
            note=note,
            row_id=row.id,
        )
    ours = os.path.realpath(store.state_dir)
    for process in psutil.process_iter(["pid"]):
        if process.pid == os.getpid():
            continue
        marker = _marker(process)
        if marker is None:
            continue
        instance, state_dir, model = marker
        if instance == live or os.path.realpath(state_dir or "/nonexistent") != ours:
            continue
        try:
            pgid = os.getpgid(process.pid)
        except ProcessLookupError:
            continue
        known = found.get(process.pid)
        if known is not None:
            found[process.pid] = replace(
                known,
                source="store+marker",
                alive=True,
                proven=True,
                note="left by a daemon that is gone",
            )
        else:
            found[process.pid] = Leftover(
                model=model,
                pid=process.pid,
                pgid=pgid,
                port=None,
                instance=instance,
                source="marker",
                alive=True,
                proven=True,
                note="left by a daemon that is gone (found by its marker)",
            )
    return sorted(found.values(), key=lambda item: (item.model, item.pid))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # Zombies still count for killpg; a group of zombies is dead for our purposes.
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return False


def _still_proven(item: Leftover, rows: dict[int, ChildRow]) -> bool:
    """Check identity again right before a kill: the scan may be a few ms old."""
    if item.source == "marker" or "marker" in item.source:
        try:
            return _marker(psutil.Process(item.pid)) is not None
        except psutil.NoSuchProcess:
            return False
    row = rows.get(item.pid)
    return row is not None and _same_process(row.pid, row.start_time, row.boot_id)


def kill_leftovers(
    store: StateStore, leftovers: Iterable[Leftover], *, grace: float
) -> list[Leftover]:
    """SIGTERM each proven group, wait ``grace``, SIGKILL what is left; update the store."""
    items = list(leftovers)
    rows = {row.pid: row for row in store.children(live_only=True)} if store.exists() else {}
    targets = [i for i in items if i.proven and i.alive and _still_proven(i, rows)]
    for item in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(item.pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    # These are not our children, so there is no pidfd wait to use: polling is the honest tool.
    while time.monotonic() < deadline and any(_group_alive(i.pgid) for i in targets):
        time.sleep(_KILL_POLL)
    results: list[Leftover] = []
    for item in items:
        if item not in targets:
            outcome = "skipped" if item.alive or not item.proven else "gone"
            if not item.alive and item.row_id is not None:
                store.child_stopped(item.row_id, None, state="gone")
            results.append(replace(item, outcome=outcome))
            continue
        killed_hard = False
        if _group_alive(item.pgid):
            killed_hard = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(item.pgid, signal.SIGKILL)
            end = time.monotonic() + 5
            while time.monotonic() < end and _group_alive(item.pgid):
                time.sleep(_KILL_POLL)
        survived = _group_alive(item.pgid)
        if item.row_id is not None and not survived:
            store.child_stopped(item.row_id, None, state="reclaimed")
        outcome = (
            "FAILED to kill" if survived else ("killed (SIGKILL)" if killed_hard else "killed")
        )
        results.append(replace(item, outcome=outcome, alive=survived))
    return results


def reclaim_leftovers(store: StateStore, *, live_instance: str, grace: float) -> list[str]:
    """What ``trioserve start`` runs before it binds: kill what a dead predecessor left."""
    leftovers = find_leftovers(store, live=live_instance)
    if not leftovers:
        return []
    results = kill_leftovers(store, leftovers, grace=grace)
    return [
        f"{item.model} pid {item.pid} (port {item.port}, instance {item.instance}): {item.outcome}"
        for item in results
        if item.outcome != "gone"
    ]
