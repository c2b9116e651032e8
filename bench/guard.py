"""The guard: time from the daemon's SIGKILL to the last model process gone.

Run with ``.venv/bin/python bench/guard.py`` (``--rounds``, ``--grace``). Each round starts the
stand-in daemon of the guard's tests (``tests/support/guard_parent.py``: a real ``Guard`` and
real model-like children, each in a session of its own, tracked as the supervisor tracks them),
waits until every child is set up, SIGKILLs the daemon, and takes the moment the last model
process ended from pidfds: the process table, not the guard's word. This script makes itself
the children's subreaper, so it reaps them and checks how each one died.

Two series, ``stop_grace`` = 0.5 s by default:

* **mixed**: children that ignore SIGTERM (two ``stubborn``, a ``family`` whose grandchild ignores
  it) and ones that do not (two ``plain``, one still ``starting``): the figure is the grace plus
  how late the SIGKILL lands. The goal is at most ``stop_grace`` + 0.5 s.
* **polite**: only children that die on SIGTERM: how fast the guard notices the death and acts.

Prints the median, min and max of each series; exit status 1 when a round missed the goal or
left a model process alive.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.guard_parent import Adopter, Parent, bench_arguments

MIXED = ["stubborn", "stubborn", "family", "plain", "plain", "starting"]
POLITE = ["plain", "plain", "plain", "starting"]


def one_round(kinds: list[str], grace: float, adopter: Adopter) -> float | None:
    """Seconds from the SIGKILL to the last model process gone; None if one survived."""
    parent = Parent(kinds, grace=grace, marker=False)
    pids: list[int] = []
    try:
        guard, pids = parent.settle()
        killed_at, ended = parent.kill_and_watch(
            [*pids, guard], timeout=grace + 10, on_exit=adopter.reap
        )
        if not set(pids) <= set(ended):
            return None
        if adopter.statuses.get(guard) != 0:
            print(f"  the guard ended with status {adopter.statuses.get(guard)}")
        return max(ended[pid] for pid in pids) - killed_at
    finally:
        parent.close()
        adopter.cleanup(pids)


def series(name: str, kinds: list[str], rounds: int, grace: float, adopter: Adopter) -> bool:
    times: list[float] = []
    for _ in range(rounds):
        took = one_round(kinds, grace, adopter)
        if took is None:
            print(f"{name}: a model process survived the daemon's death")
            return False
        times.append(took)
    ms = [t * 1000 for t in times]
    print(
        f"{name:6} ({len(kinds)} children, stop_grace {grace:g} s, {rounds} rounds): "
        f"last model process gone {statistics.median(ms):.0f} ms after the SIGKILL (median; "
        f"min {min(ms):.0f}, max {max(ms):.0f})"
    )
    return max(times) <= grace + 0.5


def main() -> int:
    args = bench_arguments(__doc__.splitlines()[0])
    with Adopter() as adopter:
        ok = series("mixed", MIXED, args.rounds, args.grace, adopter)
        ok = series("polite", POLITE, args.rounds, args.grace, adopter) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
