"""The daemon running on a state dir, proven: it holds the instance lock, and its recorded pid is
alive with the recorded start time on this boot. Blocking (psutil, sqlite)."""

from __future__ import annotations

from pathlib import Path

from trioserve.host.identity import same_process
from trioserve.host.store import DaemonRow, InstanceLock, StateStore

__all__ = ["alive_daemons", "live_daemon", "lock_holder"]


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


def alive_daemons(store: StateStore) -> list[DaemonRow]:
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
    alive = [row for row in alive_daemons(store) if row.stopped_at is None]
    return alive[-1] if alive else None
