"""Processes and what this process holds: pid checks, model processes found by their marker,
open fds and trio tasks, and polling for what nothing announces."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import trio


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie is not running: it only waits to be reaped)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _environments(
    procs: Iterable[psutil.Process],
) -> Iterator[tuple[psutil.Process, dict[str, str]]]:
    """``(process, its environment)`` for each of ``procs`` that is running and readable."""
    for proc in procs:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        yield proc, env


def children_with_marker(instance: str) -> list[psutil.Process]:
    """Live processes anywhere whose environment carries ``TRIOSERVE_INSTANCE=instance``."""
    return [
        proc
        for proc, env in _environments(psutil.process_iter())
        if env.get("TRIOSERVE_INSTANCE") == instance
    ]


def model_processes(instance: str, root: int | None = None) -> dict[str, list[int]]:
    """Live model processes of ``instance`` among the descendants of ``root`` (default: this
    process), by their ``TRIOSERVE_MODEL`` marker: ``{model: [pid, ...]}``.

    Descendants rather than the whole process table: cheap enough to sample many times a
    second, and a model's grandchildren (which carry the marker too) are still found.
    """
    try:
        procs = psutil.Process(root if root is not None else os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found: dict[str, list[int]] = {}
    for proc, env in _environments(procs):
        if env.get("TRIOSERVE_INSTANCE") == instance and "TRIOSERVE_MODEL" in env:
            found.setdefault(env["TRIOSERVE_MODEL"], []).append(proc.pid)
    return found


def model_groups(instance: str, root: int | None = None) -> dict[str, set[int]]:
    """The process groups of ``instance``'s model processes: ``{model: {pgid, ...}}``.

    What "one model never has two processes" means on a process table: a model's server may
    have helpers of its own (it may even fork ``ldconfig`` while it imports, as the echo
    backend does), all in the group the daemon gave it; a second *start* of the model is a
    second group.
    """
    groups: dict[str, set[int]] = {}
    for model, pids in model_processes(instance, root).items():
        for pid in pids:
            try:
                groups.setdefault(model, set()).add(os.getpgid(pid))
            except ProcessLookupError:
                continue
    return groups


def processes_of_state_dir(root: Path) -> list[psutil.Process]:
    """Live processes whose TRIOSERVE_STATE_DIR lies under ``root`` (model children, also
    those a SIGKILLed daemon subprocess left to init)."""
    prefix = os.path.realpath(root)
    return [
        proc
        for proc, env in _environments(psutil.process_iter())
        if env.get("TRIOSERVE_STATE_DIR")
        and os.path.realpath(env["TRIOSERVE_STATE_DIR"]).startswith(prefix)
    ]


def kill_and_wait(procs: list[psutil.Process]) -> None:
    """SIGKILL each of ``procs`` and wait (bounded) until they are gone."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)


async def eventually(
    check: Callable[[], bool], *, within: float, what: str, interval: float = 0.02
) -> None:
    """Poll ``check`` until it holds; fail with ``what`` after ``within`` seconds.

    For what nothing announces (a process reaped by init, an fd closed by the kernel)."""
    deadline = trio.current_time() + within
    while not check():
        if trio.current_time() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await trio.sleep(interval)


def trio_task_count() -> int:
    """Every task of this trio run: the root task and, recursively, its nurseries' tasks."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None, "not in a trio run"
    return walk(root)


@dataclass(frozen=True)
class Resources:
    """What a daemon running in this process holds: fds, trio tasks, resident memory."""

    fds: int
    tasks: int
    rss: int

    @classmethod
    def now(cls) -> Resources:
        me = psutil.Process()
        return cls(me.num_fds(), trio_task_count(), me.memory_info().rss)

    @classmethod
    def baseline(cls) -> Resources:
        """``now()`` once the garbage of earlier tests in this process is collected: an fd
        such garbage still holds would be closed by a collection during the test, and the
        count after it would be lower than a baseline that counted it."""
        gc.collect()
        return cls.now()


async def wait_for_baseline(
    baseline: Resources, *, within: float, fd_slack: int = 0, task_slack: int = 0
) -> Resources:
    """Wait until fds and tasks are back to ``baseline`` (closing a socket or ending a task
    happens a moment after the client has its answer); returns the last snapshot."""
    last = Resources.now()

    def back() -> bool:
        nonlocal last
        last = Resources.now()
        return last.fds <= baseline.fds + fd_slack and last.tasks <= baseline.tasks + task_slack

    try:
        await eventually(back, within=within, what="resources back to baseline", interval=0.05)
    except AssertionError:
        raise AssertionError(f"resources not back to {baseline} within {within}s: {last}") from None
    return last
