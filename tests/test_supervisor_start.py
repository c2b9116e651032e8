"""Starting models: one spawn for any number of callers, starts in the supervisor's nursery,
readiness by health check while watching the process, ports."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import pytest
import trio

from tests.support.config import SpawnCounter, echo_cmd, make_config
from tests.support.daemon import running_supervisor
from tests.support.ports import bindable, port_range
from tests.support.processes import children_with_marker
from trioserve.errors import UpstreamError
from trioserve.supervision.lifecycle import State
from trioserve.supervision.model import Endpoint
from trioserve.supervision.supervisor import Supervisor


async def wait_for_state(supervisor: Supervisor, name: str, state: State) -> None:
    """Return once ``name`` enters ``state`` (or is in it already)."""
    async with supervisor.events.subscribe() as events:
        if supervisor.models[name].state is state:
            return
        async for event in events:
            if event.model == name and event.to_state is state:
                return


async def test_hundred_concurrent_callers_share_one_spawn(
    state_dir: Path, spawns: SpawnCounter
) -> None:
    config = make_config(state_dir, {"m": {"cmd": spawns.cmd("m")}})
    endpoints: list[Endpoint] = []

    async def caller(supervisor: Supervisor) -> None:
        endpoints.append(await supervisor.ensure_ready("m"))

    async with running_supervisor(config) as supervisor:
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(caller, supervisor)
        assert supervisor.models["m"].state is State.READY
    assert len(endpoints) == 100 and len(set(endpoints)) == 1
    assert spawns.count("m") == 1


async def test_two_models_start_in_parallel(state_dir: Path) -> None:
    slow = {"cmd": echo_cmd("--startup-delay", "1")}
    config = make_config(state_dir, {"a": slow, "b": slow})
    ready_at: dict[str, float] = {}
    async with running_supervisor(config) as supervisor:
        async with supervisor.events.subscribe() as events:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(supervisor.ensure_ready, "a")
                nursery.start_soon(supervisor.ensure_ready, "b")
            took = trio.current_time() - start
            while len(ready_at) < 2:
                event = await events.receive()
                if event.to_state is State.READY:
                    ready_at[event.model] = event.at
        spawned_at = {name: supervisor.models[name].started_at or 0.0 for name in ("a", "b")}
    # Each process was spawned before the other one was ready: the starts overlapped.
    assert spawned_at["a"] < ready_at["b"] and spawned_at["b"] < ready_at["a"]
    # One after the other would take at least both starts' own times (spawn to ready: 1 s of
    # startup delay and a Python start-up each), however busy the machine is.
    own = sum(ready_at[name] - spawned_at[name] for name in ("a", "b"))
    assert took < own, f"two starts of {own:.2f}s in all took {took:.2f}s together"


async def test_cancelled_caller_does_not_stop_the_start(
    state_dir: Path, spawns: SpawnCounter
) -> None:
    config = make_config(state_dir, {"m": {"cmd": spawns.cmd("m", "--startup-delay", "0.5")}})
    got: list[Endpoint] = []
    impatient = trio.CancelScope()

    async def impatient_caller(supervisor: Supervisor) -> None:
        with impatient:
            await supervisor.ensure_ready("m")

    async def caller(supervisor: Supervisor) -> None:
        got.append(await supervisor.ensure_ready("m"))

    async with running_supervisor(config) as supervisor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(impatient_caller, supervisor)
            # The impatient caller is the one that asked for the start.
            await wait_for_state(supervisor, "m", State.STARTING)
            nursery.start_soon(caller, supervisor)
            nursery.start_soon(caller, supervisor)
            await trio.testing.wait_all_tasks_blocked()
            impatient.cancel()
        assert impatient.cancelled_caught
        assert len(got) == 2
        assert supervisor.models["m"].state is State.READY
    assert spawns.count("m") == 1


async def test_start_goes_on_when_its_only_caller_gives_up(
    state_dir: Path, spawns: SpawnCounter
) -> None:
    config = make_config(state_dir, {"m": {"cmd": spawns.cmd("m", "--startup-delay", "0.3")}})
    async with running_supervisor(config) as supervisor:
        with trio.move_on_after(0.1) as gave_up:
            await supervisor.ensure_ready("m")
        assert gave_up.cancelled_caught
        with trio.fail_after(10):
            await wait_for_state(supervisor, "m", State.READY)
    assert spawns.count("m") == 1


async def test_different_models_do_not_share_a_lock(state_dir: Path) -> None:
    # A model that takes long to start does not hold up another one.
    config = make_config(
        state_dir,
        {"slow": {"cmd": echo_cmd("--startup-delay", "30")}, "fast": {"cmd": echo_cmd()}},
    )

    async def start_slow(supervisor: Supervisor) -> None:
        with pytest.raises(UpstreamError, match="stopped while starting"):
            await supervisor.ensure_ready("slow")

    async with running_supervisor(config) as supervisor, trio.open_nursery() as nursery:
        nursery.start_soon(start_slow, supervisor)
        await wait_for_state(supervisor, "slow", State.STARTING)
        with trio.fail_after(10):
            await supervisor.ensure_ready("fast")
        assert supervisor.models["slow"].state is State.STARTING
        await supervisor.unload("slow", force=True)


# -- readiness ---------------------------------------------------------------------------------

NEVER_LISTENS = """
import time
for i in range(1, 31):
    print(f"line-{i:02d}")
print("pid", __import__("os").getpid(), flush=True)
time.sleep(60)
"""


async def test_never_healthy_child_fails_after_start_timeout_with_its_output(
    state_dir: Path,
) -> None:
    # Real time: with autojump the clock would run through start_timeout before the child
    # has printed anything, and the output tail (real I/O) is part of what is tested.
    cmd = ["{python}", "-c", NEVER_LISTENS.replace("{", "{{").replace("}", "}}")]
    config = make_config(state_dir, {"m": {"cmd": cmd}}, supervisor={"start_timeout": 1})
    async with running_supervisor(config) as supervisor:
        model = supervisor.models["m"]
        start = trio.current_time()
        with pytest.raises(UpstreamError) as failed:
            await supervisor.ensure_ready("m")
        took = trio.current_time() - start
        assert 1.0 <= took < 4.0
        assert model.state is State.FAILED
        message = str(failed.value)
        assert "start_timeout (1s)" in message
        # The last 20 lines of its output: line-12 .. line-30 and the pid line.
        assert "line-11" not in message
        assert all(f"line-{i:02d}" in message for i in range(12, 31))
        assert model.lifecycle.last_error is not None and "line-30" in model.lifecycle.last_error
        assert model.run is not None
        with trio.fail_after(5):
            await model.run.stopped.wait()
        assert children_with_marker(supervisor.instance) == []
        assert model.process is None


EXITS_AT_ONCE = (
    "import sys; print('loading weights', flush=True); "
    "print('error: no such file: model.gguf', file=sys.stderr); sys.exit(3)"
)


async def test_child_exiting_at_once_fails_fast_with_its_last_words(state_dir: Path) -> None:
    config = make_config(
        state_dir,
        {"m": {"cmd": ["{python}", "-c", EXITS_AT_ONCE]}},
        supervisor={"start_timeout": 30},
    )
    async with running_supervisor(config) as supervisor:
        start = trio.current_time()
        with pytest.raises(UpstreamError) as failed:
            await supervisor.ensure_ready("m")
        assert trio.current_time() - start < 3, "the exit was seen at once, not at the timeout"
    message = str(failed.value)
    assert failed.value.status == 502
    assert "exited with code 3" in message
    # Its stderr arrives after the exit is already known: it must still be in the error.
    assert "loading weights" in message
    assert "error: no such file: model.gguf" in message


async def test_missing_program_fails_with_the_reason(state_dir: Path) -> None:
    config = make_config(state_dir, {"m": {"cmd": ["/nonexistent/llama-server", "{port}"]}})
    async with running_supervisor(config) as supervisor:
        with pytest.raises(UpstreamError, match="could not start '/nonexistent/llama-server'"):
            await supervisor.ensure_ready("m")
        assert supervisor.models["m"].state is State.FAILED


# -- ports -------------------------------------------------------------------------------------


async def test_port_bound_by_another_program_is_skipped(state_dir: Path) -> None:
    config = make_config(state_dir, {"m": {"cmd": echo_cmd()}})
    first, last = config.supervisor.port_range
    with socket.socket() as squatter:
        # As servers bind: connections of earlier tests that left the port in TIME_WAIT do
        # not stop it; the listening socket then keeps anyone else from binding the port.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first))
        squatter.listen()
        async with running_supervisor(config) as supervisor:
            endpoint = await supervisor.ensure_ready("m")
    assert endpoint.port != first
    assert first < endpoint.port <= last


async def _impostor(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


async def test_port_taken_by_another_program_after_allocation_is_not_our_model(
    state_dir: Path,
) -> None:
    cmd = ["{python}", "-c", "import time; time.sleep(60)", "{port}"]  # never binds its port
    config = make_config(state_dir, {"m": {"cmd": cmd}}, supervisor={"start_timeout": 1})
    async with running_supervisor(config) as supervisor, trio.open_nursery() as nursery:
        failed: list[UpstreamError] = []
        answered, spawned = trio.Event(), trio.Event()
        supervisor.on_spawn = lambda name: spawned.set()

        async def caller() -> None:
            with pytest.raises(UpstreamError) as error:
                await supervisor.ensure_ready("m")
            failed.append(error.value)
            answered.set()

        nursery.start_soon(caller)
        with trio.fail_after(10):
            await spawned.wait()
        # Another program binds the model's port before the model does, and answers 200 to
        # anything.
        run = supervisor.models["m"].run
        assert run is not None and run.port is not None
        port = run.port
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _impostor, port, host="127.0.0.1")
        )
        with trio.fail_after(10):
            await answered.wait()
        nursery.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
    assert "start_timeout" in failed[0].message
    assert f"port {port} answers, but another program holds it" in failed[0].message


async def test_no_free_port_fails_the_start_with_the_reason(state_dir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = make_config(
            state_dir, {"m": {"cmd": echo_cmd()}}, supervisor={"port_range": [port, port]}
        )
        async with running_supervisor(config) as supervisor:
            with pytest.raises(UpstreamError, match="no free port in port_range"):
                await supervisor.ensure_ready("m")
            assert supervisor.models["m"].state is State.FAILED
            assert supervisor.ports.held() == frozenset()


async def test_unload_frees_the_port_at_once(state_dir: Path) -> None:
    # The port must be bindable again right away (no SO_REUSEADDR, as many servers do), even
    # after health checks: a probe connection still open when the child dies would leave the
    # port in TIME_WAIT for a minute. The readiness probes that made it ready are such checks.
    # The port is one that no earlier connection left in TIME_WAIT (other tests' crashed
    # children do): only what this test does can make it unbindable.
    first, last = port_range()
    port = next(p for p in range(first, last + 1) if bindable(p))
    config = make_config(
        state_dir, {"m": {"cmd": echo_cmd()}}, supervisor={"port_range": [port, port]}
    )
    async with running_supervisor(config) as supervisor:
        endpoint = await supervisor.ensure_ready("m")
        await supervisor.unload("m")
        assert endpoint.port == port
        assert bindable(port)


IGNORES_SIGTERM_NEVER_LISTENS = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
)


async def test_start_timeout_is_reported_before_the_stop_grace_is_waited_out(
    state_dir: Path,
) -> None:
    config = make_config(
        state_dir,
        {"m": {"cmd": ["{python}", "-c", IGNORES_SIGTERM_NEVER_LISTENS]}},
        supervisor={"start_timeout": 0.5, "stop_grace": 30},
    )
    async with running_supervisor(config) as supervisor:
        start = trio.current_time()
        with pytest.raises(UpstreamError, match="start_timeout"):
            await supervisor.ensure_ready("m")
        assert trio.current_time() - start < 3, "the caller did not wait for the 30 s grace"
        assert supervisor.models["m"].state is State.FAILED
        # Its process is still getting its grace; a forced unload ends that now.
        assert children_with_marker(supervisor.instance)
        start = trio.current_time()
        await supervisor.unload("m", force=True)
        assert trio.current_time() - start < 1
        assert children_with_marker(supervisor.instance) == []
        assert supervisor.models["m"].state is State.STOPPED
