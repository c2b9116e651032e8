"""The status page in a real browser: headless Chromium (Debian's) driven by Playwright, against
a daemon in its own process."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from playwright.sync_api import Browser, Page, expect

from tests.support.admin import admin_token
from tests.support.browser import chromium
from tests.support.cli import invoke
from tests.support.config import NO_MCP, daemon_config, echo_cmd, script_cmd
from tests.support.daemon import DaemonProcess
from tests.support.mcp import mcp_session

HOSTILE = "<img src=x onerror=alert(1)>"
ADMIN_KEY = "sk-admin-page"
# A model that prints a hostile line and dies before it is healthy.
BROKEN = script_cmd(
    f"print({HOSTILE!r}, flush=True); raise SystemExit('CUDA error: out of memory')"
)
LIVE_WITHIN_MS = 1000
KEY_STORAGE = "trioserve.adminKey"


class Daemon:
    """One daemon subprocess for a test, its config and a client for "another client" (an
    admin: the admin key when ``admin_keys`` is set, else the local admin token)."""

    def __init__(
        self,
        tmp_path: Path,
        spawn: Callable[..., DaemonProcess],
        *,
        mcp: bool = False,
        **server: Any,
    ) -> None:
        models = {
            "echo": {"cmd": echo_cmd("--token-delay", "0.05")},
            "broken": {"cmd": BROKEN},
        }
        self.state_dir = tmp_path / "state"
        self.config, self.url = daemon_config(
            tmp_path / "trioserve.toml",
            self.state_dir,
            models,
            server=server,
            supervisor={"max_start_failures": 1, "failure_cooldown": 60},
            mcp={"enabled": True} if mcp else NO_MCP,
        )
        self._spawn = spawn
        self._keyed = bool(server.get("admin_keys"))
        self.process = spawn(self.config, self.url)

    @property
    def token(self) -> str:
        """The local admin token of the running daemon (new at each start)."""
        return admin_token(self.state_dir)

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN_KEY if self._keyed else self.token}"}

    def admin_url(self) -> str:
        """The page's address as ``trioserve ui`` prints it to this account, which can read
        the token."""
        result = invoke(["ui", "--config", str(self.config)])
        assert result.exit_code == 0, result.output
        url = result.stdout.strip()
        assert url == f"{self.url}/ui#token={self.token}"
        return url

    def restart(self) -> None:
        self.process.stop()
        self.process = self._spawn(self.config, self.url)

    def post(self, path: str) -> httpx.Response:
        return self.process.http.post(path, headers=self.headers)

    def state(self, model: str) -> str:
        status = self.process.http.get("/admin/status", headers=self.headers)
        state: str = status.json()["models"][model]["state"]
        return state


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A headless Chromium for this test (here, not in conftest.py: the other tests never
    import Playwright)."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def daemon(tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess]) -> Daemon:
    return Daemon(tmp_path, spawn_daemon)


class Watched:
    """A page, with what it printed to the console and any dialog it opened."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context()
    try:
        yield Watched(context.new_page())
    finally:
        context.close()


def open_page(watched: Watched, daemon: Daemon, *, admin: bool = False) -> Page:
    """The page, live: read-only, or ``admin`` through ``trioserve ui``'s URL."""
    page = watched.page
    page.goto(daemon.admin_url() if admin else daemon.url + "/")  # "/": redirected to /ui
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    access = "admin" if admin else "read-only"
    expect(page.locator("body")).to_have_attribute("data-access", access)
    return page


def row(page: Page, model: str) -> Any:
    return page.locator(f'#models tr[data-model="{model}"]')


def test_table_at_load_shows_every_model(daemon: Daemon, watched: Watched) -> None:
    assert daemon.post("/admin/models/broken/load").status_code in (502, 503)
    page = open_page(watched, daemon)
    assert page.url.endswith("/ui")
    expect(row(page, "echo")).to_have_attribute("data-state", "stopped")
    expect(row(page, "broken")).to_have_attribute("data-state", "failed")
    expect(row(page, "broken").locator("td.state")).to_have_text("failed")
    expect(row(page, "broken").locator("td.last-error pre")).to_contain_text("out of memory")
    expect(page.locator('#users tr[data-user="anonymous"]')).to_have_count(1)
    expect(page.locator("#mcp")).to_be_hidden()  # this daemon runs no MCP endpoint
    # The strict policy let the page's own files run: no violation, no error.
    assert watched.errors == []


def test_states_changed_by_another_client_show_within_a_second(
    daemon: Daemon, watched: Watched
) -> None:
    page = open_page(watched, daemon)
    echo = row(page, "echo")
    assert daemon.post("/admin/models/echo/load").status_code == 200
    expect(echo).to_have_attribute("data-state", "ready", timeout=LIVE_WITHIN_MS)
    expect(echo.locator("td.pid")).not_to_have_text("", timeout=LIVE_WITHIN_MS)
    assert daemon.post("/admin/models/echo/unload").status_code == 200
    expect(echo).to_have_attribute("data-state", "stopped", timeout=LIVE_WITHIN_MS)


def test_load_unload_and_force_buttons(daemon: Daemon, watched: Watched) -> None:
    page = open_page(watched, daemon, admin=True)
    echo = row(page, "echo")
    echo.get_by_role("button", name="Load", exact=True).click()
    expect(echo).to_have_attribute("data-state", "ready")
    assert daemon.state("echo") == "ready"
    echo.get_by_role("button", name="Unload", exact=True).click()
    expect(echo).to_have_attribute("data-state", "stopped")
    assert daemon.state("echo") == "stopped"
    echo.get_by_role("button", name="Load", exact=True).click()
    expect(echo).to_have_attribute("data-state", "ready")
    echo.get_by_role("button", name="Force", exact=True).click()
    expect(echo).to_have_attribute("data-state", "stopped")
    assert daemon.state("echo") == "stopped"
    # A failing load says why, as the admin API does.
    row(page, "broken").get_by_role("button", name="Load", exact=True).click()
    expect(page.locator("#notice")).to_contain_text("broken: ")
    expect(page.locator("#notice")).to_have_attribute("data-kind", "error")


def test_page_opened_with_the_local_admin_token_can_unload(
    daemon: Daemon, watched: Watched
) -> None:
    assert daemon.post("/admin/models/echo/load").status_code == 200
    token = daemon.token
    sent: list[tuple[str, str, str]] = []
    watched.page.on(
        "request",
        lambda r: sent.append((r.method, r.url, r.headers.get("authorization", ""))),
    )
    page = open_page(watched, daemon, admin=True)
    # Out of the address bar (and so of bookmarks, history and screenshots) at once; kept in
    # this tab's sessionStorage only.
    assert page.evaluate("location.href") == daemon.url + "/ui"
    assert page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") == token
    assert page.evaluate(f"localStorage.getItem('{KEY_STORAGE}')") is None
    expect(page.locator("#read-only")).to_be_hidden()

    row(page, "echo").get_by_role("button", name="Unload", exact=True).click()
    expect(row(page, "echo")).to_have_attribute("data-state", "stopped")
    assert daemon.state("echo") == "stopped"
    unload = daemon.url + "/admin/models/echo/unload"
    assert ("POST", unload, f"Bearer {token}") in sent
    assert watched.errors == []


def test_page_without_the_token_is_read_only(daemon: Daemon, watched: Watched) -> None:
    assert daemon.post("/admin/models/echo/load").status_code == 200
    methods: list[str] = []
    watched.page.on("request", lambda r: methods.append(r.method))
    page = open_page(watched, daemon)
    echo = row(page, "echo")
    expect(echo).to_have_attribute("data-state", "ready")
    # No buttons that would be refused; a note says how to get write access instead, and no
    # key is asked for.
    assert echo.locator("td.actions button").count() == 4
    expect(echo.locator("td.actions")).to_be_hidden()
    expect(page.locator("#models th.actions")).to_be_hidden()
    note = page.locator("#read-only")
    expect(note).to_be_visible()
    expect(note).to_contain_text("trioserve ui --open")
    expect(page.locator("#read-only-changed")).to_be_hidden()
    expect(page.locator("#key-form")).to_be_hidden()
    # Still live: a state changed by an admin elsewhere shows.
    assert daemon.post("/admin/models/echo/unload").status_code == 200
    expect(echo).to_have_attribute("data-state", "stopped", timeout=LIVE_WITHIN_MS)
    assert set(methods) == {"GET"}  # the page tried no write
    assert watched.errors == []  # nor anything refused
    assert watched.dialogs == []


def test_log_view_shows_a_hostile_line_as_text(daemon: Daemon, watched: Watched) -> None:
    daemon.post("/admin/models/broken/load")
    page = open_page(watched, daemon, admin=True)
    row(page, "broken").get_by_role("button", name="Logs", exact=True).click()
    logs = page.locator("#logs-text")
    expect(logs).to_contain_text(HOSTILE)
    expect(logs).to_contain_text("CUDA error: out of memory")
    # Shown as text: no element was made of it, here or in the error cell (which holds the
    # same output), and no script ran.
    assert page.locator("#logs img, #models img").count() == 0
    row(page, "broken").locator("td.last-error summary").click()
    expect(row(page, "broken").locator("td.last-error pre")).to_contain_text(HOSTILE)
    assert page.locator("img").count() == 0
    assert watched.dialogs == []


def test_log_view_follows_new_output(daemon: Daemon, watched: Watched) -> None:
    page = open_page(watched, daemon, admin=True)
    row(page, "broken").get_by_role("button", name="Logs", exact=True).click()
    expect(page.locator("#logs")).to_be_visible()
    daemon.post("/admin/models/broken/load")
    expect(page.locator("#logs-text")).to_contain_text("out of memory")


def test_admin_key_prompt_and_a_wrong_key(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess], watched: Watched
) -> None:
    daemon = Daemon(tmp_path, spawn_daemon, admin_keys=[ADMIN_KEY])
    page = watched.page
    urls: list[str] = []
    authorizations: list[str] = []

    def seen(request: Any) -> None:
        urls.append(request.url)
        authorizations.append(request.headers.get("authorization", ""))

    page.on("request", seen)
    page.goto(daemon.url + "/ui")
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "key")
    assert row(page, "echo").count() == 0

    page.fill("#key-input", "sk-wrong")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-error")).to_have_text("That key was refused.")
    expect(page.locator("#key-form")).to_be_visible()

    page.fill("#key-input", ADMIN_KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(row(page, "echo")).to_have_count(1)
    assert page.evaluate("sessionStorage.getItem('trioserve.adminKey')") == ADMIN_KEY
    assert f"Bearer {ADMIN_KEY}" in authorizations
    assert not [url for url in urls if ADMIN_KEY in url]  # never in a URL

    # The key works for the buttons too.
    row(page, "echo").get_by_role("button", name="Load", exact=True).click()
    expect(row(page, "echo")).to_have_attribute("data-state", "ready")


def test_reconnects_after_the_daemon_restarts(daemon: Daemon, watched: Watched) -> None:
    page = open_page(watched, daemon, admin=True)
    first = page.locator("#daemon").inner_text()
    daemon.process.stop()
    expect(page.locator("#connection")).to_have_attribute("data-state", "lost")
    expect(page.locator("#connection")).to_contain_text("retrying")
    daemon.restart()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=15_000)
    assert page.locator("#daemon").inner_text() != first  # a new pid
    assert daemon.post("/admin/models/echo/load").status_code == 200
    expect(row(page, "echo")).to_have_attribute("data-state", "ready", timeout=LIVE_WITHIN_MS)
    # The restarted daemon wrote a new token: the tab's one is dropped and the page says so,
    # read-only, without a key prompt.
    expect(page.locator("body")).to_have_attribute("data-access", "read-only")
    expect(page.locator("#read-only-changed")).to_be_visible()
    expect(page.locator("#read-only-changed")).to_contain_text("admin token changed")
    expect(page.locator("#key-form")).to_be_hidden()
    assert page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") is None
    # `trioserve ui`'s new URL in the same tab (only the fragment changes: no page load).
    page.goto(daemon.admin_url())
    expect(page.locator("body")).to_have_attribute("data-access", "admin")
    expect(page.locator("#read-only")).to_be_hidden()
    assert "token" not in page.evaluate("location.href")
    row(page, "echo").get_by_role("button", name="Unload", exact=True).click()
    expect(row(page, "echo")).to_have_attribute("data-state", "stopped")
    assert watched.dialogs == []


def test_chart_draws_the_traffic(daemon: Daemon, watched: Watched) -> None:
    page = open_page(watched, daemon)
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=daemon.url, timeout=30, trust_env=False) as client:
            while not stop.is_set():
                body = {"model": "echo", "messages": [{"role": "user", "content": "a b c d"}]}
                client.post("/v1/chat/completions", json={**body, "max_tokens": 10})

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        line = page.locator('.chart[data-model="echo"] polyline.series-in-flight')
        # In flight above zero (y above the bottom, 100) in at least one sample.
        page.wait_for_function(
            """() => {
                const line = document.querySelector(
                    '.chart[data-model="echo"] polyline.series-in-flight');
                if (!line) return false;
                const points = line.getAttribute('points').split(' ').filter(Boolean);
                return points.length >= 3 && points.some((p) => Number(p.split(',')[1]) < 100);
            }""",
            timeout=15_000,
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    tokens = page.locator('.chart[data-model="echo"] polyline.series-tokens')
    expect(tokens).to_have_attribute("points", re.compile(r"\d"))
    assert line.get_attribute("points")


@contextmanager
def open_mcp_session(url: str) -> Iterator[None]:
    """An MCP session (the SDK's client) open on ``url`` for the block, held by a thread of
    its own running Trio (Playwright's sync API has this one)."""
    opened, close = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    async def hold() -> None:
        async with mcp_session(url):
            opened.set()
            await trio.to_thread.run_sync(close.wait)

    def run() -> None:
        try:
            trio.run(hold)
        except BaseException as exc:
            failed.append(exc)
        finally:
            opened.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert opened.wait(30), "no MCP session within 30 s"
        if failed:
            raise failed[0]
        yield
    finally:
        close.set()
        thread.join()
    if failed:
        raise failed[0]


def test_mcp_sessions_show_live(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess], watched: Watched
) -> None:
    daemon = Daemon(tmp_path, spawn_daemon, mcp=True)
    page = open_page(watched, daemon)
    line = page.locator("#mcp")
    expect(line).to_have_text("MCP: 0 sessions, 0 calls in flight")
    with open_mcp_session(daemon.url):
        expect(line).to_have_text("MCP: 1 session, 0 calls in flight")
        expect(line).to_have_attribute("data-sessions", "1")
    expect(line).to_have_text("MCP: 0 sessions, 0 calls in flight")
    assert watched.errors == []


def test_readable_at_phone_width(daemon: Daemon, browser: Browser) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(daemon.url + "/ui")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(row(page, "echo")).to_have_count(1)
        # The wide tables scroll inside their boxes; the page itself does not.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        context.close()


@pytest.fixture
def other_site() -> Iterator[str]:
    """An empty page on another origin (another port of localhost), served by a thread."""

    class Empty(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><html><body></body></html>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Empty)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_another_site_cannot_drive_the_daemon(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess], watched: Watched, other_site: str
) -> None:
    # Admin writes open to anyone who reaches the port: the browser guard is all that stands
    # between another site and the daemon here (with the token required, a refusal would not
    # say which of the two refused).
    daemon = Daemon(tmp_path, spawn_daemon, admin_over_tcp="open")
    assert daemon.post("/admin/models/echo/load").status_code == 200
    pid = httpx.get(daemon.url + "/admin/status", trust_env=False).json()["models"]["echo"]["pid"]
    page = watched.page
    # A page of another origin in the same browser, served from loopback too (Chromium's own
    # Private Network Access check would stop a public site before trioserve sees anything;
    # a site on the operator's machine is not stopped by it).
    page.goto(other_site + "/")
    unload = daemon.url + "/admin/models/echo/unload?force=true"
    outcomes = page.evaluate(
        """async (unload) => {
            const outcomes = {};
            try {  // JSON needs a preflight: trioserve never allows it
                await fetch(unload, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                     body: '{}'});
                outcomes.json = 'sent';
            } catch (error) { outcomes.json = 'blocked'; }
            const opaque = await fetch(unload, {method: 'POST', mode: 'no-cors', body: 'x'});
            outcomes.noCors = opaque.type;
            try {  // the answer of a plain GET is not readable either
                const status = unload.replace('/models/echo/unload?force=true', '/status');
                await (await fetch(status)).json();
                outcomes.read = 'read';
            } catch (error) { outcomes.read = 'blocked'; }
            return outcomes;
        }""",
        unload,
    )
    assert outcomes == {"json": "blocked", "noCors": "opaque", "read": "blocked"}
    # A cross-site form post, the oldest trick.
    with page.expect_navigation() as navigation:
        page.evaluate(
            """(unload) => {
                const form = document.createElement('form');
                form.method = 'POST';
                form.action = unload;
                document.body.appendChild(form);
                form.submit();
            }""",
            unload,
        )
    answer = navigation.value
    assert answer is not None and answer.status == 403
    assert "forbidden" in page.content()
    status = httpx.get(daemon.url + "/admin/status", trust_env=False).json()
    assert status["models"]["echo"]["state"] == "ready"
    assert status["models"]["echo"]["pid"] == pid


def test_dns_rebinding_is_refused(daemon: Daemon) -> None:
    assert daemon.post("/admin/models/echo/load").status_code == 200
    port = daemon.url.rsplit(":", 1)[1]
    # rebind.test resolves to the daemon's address, as an attacker's DNS would make it.
    with chromium("--host-resolver-rules=MAP rebind.test 127.0.0.1") as browser:
        page = browser.new_page()
        response = page.goto(f"http://rebind.test:{port}/ui")
        assert response is not None and response.status == 403
        # Now same-origin with the daemon as far as the browser knows: still refused.
        answers = page.evaluate(
            """async () => [
                (await fetch('/admin/status')).status,
                (await fetch('/admin/models/echo/unload?force=true', {
                    method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{}'
                })).status,
            ]"""
        )
        assert answers == [403, 403]
    assert daemon.state("echo") == "ready"
