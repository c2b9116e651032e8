"""Measured memory, with echo children that really hold it (``--hold-mib``): measured before a
model is ready, kept in the state store by command for the next start (and the next daemon),
a warning when it is well over the declared figure (which it then replaces), and placement
counting the measured figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.config import echo_cmd, make_config
from tests.support.daemon import running_supervisor, running_supervisor_with_store
from trioserve.errors import ModelUnavailable
from trioserve.host.store import StateStore
from trioserve.memory.figures import command_key
from trioserve.supervision.lifecycle import State

MIB = 2**20
HOLD = 64


async def test_an_auto_model_is_measured_before_it_is_ready(state_dir: Path) -> None:
    cmd = echo_cmd("--hold-mib", str(HOLD))
    config = make_config(state_dir, {"m": {"cmd": cmd}}, supervisor={"memory": {"cpu": "1 GiB"}})
    async with running_supervisor_with_store(config) as supervisor:
        status = supervisor.status()["m"]
        assert status.memory == {"estimated": {}, "measured": {}}
        assert status.warnings == [
            "memory not yet known: counted as 0 until measured "
            "(its command names no .gguf to estimate from)"
        ]
        await supervisor.load("m")
        status = supervisor.status()["m"]
        measured = status.memory["measured"]["cpu"]
        # The held memory and the interpreter's own (PSS of a python + trio process).
        assert HOLD * MIB < measured < (HOLD + 150) * MIB
        assert status.warnings == []
        assert supervisor.placer.need(supervisor.models["m"]) == {"cpu": measured}
    # Kept for the next start, by command.
    rows = StateStore(state_dir).measured_memory()
    assert rows == [(command_key(config, "m", config.models["m"]), "cpu", measured)]


async def test_the_next_daemon_knows_the_measured_figure_before_any_start(state_dir: Path) -> None:
    cmd = echo_cmd("--hold-mib", str(HOLD))
    config = make_config(state_dir, {"m": {"cmd": cmd}})
    async with running_supervisor_with_store(config) as supervisor:
        await supervisor.load("m")
        measured = supervisor.status()["m"].memory["measured"]
    async with running_supervisor_with_store(config) as supervisor:
        status = supervisor.status()["m"]
        assert status.state is State.STOPPED
        assert status.memory["measured"] == measured
        assert status.warnings == []


async def test_a_model_well_over_its_declared_size_is_warned_about_and_counted_measured(
    state_dir: Path,
) -> None:
    config = make_config(
        state_dir,
        {"m": {"cmd": echo_cmd("--hold-mib", str(HOLD)), "memory": "16 MiB"}},
        supervisor={"memory": {"cpu": "1 GiB"}},
    )
    async with running_supervisor(config) as supervisor:
        assert supervisor.placer.need(supervisor.models["m"]) == {"cpu": 16 * MIB}
        await supervisor.load("m")
        status = supervisor.status()["m"]
        measured = status.memory["measured"]["cpu"]
        assert status.memory["estimated"] == {"cpu": 16 * MIB}
        [warning] = status.warnings
        assert warning.startswith(f"measured {measured / MIB:.1f} MiB on cpu, ")
        assert warning.endswith("over the 16.0 MiB declared: the measured figure is used")
        assert supervisor.placer.need(supervisor.models["m"]) == {"cpu": measured}
        assert supervisor.devices()["cpu"]["used"] == measured


async def test_a_declared_size_within_the_margin_stands(state_dir: Path) -> None:
    config = make_config(
        state_dir, {"m": {"cmd": echo_cmd(), "memory": "1 GiB"}}, supervisor={"memory": {}}
    )
    async with running_supervisor(config) as supervisor:
        await supervisor.load("m")
        status = supervisor.status()["m"]
        assert status.memory["measured"]["cpu"] < 1024 * MIB
        assert status.warnings == []
        assert supervisor.placer.need(supervisor.models["m"]) == {"cpu": 1024 * MIB}
        assert supervisor.devices() == {}  # no budgets


async def test_a_model_measured_over_its_budget_answers_503_at_once_at_its_next_start(
    state_dir: Path,
) -> None:
    # Declared 16 MiB, it fits the 60 MiB budget; measured, it holds more than 64 MiB.
    config = make_config(
        state_dir,
        {"m": {"cmd": echo_cmd("--hold-mib", str(HOLD)), "memory": "16 MiB"}},
        supervisor={"memory": {"cpu": "60 MiB"}, "failure_cooldown": 7},
    )
    async with running_supervisor(config) as supervisor:
        await supervisor.load("m")
        await supervisor.unload("m")
        with pytest.raises(ModelUnavailable) as refused:
            await supervisor.load("m")
        assert refused.value.retry_after == 7
        assert refused.value.message.startswith("model 'm' needs ")
        assert "more than its budget of 60.0 MiB: it cannot start" in refused.value.message
        model = supervisor.models["m"]
        assert model.state is not State.FAILED and model.lifecycle.consecutive_failures == 0
