"""What a reload must reach beyond the config object: the running server's read deadline,
systemd's status line after a refused reload, and a removed model's retirement, which waits on
its requests' departures rather than looking at its queue every second."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from tests.support.config import make_config, write_config
from tests.support.daemon import running_daemon, running_supervisor
from tests.support.notify import NotifyPeer
from tests.support.ports import free_port
from trioserve.config import load_config
from trioserve.reload_plan import plan_reload
from trioserve.server.hypercorn_serve import READ_TIMEOUT_MARGIN
from trioserve.sharing.identity import User


async def test_a_reload_retunes_the_running_servers_read_timeout(
    tmp_path: Path, state_dir: Path
) -> None:
    path, port = tmp_path / "c.toml", free_port()
    write_config(path, state_dir, port, server={"request_timeout": 10})
    async with running_daemon(load_config(path), admin=True) as (info, client):
        assert info.hypercorn.read_timeout == 10 + READ_TIMEOUT_MARGIN
        write_config(path, state_dir, port, server={"request_timeout": 100})
        assert (await client.post("/admin/reload")).status_code == 200
        # The object Hypercorn reads at every read of every connection.
        assert info.hypercorn.read_timeout == 100 + READ_TIMEOUT_MARGIN


async def next_status(peer: NotifyPeer, containing: str) -> str:
    """The first STATUS= value from now on that contains ``containing``."""
    with trio.fail_after(20):
        while True:
            await trio.lowlevel.wait_readable(peer.sock)
            for datagram in peer.drain():
                for line in datagram.decode().split("\n"):
                    if line.startswith("STATUS=") and containing in line:
                        return line.removeprefix("STATUS=")


async def test_a_failed_reload_stays_in_the_status_line_until_one_succeeds(
    tmp_path: Path, state_dir: Path, notify_peer: NotifyPeer
) -> None:
    path, port = tmp_path / "c.toml", free_port()
    write_config(path, state_dir, port)
    async with running_daemon(load_config(path), admin=True) as (_info, client):
        await next_status(notify_peer, "models ready")
        path.write_text(path.read_text() + "\n[server]\nport = 'not a number'\n")
        assert (await client.post("/admin/reload")).status_code == 400
        await next_status(notify_peer, "last reload failed")
        # A lifecycle event afterwards: the line tells both the models and the failure.
        assert (await client.post("/admin/models/echo/load")).status_code == 200
        status = await next_status(notify_peer, "1 of 1 models ready")
        assert "last reload failed" in status, status
        # A reload that works clears it from the lines that follow.
        write_config(path, state_dir, port)
        assert (await client.post("/admin/reload")).status_code == 200
        assert (await client.post("/admin/models/echo/unload")).status_code == 200
        status = await next_status(notify_peer, "0 of 1 models ready")
        assert "failed" not in status, status


async def test_a_removed_model_retires_as_its_last_queued_request_gives_up(
    state_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    old = make_config(state_dir, {"m": {"cmd": ["true"], "max_concurrency": 1}})
    new = make_config(state_dir, {"n": {"cmd": ["true"]}})
    async with running_supervisor(old) as supervisor:
        model = supervisor.models["m"]
        holder_done, waiter_scope = trio.Event(), trio.CancelScope()
        async with trio.open_nursery() as nursery:

            async def hold() -> None:
                async with model.admission.slot(User(key="a")):
                    await holder_done.wait()

            async def wait_in_queue() -> None:
                with waiter_scope:
                    async with model.admission.slot(User(key="b")):
                        raise AssertionError("never granted: the holder leaves after it")

            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait_in_queue)
            await trio.testing.wait_all_tasks_blocked()
            assert (model.admission.admitted, model.admission.queued) == (1, 1)
            supervisor.apply_config(new, plan_reload(old, new))
            assert model in supervisor._retiring
            await trio.testing.wait_all_tasks_blocked()  # the retirement waits now
            start = trio.current_time()
            waiter_scope.cancel()  # the queued request gives up: no lease ends with it
            holder_done.set()
        # Virtual time: the clock moves only while every task waits, a millisecond a look.
        while model in supervisor._retiring:
            await trio.sleep(0.001)
        # Retired as the last request left, not at a later look at the queue (a poll a
        # second would have let the clock run to its next look).
        assert trio.current_time() - start < 0.01
