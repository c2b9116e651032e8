"""The model process runner: argv and environment, process group, output pump, stop.

Real children throughout (``python -c`` scripts), driven through ``ChildProcess`` directly or
through the supervisor where the config is what is under test.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest
import trio

from tests.support.config import health_server_cmd, make_config
from tests.support.daemon import running_supervisor
from trioserve.host.child_env import child_env
from trioserve.supervision.process import ChildProcess
from trioserve.supervision.ringbuffer import OutputRing

IGNORES_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('armed', flush=True)\n"
    "time.sleep(60)\n"
)


@asynccontextmanager
async def child_running(code: str, *args: str) -> AsyncIterator[ChildProcess]:
    """``python -c code args`` as a ChildProcess; stopped (SIGKILL at once) on exit."""
    async with trio.open_nursery() as nursery:
        child = await ChildProcess.spawn(
            nursery, [sys.executable, "-c", code, *args], child_env({}), OutputRing()
        )
        try:
            yield child
        finally:
            await child.kill()


def live_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


# -- argv, environment, group ------------------------------------------------------------------


async def test_argv_env_and_group_of_a_model_child(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What systemd gives the daemon must not reach the children.
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_SOMETHING_NEW", "1")
    record = tmp_path / "child.json"
    pwned = tmp_path / "pwned"
    cmd = health_server_cmd(
        "--record", str(record), "{model}", "{state_dir}", f"$HOME; touch {pwned} `id` *"
    )
    env = {"MODEL_PORT": "{port}", "PLAIN": "x y", "NOTIFY_SOCKET": "/elsewhere"}
    config = make_config(state_dir, {"m": {"cmd": cmd, "env": env}}, supervisor={"stop_grace": 5})
    async with running_supervisor(config) as supervisor:
        endpoint = await supervisor.ensure_ready("m")
        seen = json.loads(record.read_text())
        pid = supervisor.status()["m"].pid
    # argv: placeholders filled, everything else literal: no shell ever saw it.
    assert seen["argv"][1:] == [
        str(endpoint.port),
        "--record",
        str(record),
        "m",
        str(config.state_dir),
        f"$HOME; touch {pwned} `id` *",
    ]
    assert not pwned.exists()
    # Its own session and process group, not ours.
    assert seen["pid"] == pid == seen["pgid"] == seen["sid"]
    assert seen["pgid"] != os.getpgid(0)
    env_seen = seen["env"]
    assert env_seen["TRIOSERVE_INSTANCE"] == supervisor.instance
    assert env_seen["TRIOSERVE_MODEL"] == "m"
    assert env_seen["MODEL_PORT"] == str(endpoint.port)
    assert env_seen["PLAIN"] == "x y"
    assert "NOTIFY_SOCKET" not in env_seen
    assert not [name for name in env_seen if name.startswith("WATCHDOG_")]


# -- stop --------------------------------------------------------------------------------------


async def test_child_ignoring_sigterm_is_killed_after_grace(autojump_clock: trio.abc.Clock) -> None:
    # autojump works here: while the child ignores SIGTERM nothing but the grace deadline is
    # pending, so the clock jumps exactly the grace, and the SIGKILL is real.
    async with child_running(IGNORES_SIGTERM) as child:
        await child.wait_for_output("armed")
        start = trio.current_time()
        code = await child.stop(30)
        waited = trio.current_time() - start
        assert code == -signal.SIGKILL
        assert 30 <= waited < 31
        assert not live_members(child.pgid)


async def test_stop_finishes_even_when_its_caller_is_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with child_running(IGNORES_SIGTERM) as child:
        await child.wait_for_output("armed")
        start = trio.current_time()
        with trio.move_on_after(1):
            await child.stop(30)
        # Shielded: the caller's deadline did not cut the stop short, the child is reaped.
        assert trio.current_time() - start >= 30
        assert child.process.returncode == -signal.SIGKILL


async def test_polite_child_gets_sigterm_and_no_grace_is_wasted() -> None:
    # Real time: the child's exit on SIGTERM is real I/O; with autojump the clock would jump
    # through the grace while it exits, and SIGKILL it.
    async with child_running("import time; print('up', flush=True); time.sleep(60)") as child:
        await child.wait_for_output("up")
        start = trio.current_time()
        code = await child.stop(30)
        assert code == -signal.SIGTERM
        assert trio.current_time() - start < 5


GRANDPARENT = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print("grandchild pid", grandchild.pid, flush=True)
time.sleep(60)
"""
GRANDCHILD_IGNORING_SIGTERM = IGNORES_SIGTERM.replace("armed", "grandchild armed")


async def test_grandchild_leaves_nothing_in_the_group_after_stop() -> None:
    # Real time, small grace: the leader exits on SIGTERM at once, the grandchild ignores it;
    # only the SIGKILL to the group, after the grace, ends it.
    async with child_running(GRANDPARENT, GRANDCHILD_IGNORING_SIGTERM) as child:
        await child.wait_for_output("grandchild armed")
        (line,) = [line for line in child.output.tail() if line.startswith("grandchild pid ")]
        grandchild = int(line.split()[2])
        assert os.getpgid(grandchild) == child.pgid
        await child.stop(0.3)
        # The grandchild is not our child: it is reaped by init, a moment after the SIGKILL.
        # Nothing tells us when, so this one wait polls (psutil), with a bound.
        _, alive = psutil.wait_procs(live_members(child.pgid), timeout=2)
        assert not alive


GRANDCHILD_LEAVING_ON_SIGTERM = """
import signal, sys, time
def leave(signum, frame):
    open(sys.argv[1], "w").write("SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, leave)
print("grandchild armed", flush=True)
time.sleep(60)
"""


async def test_sigterm_goes_to_the_whole_group(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild-got"
    grandchild_code = f"import sys; sys.argv.append({str(marker)!r})\n" + (
        GRANDCHILD_LEAVING_ON_SIGTERM
    )
    async with child_running(GRANDPARENT, grandchild_code) as child:
        await child.wait_for_output("grandchild armed")
        start = trio.current_time()
        await child.stop(30)
        assert trio.current_time() - start < 5, "nobody waited for the grace"
        assert marker.read_text() == "SIGTERM"


# -- output ------------------------------------------------------------------------------------

WRITE_50MB = """
import sys
block = b"x" * (1 << 20)
for _ in range(50):
    sys.stdout.buffer.write(block)
sys.stdout.buffer.flush()
print("written", file=sys.stderr, flush=True)
"""


async def test_fifty_megabytes_without_newline_neither_blocks_nor_grows_memory() -> None:
    me = psutil.Process()
    rss_before = me.memory_info().rss
    async with child_running(WRITE_50MB) as child:
        # Were the pipe not drained, the child would block after 64 KiB and never exit.
        with trio.fail_after(30):
            await child.exited.wait()
        assert child.returncode == 0
        await child.drain_output()
        ring = child.output
        assert ring.size <= ring.max_bytes + ring.max_line_bytes
        assert ring.tail()[-1] == "written"
        assert ring.total_lines >= 50 * (1 << 20) // ring.max_line_bytes
    growth = me.memory_info().rss - rss_before
    assert growth < 20 << 20, f"RSS grew by {growth >> 20} MiB for 50 MiB of output"


LOUD_EXIT = """
import signal, sys
def leave(signum, frame):
    for i in range(20000):  # ~1 MB: far more than a pipe holds
        print("shutting down, step", i)
    print("bye", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, leave)
print("armed", flush=True)
signal.pause()
"""


async def test_output_is_still_drained_while_a_cancelled_child_stops() -> None:
    # On shutdown or unload the task owning the child is cancelled: the pump must go on
    # reading, or a child that logs while it shuts down blocks on the pipe and is SIGKILLed.
    ring = OutputRing()
    async with trio.open_nursery() as nursery:
        child = await ChildProcess.spawn(
            nursery, [sys.executable, "-c", LOUD_EXIT], child_env({}), ring
        )
        await child.wait_for_output("armed")
        nursery.cancel_scope.cancel()
        code = await child.stop(10)
    assert code == 0
    assert ring.tail(1) == ["bye"]


async def test_wait_for_output_raises_when_the_output_ends_without_it() -> None:
    async with child_running("print('something else')") as child:
        with pytest.raises(EOFError):
            await child.wait_for_output("never printed")
