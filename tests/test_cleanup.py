"""Finding and killing leftovers: identity proven by pid + start time + boot id, or by marker.

Real processes throughout (`python -c` scripts in their own sessions), a real state store; the
CLI's `cleanup` through CliRunner. Each "leftover" here is the test's own child, so after a kill
it lingers as a zombie until the fixture reaps it, which cleanup must treat as dead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import trioserve_cli.cleanup_cmd
from tests.support.cli import invoke
from tests.support.config import write_toml
from tests.support.processes import alive
from trioserve.host import groupkill
from trioserve.host.cleanup import (
    KILLED,
    KILLED_HARD,
    NOT_KILLED,
    SKIPPED,
    find_leftovers,
    kill_leftovers,
)
from trioserve.host.identity import process_start_time, read_boot_id
from trioserve.host.store import DaemonRow, InstanceLock, StateStore

# Prints "ready" once its signal handling is set up, so a test never races the handler.
CHILD = r"""
import os, signal, subprocess, sys, time
opts = sys.argv[1:]
if "--ignore-sigterm" in opts:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "--grandchild" in opts:
    subprocess.Popen(["sleep", "60"])
print("ready", flush=True)
while True:
    time.sleep(1)
"""


class Children:
    """Processes started for one test; every one is killed (by group) and reaped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self,
        *options: str,
        marker: tuple[str, Path] | None = None,
        model: str = "m",
    ) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOSERVE_")}
        if marker is not None:
            instance, state_dir = marker
            env.update(
                TRIOSERVE_INSTANCE=instance,
                TRIOSERVE_STATE_DIR=str(state_dir),
                TRIOSERVE_MODEL=model,
            )
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *options],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            # Its own group, as a model child has: a kill of its group can never reach pytest.
            start_new_session=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.close()


@pytest.fixture
def store(state_dir: Path) -> StateStore:
    return StateStore(state_dir)


@pytest.fixture
def config_file(tmp_path: Path, state_dir: Path) -> Path:
    return write_toml(
        tmp_path / "c.toml",
        {"server": {"state_dir": str(state_dir)}, "supervisor": {"stop_grace": 0.5}},
    )


def record(
    store: StateStore,
    pid: int,
    *,
    instance: str = "deadbeef0001",
    model: str = "m",
    start_time: float | None = None,
    port: int = 20001,
) -> int:
    """A children row as the supervisor writes it; by default with the true start time."""
    return store.record_child(
        instance=instance,
        model=model,
        pid=pid,
        pgid=pid,
        port=port,
        start_time=process_start_time(pid) if start_time is None else start_time,
        boot_id=read_boot_id(),
        argv=["model", "--port", str(port)],
        state="ready",
    )


# -- identity ------------------------------------------------------------------------------------


def test_row_whose_pid_now_belongs_to_another_program_is_not_killed(
    children: Children, store: StateStore, config_file: Path
) -> None:
    unrelated = children.start()
    true_start = process_start_time(unrelated.pid)
    assert true_start is not None
    # The row's process started 100 s earlier: this pid has been reused since.
    row_id = record(store, unrelated.pid, start_time=true_start - 100)

    [item] = find_leftovers(store, live=None)
    assert (item.pid, item.alive, item.proven) == (unrelated.pid, False, False)
    assert "another program" in item.note

    result = invoke(["cleanup", "--config", str(config_file), "--yes"])
    assert result.exit_code == 0, result.output
    assert "pid now belongs to another program" in result.stdout
    assert "not touched" in result.stdout
    assert alive(unrelated.pid)
    # The row is closed (its process is gone), the unrelated process left as it was.
    assert [r.id for r in store.children(live_only=True)] == []
    assert [r.state for r in store.children() if r.id == row_id] == ["gone"]


def test_row_from_another_boot_is_never_proven(children: Children, store: StateStore) -> None:
    proc = children.start()
    store.record_child(
        instance="oldboot",
        model="m",
        pid=proc.pid,
        pgid=proc.pid,
        port=1,
        start_time=process_start_time(proc.pid),
        boot_id="another-boot",
        argv=["x"],
        state="ready",
    )
    [item] = find_leftovers(store, live=None)
    assert not item.proven and "rebooted" in item.note
    kill_leftovers(store, [item], grace=0.1)
    assert alive(proc.pid)


def test_row_with_true_start_time_is_killed(
    children: Children, store: StateStore, config_file: Path
) -> None:
    proc = children.start()
    row_id = record(store, proc.pid)
    result = invoke(["cleanup", "--config", str(config_file), "--yes"])
    assert result.exit_code == 0, result.output
    assert not alive(proc.pid)
    assert "killed 1 process group(s); nothing is left" in result.stdout
    assert [r.state for r in store.children() if r.id == row_id] == ["reclaimed"]


def test_marker_of_a_dead_instance_is_killed_without_any_row(
    children: Children, store: StateStore, state_dir: Path
) -> None:
    proc = children.start(marker=("deadbeef0002", state_dir), model="llama")
    [item] = [i for i in find_leftovers(store, live=None) if i.pid == proc.pid]
    assert (item.model, item.source, item.instance) == ("llama", "marker", "deadbeef0002")
    [done] = kill_leftovers(store, [item], grace=2)
    assert done.outcome == KILLED
    assert not alive(proc.pid)


def test_marker_of_another_state_dir_is_left_alone(
    children: Children, store: StateStore, tmp_path: Path
) -> None:
    other = tmp_path / "other-state"
    proc = children.start(marker=("deadbeef0003", other))
    assert [i for i in find_leftovers(store, live=None) if i.pid == proc.pid] == []


def test_row_and_marker_are_one_leftover(
    children: Children, store: StateStore, state_dir: Path
) -> None:
    proc = children.start(marker=("deadbeef0004", state_dir))
    record(store, proc.pid, instance="deadbeef0004")
    [item] = find_leftovers(store, live=None)
    assert item.source == "store+marker" and item.proven and item.alive


def test_gone_process_row_is_listed_dead_and_closed(children: Children, store: StateStore) -> None:
    proc = children.start()
    start = process_start_time(proc.pid)
    children.close()  # killed and reaped: the pid is free
    row_id = record(store, proc.pid, start_time=start)
    [item] = find_leftovers(store, live=None)
    assert not item.alive and item.note == "gone"
    [done] = kill_leftovers(store, [item], grace=0.1)
    assert done.outcome == "already gone"
    assert [r.state for r in store.children() if r.id == row_id] == ["gone"]


# -- live daemons are never touched --------------------------------------------------------------


def test_children_of_the_lock_holder_are_protected_even_without_a_daemon_row(
    children: Children, store: StateStore, state_dir: Path
) -> None:
    # This test process plays a daemon in its first milliseconds: it holds the lock but has not
    # recorded itself. Its child carries the marker of an instance nobody knows.
    lock = InstanceLock(state_dir)
    lock.acquire()
    try:
        proc = children.start(marker=("notrecorded01", state_dir))
        record(store, proc.pid, instance="notrecorded01")
        assert find_leftovers(store, live=None) == []
    finally:
        lock.release()
    assert [i.pid for i in find_leftovers(store, live=None)] == [proc.pid]


def test_instance_of_a_live_daemon_process_is_protected(
    children: Children, store: StateStore, state_dir: Path
) -> None:
    daemon = children.start()  # stands in for a running daemon (no lock needed)
    store.record_daemon(
        DaemonRow(
            instance="livedaemon01",
            pid=daemon.pid,
            pid_start_time=process_start_time(daemon.pid),
            boot_id=read_boot_id(),
            url="http://127.0.0.1:1",
            started_at=0,
            stopped_at=None,
        )
    )
    child = children.start(marker=("livedaemon01", state_dir))
    record(store, child.pid, instance="livedaemon01")
    assert find_leftovers(store, live=None) == []
    # Once that daemon is gone, its child is a leftover.
    os.killpg(daemon.pid, signal.SIGKILL)
    daemon.wait()
    assert [i.pid for i in find_leftovers(store, live=None)] == [child.pid]


# -- killing -------------------------------------------------------------------------------------


def test_child_ignoring_sigterm_is_killed_after_grace(
    children: Children, store: StateStore
) -> None:
    proc = children.start("--ignore-sigterm")
    record(store, proc.pid)
    [item] = find_leftovers(store, live=None)
    [done] = kill_leftovers(store, [item], grace=0.3)
    assert done.outcome == KILLED_HARD
    assert not alive(proc.pid)


def test_whole_process_group_is_killed(children: Children, store: StateStore) -> None:
    proc = children.start("--grandchild")
    [grandchild] = psutil.Process(proc.pid).children()
    record(store, proc.pid)
    [done] = kill_leftovers(store, find_leftovers(store, live=None), grace=2)
    assert done.outcome == KILLED
    psutil.wait_procs([grandchild], timeout=5)
    assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE


def test_group_whose_members_are_all_strangers_is_not_signalled(children: Children) -> None:
    # A group we knew by (pid, start time) whose only member now has another start time: the
    # pgid was reused by someone else. It must count as gone and never be signalled.
    stranger = children.start()
    groups = groupkill._Groups([stranger.pid], {stranger.pid: {(stranger.pid, 1234)}})
    groups.refresh()
    assert groups.alive() == []
    groups.signal(signal.SIGKILL)
    assert alive(stranger.pid)


def test_group_that_survives_sigkill_is_reported_and_exits_1(
    children: Children,
    store: StateStore,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proc = children.start()
    record(store, proc.pid)
    # Stand-in for a process stuck in uninterruptible sleep: signals have no effect.
    monkeypatch.setattr(groupkill.os, "killpg", lambda pgid, signum: None)
    monkeypatch.setattr(groupkill, "SIGKILL_WAIT", 0.2)
    result = invoke(["cleanup", "--config", str(config_file), "--yes"])
    assert result.exit_code == 1, result.output
    assert NOT_KILLED in result.stdout
    assert f"1 process group(s) could not be killed: m pid {proc.pid}" in result.stderr
    assert alive(proc.pid)
    assert len(store.children(live_only=True)) == 1  # still recorded: still there


# -- the command's modes -------------------------------------------------------------------------


def test_dry_run_lists_and_kills_nothing(
    children: Children, store: StateStore, config_file: Path
) -> None:
    proc = children.start()
    record(store, proc.pid, model="llama", port=20444)
    result = invoke(["cleanup", "--config", str(config_file), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "llama" in result.stdout and str(proc.pid) in result.stdout and "20444" in result.stdout
    assert "dry run: would kill 1 process group(s)" in result.stdout
    assert alive(proc.pid)
    assert len(store.children(live_only=True)) == 1


def test_without_yes_and_no_terminal_it_refuses_with_exit_2(
    children: Children, store: StateStore, config_file: Path
) -> None:
    proc = children.start()
    record(store, proc.pid)
    result = invoke(["cleanup", "--config", str(config_file)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "trioserve: refusing to kill 1 process group(s) without confirmation: stdin is not a "
        "terminal; pass --yes (or --dry-run to only list them)"
    )
    assert alive(proc.pid)


@pytest.mark.parametrize(("answer", "code", "killed"), [("n\n", 1, False), ("y\n", 0, True)])
def test_on_a_terminal_it_asks_first(
    children: Children,
    store: StateStore,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
    code: int,
    killed: bool,
) -> None:
    proc = children.start()
    record(store, proc.pid)
    monkeypatch.setattr(trioserve_cli.cleanup_cmd, "_stdin_is_terminal", lambda: True)
    result = invoke(["cleanup", "--config", str(config_file)], input=answer)
    assert result.exit_code == code, result.output
    assert "Kill 1 process group(s)?" in result.stdout
    assert alive(proc.pid) is not killed


def test_nothing_to_clean_up(config_file: Path, state_dir: Path) -> None:
    result = invoke(["cleanup", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"nothing to clean up for {state_dir}"
    # Looking did not create a store.
    assert not (state_dir / "state.db").exists()


def test_skipped_outcome_is_named(children: Children, store: StateStore) -> None:
    unrelated = children.start()
    record(store, unrelated.pid, start_time=1.0)
    [done] = kill_leftovers(store, find_leftovers(store, live=None), grace=0.1)
    assert done.outcome == SKIPPED


def test_trioserve_config_names_the_store_when_no_option(
    children: Children, store: StateStore, config_file: Path
) -> None:
    proc = children.start()
    record(store, proc.pid)
    result = invoke(["cleanup", "--dry-run"], TRIOSERVE_CONFIG=str(config_file))
    assert result.exit_code == 0, result.output
    assert str(proc.pid) in result.stdout
