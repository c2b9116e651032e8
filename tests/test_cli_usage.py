"""``trioserve users --since``: per-user totals over a span, from the state store
(``GET /admin/usage``), so they survive a restart; against a real daemon, in a thread of the
test's process (a subprocess for the restart)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cli import error_line, invoke
from tests.support.config import echo_cmd, write_toml
from tests.support.daemon import DaemonHandle
from tests.support.http import chat
from tests.support.ports import free_port, port_range

ALICE = "sk-alice"
BOB = "sk-bob"
HEADER = ["USER", "REQUESTS", "PROMPT-TOKENS", "COMPLETION-TOKENS"]
TOTALS = ["requests", "prompt_tokens", "completion_tokens"]


class Users:
    """A daemon with users alice and bob and one echo model, restartable on its config;
    started by ``start`` (``threaded_daemon`` or ``spawn_daemon``)."""

    def __init__(self, directory: Path, start: Callable[[Path, str], DaemonHandle]) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.start = start
        self.config = write_toml(
            directory / "users.toml",
            {
                "server": {"host": "127.0.0.1", "port": port, "state_dir": str(directory / "s")},
                "supervisor": {"port_range": port_range(), "stop_grace": 2},
                "models": {"echo": {"cmd": echo_cmd()}},
                "users": {"alice": {"api_keys": [ALICE]}, "bob": {"api_keys": [BOB]}},
            },
        )
        self.proc = start(self.config, self.url)

    def restart(self) -> None:
        self.proc.stop()
        self.proc = self.start(self.config, self.url)

    def chat(self, key: str, text: str) -> None:
        response = httpx.post(
            f"{self.url}/v1/chat/completions",
            json=chat(text=text),
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
            trust_env=False,
        )
        assert response.status_code == 200, response.text

    def usage(self, since: str = "1d") -> dict[str, Any]:
        response = httpx.get(
            f"{self.url}/admin/usage", params={"since": since}, timeout=10, trust_env=False
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def wait_for_requests(self, user: str, count: int, timeout: float = 10) -> dict[str, Any]:
        """The usage once ``user`` has ``count`` requests in the store (at most 1 s behind)."""
        # Polling is the honest tool here: another process or thread, with no ready signal to us.
        deadline = time.monotonic() + timeout
        while True:
            usage = self.usage()
            if usage["users"].get(user, {}).get("requests") == count:
                return usage
            assert time.monotonic() < deadline, usage
            time.sleep(0.05)


def rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == HEADER)
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1 :]}


@pytest.fixture
def users(short_dir: Path, threaded_daemon: Any) -> Users:
    return Users(short_dir, threaded_daemon)


def test_users_since_shows_the_totals_the_store_kept_across_a_restart(
    short_dir: Path, spawn_daemon: Any
) -> None:
    # A restart of the daemon process, as in use.
    users = Users(short_dir, spawn_daemon)
    users.chat(ALICE, "one two three")
    users.chat(ALICE, "four")
    users.chat(BOB, "five")
    users.wait_for_requests("alice", 2)
    users.restart()
    # Since this start: nobody yet. Over the last day: what the store kept.
    now = invoke(["users", "--url", users.url])
    [alice] = [line.split() for line in now.stdout.splitlines() if line.startswith("alice ")]
    assert alice[3] == "0", now.output  # REQUESTS since the daemon started
    result = invoke(["users", "--since", "1d", "--url", users.url])
    assert result.exit_code == 0, result.output
    first, *_ = result.stdout.splitlines()
    usage = users.usage()
    assert first == f"usage from {usage['since']} to " + first.rsplit(" ", 1)[-1]
    table = rows(result.stdout)
    assert list(table) == ["alice", "bob"]
    for name, row in table.items():
        assert row == [str(usage["users"][name][key]) for key in TOTALS], (name, row)
    assert table["alice"][0] == "2" and table["bob"][0] == "1"
    assert int(table["alice"][1]) > int(table["bob"][1]) > 0


def test_users_since_json_is_the_usage_report(users: Users) -> None:
    users.chat(BOB, "hello")
    users.wait_for_requests("bob", 1)
    result = invoke(["users", "--since", "24h", "--json"], TRIOSERVE_URL=users.url)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert set(answer) == {"since", "until", "users"}
    assert answer["users"] == users.usage("24h")["users"]
    assert set(answer["users"]["bob"]) == {*TOTALS, "by_model", "by_day"}
    assert answer["users"]["bob"]["by_model"]["echo"]["requests"] == 1


def test_users_since_of_nonsense_is_the_daemons_one_line(users: Users) -> None:
    result = invoke(["users", "--since", "last tuesday", "--url", users.url])
    assert result.exit_code == 1
    assert error_line(result) == (
        "trioserve: since: 'last tuesday' is neither a duration (30m, 24h, 7d) nor an ISO date "
        "or datetime (2024-05-01, 2024-05-01T12:00:00Z)"
    )


def test_users_since_through_the_admin_socket(users: Users) -> None:
    users.chat(ALICE, "x")
    users.wait_for_requests("alice", 1)
    result = invoke(["users", "--since", "7d"], TRIOSERVE_CONFIG=str(users.config))
    assert result.exit_code == 0, result.output
    assert rows(result.stdout)["alice"][0] == "1"
