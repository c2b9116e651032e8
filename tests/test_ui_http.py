"""The status page over plain HTTP: what it serves, how it is cached, and what keeps other
sites out (the browser itself is in test_ui_browser.py)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.support.admin import admin_token
from tests.support.config import daemon_config, make_config, write_config
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.http import assert_openai_error, chat, sse_lines
from tests.support.mcp import mcp_session, with_mcp
from tests.support.ports import free_port
from tests.support.status import load_model
from trioserve.config import load_config
from trioserve.gateway.ui import CONTENT_SECURITY_POLICY

ADMIN_KEY = "sk-admin-ui"
EVIL = {"host": "evil.example"}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_root_redirects_to_the_page(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir)) as (_, client):
        response = await client.get("/")
        assert response.status_code == 302
        assert response.headers["location"] == "/ui"


async def test_page_has_a_strict_policy_and_no_inline_code(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir)) as (_, client):
        response = await client.get("/ui")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        policy = response.headers["content-security-policy"]
        assert policy == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in policy
        assert "unsafe" not in policy  # neither unsafe-inline nor unsafe-eval
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-cache"
        html = response.text
        scripts = re.findall(r"<script\b[^>]*>", html)
        assert scripts and all("src=" in tag for tag in scripts)
        assert not re.search(r"\son[a-z]+\s*=", html)  # no inline event handlers
        assert "style=" not in html


async def test_static_files_are_versioned_and_cached(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir)) as (_, client):
        html = (await client.get("/ui")).text
        paths = re.findall(r'(?:src|href)="(/ui/static/[0-9a-f]{12}/[a-z.]+)"', html)
        assert {path.rsplit("/", 1)[1] for path in paths} == {"app.js", "style.css", "favicon.svg"}
        for path in paths:
            response = await client.get(path)
            assert response.status_code == 200, path
            assert "immutable" in response.headers["cache-control"]
            assert response.headers["x-content-type-options"] == "nosniff"
        old = re.sub(r"/static/[0-9a-f]{12}/", "/static/000000000000/", paths[0])
        assert (await client.get(old)).status_code == 404
        assert (await client.get(paths[0].rsplit("/", 1)[0] + "/x.js")).status_code == 404


async def test_page_files_reveal_nothing_and_need_no_key(state_dir: Path) -> None:
    config = make_config(
        state_dir, {"secret-model-name": {"cmd": ["true"]}}, server={"admin_keys": [ADMIN_KEY]}
    )
    async with running_daemon(config) as (_, client):
        html = (await client.get("/ui")).text
        paths = re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', html)
        bodies = [html] + [(await client.get(path)).text for path in paths]
        for body in bodies:
            assert "secret-model-name" not in body
            assert ADMIN_KEY not in body
        assert (await client.get("/admin/history")).status_code == 401
        assert (await client.get("/admin/activity")).status_code == 401
        # With the key, the page is admin (and the local admin token is no key here).
        status = await client.get("/admin/status", headers=bearer(ADMIN_KEY))
        assert status.json()["admin"] is True
        token = bearer(admin_token(state_dir))
        assert (await client.get("/admin/status", headers=token)).status_code == 401


async def test_the_page_reads_without_the_token_and_writes_with_it(state_dir: Path) -> None:
    """What the page relies on with admin_keys empty: everything it shows is open, and
    /admin/status says whether its admin calls would pass, before it offers any."""
    async with running_daemon(make_config(state_dir)) as (_, client):
        for path in ("/ui", "/admin/history"):
            assert (await client.get(path)).status_code == 200, path
        async with client.stream("GET", "/admin/events") as events:
            assert events.status_code == 200
        status = await client.get("/admin/status")
        assert status.status_code == 200
        assert status.json()["admin"] is False
        wrong = await client.get("/admin/status", headers=bearer("not-the-token"))
        assert wrong.json()["admin"] is False
        for method, path in [
            ("POST", "/admin/models/echo/load"),
            ("POST", "/admin/models/echo/unload"),
            ("POST", "/admin/reload"),
            ("GET", "/admin/models/echo/logs?tail=5"),
        ]:
            response = await client.request(method, path)
            assert_openai_error(response, 401, "invalid_api_key")
            assert "trioserve ui" in response.json()["error"]["message"]  # how to get it
        assert (await client.get("/admin/status")).json()["models"]["echo"]["state"] == "stopped"

        token = bearer(admin_token(state_dir))
        assert (await client.get("/admin/status", headers=token)).json()["admin"] is True
        assert (await client.post("/admin/models/echo/load", headers=token)).status_code == 200
        logs = await client.get("/admin/models/echo/logs?tail=5", headers=token)
        assert logs.status_code == 200


async def test_admin_over_tcp_open_makes_every_page_admin(state_dir: Path) -> None:
    config = make_config(state_dir, server={"admin_over_tcp": "open"})
    async with running_daemon(config) as (_, client):
        assert (await client.get("/admin/status")).json()["admin"] is True


async def test_a_foreign_host_gets_403_everywhere_but_health(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir)) as (_, client):
        for path in ("/ui", "/", "/admin/status", "/v1/models", "/metrics"):
            assert_openai_error(await client.get(path, headers=EVIL), 403, "forbidden")
        response = await client.post(
            "/v1/chat/completions", json={"model": "echo", "messages": []}, headers=EVIL
        )
        assert_openai_error(response, 403, "forbidden")
        assert (await client.get("/health", headers=EVIL)).status_code == 200
        for own in ("localhost:8600", "127.0.0.1", "[::1]:8600"):
            assert (await client.get("/v1/models", headers={"host": own})).status_code == 200
        # The refused chat started nothing.
        assert (await client.get("/admin/status")).json()["models"]["echo"]["state"] == "stopped"


async def test_allowed_hosts_names_more_of_the_daemon_s_names(state_dir: Path) -> None:
    config = make_config(state_dir, server={"allowed_hosts": ["llm.example.com"]})
    async with running_daemon(config) as (_, client):
        named = {"host": "llm.example.com:8600"}
        assert (await client.get("/v1/models", headers=named)).status_code == 200
        assert (await client.get("/v1/models", headers=EVIL)).status_code == 403


async def test_cross_site_writes_change_nothing(state_dir: Path) -> None:
    # Admin writes open over TCP: the browser guard alone refuses here.
    config = make_config(state_dir, server={"admin_over_tcp": "open"})
    async with running_daemon(config) as (info, client):
        await load_model(client, "echo")
        own = "http://" + info.url.removeprefix("http://")
        attempts = [
            # A form on another site, and a no-cors fetch from it.
            {"origin": "http://evil.example", "content-type": "application/x-www-form-urlencoded"},
            {"origin": "http://evil.example", "content-type": "text/plain"},
            {"sec-fetch-site": "cross-site"},
            # A browser on our own origin, with a type a form could send.
            {"origin": own, "sec-fetch-site": "same-origin", "content-type": "text/plain"},
        ]
        for headers in attempts:
            response = await client.post("/admin/models/echo/unload?force=true", headers=headers)
            assert_openai_error(response, 403, "forbidden")
            response = await client.post("/admin/reload", headers=headers)
            assert_openai_error(response, 403, "forbidden")
        assert (await client.get("/admin/status")).json()["models"]["echo"]["state"] == "ready"
        # The page's own request (same origin, JSON) and a plain client both work.
        page = {"origin": own, "sec-fetch-site": "same-origin", "content-type": "application/json"}
        response = await client.post("/admin/models/echo/unload", headers=page, content=b"{}")
        assert response.status_code == 200
        assert (await client.post("/admin/models/echo/load")).status_code == 200


async def test_no_cross_origin_caller_is_ever_allowed(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir)) as (_, client):
        preflight = {
            "origin": "http://evil.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization",
        }
        responses = [
            await client.options("/admin/models/echo/unload", headers=preflight),
            await client.options("/v1/chat/completions", headers=preflight),
            await client.get("/admin/status", headers={"origin": "http://evil.example"}),
            await client.post(
                "/v1/chat/completions", json=chat(), headers={"origin": "http://evil.example"}
            ),
        ]
        for response in responses:
            assert not any(name.startswith("access-control-") for name in response.headers)


async def test_history_endpoint_has_each_model_s_samples(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir)) as (_, client):
        history = (await client.get("/admin/history")).json()
        assert history["interval"] == 1.0
        assert history["seconds"] == 600
        echo = history["models"]["echo"]
        assert set(echo) == {"at", "in_flight", "queued", "tokens_per_s"}
        assert len(echo["at"]) >= 1


async def test_activity_feed_sends_history_then_samples(state_dir: Path) -> None:
    async with (
        running_daemon(make_config(state_dir)) as (_, client),
        client.stream("GET", "/admin/activity") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        events: list[tuple[str, dict[str, object]]] = []
        name = ""
        async with aclosing(sse_lines(response)) as lines:
            async for line in lines:
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((name, json.loads(line.removeprefix("data: "))))
                    if len(events) == 2:
                        break
        (first, history), (second, sample) = events
        assert (first, second) == ("history", "sample")
        assert "echo" in history["models"]  # type: ignore[operator]
        echo = sample["models"]["echo"]  # type: ignore[index]
        assert echo["state"] == "stopped"
        assert "tokens_per_s" in echo
        assert "anonymous" in sample["users"]  # type: ignore[operator]


async def _sample_where(client: httpx.AsyncClient, check: Callable[[Any], bool]) -> Any:
    """The first ``event: sample`` of /admin/activity that passes ``check`` (within 10 s)."""
    with trio.fail_after(10):
        async with (
            client.stream("GET", "/admin/activity") as response,
            aclosing(sse_lines(response)) as lines,
        ):
            name = ""
            async for line in lines:
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif name == "sample" and line.startswith("data: "):
                    sample = json.loads(line.removeprefix("data: "))
                    if check(sample):
                        return sample
    raise AssertionError("the activity feed ended")


async def test_activity_samples_carry_the_mcp_figures(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir)) as (info, client):
        async with mcp_session(info.url):
            sample = await _sample_where(client, lambda s: s["mcp"]["sessions"] == 1)
            assert sample["mcp"] == {"sessions": 1, "calls_in_flight": 0}
        await _sample_where(client, lambda s: s["mcp"] == {"sessions": 0, "calls_in_flight": 0})
    off = with_mcp(make_config(state_dir), enabled=False)
    async with running_daemon(off) as (_, client):
        sample = await _sample_where(client, lambda s: "mcp" in s)
        assert sample["mcp"] is None


async def test_allowed_hosts_follow_a_reload(state_dir: Path, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", state_dir, free_port())
    async with running_daemon(load_config(path), admin=True) as (_, client):
        named = {"host": "llm.example.com"}
        assert (await client.get("/v1/models", headers=named)).status_code == 403
        port = int(str(client.base_url).rsplit(":", 1)[1].strip("/"))
        write_config(path, state_dir, port, server={"allowed_hosts": ["llm.example.com"]})
        assert (await client.post("/admin/reload")).status_code == 200
        assert (await client.get("/v1/models", headers=named)).status_code == 200


def test_open_event_streams_do_not_hold_a_stop(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    """An open status page must not keep a stopping daemon waiting for shutdown_grace."""
    config, url = daemon_config(
        tmp_path / "c.toml", tmp_path / "state", server={"shutdown_grace": 60}
    )
    daemon = spawn_daemon(config, url)
    with (
        httpx.Client(base_url=url, timeout=30, trust_env=False) as client,
        client.stream("GET", "/admin/events") as events,
        client.stream("GET", "/admin/activity") as activity,
    ):
        streams = [events.iter_lines(), activity.iter_lines()]
        for lines in streams:
            assert next(lines)  # open, and answered
        started = time.monotonic()
        daemon.proc.terminate()
        assert daemon.wait(timeout=30) == 0
        # Far below the 60 s grace: the streams ended at once, each cleanly.
        assert time.monotonic() - started < 10
        for lines in streams:
            list(lines)
