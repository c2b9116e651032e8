"""``trioserve ui [--open]``: the status page's address, with the local admin token in its
fragment when this account can read it and the address is the one the state folder's running
daemon recorded. Against a real daemon: in a thread of the test's process, a subprocess where
it stops or the console script runs."""

from __future__ import annotations

import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.admin import admin_token
from tests.support.cli import invoke, run_trioserve
from tests.support.config import echo_cmd, write_config
from tests.support.daemon import DaemonHandle
from tests.support.ports import free_port, port_range


class Setup:
    def __init__(
        self, directory: Path, start: Callable[[Path, str], DaemonHandle], **server: Any
    ) -> None:
        self.state_dir = directory / "s"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.config = write_config(
            directory / "c.toml",
            self.state_dir,
            port,
            {"echo": {"cmd": echo_cmd()}},
            server=server,
            supervisor={"port_range": port_range()},
        )
        self.proc = start(self.config, self.url)

    def ui(self, *args: str) -> Any:
        return invoke(["ui", *args], TRIOSERVE_CONFIG=str(self.config))


@pytest.fixture
def setup(short_dir: Path, threaded_daemon: Any) -> Setup:
    return Setup(short_dir, threaded_daemon)


def test_ui_prints_the_page_with_the_token_that_makes_its_reader_admin(setup: Setup) -> None:
    result = setup.ui()
    assert result.exit_code == 0, result.output
    token = admin_token(setup.state_dir)
    assert result.stdout == f"{setup.url}/ui#token={token}\n"
    # What the page does with it: an admin write over TCP.
    page, _, fragment = result.stdout.strip().partition("#token=")
    assert httpx.get(page, timeout=10, trust_env=False).status_code == 200
    loaded = httpx.post(
        f"{setup.url}/admin/models/echo/load",
        headers={"authorization": f"Bearer {fragment}"},
        timeout=30,
        trust_env=False,
    )
    assert loaded.status_code == 200, loaded.text


def test_ui_without_a_readable_token_prints_the_plain_page(setup: Setup) -> None:
    (setup.state_dir / "admin.token").rename(setup.state_dir / "hidden.token")
    result = setup.ui()
    assert (result.exit_code, result.stdout) == (0, f"{setup.url}/ui\n")


def test_ui_puts_the_token_only_into_its_own_daemons_address(setup: Setup) -> None:
    token = admin_token(setup.state_dir)
    same = setup.ui("--url", setup.url + "/")
    assert same.stdout == f"{setup.url}/ui#token={token}\n"
    other = f"http://127.0.0.1:{free_port()}"
    result = setup.ui("--url", other)
    assert (result.exit_code, result.stdout) == (0, f"{other}/ui\n")
    # No config naming this daemon: its token is not looked for.
    result = invoke(["ui", "--url", setup.url])
    assert result.stdout == f"{setup.url}/ui\n"


def test_ui_puts_no_token_into_the_configs_address_while_no_daemon_runs(
    short_dir: Path, spawn_daemon: Any
) -> None:
    setup = Setup(short_dir, spawn_daemon)
    # Stopped, its token file left behind: whoever listens on the port next is not this daemon.
    setup.proc.stop()
    assert (setup.state_dir / "admin.token").exists()
    result = setup.ui()
    assert (result.exit_code, result.stdout) == (0, f"{setup.url}/ui\n")
    assert setup.ui("--url", setup.url).stdout == f"{setup.url}/ui\n"


def test_ui_with_admin_keys_carries_no_token(short_dir: Path, threaded_daemon: Any) -> None:
    # The token is no key then; the page asks for one itself.
    setup = Setup(short_dir, threaded_daemon, admin_keys=["adm-1"])
    assert setup.ui().stdout == f"{setup.url}/ui\n"


def test_ui_open_opens_the_printed_address(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    def fake_open(url: str) -> bool:
        opened.append(url)
        return True

    monkeypatch.setattr(webbrowser, "open", fake_open)
    result = setup.ui("--open")
    assert result.exit_code == 0, result.output
    assert opened == [result.stdout.strip()]
    assert "#token=" in opened[0]

    monkeypatch.setattr(webbrowser, "open", lambda url: False)
    result = setup.ui("--open")
    assert result.exit_code == 1
    assert result.stdout.startswith(f"{setup.url}/ui#token=")
    assert result.stderr == (
        "trioserve: no web browser could be started here: open the address above in one\n"
    )


@pytest.mark.slow
def test_ui_through_the_console_script(short_dir: Path, spawn_daemon: Any) -> None:
    setup = Setup(short_dir, spawn_daemon)
    result = run_trioserve("ui", "--config", str(setup.config))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{setup.url}/ui#token={admin_token(setup.state_dir)}\n"
