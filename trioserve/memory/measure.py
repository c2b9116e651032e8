"""The host memory a model's process group uses, read from the process table with psutil.

Blocking (they read ``/proc``): the daemon calls them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os

import psutil

__all__ = ["group_pids", "host_memory"]


def group_pids(pgid: int) -> set[int]:
    """Every live process whose process group is ``pgid``.

    The daemon starts each model in a session of its own, so the group holds the model's server
    and whatever it forked (helpers, workers) and nothing else. Zombies are left out: they only
    wait to be reaped and hold no memory.
    """
    members: set[int] = set()
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                continue
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue  # ended since the listing
        members.add(pid)
    return members


def _process_memory(pid: int) -> int | None:
    """``pid``'s PSS, its RSS when PSS cannot be read, None when it has ended."""
    try:
        process = psutil.Process(pid)
        try:
            # PSS, not RSS: pages shared between the group's processes (a forked worker's
            # copy-on-write pages, the same libraries) are counted once over the group, not
            # once per process, so the sum is what the group costs the host.
            pss = getattr(process.memory_full_info(), "pss", None)
        except psutil.AccessDenied:
            pss = None  # /proc/PID/smaps is readable only by its owner (and root)
        if pss is not None:
            return int(pss)
        # No PSS: another user's process, or a kernel without /proc/PID/smaps (psutil's
        # memory_full_info then has no ``pss``). RSS overcounts shared pages, never undercounts.
        return int(process.memory_info().rss)
    except psutil.NoSuchProcess:  # also psutil.ZombieProcess, its subclass
        return None


def host_memory(pgid: int) -> int:
    """Bytes of host memory the processes of group ``pgid`` use: the sum of their PSS (RSS where
    PSS cannot be read). Processes that end while we read are skipped; 0 for an empty group."""
    total = 0
    for pid in group_pids(pgid):
        memory = _process_memory(pid)
        if memory is not None:
            total += memory
    return total
