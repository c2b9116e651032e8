"""Shutdown: every child stopped in parallel and recorded as stopped, in-process and through
the real ``trioserve start`` console script receiving SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.admin import AdminAuth
from tests.support.config import health_server_cmd, make_config
from tests.support.daemon import running_supervisor_with_store
from tests.support.ports import free_port
from tests.support.processes import children_with_marker
from trioserve.host.store import StateStore
from trioserve.supervision.lifecycle import State

TRIOSERVE = Path(sys.executable).with_name("trioserve")


async def test_cancel_stops_every_child_in_parallel_and_rows_say_stopped(
    state_dir: Path,
) -> None:
    # Real time: what is measured is real processes exiting. Each child takes 1 s to exit
    # after SIGTERM; stopped one after the other, two would take 2 s.
    slow = {"cmd": health_server_cmd("--slow-exit", "1")}
    config = make_config(state_dir, {"a": slow, "b": slow}, supervisor={"stop_grace": 10})
    async with running_supervisor_with_store(config) as supervisor:
        await supervisor.ensure_ready("a")
        await supervisor.ensure_ready("b")
        assert len(children_with_marker(supervisor.instance)) == 2
        start = trio.current_time()
    took = trio.current_time() - start
    assert 1.0 <= took < 1.8, f"shutdown took {took:.2f}s"
    assert children_with_marker(supervisor.instance) == []
    assert {m.state for m in supervisor.models.values()} == {State.STOPPED}
    rows = StateStore(state_dir).children()
    assert [
        (row.model, row.state, row.exit_code) for row in sorted(rows, key=lambda r: r.model)
    ] == [
        ("a", "stopped", 0),
        ("b", "stopped", 0),
    ]
    assert all(row.stopped_at is not None for row in rows)


async def test_shutdown_during_a_start_stops_the_starting_child(state_dir: Path) -> None:
    never_ready = {"cmd": ["{python}", "-c", "import time; time.sleep(60)"]}
    config = make_config(state_dir, {"m": never_ready})
    async with running_supervisor_with_store(config) as supervisor, trio.open_nursery() as nursery:
        spawned = trio.Event()
        supervisor.on_spawn = lambda name: spawned.set()
        nursery.start_soon(supervisor.ensure_ready, "m")
        model = supervisor.models["m"]
        with trio.fail_after(10):
            await spawned.wait()
        nursery.cancel_scope.cancel()
    assert model.state is State.STOPPED
    assert children_with_marker(supervisor.instance) == []
    assert [row.state for row in StateStore(state_dir).children()] == ["stopped"]


def write_config(path: Path, state_dir: Path, port: int) -> None:
    # The models' ports come from make_config's private ranges, below the ephemeral ports that
    # other programs' connections take at random.
    first, last = make_config(state_dir).supervisor.port_range
    echo = '["{python}", "-m", "trioserve.backends.echo", "--port", "{port}"]'
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
state_dir = "{state_dir}"

[supervisor]
stop_grace = 5
port_range = [{first}, {last}]

[models.a]
cmd = {echo}

[models.b]
cmd = {echo}
"""
    )


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
async def test_sigterm_to_the_daemon_stops_children_and_exits_0(
    state_dir: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    port = free_port()
    config = tmp_path / "trioserve.toml"
    write_config(config, state_dir, port)
    log = (tmp_path / "daemon.log").open("w")
    daemon = await trio.lowlevel.open_process(
        [str(TRIOSERVE), "start", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, auth=AdminAuth(state_dir)
        ) as client:
            with trio.fail_after(20):
                while True:  # polling is the honest tool for "has it started listening"
                    assert daemon.returncode is None, (tmp_path / "daemon.log").read_text()
                    try:
                        if (await client.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await trio.sleep(0.05)
                for name in ("a", "b"):
                    response = await client.post(f"/admin/models/{name}/load", timeout=20)
                    assert response.status_code == 200, response.text
                status = (await client.get("/admin/status")).json()
        instance = status["instance"]
        assert {m["state"] for m in status["models"].values()} == {"ready"}
        assert len(children_with_marker(instance)) == 2

        daemon.send_signal(signum)
        with trio.fail_after(20):
            code = await daemon.wait()
    finally:
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
        log.close()
    assert code == 0, (tmp_path / "daemon.log").read_text()
    assert children_with_marker(instance) == []
    store = StateStore(state_dir)
    rows = store.children()
    assert sorted(row.model for row in rows) == ["a", "b"]
    assert {row.state for row in rows} == {"stopped"}
    assert all(row.instance == instance and row.stopped_at is not None for row in rows)
    (daemon_row,) = store.daemons()
    assert daemon_row.instance == instance and daemon_row.stopped_at is not None
