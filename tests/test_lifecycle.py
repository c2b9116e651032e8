"""The model lifecycle: a pure state machine whose rules are one table of data."""

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
    event = lifecycle.move(target, at=123.5, reason="because")
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
        lifecycle.move(target, at=1.0, reason="nope")
    assert lifecycle.state is current
    assert lifecycle.history == []
    assert "'m'" in str(caught.value)
    assert (caught.value.current, caught.value.target) == (current, target)


def test_failures_count_until_a_start_succeeds() -> None:
    lifecycle = Lifecycle("m")
    for n in range(1, 4):
        lifecycle.move(S.STARTING, at=n, reason="requested")
        lifecycle.move(S.FAILED, at=n, reason=f"crash {n}")
        assert lifecycle.consecutive_failures == n
        assert lifecycle.last_error == f"crash {n}"
        assert lifecycle.exhausted(3) is (n >= 3)
    lifecycle.move(S.STARTING, at=5, reason="cooldown over")
    assert not lifecycle.exhausted(3), "a model that is starting is not failed"
    lifecycle.move(S.READY, at=6, reason="healthy")
    assert lifecycle.consecutive_failures == 0
    assert lifecycle.last_error is None
    # Every start after the first one is a restart.
    assert lifecycle.restarts == 3


def test_full_cycle_produces_one_event_per_transition() -> None:
    lifecycle = Lifecycle("m")
    path = [S.STARTING, S.READY, S.STOPPING, S.STOPPED]
    for at, target in enumerate(path):
        lifecycle.move(target, at=at, reason="step")
    assert [(e.from_state, e.to_state) for e in lifecycle.history] == list(
        zip([S.STOPPED, *path], path, strict=False)
    )


def test_history_is_bounded() -> None:
    lifecycle = Lifecycle("m")
    for at in range(500):
        lifecycle.move(S.STARTING, at=at, reason="requested")
        lifecycle.move(S.FAILED, at=at, reason="crash")
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
