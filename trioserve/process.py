"""One model child process: spawn in its own process group, pump its output, stop the whole group.

Stopping always ends with the child reaped (``Process.wait()``), inside a shielded scope, so a
cancelled request or a shutting-down daemon never leaves a zombie or a live process group.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import trio

from .ringbuffer import OutputRing

__all__ = ["ChildProcess", "process_start_time", "read_boot_id"]

log = logging.getLogger(__name__)

# Children must not talk to systemd as if they were us.
_SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def process_start_time(pid: int) -> float | None:
    """The process's start time (seconds since the epoch) as psutil computes it, or None."""
    import psutil

    try:
        return round(float(psutil.Process(pid).create_time()), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(extra)
    return env


class ChildProcess:
    """A running child. Create with ``await ChildProcess.spawn(...)`` inside a nursery."""

    def __init__(self, process: trio.Process, argv: Sequence[str], output: OutputRing) -> None:
        self.process = process
        self.argv = list(argv)
        self.output = output
        self.pid = process.pid
        # start_new_session makes the child a session and group leader: pgid == pid.
        self.pgid = process.pid
        self.exited = trio.Event()
        self.returncode: int | None = None

    @classmethod
    async def spawn(
        cls,
        nursery: trio.Nursery,
        argv: Sequence[str],
        env: Mapping[str, str],
        output: OutputRing,
    ) -> ChildProcess:
        """Start ``argv`` (never through a shell) and start pumping its output in ``nursery``."""
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
        child = cls(process, argv, output)
        nursery.start_soon(child._pump_output)
        nursery.start_soon(child._watch_exit)
        return child

    async def _pump_output(self) -> None:
        # Always drained, so a child that writes fast never blocks on a full pipe; the ring
        # bounds what we keep. The pipe may outlive the child if a grandchild inherited it.
        stream = self.process.stdout
        assert stream is not None
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                self.output.feed(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self.output.close()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _watch_exit(self) -> None:
        # Process.wait() waits on a pidfd on Linux: we learn of the exit at once, no polling.
        self.returncode = await self.process.wait()
        self.exited.set()

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pgid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:  # the pgid is no longer ours: the group is gone
            pass

    async def stop(self, grace: float) -> int:
        """SIGTERM the group, wait ``grace``, SIGKILL the group; return the exit code.

        Shielded: this is bounded cleanup that must finish even when our caller is cancelled.
        """
        # We wait on the process directly, not on `exited`: the task that sets `exited` may
        # have been cancelled along with everything else when the daemon shuts down.
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.signal_group(signal.SIGTERM)
                with trio.move_on_after(grace):
                    await self.process.wait()
            # Whatever is still in the group (the child itself, or grandchildren that outlived
            # it) is killed: the group is the model's, and nothing of it may survive a stop.
            self.signal_group(signal.SIGKILL)
            code = await self.process.wait()
            self.returncode = code
            self.exited.set()
        return code

    async def kill(self) -> int:
        """SIGKILL the group at once and reap."""
        return await self.stop(0)
