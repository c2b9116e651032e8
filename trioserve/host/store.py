"""The state store: SQLite at ``{state_dir}/state.db`` recording the daemon and every child.

The store outlives the daemon, so ``trioserve status`` and ``trioserve cleanup`` can still see
what a crashed daemon left behind. Methods here are blocking; the daemon calls them through
``StoreWriter`` (one thread-hopping writer task, so writes keep their order and never block the
event loop), the CLI calls them directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import trio

__all__ = [
    "ChildRow",
    "DaemonRow",
    "InstanceLock",
    "InstanceLocked",
    "StateStore",
    "StoreWriter",
    "UsageRow",
]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS daemon (
    instance TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    pid_start_time REAL,
    boot_id TEXT NOT NULL,
    url TEXT NOT NULL,
    started_at REAL NOT NULL,
    stopped_at REAL
);
CREATE TABLE IF NOT EXISTS children (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance TEXT NOT NULL,
    model TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pgid INTEGER NOT NULL,
    port INTEGER NOT NULL,
    start_time REAL,
    boot_id TEXT NOT NULL,
    argv TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    stopped_at REAL,
    exit_code INTEGER
);
CREATE INDEX IF NOT EXISTS children_live ON children (state) WHERE stopped_at IS NULL;
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL,  -- UTC hour: UNIX seconds // 3600
    user TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (hour, user, model)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS memory (
    command TEXT NOT NULL,  -- the model's cmd as configured (JSON), placeholders unfilled
    device TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    measured_at REAL NOT NULL,
    PRIMARY KEY (command, device)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class DaemonRow:
    instance: str
    pid: int
    pid_start_time: float | None
    boot_id: str
    url: str
    started_at: float
    stopped_at: float | None


@dataclass(frozen=True)
class ChildRow:
    id: int
    instance: str
    model: str
    pid: int
    pgid: int
    port: int
    start_time: float | None
    boot_id: str
    argv: list[str]
    state: str
    started_at: float
    stopped_at: float | None
    exit_code: int | None


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One user's usage of one model in one UTC hour (or what to add to it)."""

    hour: int  # UNIX seconds // 3600
    user: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


class StateStore:
    """Blocking access to ``state.db``. Open one per thread that uses it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "state.db"
        self._schema_ready = False

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # A short-lived connection per call: the store is written a few times per model start,
        # and sqlite3 connections must not cross threads.
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            if not self._schema_ready:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                self._schema_ready = True
            conn.execute("PRAGMA synchronous=NORMAL")
            with conn:
                yield conn
        finally:
            conn.close()

    def _read(self, query: str) -> list[Any]:
        """Rows of a query, opened read-only: ``status`` and ``cleanup`` read a state dir they
        may not own (systemd's) and must never create one. No store yet: no rows."""
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(query).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # created, not yet written by its daemon
            raise
        finally:
            conn.close()

    def exists(self) -> bool:
        return self.path.exists()

    def record_daemon(self, row: DaemonRow) -> None:
        with self._connect() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO daemon VALUES (?,?,?,?,?,?,?)",
                (
                    row.instance,
                    row.pid,
                    row.pid_start_time,
                    row.boot_id,
                    row.url,
                    row.started_at,
                    row.stopped_at,
                ),
            )

    def daemon_stopped(self, instance: str, at: float | None = None) -> None:
        with self._connect() as conn:
            conn.execute(
                "UPDATE daemon SET stopped_at=? WHERE instance=?", (at or time.time(), instance)
            )

    def daemons(self) -> list[DaemonRow]:
        return [DaemonRow(*row) for row in self._read("SELECT * FROM daemon ORDER BY started_at")]

    def latest_daemon(self) -> DaemonRow | None:
        rows = self.daemons()
        return rows[-1] if rows else None

    def record_child(
        self,
        *,
        instance: str,
        model: str,
        pid: int,
        pgid: int,
        port: int,
        start_time: float | None,
        boot_id: str,
        argv: Sequence[str],
        state: str,
    ) -> int:
        with self._connect() as conn:
            cur = conn.execute(
                "INSERT INTO children (instance, model, pid, pgid, port, start_time, boot_id,"
                " argv, state, started_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    instance,
                    model,
                    pid,
                    pgid,
                    port,
                    start_time,
                    boot_id,
                    json.dumps(list(argv)),
                    state,
                    time.time(),
                ),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def child_state(self, row_id: int, state: str) -> None:
        with self._connect() as conn:
            conn.execute("UPDATE children SET state=? WHERE id=?", (state, row_id))

    def child_stopped(self, row_id: int, exit_code: int | None, state: str = "stopped") -> None:
        with self._connect() as conn:
            conn.execute(
                "UPDATE children SET state=?, stopped_at=?, exit_code=? WHERE id=?",
                (state, time.time(), exit_code, row_id),
            )

    def children(self, *, live_only: bool = False) -> list[ChildRow]:
        query = "SELECT * FROM children"
        if live_only:
            query += " WHERE stopped_at IS NULL"
        return [_child(row) for row in self._read(query + " ORDER BY id")]

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add to the hourly usage totals: one transaction per batch (the daemon's is a second's
        worth of finished requests)."""
        with self._connect() as conn:
            conn.executemany(
                "INSERT INTO usage VALUES (?,?,?,?,?,?) ON CONFLICT (hour, user, model) DO UPDATE"
                " SET requests = requests + excluded.requests,"
                " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens",
                [
                    (r.hour, r.user, r.model, r.requests, r.prompt_tokens, r.completion_tokens)
                    for r in rows
                ],
            )

    def usage(self, since_hour: int) -> list[UsageRow]:
        """The hourly usage rows from ``since_hour`` on (read-only; none before any)."""
        query = f"SELECT * FROM usage WHERE hour >= {int(since_hour)} ORDER BY hour, user, model"
        return [UsageRow(*row) for row in self._read(query)]

    def record_memory(self, command: str, measured: dict[str, int]) -> None:
        """Keep what a command's process group was measured to use, per device, for its next
        start (and the next daemon's)."""
        now = time.time()
        with self._connect() as conn:
            conn.executemany(
                "INSERT INTO memory VALUES (?,?,?,?) ON CONFLICT (command, device) DO UPDATE"
                " SET bytes = excluded.bytes, measured_at = excluded.measured_at",
                [(command, device, size, now) for device, size in measured.items()],
            )

    def measured_memory(self) -> list[tuple[str, str, int]]:
        """Every (command, device, bytes) measured so far (read-only; none before any)."""
        return [tuple(row) for row in self._read("SELECT command, device, bytes FROM memory")]


def _child(row: Sequence[Any]) -> ChildRow:
    values = list(row)
    values[8] = json.loads(values[8])
    return ChildRow(*values)


class InstanceLocked(RuntimeError):
    pass


class InstanceLock:
    """``flock`` on ``{state_dir}/trioserve.lock``: one daemon per state dir.

    The kernel drops the lock when the process dies however it dies, so a SIGKILLed daemon never
    leaves a stale lock behind.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "trioserve.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the daemon's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another trioserve daemon"
            handle.close()
            raise InstanceLocked(
                f"{self.path.parent} is already used by a running daemon ({holder}); "
                "stop it first (trioserve stop) or use another state_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._file = handle

    def held_by_someone(self) -> bool:
        """True when a live process holds the lock (used by the CLI, which never takes it)."""
        if not self.path.exists():
            return False
        with open(self.path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class StoreWriter:
    """Runs store calls one at a time in a worker thread, in the order they were submitted.

    ``submit`` never blocks the caller; ``call`` waits for the result. ``run`` is the writer
    task; it drains everything submitted before it returns on ``close``.
    """

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._send, self._receive = trio.open_memory_channel[Callable[[], object]](1024)
        self._lock = trio.Lock()

    def submit(self, fn: Callable[[], object]) -> None:
        # The store is a record, not the source of truth; losing a write under extreme
        # load beats stalling the event loop. `cleanup` also finds children by marker.
        with contextlib.suppress(
            trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError
        ):
            self._send.send_nowait(fn)

    async def call(self, fn: Callable[[], Any]) -> Any:
        async with self._lock:
            return await trio.to_thread.run_sync(fn)

    def close(self) -> None:
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._receive:
            try:
                async for fn in self._receive:
                    await self._write(fn)
            finally:
                # Cancelled (the daemon is going away): what was submitted is still written,
                # e.g. the rows that say the children were stopped. Bounded: the channel
                # holds at most its buffer, and nothing new can be waited for here.
                with trio.CancelScope(shield=True):
                    while True:
                        try:
                            fn = self._receive.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        await self._write(fn)

    async def _write(self, fn: Callable[[], object]) -> None:
        # Shielded: a write that has begun is finished even during shutdown.
        with trio.CancelScope(shield=True):
            async with self._lock:
                try:
                    await trio.to_thread.run_sync(fn)
                except Exception:  # a broken disk must not take the daemon down
                    log.exception("state store write failed")
