"""Usage that survives (issue 26): per-user totals per model and UTC hour in the state store,
written each second off the request path, read back at start; ``/admin/usage?since=``.

The restart test is a real ``trioserve start`` SIGKILLed once ``/admin/usage`` shows its
requests: the restarted daemon shows them on ``/admin/usage`` and counts them against the
user's ``max_tokens_per_day``. That a crash loses at most ``FLUSH_INTERVAL`` is the keeper's
interval, tested on its own clock (``autojump_clock``), not on a busy machine's wall clock.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from prometheus_client import CollectorRegistry

from tests.support.config import echo_cmd, write_toml
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.http import assert_openai_error, chat
from tests.support.ports import free_port, port_range
from trioserve.config import load_config, parse_config
from trioserve.errors import InvalidRequest
from trioserve.gateway.usage import UsageBook
from trioserve.gateway.usage_keeper import FLUSH_INTERVAL, UsageKeeper
from trioserve.gateway.usage_report import parse_since, usage_report
from trioserve.host.store import StateStore, StoreWriter, UsageRow
from trioserve.sharing.identity import User

ALICE = "sk-alice"
BOB = "sk-bob"
CAROL = "sk-carol"
CHAT = "/v1/chat/completions"
COST = 3 + 5  # "a b c" and max_tokens 5, as the echo model counts them
# 2024-05-01T10:42:17Z
NOW = datetime(2024, 5, 1, 10, 42, 17, tzinfo=UTC).timestamp()
HOUR_NOW = int(NOW // 3600)


def alice(**extra: Any) -> User:
    return User(key="name:alice", name="alice", **extra)


# -- the store -----------------------------------------------------------------------------------


def test_usage_rows_add_up_per_hour_user_and_model(state_dir: Path) -> None:
    store = StateStore(state_dir)
    store.add_usage([UsageRow(HOUR_NOW, "alice", "echo", 1, 3, 5)])
    store.add_usage(
        [
            UsageRow(HOUR_NOW, "alice", "echo", 2, 6, 10),
            UsageRow(HOUR_NOW, "alice", "other", 1, 1, 1),
            UsageRow(HOUR_NOW - 30, "bob", "echo", 1, 2, 2),
        ]
    )
    assert store.usage(HOUR_NOW) == [
        UsageRow(HOUR_NOW, "alice", "echo", 3, 9, 15),
        UsageRow(HOUR_NOW, "alice", "other", 1, 1, 1),
    ]
    assert len(store.usage(0)) == 3


def test_a_store_from_before_usage_has_none(state_dir: Path) -> None:
    # A state.db written by a version without the usage table.
    with sqlite3.connect(state_dir / "state.db") as conn:
        conn.execute("CREATE TABLE daemon (instance TEXT PRIMARY KEY)")
    assert StateStore(state_dir).usage(0) == []
    assert StateStore(state_dir / "none").usage(0) == []


# -- since, and the answer's shape ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - 1800),
        ("24h", NOW - 86400),
        ("1d", NOW - 86400),
        ("7d", NOW - 7 * 86400),
        ("2w", NOW - 14 * 86400),
        ("90s", NOW - 90),
        ("2024-04-30", datetime(2024, 4, 30, tzinfo=UTC).timestamp()),
        ("2024-04-30T08:00:00", datetime(2024, 4, 30, 8, tzinfo=UTC).timestamp()),
        ("2024-04-30T08:00:00Z", datetime(2024, 4, 30, 8, tzinfo=UTC).timestamp()),
        ("2024-04-30T10:00:00+02:00", datetime(2024, 4, 30, 8, tzinfo=UTC).timestamp()),
        ("99999999d", 0.0),
        ("1960-01-01", 0.0),
    ],
)
def test_since_is_a_duration_back_from_now_or_an_iso_date(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize(
    "text", ["", "7", "d", "-1d", "1y", "1.5h", "7 days", "yesterday", "2024-13-01"]
)
def test_anything_else_is_refused_with_what_is_understood(text: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_since(text, NOW)
    assert "30m, 24h, 7d" in refused.value.message and "ISO date" in refused.value.message


def test_the_report_is_per_user_per_model_per_utc_day() -> None:
    midnight = int(datetime(2024, 5, 1, tzinfo=UTC).timestamp() // 3600)
    rows = [
        UsageRow(midnight - 2, "alice", "echo", 1, 10, 20),  # 2024-04-30, 22:00
        UsageRow(midnight - 1, "alice", "big", 2, 1, 2),
        UsageRow(midnight + 10, "alice", "echo", 3, 30, 60),  # 2024-05-01, 10:00
        UsageRow(midnight + 10, "bob", "echo", 1, 5, 5),
        UsageRow(midnight - 30, "carol", "echo", 9, 9, 9),  # before since: left out
    ]
    report = usage_report(rows, midnight - 2, NOW)
    assert report == {
        "since": "2024-04-30T22:00:00Z",
        "until": "2024-05-01T10:42:17Z",
        "users": {
            "alice": {
                "requests": 6,
                "prompt_tokens": 41,
                "completion_tokens": 82,
                "by_model": {
                    "echo": {"requests": 4, "prompt_tokens": 40, "completion_tokens": 80},
                    "big": {"requests": 2, "prompt_tokens": 1, "completion_tokens": 2},
                },
                "by_day": {
                    "2024-04-30": {"requests": 3, "prompt_tokens": 11, "completion_tokens": 22},
                    "2024-05-01": {"requests": 3, "prompt_tokens": 30, "completion_tokens": 60},
                },
            },
            "bob": {
                "requests": 1,
                "prompt_tokens": 5,
                "completion_tokens": 5,
                "by_model": {"echo": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 5}},
                "by_day": {
                    "2024-05-01": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 5}
                },
            },
        },
    }


# -- the keeper: a write each second, one more at the stop ---------------------------------------


def book(*names: str) -> UsageBook:
    return UsageBook(
        CollectorRegistry(), parse_config({"users": {name: {} for name in names}}).users
    )


async def test_finished_requests_reach_the_store_and_the_last_at_the_stop(
    state_dir: Path,
) -> None:
    # The real writer, its worker thread and the real clock; how soon the keeper writes is
    # the next test's, on the keeper's own clock.
    store = StateStore(state_dir)
    usage = book("alice")
    writer = StoreWriter(store)
    keeper = UsageKeeper(usage, writer)
    hour = int(time.time() // 3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        usage.finished(alice(), "echo", 200, (3, 5))
        usage.finished(alice(), "echo", 200, (3, 5))
        usage.finished(User(key="addr:x"), "echo", 429, None)
        # Nothing is written from the request's side (no keeper runs yet).
        assert store.usage(0) == []
        await nursery.start(keeper.run)
        with trio.fail_after(10):  # bounded, not timed: a busy machine may be slow
            while not (rows := await trio.to_thread.run_sync(store.usage, 0)):
                await trio.sleep(0.02)
        # (An hour may have turned between the two requests: summed over hours.)
        assert _sum(rows, "alice") == (2, 6, 10)
        assert _sum(rows, "anonymous") == (1, 0, 0)
        assert {row.hour for row in rows} <= {hour, hour + 1}

        usage.finished(alice(), "other", 200, (1, 1))
        nursery.cancel_scope.cancel()  # a clean stop: the keeper writes once more
    writer.close()
    rows = await trio.to_thread.run_sync(store.usage, 0)
    assert _sum(rows, "alice") == (3, 7, 11)


class ClockedStore:
    """A store that notes when each batch came, on trio's clock, and how many requests it
    held."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, int]] = []

    def add_usage(self, rows: list[UsageRow]) -> None:
        self.writes.append((trio.current_time(), sum(row.requests for row in rows)))


class InlineWriter:
    """``StoreWriter.call`` without its worker thread, so that ``autojump_clock`` jumps only
    when the keeper waits for its next round."""

    def __init__(self, store: ClockedStore) -> None:
        self.store = store

    async def call(self, fn: Callable[[], Any]) -> Any:
        await trio.lowlevel.checkpoint()
        return fn()


async def test_the_keeper_writes_each_request_within_flush_interval_of_its_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # What a crash can lose: what finished since the last write. On the keeper's own clock,
    # every request is in a write at most FLUSH_INTERVAL after it finished, and a clean stop
    # writes what is left.
    usage = book("alice")
    store = ClockedStore()
    keeper = UsageKeeper(usage, cast(StoreWriter, InlineWriter(store)))
    ends: list[float] = []
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(keeper.run)
        for at in (0.0, 0.1, 0.5, 0.999, 1.0, 1.001, 1.7, 3.25, 3.3, 6.9):
            await trio.sleep_until(start + at)
            usage.finished(alice(), "echo", 200, (1, 1))
            ends.append(trio.current_time())
        await trio.sleep(2 * FLUSH_INTERVAL)
        assert sum(count for _, count in store.writes) == len(ends)
        # One more, and the stop at once: the last write has it.
        usage.finished(alice(), "echo", 200, (1, 1))
        ends.append(trio.current_time())
        nursery.cancel_scope.cancel()
    assert sum(count for _, count in store.writes) == len(ends)
    written = [when for when, count in store.writes for _ in range(count)]
    late = [(end, when) for end, when in zip(ends, written, strict=True) if when - end > 1.0]
    assert not late, late
    assert FLUSH_INTERVAL <= 1.0  # the "at most 1 s lost"
    # No write without something to write: one per round that had something.
    assert all(count > 0 for _, count in store.writes)


async def test_a_write_that_fails_keeps_its_rows_for_the_next(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(state_dir)
    usage = book("alice")
    keeper = UsageKeeper(usage, StoreWriter(store))
    real = store.add_usage
    failures = [sqlite3.OperationalError("disk I/O error")]

    def flaky(rows: list[UsageRow]) -> None:
        if failures:
            raise failures.pop()
        real(rows)

    store.add_usage = flaky  # type: ignore[method-assign]
    usage.finished(alice(), "echo", 200, (3, 5))
    await keeper.flush()
    assert "writing usage to the state store failed" in caplog.text
    usage.finished(alice(), "echo", 200, (3, 5))
    await keeper.flush()
    assert _sum(store.usage(0), "alice") == (2, 6, 10)


async def test_todays_totals_from_the_store_count_against_the_day_budget(
    state_dir: Path,
) -> None:
    store = StateStore(state_dir)
    now = time.time()
    today = int(now // 86400) * 24
    store.add_usage(
        [
            UsageRow(today, "alice", "echo", 1, 40, 50),
            UsageRow(int(now // 3600), "alice", "big", 1, 5, 5),
            UsageRow(today - 1, "alice", "echo", 1, 1000, 1000),  # yesterday
        ]
    )
    users = parse_config({"users": {"alice": {"max_tokens_per_day": 200}}}).users
    usage = UsageBook(CollectorRegistry(), users)
    await UsageKeeper(usage, StoreWriter(store)).load()
    budget = usage.budgets.get("alice")
    assert budget is not None
    assert budget.used(time.time())[2] == 100


def test_a_request_of_a_user_a_reload_removed_counts_under_its_name() -> None:
    users = parse_config({"users": {"alice": {"max_tokens_per_day": 100}, "bob": {}}}).users
    usage = UsageBook(CollectorRegistry(), users)
    usage.set_users(parse_config({"users": {"bob": {}}}).users)
    # Admitted before the reload, ended after it.
    usage.finished(alice(), "echo", 200, (30, 40))
    assert usage.totals["anonymous"].requests == 1  # since start: the removed user's go
    assert [(row.user, row.requests) for row in usage.take_pending()] == [("alice", 1)]
    usage.set_users(users)
    budget = usage.budgets.get("alice")
    assert budget is not None and budget.used(time.time())[2] == 70


def _sum(rows: list[UsageRow], user: str) -> tuple[int, int, int]:
    mine = [row for row in rows if row.user == user]
    return (
        sum(row.requests for row in mine),
        sum(row.prompt_tokens for row in mine),
        sum(row.completion_tokens for row in mine),
    )


# -- /admin/usage --------------------------------------------------------------------------------


def config_data(state_dir: Path, port: int = 0, **alice: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "state_dir": str(state_dir)},
        "supervisor": {"port_range": port_range(), "stop_grace": 2, "start_timeout": 20},
        "models": {"echo": {"cmd": echo_cmd()}, "other": {"cmd": echo_cmd()}},
        "users": {"alice": {"api_keys": [ALICE], **alice}, "bob": {"api_keys": [BOB]}},
    }


async def test_admin_usage_shows_the_stores_totals_per_user_model_and_day(
    state_dir: Path,
) -> None:
    # Earlier days, as an earlier daemon left them.
    week_ago = int(time.time() // 3600) - 6 * 24
    StateStore(state_dir).add_usage([UsageRow(week_ago, "alice", "echo", 4, 40, 40)])
    config = parse_config(config_data(state_dir), "t.toml")
    async with running_daemon(config) as (_, client):
        headers = {"authorization": f"Bearer {ALICE}"}
        for model in ("echo", "echo", "other"):
            answer = await client.post(CHAT, json=chat(model, max_tokens=5), headers=headers)
            assert answer.status_code == 200, answer.text
        bob = await client.post(CHAT, json=chat(max_tokens=5), headers={"x-api-key": BOB})
        assert bob.status_code == 200, bob.text

        # At most a second behind.
        with trio.fail_after(10):
            while "bob" not in (report := (await client.get("/admin/usage")).json())["users"]:
                await trio.sleep(0.05)
        assert set(report) == {"since", "until", "users"}
        for key in ("since", "until"):
            assert datetime.strptime(report[key], "%Y-%m-%dT%H:%M:%SZ")
        assert report["since"].endswith(":00:00Z")  # whole hours: the rows' precision
        mine = report["users"]["alice"]
        assert (mine["requests"], mine["prompt_tokens"], mine["completion_tokens"]) == (
            3,
            9,
            15,
        )
        assert mine["by_model"] == {
            "echo": {"requests": 2, "prompt_tokens": 6, "completion_tokens": 10},
            "other": {"requests": 1, "prompt_tokens": 3, "completion_tokens": 5},
        }
        assert sum(day["requests"] for day in mine["by_day"].values()) == 3
        assert report["users"]["bob"]["requests"] == 1

        week = (await client.get("/admin/usage", params={"since": "7d"})).json()
        assert week["users"]["alice"]["requests"] == 7
        assert week["users"]["alice"]["by_model"]["echo"]["requests"] == 6
        assert len(week["users"]["alice"]["by_day"]) >= 2
        recent = (await client.get("/admin/usage", params={"since": "30m"})).json()
        assert recent["users"]["alice"]["requests"] == 3
        date = (await client.get("/admin/usage", params={"since": "2000-01-01"})).json()
        assert date["since"] == "2000-01-01T00:00:00Z"
        assert date["users"]["alice"]["requests"] == 7

        for bad in ("soon", "7x", ""):
            refused = await client.get("/admin/usage", params={"since": bad})
            error = assert_openai_error(refused, 400, "invalid_request")
            assert "since" in error["message"]


async def test_a_user_a_reload_adds_is_counted_what_its_name_spent_today(
    state_dir: Path, tmp_path: Path
) -> None:
    # carol is in the store (an earlier daemon's config had her) but not in this config;
    # alice is removed by one reload and added again by another. Neither starts a new day.
    today = int(time.time() // 86400) * 24  # the day's first hour
    StateStore(state_dir).add_usage([UsageRow(today, "carol", "echo", 2, 2 * 3, 2 * 5)])
    data = config_data(state_dir)
    path = write_toml(tmp_path / "c.toml", data)

    async def reload() -> None:
        write_toml(path, data)
        response = await client.post("/admin/reload")
        assert response.status_code == 200, response.text

    alice_headers = {"authorization": f"Bearer {ALICE}"}
    async with running_daemon(load_config(path), admin=True) as (_, client):
        answer = await client.post(CHAT, json=chat(max_tokens=5), headers=alice_headers)
        assert answer.status_code == 200, answer.text
        with trio.fail_after(10):
            while (await client.get("/admin/status")).json()["users"]["alice"]["requests"] < 1:
                await trio.sleep(0.01)

        del data["users"]["alice"]
        data["users"]["carol"] = {"api_keys": [CAROL], "max_tokens_per_day": 2 * COST}
        await reload()
        users = (await client.get("/admin/status")).json()["users"]
        assert users["carol"]["remaining"] == {"tokens_per_day": 0}
        refused = await client.post(
            CHAT, json=chat(max_tokens=5), headers={"authorization": f"Bearer {CAROL}"}
        )
        assert_openai_error(refused, 429, "rate_limited")
        assert "max_tokens_per_day" in refused.json()["error"]["message"]

        data["users"]["alice"] = {"api_keys": [ALICE], "max_tokens_per_day": COST}
        await reload()
        users = (await client.get("/admin/status")).json()["users"]
        assert users["alice"]["remaining"] == {"tokens_per_day": 0}
        refused = await client.post(CHAT, json=chat(max_tokens=5), headers=alice_headers)
        assert_openai_error(refused, 429, "rate_limited")
        assert "max_tokens_per_day" in refused.json()["error"]["message"]


# -- a daemon SIGKILLed and started again --------------------------------------------------------


def test_a_daemon_sigkilled_and_restarted_keeps_the_days_totals_and_budget(
    tmp_path: Path, state_dir: Path, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    port = free_port()
    config = write_toml(
        tmp_path / "c.toml", config_data(state_dir, port, max_tokens_per_day=3 * COST)
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {ALICE}"}
    daemon = spawn_daemon(config, url)
    for _ in range(3):
        answer = daemon.http.post(CHAT, json=chat(max_tokens=5), headers=headers)
        assert answer.status_code == 200, answer.text
    refused = daemon.http.post(CHAT, json=chat(max_tokens=5), headers=headers)
    assert refused.status_code == 429 and "max_tokens_per_day" in refused.text
    # In the store (the keeper writes each FLUSH_INTERVAL: bounded here, not timed); then
    # the daemon dies without a word.
    deadline = time.monotonic() + 10
    while _stored_requests(daemon, "alice") < 3:
        assert time.monotonic() < deadline, "the requests never reached the store"
        time.sleep(0.05)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)

    again = spawn_daemon(config, url)
    # /admin/status counts since this daemon started; the store, since the day began.
    assert again.status()["users"]["alice"]["requests"] == 0
    report = again.http.get("/admin/usage", params={"since": "1d"}).json()
    mine = report["users"]["alice"]
    assert (mine["requests"], mine["prompt_tokens"], mine["completion_tokens"]) == (3, 9, 15)
    # The day's budget is still spent: a restart is no new day.
    refused = again.http.post(CHAT, json=chat(max_tokens=5), headers=headers)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited"
    assert "max_tokens_per_day" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    # Bob, with no budget, is served.
    served = again.http.post(CHAT, json=chat(max_tokens=5), headers={"x-api-key": BOB})
    assert served.status_code == 200, served.text


def _stored_requests(daemon: DaemonProcess, user: str) -> int:
    """``user``'s requests today in the state store, as ``/admin/usage`` shows them."""
    users = daemon.http.get("/admin/usage", params={"since": "1d"}).json()["users"]
    return int(users.get(user, {}).get("requests", 0))
