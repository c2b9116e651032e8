"""The state store: SQLite in WAL mode written off the event loop, and the instance lock."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from tests.support.config import health_server_cmd, make_config
from tests.support.daemon import running_supervisor_with_store
from trioserve.host.identity import read_boot_id
from trioserve.host.store import DaemonRow, InstanceLock, InstanceLocked, StateStore, StoreWriter


def test_database_is_in_wal_mode(state_dir: Path) -> None:
    StateStore(state_dir).daemon_stopped("nobody")
    with sqlite3.connect(state_dir / "state.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_reading_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "not-there"
    store = StateStore(state_dir)
    assert store.children() == []
    assert store.daemons() == []
    assert store.latest_daemon() is None
    assert not state_dir.exists()


def test_reads_open_the_store_read_only(state_dir: Path) -> None:
    store = StateStore(state_dir)
    store.record_daemon(DaemonRow("abc", 42, 1000.5, "boot", "http://127.0.0.1:1", 1001.0, None))
    # Root ignores file modes, so a read-only file proves nothing here; a store whose file is
    # replaced by one without the schema must read as empty rather than be written to.
    (state_dir / "state.db").unlink()
    for leftover in state_dir.glob("state.db-*"):
        leftover.unlink()
    sqlite3.connect(state_dir / "state.db").close()  # an empty database
    assert StateStore(state_dir).children() == []
    with sqlite3.connect(state_dir / "state.db") as conn:
        tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == []  # reading did not create the schema


def test_daemon_row_round_trip(state_dir: Path) -> None:
    store = StateStore(state_dir)
    row = DaemonRow("abc", 42, 1000.5, "boot", "http://127.0.0.1:1", 1001.0, None)
    store.record_daemon(row)
    assert store.latest_daemon() == row
    store.daemon_stopped("abc", at=1002.0)
    assert store.daemons() == [
        DaemonRow("abc", 42, 1000.5, "boot", "http://127.0.0.1:1", 1001.0, 1002.0)
    ]


def test_child_rows_record_identity_state_and_exit(state_dir: Path) -> None:
    store = StateStore(state_dir)
    before = time.time()
    row_id = store.record_child(
        instance="abc",
        model="m",
        pid=10,
        pgid=10,
        port=20001,
        start_time=99.5,
        boot_id="boot",
        argv=["python", "-m", "x", "--port", "20001"],
        state="starting",
    )
    store.child_state(row_id, "ready")
    (live,) = store.children(live_only=True)
    assert (live.model, live.pid, live.pgid, live.port, live.start_time, live.boot_id) == (
        "m",
        10,
        10,
        20001,
        99.5,
        "boot",
    )
    assert live.argv == ["python", "-m", "x", "--port", "20001"]
    assert live.state == "ready"
    assert live.started_at >= before and live.stopped_at is None and live.exit_code is None
    store.child_stopped(row_id, -15)
    assert store.children(live_only=True) == []
    (done,) = store.children()
    assert done.state == "stopped" and done.exit_code == -15 and done.stopped_at is not None


async def test_writer_runs_writes_in_order_in_a_worker_thread(state_dir: Path) -> None:
    writer = StoreWriter(StateStore(state_dir))
    done: list[tuple[int, int]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(50):
            writer.submit(lambda i=i: done.append((i, threading.get_ident())))
        assert await writer.call(lambda: 7) == 7
        writer.close()
    assert [i for i, _ in done] == list(range(50))
    assert threading.get_ident() not in {thread for _, thread in done}


async def test_writer_survives_a_failing_write(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = StoreWriter(StateStore(state_dir))
    done: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.submit(lambda: 1 / 0)
        writer.submit(lambda: done.append(1))
        writer.close()
    assert done == [1]
    assert "state store write failed" in caplog.text


async def test_writer_finishes_submitted_writes_when_cancelled(state_dir: Path) -> None:
    # The daemon cancels the writer right after submitting the rows that say its children
    # stopped: those rows must still be written.
    writer = StoreWriter(StateStore(state_dir))
    done: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(20):
            writer.submit(lambda i=i: (time.sleep(0.001), done.append(i)))
        writer.close()
        nursery.cancel_scope.cancel()
    assert done == list(range(20))


async def test_supervisor_records_its_children(state_dir: Path) -> None:
    config = make_config(
        state_dir, {"m": {"cmd": health_server_cmd()}}, supervisor={"stop_grace": 5}
    )
    async with running_supervisor_with_store(config) as supervisor:
        endpoint = await supervisor.ensure_ready("m")
        pid = supervisor.status()["m"].pid
        await supervisor.unload("m")
    (row,) = StateStore(state_dir).children()
    assert row.instance == supervisor.instance and row.model == "m"
    assert row.pid == row.pgid == pid
    assert row.port == endpoint.port
    assert row.boot_id == read_boot_id()
    assert row.start_time is not None and abs(row.start_time - row.started_at) < 5
    assert row.argv[0] == sys.executable and row.argv[-1] == str(endpoint.port)
    assert row.state == "stopped" and row.stopped_at is not None
    assert row.exit_code == -signal.SIGTERM


HOLD_LOCK = """
import sys, time
from pathlib import Path
from trioserve.host.store import InstanceLock
lock = InstanceLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_daemon_on_the_same_state_dir_is_refused_naming_the_first(state_dir: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(state_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert InstanceLock(state_dir).held_by_someone()
        with pytest.raises(InstanceLocked) as refused:
            InstanceLock(state_dir).acquire()
        message = str(refused.value)
        assert f"pid {holder.pid}" in message
        assert str(state_dir) in message
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    # The kernel dropped the lock with the process: no stale lock after a crash.
    assert not InstanceLock(state_dir).held_by_someone()
    lock = InstanceLock(state_dir)
    lock.acquire()
    lock.release()
