"""Who a process is, proven: the same pid, the same start time, the same boot, or our marker.

A pid alone proves nothing: the kernel reuses it. The state store records each process's start
time (as psutil computes it, rounded to 1/100 s) and the boot id, and each model child carries
``TRIOSERVE_INSTANCE`` (and ``TRIOSERVE_STATE_DIR``, ``TRIOSERVE_MODEL``) in its environment.

Blocking (psutil reads /proc). Imports only the standard library and psutil: a small separate
process (a guard) may use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = [
    "START_TIME_TOLERANCE",
    "Marker",
    "create_time",
    "parent_pid",
    "pgid_of",
    "process_start_time",
    "read_boot_id",
    "read_marker",
    "reused",
    "same_dir",
    "same_process",
]

# Start times are compared to 1/100 s: psutil derives them from clock ticks since boot, and the
# store keeps them rounded to 2 decimals.
START_TIME_TOLERANCE = 0.05

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


def read_boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``), or ``"unknown"``."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def create_time(process: psutil.Process) -> float | None:
    """The process's start time (seconds since the epoch) as the store records it, or None."""
    try:
        return round(float(process.create_time()), 2)
    except _GONE:
        return None


def process_start_time(pid: int) -> float | None:
    """``create_time`` of ``pid``, or None when there is no such process."""
    try:
        return create_time(psutil.Process(pid))
    except _GONE:
        return None


def same_process(pid: int, start_time: float | None, boot_id: str) -> bool:
    """True when ``pid`` is a live (non-zombie) process started at ``start_time`` this boot."""
    if start_time is None or boot_id != read_boot_id():
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = float(process.create_time())
    except _GONE:
        return False
    return abs(round(created, 2) - start_time) <= START_TIME_TOLERANCE


def reused(pid: int, start_time: float | None) -> bool:
    """True when ``pid`` is now some other live process (not ours, not our unreaped zombie)."""
    try:
        process = psutil.Process(pid)
        zombie = process.status() == psutil.STATUS_ZOMBIE
        created = round(float(process.create_time()), 2)
    except _GONE:
        return False
    ours = start_time is not None and abs(created - start_time) <= START_TIME_TOLERANCE
    return not (zombie and ours)


def parent_pid(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).ppid())
    except _GONE:
        return None


def pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@dataclass(frozen=True)
class Marker:
    """What a model child's environment says about who started it."""

    instance: str
    state_dir: str
    model: str


def read_marker(process: psutil.Process) -> Marker | None:
    """The process's trioserve marker, or None (no marker, or its environment is unreadable)."""
    try:
        env = process.environ()
    except (*_GONE, OSError):
        return None
    instance = env.get("TRIOSERVE_INSTANCE")
    if not instance:
        return None
    return Marker(instance, env.get("TRIOSERVE_STATE_DIR", ""), env.get("TRIOSERVE_MODEL", "?"))


def same_dir(a: str, b: Path) -> bool:
    """True when ``a`` (from a marker; may be empty) names the directory ``b``."""
    return bool(a) and os.path.realpath(a) == os.path.realpath(b)
