"""The host memory of a process group, measured on real children (trioserve.memory.measure)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from trioserve.memory import measure
from trioserve.memory.measure import group_pids, host_memory

MIB = 2**20

# A leader that holds 50 MiB and a child it forks that holds 30 MiB more, each page written (an
# allocation alone stays out of RSS and PSS). The leader prints the child's pid once both hold
# their memory, then both sleep until killed.
GROUP = """
import mmap, os, signal, sys, time

def hold(mib):
    held = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    held[::mmap.PAGESIZE] = b"\\x01" * ((mib << 20) // mmap.PAGESIZE)
    return held

leader_memory = hold(50)
ready, told = os.pipe()
child = os.fork()
if child == 0:
    child_memory = hold(30)
    os.write(told, b"x")
    while True:
        time.sleep(60)

def stop(signum, frame):
    # Kill and reap the child here: orphaned, it would wait for init to reap it.
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(child, 0)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
os.read(ready, 1)
print(child, flush=True)
while True:  # reaps its child only when stopped: a child killed by a test stays a zombie
    time.sleep(60)
"""


@dataclass
class Group:
    leader: subprocess.Popen[str]
    child: int

    @property
    def pgid(self) -> int:
        return self.leader.pid  # start_new_session: the leader's pid is the group's id


def start_group() -> Group:
    leader = subprocess.Popen(
        [sys.executable, "-c", GROUP],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert leader.stdout is not None
    line = leader.stdout.readline()
    assert line, "the group's leader exited before its child held its memory"
    return Group(leader, int(line))


def stop_group(group: Group) -> None:
    """SIGTERM to the leader, which kills and reaps its child; SIGKILL to the whole group if
    that does not end it."""
    group.leader.terminate()
    try:
        group.leader.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(group.pgid, signal.SIGKILL)
        group.leader.wait()
    assert group.leader.stdout is not None
    group.leader.stdout.close()


@pytest.fixture
def group() -> Iterator[Group]:
    started = start_group()
    try:
        yield started
    finally:
        stop_group(started)


def test_group_pids_are_the_leader_and_its_forked_child(group: Group) -> None:
    assert group_pids(group.pgid) == {group.leader.pid, group.child}
    assert os.getpid() not in group_pids(group.pgid)


def test_host_memory_is_what_the_group_holds_counting_shared_pages_once(group: Group) -> None:
    total = host_memory(group.pgid)
    # 50 + 30 MiB held, plus two interpreters (a few MiB each, partly shared after the fork).
    assert 80 * MIB <= total <= 120 * MIB, total / MIB
    # The child shares the leader's 50 MiB copy-on-write until it writes them: RSS counts them
    # twice, PSS once over the group.
    rss = sum(psutil.Process(pid).memory_info().rss for pid in (group.leader.pid, group.child))
    assert rss - total >= 40 * MIB, (rss / MIB, total / MIB)


def test_a_process_gone_between_listing_and_reading_is_skipped(
    group: Group, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pid that was in the group a moment ago and is gone now: a reaped child of ours.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = group_pids(group.pgid)
    monkeypatch.setattr(measure, "group_pids", lambda pgid: alive | {gone.pid})
    assert host_memory(group.pgid) >= 80 * MIB


def test_rss_stands_in_where_pss_cannot_be_read(
    group: Group, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for another user's process: its /proc/PID/smaps is not ours to read (we may be root
    # here, so the refusal is simulated).
    def refused(process: psutil.Process) -> None:
        raise psutil.AccessDenied(process.pid)

    monkeypatch.setattr(psutil.Process, "memory_full_info", refused)
    rss = sum(psutil.Process(pid).memory_info().rss for pid in (group.leader.pid, group.child))
    # RSS counts the 50 MiB the child shares with its leader twice.
    assert host_memory(group.pgid) >= 120 * MIB
    assert abs(host_memory(group.pgid) - rss) < 4 * MIB


def test_a_zombie_is_not_in_the_group_and_an_empty_group_measures_zero() -> None:
    started = start_group()
    try:
        os.kill(started.child, signal.SIGKILL)
        child = psutil.Process(started.child)
        for _ in range(500):  # the kill takes effect a moment later; nothing announces it
            if child.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.01)
        assert child.status() == psutil.STATUS_ZOMBIE
        assert group_pids(started.pgid) == {started.leader.pid}
        assert 50 * MIB <= host_memory(started.pgid) < 80 * MIB
    finally:
        stop_group(started)
    assert group_pids(started.pgid) == set()
    assert host_memory(started.pgid) == 0
