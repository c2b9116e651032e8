"""One model child process: spawn in its own process group, pump its output, stop the whole group.

Stopping always ends with the child reaped (``Process.wait()``), inside a shielded scope, so a
cancelled request or a shutting-down daemon never leaves a zombie or a live process group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import trio

from trioserve.supervision.ports import listening_inodes
from trioserve.supervision.ringbuffer import OutputRing

__all__ = ["ChildProcess", "listens_on"]

log = logging.getLogger(__name__)

# After the group is dead, how long we wait for the end of its output pipe. Only a process that
# escaped the group (setsid) and kept the pipe open makes us wait this long.
_DRAIN_LIMIT = 1.0
# One read from the child's pipe. The pipe itself holds 64 KiB; reading as much keeps a child
# that writes fast from ever waiting for us.
_READ_SIZE = 65536


def _holds_socket(pid: int, inodes: set[int]) -> bool:
    wanted = {f"socket:[{inode}]" for inode in inodes}
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}") in wanted:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def listens_on(pid: int, port: int) -> bool:
    """True when ``pid`` or one of its descendants holds the socket listening on ``port``.

    Blocking (it reads /proc): call it from a worker thread. Answers True when it cannot tell
    (no permission to look), so a model is never refused for our lack of insight.
    """
    import psutil

    try:
        inodes = listening_inodes(port)
        if not inodes:
            return False
        if _holds_socket(pid, inodes):
            return True
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if _holds_socket(child.pid, inodes):
                    return True
            except (FileNotFoundError, ProcessLookupError):
                continue
    except PermissionError:
        return True
    except (FileNotFoundError, ProcessLookupError, psutil.NoSuchProcess):
        return False
    return False


def _exit_status(pid: int) -> int | None:
    """The exit status of an exited, unreaped child, in ``returncode``'s convention (negative:
    the signal that ended it); the child stays a zombie."""
    try:
        result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if result is None:
        return None
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


class ChildProcess:
    """A running child. Create with ``await ChildProcess.spawn(...)`` inside a nursery, and
    always end it with ``stop`` or ``kill``: its output pump is shielded until then, so the
    nursery does not exit before the child is reaped."""

    def __init__(self, process: trio.Process, argv: Sequence[str], output: OutputRing) -> None:
        self.process = process
        self.argv = list(argv)
        self.output = output
        self.pid = process.pid
        # start_new_session makes the child a session and group leader: pgid == pid.
        self.pgid = process.pid
        self.exited = trio.Event()
        self.returncode: int | None = None
        # Set when the output pipe reached its end (every holder of it is gone).
        self.output_closed = trio.Event()
        self._output_changed = trio.Event()
        # The pump is shielded so that it keeps draining the pipe while the child is being
        # stopped, even when the stop is part of a cancellation (unload, shutdown): a child that
        # logs a lot while shutting down must not block on a full pipe and miss its grace, and
        # its last words belong in the ring. ``stop`` ends it once the group is reaped, which
        # bounds it.
        self._pump_scope = trio.CancelScope(shield=True)
        self._killed = False  # kill_now() was called: a stop skips SIGTERM and grace
        # The leader is reaped only by ``stop``, after the last signal to its group: until
        # then it stays a zombie, so its pid (our pgid) cannot be reused by another process,
        # and a group signal can never reach a stranger's group. Its exit is watched on a
        # pidfd of our own, which does not reap (trio's ``Process.wait`` and even its
        # ``returncode`` would).
        self._pidfd = os.pidfd_open(process.pid)
        self._exit_lock = trio.Lock()
        self._reaped = False

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
        try:
            child = cls(process, argv, output)
        except BaseException:
            # No pidfd (EMFILE): the process must not outlive this failed spawn.
            with trio.CancelScope(shield=True):
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
                if process.stdout is not None:
                    await process.stdout.aclose()
            raise
        nursery.start_soon(child._pump_output)
        nursery.start_soon(child._watch_exit)
        return child

    async def _pump_output(self) -> None:
        # Always drained, so a child that writes fast never blocks on a full pipe; the ring
        # bounds what we keep. The pipe may outlive the child if a grandchild inherited it.
        stream = self.process.stdout
        assert stream is not None
        try:
            with self._pump_scope:
                while True:
                    data = await stream.receive_some(_READ_SIZE)
                    if not data:
                        break
                    self.output.feed(data)
                    self._output_changed.set()
                    self._output_changed = trio.Event()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self.output.close()
            self.output_closed.set()
            self._output_changed.set()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def wait_for_output(self, text: str) -> None:
        """Return once a line containing ``text`` was written; raise ``EOFError`` if the
        output ended without one."""
        while not any(text in line for line in self.output.tail()):
            if self.output_closed.is_set():
                raise EOFError(f"pid {self.pid} never wrote {text!r}")
            await self._output_changed.wait()

    async def drain_output(self, limit: float = _DRAIN_LIMIT) -> None:
        """Wait (at most ``limit`` seconds) until everything the child wrote is in the ring.

        The exit of a process (its pidfd) can be seen before the last bytes it wrote have been
        read from the pipe: an error message quoting its last lines must wait for the pipe's
        end, or it would miss the traceback that explains the exit.
        """
        with trio.move_on_after(limit):
            await self.output_closed.wait()

    async def last_words(self) -> None:
        """After the leader exited on its own: kill what is left of its group (it would be
        killed anyway) so the output pipe ends, then wait until its last output is in."""
        self.kill_now()
        await self.drain_output()

    async def _watch_exit(self) -> None:
        # A pidfd: we learn of the exit at once, no polling, and the leader is left unreaped.
        await self._leader_exited()

    async def _leader_exited(self) -> None:
        """Wait until the leader has exited, without reaping it; set ``returncode``."""
        # One waiter on the fd at a time (trio's own Process.wait does the same): the watcher
        # and a stop whose watcher was cancelled with the rest of the daemon.
        async with self._exit_lock:
            if self.exited.is_set():
                return
            with contextlib.suppress(trio.ClosedResourceError):  # stop() reaped it meanwhile
                await trio.lowlevel.wait_readable(self._pidfd)
            if not self.exited.is_set():
                self.returncode = _exit_status(self.pid)
                self.exited.set()

    def signal_group(self, signum: int) -> None:
        if self._reaped:  # the pgid may name a stranger's group now
            return
        try:
            os.killpg(self.pgid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:  # the pgid is no longer ours: the group is gone
            pass

    def kill_now(self) -> None:
        """SIGKILL the group without waiting; a ``stop`` in progress then ends at once."""
        self._killed = True
        self.signal_group(signal.SIGKILL)

    async def stop(self, grace: float) -> int:
        """SIGTERM the group, wait ``grace``, SIGKILL the group; return the exit code.

        Shielded: this is bounded cleanup that must finish even when our caller is cancelled.
        """
        # We wait on the process directly, not on `exited`: the task that sets `exited` may
        # have been cancelled along with everything else when the daemon shuts down.
        with trio.CancelScope(shield=True):
            if not self.exited.is_set() and not self._killed:
                self.signal_group(signal.SIGTERM)
                with trio.move_on_after(grace):
                    await self._leader_exited()
                    # The rest of the group (workers the child started) has the same grace
                    # to finish: they share the output pipe, whose end says they are all gone.
                    await self.output_closed.wait()
            # Whatever is still in the group (the child itself, or grandchildren that outlived
            # it) is killed: the group is the model's, and nothing of it may survive a stop.
            self.signal_group(signal.SIGKILL)
            code = await self.process.wait()  # reaps: no group signal after this line
            if not self._reaped:
                self._reaped = True
                trio.lowlevel.notify_closing(self._pidfd)
                os.close(self._pidfd)
            self.returncode = code
            self.exited.set()
            # With the whole group dead the pipe ends at once, unless something that left the
            # group still holds it; then we stop reading rather than wait for it.
            await self.drain_output()
            self._pump_scope.cancel()
        return code

    async def kill(self) -> int:
        """SIGKILL the group at once and reap."""
        self.kill_now()
        return await self.stop(0)
