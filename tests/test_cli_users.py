"""``trioserve users`` and the users section of ``trioserve status``, through typer's CliRunner
against a real daemon in a thread of the test's process (and once through the installed
console script, against a daemon subprocess)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cli import error_line, invoke, run_trioserve
from tests.support.config import echo_cmd, write_toml
from tests.support.daemon import DaemonHandle
from tests.support.http import chat, raw_address, raw_post
from tests.support.ports import free_port, port_range

ALICE = "sk-alice"
BOB = "sk-bob"
HEADER = ["USER", "IN-FLIGHT", "QUEUED", "REQUESTS", "PROMPT-TOKENS", "COMPLETION-TOKENS"]
STATUS_KEYS = ["in_flight", "queued", "requests", "prompt_tokens", "completion_tokens"]


def users_daemon(
    tmp_path: Path,
    start: Callable[[Path, str], DaemonHandle],
    *echo_options: str,
    server: dict[str, Any] | None = None,
    **model: Any,
) -> DaemonHandle:
    """A daemon with users alice and bob and one ``echo`` model, started by ``start``
    (``threaded_daemon`` or ``spawn_daemon``)."""
    port = free_port()
    config = write_toml(
        tmp_path / "users.toml",
        {
            "server": {
                "host": "127.0.0.1",
                "port": port,
                "state_dir": str(tmp_path / "state"),
                **(server or {}),
            },
            "supervisor": {"port_range": port_range(), "stop_grace": 2, "start_timeout": 20},
            "models": {"echo": {"cmd": echo_cmd(*echo_options), **model}},
            "users": {"alice": {"api_keys": [ALICE]}, "bob": {"api_keys": [BOB], "weight": 2}},
        },
    )
    return start(config, f"http://127.0.0.1:{port}")


def post(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    """The rows of the users table in ``lines`` (from its header on), by user name."""
    start = next(i for i, line in enumerate(lines) if line.split() == HEADER)
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1 :]}


def expected_row(entry: dict[str, int]) -> list[str]:
    return [str(entry[key]) for key in STATUS_KEYS]


@contextmanager
def waiting_requests(daemon: DaemonHandle, *keys: str) -> Iterator[None]:
    """One long streamed request per key, in this order, each on its own connection and left
    unanswered until the block ends: the first holds the model's one slot, the others queue.
    Then every connection is closed."""
    with ExitStack() as stack:
        for index, key in enumerate(keys):
            sock = stack.enter_context(socket.create_connection(raw_address(daemon.url)))
            sock.sendall(raw_post(chat(stream=True), f"Authorization: Bearer {key}".encode()))
            # Arrived before the next one is sent: connections race otherwise.
            daemon.wait_status(lambda status, count=index + 1: _waiting(status) == count)
        yield


def _waiting(status: dict[str, Any]) -> int:
    echo: dict[str, int] = status["models"]["echo"]
    return echo["in_flight"] + echo["queued"]


# -- users ---------------------------------------------------------------------------------------


def test_users_shows_requests_and_tokens_per_user(tmp_path: Path, threaded_daemon: Any) -> None:
    daemon = users_daemon(tmp_path, threaded_daemon)
    usage = post(daemon.url, ALICE, chat(text="one two three"))["usage"]
    post(daemon.url, ALICE, chat(text="four"))
    result = invoke(["users", "--url", daemon.url])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == HEADER
    rows = table_rows(lines)
    assert list(rows) == ["alice", "bob", "anonymous"]
    users = daemon.status()["users"]
    for name, row in rows.items():
        assert row == expected_row(users[name]), (name, row)
    assert rows["alice"][2] == "2"
    assert int(rows["alice"][3]) > usage["prompt_tokens"] > 0
    assert rows["bob"] == ["0"] * 5


def test_users_shows_in_flight_and_queued_while_requests_wait(
    tmp_path: Path, threaded_daemon: Any
) -> None:
    daemon = users_daemon(
        tmp_path, threaded_daemon, "--tokens", "1000", "--token-delay", "0.02", max_concurrency=1
    )
    daemon.load("echo")
    with waiting_requests(daemon, ALICE, ALICE, BOB, BOB, BOB):
        result = invoke(["users", "--url", daemon.url])
        assert result.exit_code == 0, result.output
        rows = table_rows(result.stdout.splitlines())
        assert rows["alice"][:2] == ["1", "1"]
        assert rows["bob"][:2] == ["0", "3"]
        assert rows["anonymous"][:2] == ["0", "0"]
    daemon.wait_status(lambda status: status["models"]["echo"]["in_flight"] == 0)


def test_users_json_is_the_users_of_admin_status(tmp_path: Path, threaded_daemon: Any) -> None:
    daemon = users_daemon(tmp_path, threaded_daemon)
    post(daemon.url, BOB, chat())
    result = invoke(["users", "--json", "--url", daemon.url])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer == daemon.status()["users"]
    assert set(answer) == {"alice", "bob", "anonymous"}
    assert answer["bob"]["requests"] == 1
    assert all(set(entry) == set(STATUS_KEYS) for entry in answer.values())


def test_users_uses_trioserve_url(tmp_path: Path, threaded_daemon: Any) -> None:
    daemon = users_daemon(tmp_path, threaded_daemon)
    result = invoke(["users", "--json"], TRIOSERVE_URL=daemon.url)
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"alice", "bob", "anonymous"}


def test_users_needs_the_admin_key_when_one_is_configured(
    tmp_path: Path, threaded_daemon: Any
) -> None:
    daemon = users_daemon(tmp_path, threaded_daemon, server={"admin_keys": ["admin-key"]})
    refused = invoke(["users", "--url", daemon.url])
    assert refused.exit_code == 1
    assert error_line(refused) == (
        "trioserve: GET /admin/status needs admin: pass --api-key with an admin key, or --config "
        f"with the config of the daemon at {daemon.url} so that its admin socket or local admin "
        "token can be used"
    )
    # A user's key is for /v1/*, not for the admin API.
    assert invoke(["users", "--url", daemon.url, "--api-key", ALICE]).exit_code == 1
    assert invoke(["users", "--url", daemon.url, "--api-key", "admin-key"]).exit_code == 0
    assert invoke(["users", "--url", daemon.url], TRIOSERVE_API_KEY="admin-key").exit_code == 0


def test_users_without_daemon_fails_with_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = invoke(["users", "--url", url])
    assert result.exit_code == 1, result.output
    assert result.stderr == f"trioserve: no daemon answers at {url}\n"


def test_users_of_a_server_that_is_not_trioserve(tmp_path: Path, threaded_daemon: Any) -> None:
    daemon = users_daemon(tmp_path, threaded_daemon)
    port = daemon.load("echo")["port"]
    result = invoke(["users", "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert error_line(result) == (
        f"trioserve: GET http://127.0.0.1:{port}/admin/status: No route for /admin/status. "
        "(is this a trioserve daemon?)"
    )


def test_users_help() -> None:
    result = invoke(["users", "--help"])
    assert result.exit_code == 0, result.output
    assert "--json" in result.stdout and "--api-key" in result.stdout


@pytest.mark.slow
def test_users_through_the_console_script(tmp_path: Path, spawn_daemon: Any) -> None:
    daemon = users_daemon(tmp_path, spawn_daemon)
    post(daemon.url, ALICE, chat())
    result = run_trioserve("users", "--url", daemon.url)
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout.splitlines())
    assert rows["alice"] == expected_row(daemon.status()["users"]["alice"])


# -- status --------------------------------------------------------------------------------------


def test_status_shows_the_users_table_after_the_models_table(
    tmp_path: Path, threaded_daemon: Any
) -> None:
    daemon = users_daemon(tmp_path, threaded_daemon)
    post(daemon.url, BOB, chat())
    result = invoke(["status", "--url", daemon.url])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split()[0] == "MODEL"
    assert lines[2].split()[:2] == ["echo", "ready"]
    assert lines[3].split() == HEADER
    rows = table_rows(lines)
    users = daemon.status()["users"]
    assert rows == {name: expected_row(entry) for name, entry in users.items()}
    assert rows["bob"][2] == "1"


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_status_users_shows_only_the_users(
    tmp_path: Path, threaded_daemon: Any, as_json: bool
) -> None:
    daemon = users_daemon(tmp_path, threaded_daemon)
    post(daemon.url, ALICE, chat())
    result = invoke(["status", "--users", "--url", daemon.url, *(["--json"] if as_json else [])])
    assert result.exit_code == 0, result.output
    users = daemon.status()["users"]
    if as_json:
        assert json.loads(result.stdout) == users
        return
    lines = result.stdout.splitlines()
    assert lines[0].split() == HEADER
    assert table_rows(lines) == {name: expected_row(entry) for name, entry in users.items()}
