"""A model's process group is never signalled after its leader was reaped.

The group's id is the leader's pid. Once the leader is reaped and the rest of its group is gone,
the kernel may give that pid to another process, which may lead a group of its own: a signal to
the old pgid would then reach a stranger. ``ChildProcess`` therefore leaves the leader a zombie
until its last group signal, and reaps it after.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest
import trio

from trioserve.host.child_env import child_env
from trioserve.supervision.process import ChildProcess
from trioserve.supervision.ringbuffer import OutputRing

# The leader leaves on SIGTERM; a worker it started (same group) ignores SIGTERM, so the stop
# has to SIGKILL the group after the leader is gone.
LEADER_WITH_STUBBORN_WORKER = (
    "import signal, subprocess, sys, time\n"
    "worker = subprocess.Popen([sys.executable, '-c', "
    "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    'print("worker armed", flush=True); time.sleep(60)\'])\n'
    "time.sleep(60)\n"
)
EXITS_AT_ONCE = "import sys; sys.exit(3)"


def _leader_state(pid: int) -> str:
    """'Z' while the leader is an unreaped zombie, 'gone' once reaped, else its state."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


class GroupSignals:
    """Every killpg to the group of the child spawned through it, as the leader's state at
    that moment ("SIGKILL:Z": sent while the leader was a zombie)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[str] = []
        self.pgid: int | None = None
        real_killpg = os.killpg

        def killpg(pgid: int, signum: int) -> None:
            if pgid == self.pgid:
                self.seen.append(f"{signal.Signals(signum).name}:{_leader_state(pgid)}")
            real_killpg(pgid, signum)

        monkeypatch.setattr(os, "killpg", killpg)

    async def spawn(self, nursery: trio.Nursery, code: str) -> ChildProcess:
        """``python -c code`` as a model child, whose group is watched."""
        child = await ChildProcess.spawn(
            nursery, [sys.executable, "-c", code], child_env({}), OutputRing()
        )
        self.pgid = child.pgid
        return child


@pytest.fixture
def group_signals(monkeypatch: pytest.MonkeyPatch) -> GroupSignals:
    return GroupSignals(monkeypatch)


async def test_group_is_killed_before_its_exited_leader_is_reaped(
    group_signals: GroupSignals,
) -> None:
    seen = group_signals.seen
    async with trio.open_nursery() as nursery:
        child = await group_signals.spawn(nursery, LEADER_WITH_STUBBORN_WORKER)
        await child.wait_for_output("worker armed")
        code = await child.stop(grace=0.5)
    assert code == -signal.SIGTERM
    assert seen[0].startswith("SIGTERM:")
    # The SIGKILL for the stubborn worker went out while the leader was still a zombie.
    assert seen[-1] == "SIGKILL:Z", seen
    assert _leader_state(child.pid) == "gone"


async def test_a_leader_that_exited_alone_stays_unreaped_until_stop(
    group_signals: GroupSignals,
) -> None:
    async with trio.open_nursery() as nursery:
        child = await group_signals.spawn(nursery, EXITS_AT_ONCE)
        await child.exited.wait()
        # Its exit is known (code included) without reaping it.
        assert child.returncode == 3
        assert _leader_state(child.pid) == "Z"
        await child.last_words()
        code = await child.stop(grace=5)
    assert code == 3
    seen = list(group_signals.seen)
    assert seen and all(entry.endswith(":Z") for entry in seen), seen
    assert _leader_state(child.pid) == "gone"
    # A kill after the reap sends nothing: the pgid may be someone else's by now.
    child.kill_now()
    assert group_signals.seen == seen
