"""The daemon's side of the guard (``trioserve.host.guard``): start it, tell it of every model
child, restart it when it dies.

The daemon tells the guard of each child with one short line into a pipe (``track`` at spawn,
``untrack`` once the child's group is stopped and the child reaped): no await, no thread, no
syscall but one ``write``, nothing on the request path.

A full pipe never blocks the event loop: the pipe is non-blocking and holds 1 MiB (about 10,000
lines); a guard that left that much unread has not run for a long time (stopped, or starved),
so the write is dropped and that guard is replaced. Every line is shorter than ``PIPE_BUF``, so
each write is atomic: the guard never sees half a line. The set of tracked children lives here,
not in the pipe, and a new guard gets all of it before anything else: a guard that died or was
replaced leaves no gap in its successor's knowledge.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

import trio

from trioserve.errors import TrioserveError
from trioserve.host.child_env import child_env

__all__ = ["Guard", "GuardError"]

log = logging.getLogger(__name__)

# Room for ~10,000 lines (unprivileged processes may go up to /proc/sys/fs/pipe-max-size,
# 1 MiB by default); the kernel's default of 64 KiB would still be ~600.
_PIPE_SIZE = 1 << 20
# Writes up to PIPE_BUF bytes into a pipe are atomic; a model name is cut to keep lines short.
_LINE_LIMIT = select.PIPE_BUF
_MODEL_NAME_LIMIT = 200
# From spawn to its "ready" line, a guard is a Python start-up (a blink; seconds on a loaded box).
_READY_TIMEOUT = 10.0
# A guard that lived this long had not been failing: its death is restarted from at once.
_STABLE_AFTER = 10.0
# A guard that keeps dying at once (a broken install) is retried ever more slowly, not in a spin.
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
# After close(), beyond the grace: the guard's own wait for SIGKILLed groups, and some slack.
_CLOSE_SLACK = 10.0


class GuardError(TrioserveError):
    """The guard process could not be started."""


def _line(**fields: object) -> bytes:
    line = (json.dumps(fields, separators=(",", ":")) + "\n").encode()
    if len(line) > _LINE_LIMIT:  # cannot happen with our fields; a torn line would be worse
        raise ValueError(f"guard line too long: {line[:100]!r}")
    return line


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Guard:
    """Keeps one guard process watching over the daemon's model children.

    Start with ``await nursery.start(guard.run)``: it returns once a guard is up, and raises
    ``GuardError`` if none can be started. ``track``/``untrack`` may be called before that (the
    guard learns everything when it starts). ``close()`` is the clean end: with nothing tracked
    the guard exits and kills nothing; children still tracked are stopped by it, as after the
    daemon's death. Cancelling ``run()`` without ``close()`` leaves the guard on watch: the
    daemon's exit then counts as its death.
    """

    def __init__(
        self,
        *,
        instance: str,
        grace: float,
        on_start: Callable[[int], None] | None = None,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.instance = instance
        self._grace = grace
        # Called with the pid of each guard that is up (the first one and every replacement).
        self._on_start = on_start
        self._argv = list(argv) if argv else [sys.executable, "-m", "trioserve.host.guard"]
        self._tracked: dict[int, bytes] = {}  # pid -> its track line, re-sent to a new guard
        self._process: trio.Process | None = None
        self._fd: int | None = None  # the current guard's stdin, while it takes lines
        self._closing = False
        self._closed = trio.Event()
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The current guard process, if one is running."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def tracked(self) -> list[int]:
        """The pids of the children the guard watches over."""
        return list(self._tracked)

    def track(self, pid: int, pgid: int, start_time: float, model: str) -> None:
        """A model child was spawned. ``start_time`` as ``process_start_time`` gives it."""
        line = _line(
            op="track", pid=pid, pgid=pgid, start_time=start_time, model=model[:_MODEL_NAME_LIMIT]
        )
        self._tracked[pid] = line
        self._send(line)

    def untrack(self, pid: int) -> None:
        """The child's group was stopped and the child reaped: nothing of it is left to guard."""
        if self._tracked.pop(pid, None) is not None:
            self._send(_line(op="untrack", pid=pid))

    def set_grace(self, grace: float) -> None:
        """A new ``stop_grace`` (a config reload)."""
        self._grace = grace
        self._send(_line(op="grace", grace=grace))

    def close(self) -> None:
        """Clean shutdown, once every child was stopped and untracked: the guard exits and
        kills nothing; ``run()`` returns once it has. Children still tracked are stopped by the
        guard, as after the daemon's death: a close never leaves one unguarded."""
        if self._closing:
            return
        self._closing = True
        if self._tracked:
            log.warning(
                "closing the guard with %d children still tracked (pids %s): it stops them",
                len(self._tracked),
                ", ".join(map(str, self._tracked)),
            )
        self._say_goodbye()
        self._closed.set()

    def _say_goodbye(self) -> None:
        if self._tracked:
            # No bye: the end of the pipe makes the guard stop what is tracked, as after a death.
            self._fd = None
            process = self._process
            if process is not None and isinstance(process.stdin, trio.lowlevel.FdStream):
                process.stdin.close()
        else:
            self._send(_line(op="bye"))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a guard running until ``close()``; start a new one whenever one dies."""
        failures = 0
        first = True
        while not self._closing:
            began = trio.current_time()
            try:
                process = await self._start()
            except GuardError as exc:
                if first:
                    raise
                log.error("%s", exc)
            else:
                if first:
                    first = False
                    task_status.started()
                code = await process.wait()
                _release(process)
                if self._closing:
                    break
                log.error(
                    "guard pid %d died (%s): starting a new one for %d children",
                    process.pid,
                    _describe(code),
                    len(self._tracked),
                )
            failures = 0 if trio.current_time() - began >= _STABLE_AFTER else failures + 1
            if failures > 1:
                delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (failures - 2))
                with trio.move_on_after(delay):
                    await self._closed.wait()
        if first:
            task_status.started()  # closed before any guard was up
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """After ``close()``: until the guard has exited, and reap it. Shielded and bounded, so
        a daemon being cancelled (its ``run()`` task included) still leaves no guard behind."""
        with trio.CancelScope(shield=True):
            await self._reap_closed()

    async def _reap_closed(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        with trio.move_on_after(self._grace + _CLOSE_SLACK):
            await process.wait()
        if process.returncode is None:
            log.error("guard pid %d did not exit after close: killing it", process.pid)
            process.kill()
            await process.wait()
        _release(process)

    async def _start(self) -> trio.Process:
        try:
            process = await trio.lowlevel.open_process(
                self._argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=child_env({}),
                # Its own session: Ctrl-C in the daemon's terminal, a hang-up of it, or a
                # signal to the daemon's process group do not reach the guard.
                start_new_session=True,
            )
        except OSError as exc:
            raise GuardError(f"cannot start the guard ({self._argv[0]}): {exc}") from exc
        assert isinstance(process.stdin, trio.lowlevel.FdStream)
        assert process.stdout is not None
        self._process = process
        # The write end is ours alone: trio's pipes are close-on-exec and Popen closes every
        # other fd in its children, so no model child (and not the guard) holds it, and its
        # end is the daemon's death.
        self._fd = process.stdin.fileno()
        with contextlib.suppress(OSError):  # a lower pipe-max-size: the default size will do
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        # Everything it must know goes in before any other line: the kernel keeps it while
        # the guard starts up, so from here on the daemon's death is covered.
        self._send(
            _line(
                op="hello",
                instance=self.instance,
                grace=self._grace,
                daemon_pid=os.getpid(),
                daemon_pgid=os.getpgrp(),
            )
        )
        for line in list(self._tracked.values()):
            self._send(line)
        if self._closing:  # close() came while it was being spawned
            self._say_goodbye()
        try:
            with trio.fail_after(_READY_TIMEOUT):
                await _read_ready(process.stdout)
        except (trio.TooSlowError, EOFError) as exc:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                code = await process.wait()
            _release(process)
            self._fd = None
            what = "no sign of life" if isinstance(exc, trio.TooSlowError) else _describe(code)
            raise GuardError(f"the guard ({' '.join(self._argv)}) did not start: {what}") from exc
        if isinstance(process.stdout, trio.lowlevel.FdStream):
            process.stdout.close()  # it says nothing more
        self.starts += 1
        log.info(
            "guard pid %d is watching over %d children (grace %gs)",
            process.pid,
            len(self._tracked),
            self._grace,
        )
        if self._on_start is not None:
            self._on_start(process.pid)
        return process

    def _send(self, line: bytes) -> None:
        fd = self._fd
        if fd is None:
            return  # no guard right now: its successor gets the whole set
        try:
            written = os.write(fd, line)
        except BlockingIOError:
            self._replace("has left 1 MiB of its pipe unread")
            return
        except OSError:  # it died (EPIPE): run() sees the exit and starts a new one
            self._fd = None
            return
        if written != len(line):  # not for a pipe and a line below PIPE_BUF; but never torn
            self._replace("took part of a line")

    def _replace(self, why: str) -> None:
        self._fd = None
        process = self._process
        if process is not None and process.returncode is None:
            log.error("guard pid %d %s: replacing it", process.pid, why)
            process.kill()  # run() sees the exit and starts a new one with everything


async def _read_ready(stdout: trio.abc.ReceiveStream) -> None:
    seen = b""
    while b"\n" not in seen:
        data = await stdout.receive_some(64)
        if not data:
            raise EOFError("the guard exited before it was ready")
        seen += data
    if not seen.startswith(b"ready\n"):
        raise EOFError(f"the guard said {seen[:100]!r} instead of ready")


def _release(process: trio.Process) -> None:
    """Close our ends of a guard's pipes (it has exited, or must not hear from us again)."""
    for stream in (process.stdin, process.stdout):
        if isinstance(stream, trio.lowlevel.FdStream):
            stream.close()
