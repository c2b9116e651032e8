"""Preload models: started with the supervisor and by a reload that adds them, restarted after
a crash, left stopped once unloaded; the child of a CUDA model sees only its devices."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from tests.support.config import health_server_cmd, make_config, script_cmd
from tests.support.daemon import running_supervisor, supervisor_reaches
from trioserve.config import Config
from trioserve.reload_plan import plan_reload
from trioserve.supervision.lifecycle import State
from trioserve.supervision.run import child_command
from trioserve.supervision.supervisor import Supervisor


def preload_config(state_dir: Path, **models: dict[str, object]) -> Config:
    return make_config(
        state_dir,
        {name: {"cmd": health_server_cmd(), **model} for name, model in models.items()},
        supervisor={"start_timeout": 60, "health_interval": 3600, "failure_cooldown": 0},
    )


async def until(predicate: Callable[[], bool], supervisor: Supervisor) -> None:
    await supervisor_reaches(supervisor, predicate)


def ready(supervisor: Supervisor, name: str) -> Callable[[], bool]:
    return lambda: supervisor.models[name].state is State.READY


async def test_a_preload_model_starts_with_the_supervisor(state_dir: Path) -> None:
    config = preload_config(state_dir, pre={"preload": True}, lazy={})
    async with running_supervisor(config) as supervisor:
        with trio.fail_after(30):
            await until(ready(supervisor, "pre"), supervisor)
        assert supervisor.models["lazy"].state is State.STOPPED
        assert supervisor.status()["pre"].preload is True


async def test_a_preload_model_is_restarted_after_a_crash(state_dir: Path) -> None:
    config = preload_config(state_dir, pre={"preload": True})
    async with running_supervisor(config) as supervisor:
        model = supervisor.models["pre"]
        with trio.fail_after(30):
            await until(ready(supervisor, "pre"), supervisor)
            first = supervisor.status()["pre"].pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            await until(lambda: model.state is State.FAILED, supervisor)
            await until(ready(supervisor, "pre"), supervisor)
        assert supervisor.status()["pre"].pid != first
        assert model.lifecycle.restarts >= 1


async def test_an_unloaded_preload_model_stays_stopped(state_dir: Path) -> None:
    config = preload_config(state_dir, pre={"preload": True})
    async with running_supervisor(config) as supervisor:
        with trio.fail_after(30):
            await until(ready(supervisor, "pre"), supervisor)
            await supervisor.unload("pre")
        await trio.sleep(0.5)
        assert supervisor.models["pre"].state is State.STOPPED


async def test_a_reload_that_adds_a_preload_model_starts_it(state_dir: Path) -> None:
    old = preload_config(state_dir, a={})
    new = preload_config(state_dir, a={}, b={"preload": True})
    async with running_supervisor(old) as supervisor:
        supervisor.apply_config(new, plan_reload(old, new))
        with trio.fail_after(30):
            await until(ready(supervisor, "b"), supervisor)
        assert supervisor.models["a"].state is State.STOPPED


async def test_a_reload_that_changes_nothing_does_not_restart_an_unloaded_preload_model(
    state_dir: Path,
) -> None:
    config = preload_config(state_dir, pre={"preload": True})
    same = preload_config(state_dir, pre={"preload": True, "ttl": 5})
    async with running_supervisor(config) as supervisor:
        with trio.fail_after(30):
            await until(ready(supervisor, "pre"), supervisor)
            await supervisor.unload("pre")
        supervisor.apply_config(same, plan_reload(config, same))
        await trio.sleep(0.5)
        assert supervisor.models["pre"].state is State.STOPPED


def test_a_cuda_model_sees_only_its_devices(state_dir: Path) -> None:
    config = make_config(
        state_dir,
        {
            "gpu": {"cmd": ["x"], "devices": ["cuda:1", "cuda:3"]},
            "own": {"cmd": ["x"], "devices": ["cuda:0"], "env": {"CUDA_VISIBLE_DEVICES": "7"}},
            "cpu": {"cmd": ["x"]},
        },
    )

    class Host:
        instance = "test"

    Host.config = config  # type: ignore[attr-defined]
    envs = {
        name: child_command(Host(), name, model, 20000)[1]  # type: ignore[arg-type]
        for name, model in config.models.items()
    }
    assert envs["gpu"]["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert envs["gpu"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert envs["own"]["CUDA_VISIBLE_DEVICES"] == "7"
    # A CPU model's environment is left as it was (hiding GPUs would break configs that run a
    # GPU build without naming its devices).
    assert envs["cpu"].get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.fixture
def slow_clock() -> MockClock:
    # The clock jumps only after 50 ms of real idleness: a child's start runs in real time.
    return MockClock(autojump_threshold=0.05)


async def test_a_preload_model_that_keeps_failing_is_tried_again_after_each_cooldown(
    state_dir: Path, slow_clock: MockClock
) -> None:
    config = make_config(
        state_dir,
        {"broken": {"cmd": script_cmd("import sys; sys.exit(1)"), "preload": True}},
        supervisor={"max_start_failures": 1, "failure_cooldown": 30, "start_timeout": 60},
    )
    async with running_supervisor(config) as supervisor:
        await trio.sleep(100)  # starts at 0, 30, 60 and 90 s
        spawns = supervisor.models["broken"].spawns
    assert spawns == 4
