r"""A stand-in daemon for the guard's tests (tests/test_guard.py) and benchmark (bench/guard.py).

Run as a script, it plays the daemon: it starts a ``Guard``, spawns model-like children (each
in its own session, as the supervisor does), tracks them, and waits to be killed::

    python tests/support/guard_parent.py --instance ID --grace S [--no-marker] \
        [--foreign PID:START] KIND...

KIND is ``plain`` (dies on SIGTERM), ``stubborn`` (ignores SIGTERM), ``family`` (a leader that
dies on SIGTERM and a grandchild in its group that ignores it), ``escapee`` (a leader and a
grandchild that left the group with ``setsid()``) or ``starting`` (a sleeping process that says
nothing: a model still loading); ``untracked:KIND`` is spawned but never tracked (the daemon
died between spawn and ``track``). ``--foreign PID:START`` tracks someone else's process with a
start time of our choosing. Children carry ``TRIOSERVE_INSTANCE=ID`` unless ``--no-marker``.

Everything is told on stdout as JSON lines: ``{"event":"guard","pid"}`` for each guard that is up,
``{"event":"child","kind","pid","tracked"}`` for each child, ``{"event":"tracked"}`` once the
children asked for are tracked; the children print ``{"event":"ready","pid",...}`` once set up.
Commands on stdin: ``spawn KIND``, ``bye`` (untrack every child as a clean shutdown would, but
leave them running; ``Guard.close()``; exit 0). At the end of stdin it exits at once without a
bye, like a daemon that died.

Imported, it gives the tests' side: ``Parent`` (drives the script), ``Exits`` (waits for
processes to end through pidfds, from the process table rather than anyone's word) and
``Adopter`` (makes us the reaper of the orphans, so they are reaped and none is left behind).
Run as a script it imports nothing of ``tests`` (its own folder is first on sys.path, not the
repository's root); ``trioserve`` comes from the installed package.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()

_READY = """
import json, os, signal, sys, time
def ready(**more):
    line = json.dumps({"event": "ready", "pid": os.getpid(), **more}) + "\\n"
    os.write(1, line.encode())  # one write: lines of several processes share this pipe
"""
# A grandchild forked by the leader; it says it is set up through a pipe before the leader
# reports both. SETUP is what it does first.
_FAMILY = """
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    SETUP
    os.write(w, b"x")
    time.sleep(600)
    os._exit(0)
os.read(r, 1)
ready(grandchild=pid)
time.sleep(600)
"""
CHILDREN = {
    "plain": _READY + "ready()\ntime.sleep(600)\n",
    "stubborn": _READY
    + "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nready()\ntime.sleep(600)\n",
    "family": _READY + _FAMILY.replace("SETUP", "signal.signal(signal.SIGTERM, signal.SIG_IGN)"),
    "escapee": _READY + _FAMILY.replace("SETUP", "os.setsid()"),
    "starting": "import time\ntime.sleep(600)\n",
}
# The kinds that print a ready line (and how many processes they are).
SAYS_READY = {"plain", "stubborn", "family", "escapee"}


# -- the script: a stand-in daemon -----------------------------------------------------------


def _emit(**fields: Any) -> None:
    # One write per line (print makes two when unbuffered): the children share this pipe.
    os.write(1, (json.dumps(fields) + "\n").encode())


async def _serve(args: Any) -> None:
    import trio

    from trioserve.host.guard_client import Guard
    from trioserve.host.identity import process_start_time

    guard = Guard(
        instance=args.instance,
        grace=args.grace,
        on_start=lambda pid: _emit(event="guard", pid=pid),
    )
    children: list[trio.Process] = []  # kept, so they are never garbage collected

    async def spawn(spec: str) -> None:
        kind = spec.removeprefix("untracked:")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOSERVE_")}
        if not args.no_marker:
            env |= {"TRIOSERVE_INSTANCE": args.instance, "TRIOSERVE_MODEL": kind}
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", CHILDREN[kind]],
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        children.append(process)
        tracked = not spec.startswith("untracked:")
        if tracked:
            # As the supervisor does: the start time from psutil, in a worker thread.
            start_time = await trio.to_thread.run_sync(process_start_time, process.pid)
            assert start_time is not None
            guard.track(process.pid, process.pid, start_time, kind)
        _emit(event="child", kind=kind, pid=process.pid, tracked=tracked)

    async with trio.open_nursery() as nursery:
        await nursery.start(guard.run)
        for spec in args.kinds:
            await spawn(spec)
        for foreign in args.foreign:
            pid, start = foreign.split(":")
            guard.track(int(pid), int(pid), float(start), "foreign")
        _emit(event="tracked")
        stdin = trio.lowlevel.FdStream(os.dup(0))
        pending = b""
        while True:
            data = await stdin.receive_some()
            if not data:
                os._exit(0)  # as if killed: no bye, the guard stops what is tracked
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                command = line.decode().split()
                if command == ["bye"]:
                    # A clean shutdown: the daemon untracks each child it stopped (these it
                    # leaves running, to see that the guard touches nothing), then says bye.
                    for pid in guard.tracked:
                        guard.untrack(pid)
                    guard.close()  # run() returns once the guard has exited
                    await stdin.aclose()
                    return
                if command[:1] == ["spawn"]:
                    await spawn(command[1])
                    _emit(event="tracked")


def _main() -> None:
    import trio

    parser = argparse.ArgumentParser()
    parser.add_argument("--instance", required=True)
    parser.add_argument("--grace", type=float, required=True)
    parser.add_argument("--no-marker", action="store_true")
    parser.add_argument("--foreign", action="append", default=[])
    parser.add_argument("kinds", nargs="*")
    trio.run(_serve, parser.parse_args())


# -- the tests' side -------------------------------------------------------------------------


class Parent:
    """The stand-in daemon as a subprocess (in a session of its own), and what it told us."""

    def __init__(
        self,
        kinds: Iterable[str],
        *,
        grace: float,
        instance: str | None = None,
        marker: bool = True,
        foreign: Iterable[str] = (),
    ) -> None:
        self.instance = instance or "guardtest-" + os.urandom(4).hex()
        self.grace = grace
        argv = [sys.executable, str(SCRIPT), "--instance", self.instance, "--grace", str(grace)]
        argv += [] if marker else ["--no-marker"]
        for item in foreign:
            argv += ["--foreign", item]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOSERVE_")}
        self.proc = subprocess.Popen(
            [*argv, *kinds],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.events: list[dict[str, Any]] = []
        self._pending = b""
        self._seen = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, timeout: float) -> bool:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if not ready:
            return False
        data = os.read(fd, 65536)
        if not data:
            raise EOFError("the stand-in daemon's output ended")
        *lines, self._pending = (self._pending + data).split(b"\n")
        self.events.extend(json.loads(line) for line in lines if line.strip())
        return True

    def wait_for(
        self, test: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        """The next event (after those already returned) that passes ``test``."""
        deadline = time.monotonic() + timeout
        while True:
            while self._seen < len(self.events):
                event = self.events[self._seen]
                self._seen += 1
                if test(event):
                    return event
            if not self._read(deadline - time.monotonic()) and time.monotonic() >= deadline:
                raise TimeoutError(f"no such event within {timeout}s; got {self.events}")

    def event(self, name: str, timeout: float = 30) -> dict[str, Any]:
        return self.wait_for(lambda e: e.get("event") == name, timeout)

    def settle(self, timeout: float = 30) -> tuple[int, list[int]]:
        """Wait until the guard is up, every child is tracked and set up; return the guard's
        pid and the pids of every process of every child (grandchildren too)."""
        guard = self.event("guard", timeout)["pid"]
        self.event("tracked", timeout)
        return guard, self.collect(timeout)

    def collect(self, timeout: float = 30) -> list[int]:
        """Wait for the ready line of every child that says one; every model pid so far."""
        children = [e for e in self.events if e.get("event") == "child"]
        waiting = {e["pid"] for e in children if e["kind"] in SAYS_READY}

        def is_ready(pid: int) -> bool:
            return any(e.get("event") == "ready" and e["pid"] == pid for e in self.events)

        deadline = time.monotonic() + timeout
        while not all(is_ready(pid) for pid in waiting):
            if not self._read(deadline - time.monotonic()) and time.monotonic() >= deadline:
                raise TimeoutError(f"children not ready within {timeout}s: {self.events}")
        pids = [e["pid"] for e in children]
        pids += [e["grandchild"] for e in self.events if "grandchild" in e]
        return pids

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> float:
        """SIGKILL the stand-in daemon; return the time it was sent (``time.monotonic``)."""
        sent = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return sent

    def kill_and_watch(
        self, pids: Iterable[int], *, timeout: float, on_exit: Callable[[int], object]
    ) -> tuple[float, dict[int, float]]:
        """SIGKILL the stand-in daemon and wait, at most ``timeout``, for ``pids`` to end
        (``on_exit`` of each as it does). Returns when the SIGKILL was sent and when each pid
        ended (``time.monotonic``)."""
        with Exits(pids) as exits:
            killed_at = self.kill()
            exits.wait(timeout, on_exit=on_exit)
        return killed_at, exits.ended

    def close(self) -> None:
        """Our ends of its pipes; kill and reap it if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class Exits:
    """Waits for processes to end (their pidfds turn readable: exited, a zombie at most)."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.fds = {pid: os.pidfd_open(pid) for pid in pids}
        self.ended: dict[int, float] = {}

    def alive(self, pid: int) -> bool:
        return pid not in self.ended and not select.select([self.fds[pid]], [], [], 0)[0]

    def wait(self, timeout: float, on_exit: Callable[[int], object] | None = None) -> None:
        """Until every one has ended (the time of each in ``ended``), at most ``timeout``."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        by_fd = {fd: pid for pid, fd in self.fds.items() if pid not in self.ended}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        while len(self.ended) < len(self.fds):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for fd, _ in poller.poll(left * 1000):
                self.ended[by_fd[fd]] = time.monotonic()
                poller.unregister(fd)
                if on_exit is not None:
                    on_exit(by_fd[fd])

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def __enter__(self) -> Exits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PR_SET_CHILD_SUBREAPER = 36


def bench_arguments(description: str) -> argparse.Namespace:
    """The guard benchmarks' ``--rounds`` and ``--grace``, once the machine's load is printed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--grace", type=float, default=0.5)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    return args


class Adopter:
    """Makes this process the reaper of its orphaned descendants while in use.

    A model process whose daemon died is re-parented to the nearest subreaper; without one it
    would go to init (which in some containers never reaps). As the subreaper we reap them,
    read their exit status, and kill whatever a failed test left.
    """

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}

    def _subreaper(self, on: bool) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    def __enter__(self) -> Adopter:
        self._subreaper(True)
        return self

    def reap(self, pid: int) -> int | None:
        """Reap ``pid`` if it is an exited child of ours; its wait status, else None."""
        if pid in self.statuses:
            return self.statuses[pid]
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not ours (its parent reaps it) or reaped already
            return None
        if done == 0:
            return None
        self.statuses[pid] = status
        return status

    def cleanup(self, pids: Iterable[int] = ()) -> list[int]:
        """Kill ``pids`` that still run and every process adopted meanwhile; reap them all.
        Returns the pids that had to be killed."""
        # Here, not at the top: run as a script, this file has no ``tests`` package to import.
        import psutil

        from tests.support.processes import alive

        me = psutil.Process()
        killed = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        for child in me.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    child.kill()
                    killed.append(child.pid)
                child.wait(10)  # reaps it: it is our child
        return killed

    def __exit__(self, *exc: object) -> None:
        self._subreaper(False)


if __name__ == "__main__":
    _main()
