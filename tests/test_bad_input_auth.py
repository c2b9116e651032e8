"""API keys (issue 7): missing, wrong and right keys on every /v1 and /admin route, the forms
of a bearer header, and the comparison itself. ``test_gateway_errors.py`` covers the basic
401s on the chat route, /v1/models and /admin/status.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.config import SpawnCounter, make_config
from tests.support.daemon import leak_checked_daemon
from tests.support.http import assert_openai_error, chat, raw_exchange, status_of
from tests.support.processes import model_processes

API_KEY = "sk-api-0123456789"
ADMIN_KEY = "sk-admin-9876543210"
KEYS = {"api_keys": [API_KEY], "admin_keys": [ADMIN_KEY]}  # the [server] settings


def _bearer(value: str) -> dict[str, str]:
    return {"authorization": value}


async def _call(client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]) -> int:
    """The status of one call; an event stream is closed once its head is in."""
    body = chat() if method == "POST" and path.startswith("/v1/") else None
    if path.endswith("/embeddings") and body is not None:
        body = {"model": "echo", "input": "hello"}
    async with client.stream(method, path, json=body, headers=headers) as response:
        if response.status_code != 200 or path != "/admin/events":
            await response.aread()
        if response.status_code == 401:
            assert_openai_error(response, 401, "invalid_api_key")
        return response.status_code


V1_ROUTES = [
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/chat/completions"),  # wrong method: still behind the key, no route leak
    ("GET", "/v1/no-such-route"),
]
ADMIN_ROUTES = [
    ("GET", "/admin/status"),
    ("GET", "/admin/events"),
    ("GET", "/admin/models/echo/logs"),
    ("POST", "/admin/models/echo/load"),
    ("POST", "/admin/models/echo/unload"),
    ("GET", "/admin/no-such-route"),
]


async def test_keys_guard_every_v1_and_admin_route_but_not_health_or_metrics(
    state_dir: Path, spawns: SpawnCounter
) -> None:
    config = make_config(state_dir, {"echo": {"cmd": spawns.cmd("echo")}}, server=KEYS)
    async with leak_checked_daemon(config) as (info, client):
        api, admin = _bearer(f"Bearer {API_KEY}"), _bearer(f"Bearer {ADMIN_KEY}")
        for method, path in V1_ROUTES + ADMIN_ROUTES:
            for headers in ({}, _bearer("Bearer nope")):
                assert await _call(client, method, path, headers) == 401, (method, path)
        # Each key opens its own half only.
        for method, path in ADMIN_ROUTES:
            assert await _call(client, method, path, api) == 401, (method, path)
        for method, path in V1_ROUTES:
            assert await _call(client, method, path, admin) == 401, (method, path)
        # Nothing refused started a model.
        assert spawns.count("echo") == 0
        assert model_processes(info.instance) == {}

        for method, path in V1_ROUTES:
            status = await _call(client, method, path, api)
            assert status != 401 and status != 500, (method, path, status)
        for method, path in ADMIN_ROUTES:
            status = await _call(client, method, path, admin)
            assert status != 401 and status != 500, (method, path, status)
        # Liveness and metrics are open, as the README says.
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


BEARER_FORMS = [
    (f"Bearer {API_KEY}", True),
    (f"bearer {API_KEY}", True),
    (f"BEARER {API_KEY}", True),
    (f"Bearer    {API_KEY}", True),  # extra spaces between scheme and token
    (API_KEY, False),  # no scheme
    (f"Basic {API_KEY}", False),
    (f"Token {API_KEY}", False),
    ("Bearer", False),
    (f"Bearer {API_KEY[:-1]}", False),  # a prefix of the key
    (f"Bearer {API_KEY}x", False),  # the key and more
    (f"Bearer {API_KEY.upper()}", False),  # keys are case-sensitive
    (f"Bearer {API_KEY} {API_KEY}", False),
]


async def test_bearer_header_forms(state_dir: Path) -> None:
    config = make_config(state_dir, server=KEYS)
    async with leak_checked_daemon(config) as (_, client):
        for value, accepted in BEARER_FORMS:
            # The relayed routes and the framework's routes check keys in two places.
            for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models")]:
                status = await _call(client, method, path, _bearer(value))
                assert (status == 200) is accepted and status in (200, 401), (value, path, status)
            # The same form with the admin key, on an admin route.
            admin_value = value.replace(API_KEY, ADMIN_KEY)
            status = await _call(client, "GET", "/admin/status", _bearer(admin_value))
            assert (status == 200) is accepted, (admin_value, status)


async def test_header_bytes_that_are_not_ascii_get_401_not_500(state_dir: Path) -> None:
    config = make_config(state_dir, server=KEYS)
    async with leak_checked_daemon(config) as (info, client):
        for path in [b"/v1/chat/completions", b"/v1/models", b"/admin/status"]:
            method = b"POST" if path.endswith(b"completions") else b"GET"
            request = (
                method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer \xff\xfe" + API_KEY.encode() + b"\x80\r\n"
                b"Content-Length: 2\r\n\r\n{}"
            )
            raw = await raw_exchange(info.url, request, within=5)
            assert status_of(raw) == 401, raw[:300]
        assert (await client.get("/health")).status_code == 200


async def test_keys_are_compared_in_constant_time_against_every_key(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    # The module trioserve.gateway.asgi compares with (hmac), so the spy sees exactly its calls.
    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = ["sk-first", "sk-second", "sk-third"]
    config = make_config(state_dir, server={"api_keys": keys, "admin_keys": [ADMIN_KEY]})
    async with leak_checked_daemon(config) as (_, client):
        for token, status in [("sk-first", 200), ("sk-nope", 401), ("sk-third", 200)]:
            compared.clear()
            with trio.fail_after(20):
                response = await client.post(
                    "/v1/chat/completions", json=chat(), headers=_bearer(f"Bearer {token}")
                )
            assert response.status_code == status, response.text
            # Every key is compared, the first match does not stop the loop: the time taken
            # says nothing about which key matched.
            assert compared == [(token.encode(), key.encode()) for key in keys]
