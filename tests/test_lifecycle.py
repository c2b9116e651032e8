"""The model lifecycle: a pure state machine whose rules are one table of data, and the rules
about failures (their count, its reset, the cooldown)."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

import trioserve.supervision.lifecycle
from trioserve.supervision.lifecycle import (
    TRANSITIONS,
    InvalidTransition,
    Lifecycle,
    State,
    Transition,
)

S = State
# The contract's diagram, written out independently of the module under test.
ALLOWED = {
    (S.STOPPED, S.STARTING),
    (S.STARTING, S.READY),
    (S.STARTING, S.FAILED),
    (S.STARTING, S.STOPPING),
    (S.READY, S.STOPPING),
    (S.READY, S.FAILED),
    (S.STOPPING, S.STOPPED),
    (S.FAILED, S.STARTING),
    (S.FAILED, S.STOPPED),
}
REFUSED = sorted(set(itertools.product(State, State)) - ALLOWED)


def test_transitions_are_data_matching_the_contract() -> None:
    assert set(TRANSITIONS) == set(State)
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED))
def test_allowed_transition_moves_and_returns_its_event(current: State, target: State) -> None:
    lifecycle = Lifecycle("m", state=current)
    event = lifecycle.move(target, at=123.5, now=7.0, reason="because")
    assert lifecycle.state is target
    assert event == Transition("m", current, target, 123.5, "because")
    assert event.as_dict() == {
        "model": "m",
        "from": current.value,
        "to": target.value,
        "at": 123.5,
        "reason": "because",
    }
    assert lifecycle.history[-1] == event


@pytest.mark.parametrize(("current", "target"), REFUSED)
def test_refused_transition_raises_and_changes_nothing(current: State, target: State) -> None:
    lifecycle = Lifecycle("m", state=current)
    with pytest.raises(InvalidTransition) as caught:
        lifecycle.move(target, at=1.0, now=1.0, reason="nope")
    assert lifecycle.state is current
    assert lifecycle.history == []
    assert "'m'" in str(caught.value)
    assert (caught.value.current, caught.value.target) == (current, target)


def go(lifecycle: Lifecycle, *path: State, now: float = 0.0, reason: str = "step") -> None:
    for target in path:
        lifecycle.move(target, at=1e9 + now, now=now, reason=reason)


def failed_times(n: int, *, now: float = 0.0) -> Lifecycle:
    """A lifecycle whose last ``n`` starts failed, the last one at ``now``."""
    lifecycle = Lifecycle("m")
    for _ in range(n):
        go(lifecycle, S.STARTING, S.FAILED, now=now)
    return lifecycle


def test_failures_count_until_a_start_succeeds() -> None:
    lifecycle = Lifecycle("m")
    for n in range(1, 4):
        go(lifecycle, S.STARTING, now=n)
        go(lifecycle, S.FAILED, now=n, reason=f"crash {n}")
        assert lifecycle.consecutive_failures == n
        assert lifecycle.last_error == f"crash {n}"
        assert lifecycle.exhausted(3) is (n >= 3)
    go(lifecycle, S.STARTING, now=5)
    assert not lifecycle.exhausted(3), "a model that is starting is not failed"
    go(lifecycle, S.READY, now=6)
    assert lifecycle.consecutive_failures == 0
    assert lifecycle.last_error is None
    assert lifecycle.failed_at is None
    # Every start after the first one is a restart.
    assert lifecycle.restarts == 3


def test_a_crash_while_ready_counts_as_a_failure() -> None:
    lifecycle = Lifecycle("m")
    go(lifecycle, S.STARTING, S.READY, S.FAILED, now=4.0, reason="exited")
    assert lifecycle.consecutive_failures == 1
    assert lifecycle.failed_at == 4.0
    assert lifecycle.exhausted(1)


def test_a_stop_on_purpose_is_not_a_failure() -> None:
    lifecycle = failed_times(2)
    go(lifecycle, S.STARTING, S.STOPPING, S.STOPPED)
    assert lifecycle.consecutive_failures == 2, "neither a failure nor a success"
    go(lifecycle, S.STARTING, S.READY, S.STOPPING, S.STOPPED)
    assert lifecycle.consecutive_failures == 0


def test_the_cooldown_starts_when_the_model_became_failed() -> None:
    lifecycle = failed_times(3, now=100.0)
    assert lifecycle.failed_at == 100.0
    left = lifecycle.cooldown_left
    assert left(100.0, max_start_failures=3, cooldown=30) == 30
    assert left(129.5, max_start_failures=3, cooldown=30) == 0.5
    assert left(130.0, max_start_failures=3, cooldown=30) == 0.0
    assert left(1000.0, max_start_failures=3, cooldown=30) == 0.0


def test_no_cooldown_before_max_start_failures() -> None:
    lifecycle = failed_times(2, now=100.0)
    assert not lifecycle.exhausted(3)
    assert lifecycle.cooldown_left(100.0, max_start_failures=3, cooldown=30) == 0.0
    go(lifecycle, S.STARTING, S.FAILED, now=110.0)
    assert lifecycle.cooldown_left(110.0, max_start_failures=3, cooldown=30) == 30


def test_each_failure_restarts_the_cooldown() -> None:
    # After the cooldown one more start is allowed; its failure starts a new cooldown.
    lifecycle = failed_times(3, now=100.0)
    go(lifecycle, S.STARTING, S.FAILED, now=130.0)
    assert lifecycle.consecutive_failures == 4
    assert lifecycle.cooldown_left(131.0, max_start_failures=3, cooldown=30) == 29


def test_unloading_a_failed_model_clears_its_failures_and_cooldown() -> None:
    lifecycle = failed_times(3, now=100.0)
    go(lifecycle, S.STOPPED, now=101.0, reason="unloaded")
    assert lifecycle.consecutive_failures == 0
    assert lifecycle.failed_at is None
    assert lifecycle.cooldown_left(101.0, max_start_failures=3, cooldown=30) == 0.0
    assert lifecycle.last_error == "step", "the last error stays visible"
    go(lifecycle, S.STARTING, S.FAILED, now=102.0)
    assert lifecycle.consecutive_failures == 1, "the count starts again"


def test_a_start_keeps_the_failure_count_but_ends_the_cooldown() -> None:
    lifecycle = failed_times(3, now=100.0)
    go(lifecycle, S.STARTING, now=130.0)
    assert lifecycle.consecutive_failures == 3
    assert lifecycle.cooldown_left(130.0, max_start_failures=3, cooldown=30) == 0.0


def test_full_cycle_produces_one_event_per_transition() -> None:
    lifecycle = Lifecycle("m")
    path = [S.STARTING, S.READY, S.STOPPING, S.STOPPED]
    for at, target in enumerate(path):
        lifecycle.move(target, at=at, now=at, reason="step")
    assert [(e.from_state, e.to_state) for e in lifecycle.history] == list(
        zip([S.STOPPED, *path], path, strict=False)
    )


def test_history_is_bounded() -> None:
    lifecycle = Lifecycle("m")
    for at in range(500):
        go(lifecycle, S.STARTING, S.FAILED, now=at)
    assert len(lifecycle.history) <= 64


def test_lifecycle_module_imports_no_trio() -> None:
    tree = ast.parse(Path(trioserve.supervision.lifecycle.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "enum", "dataclasses", "typing"}, imported
    # And nothing it imports pulls trio in either.
    check = "import sys, trioserve.supervision.lifecycle; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
