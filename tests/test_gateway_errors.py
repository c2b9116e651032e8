"""Every status of CONTRACT's error table, in the OpenAI error shape (504: the deadline tests)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.config import echo_cmd, echo_config, make_config
from tests.support.daemon import running_daemon
from tests.support.http import RawConnection, assert_openai_error, chat, head_complete, raw_post
from tests.support.status import load_model, wait_for_status


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'{"messages": []}',
        b'{"model": 7}',
        b'{"model": null}',
        b"\xff\xfe\x00 invalid utf-8",
        b"[" * 100000 + b"]" * 100000,
    ],
    ids=["malformed", "array", "no-model", "model-number", "model-null", "bad-utf8", "deep"],
)
async def test_bad_bodies_get_400(state_dir: Path, body: bytes) -> None:
    async with running_daemon(make_config(state_dir)) as (_, client):
        response = await client.post("/v1/chat/completions", content=body)
        assert_openai_error(response, 400, "invalid_request")
        assert (await client.get("/health")).status_code == 200


async def test_unknown_model_gets_404_listing_known_names(state_dir: Path) -> None:
    config = make_config(state_dir, {"echo": {"cmd": echo_cmd(), "aliases": ["parrot"]}})
    async with running_daemon(config) as (_, client):
        for name in ["nope", "../echo", "echo; rm -rf /", "x" * 10000]:
            response = await client.post("/v1/chat/completions", json=chat(name))
            error = assert_openai_error(response, 404, "model_not_found")
            assert "echo" in error["message"] and "parrot" in error["message"]


async def test_alias_routes_to_its_model(state_dir: Path) -> None:
    config = make_config(state_dir, {"echo": {"cmd": echo_cmd(), "aliases": ["parrot"]}})
    async with running_daemon(config) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat("parrot"))
        assert response.status_code == 200


async def test_missing_or_wrong_key_gets_401(state_dir: Path) -> None:
    config = make_config(state_dir, server={"api_keys": ["sekret"], "admin_keys": ["boss"]})
    async with running_daemon(config) as (_, client):
        assert_openai_error(
            await client.post("/v1/chat/completions", json=chat()), 401, "invalid_api_key"
        )
        wrong = {"authorization": "Bearer nope"}
        assert_openai_error(
            await client.post("/v1/chat/completions", json=chat(), headers=wrong),
            401,
            "invalid_api_key",
        )
        assert_openai_error(await client.get("/v1/models", headers=wrong), 401, "invalid_api_key")
        right = {"authorization": "Bearer sekret"}
        ok = await client.post("/v1/chat/completions", json=chat(), headers=right)
        assert ok.status_code == 200
        # A /v1 key does not open /admin when admin_keys is set.
        assert_openai_error(
            await client.get("/admin/status", headers=right), 401, "invalid_api_key"
        )
        boss = {"authorization": "Bearer boss"}
        assert (await client.get("/admin/status", headers=boss)).status_code == 200
        # /health is never behind a key.
        assert (await client.get("/health")).status_code == 200


async def test_body_over_the_limit_gets_413_without_being_read(state_dir: Path) -> None:
    config = make_config(state_dir, server={"max_body_bytes": 1000})
    async with running_daemon(config) as (info, client):
        big = b'{"model": "echo", "x": "' + b"a" * 5000 + b'"}'
        assert_openai_error(
            await client.post("/v1/chat/completions", content=big), 413, "request_too_large"
        )
        # Declared huge, body never sent: the answer comes at once, not after reading 1 GB.
        async with await RawConnection.open(info.url) as connection:
            assert await connection.send(raw_post(b"", length=1_000_000_000))
            head = await connection.read(head_complete, within=5)
        assert head.startswith(b"HTTP/1.1 413"), head[:300]


async def test_model_killed_mid_answer_gets_502_within_a_second(state_dir: Path) -> None:
    config = echo_config(state_dir, "--response-delay", "30")
    async with running_daemon(config, admin=True) as (_, client):
        pid = (await load_model(client, "echo"))["pid"]
        result: list[httpx.Response] = []

        async def call() -> None:
            result.append(await client.post("/v1/chat/completions", json=chat()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await wait_for_status(client, "echo", "in_flight", 1)
            os.kill(pid, signal.SIGKILL)
            killed_at = trio.current_time()
        assert trio.current_time() - killed_at < 1
        assert_openai_error(result[0], 502, "upstream_error")
        assert (await client.get("/health")).status_code == 200


async def test_crash_mid_stream_ends_with_an_error_event(state_dir: Path) -> None:
    config = echo_config(state_dir, "--tokens", "50", "--crash-after", "3", "--token-delay", "0.05")
    async with running_daemon(config) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
        assert response.status_code == 200
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert '"code": "upstream_error"' in events[-1]


async def test_failed_model_gets_503_with_retry_after(state_dir: Path) -> None:
    config = make_config(
        state_dir,
        {"broken": {"cmd": ["{python}", "-c", "import sys; print('no GPU here'); sys.exit(3)"]}},
        supervisor={"max_start_failures": 1, "failure_cooldown": 60},
    )
    async with running_daemon(config) as (_, client):
        first = await client.post("/v1/chat/completions", json=chat("broken"))
        error = assert_openai_error(first, 502, "upstream_error")
        assert "no GPU here" in error["message"]
        second = await client.post("/v1/chat/completions", json=chat("broken"))
        assert_openai_error(second, 503, "model_unavailable")
        assert 1 <= int(second.headers["retry-after"]) <= 60


async def test_unknown_path_and_method_get_json_errors(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir)) as (_, client):
        response = await client.get("/v2/nothing")
        assert response.status_code == 404
        assert "error" in response.json()
        wrong_method = await client.get("/v1/chat/completions")
        assert wrong_method.status_code in (404, 405)
        assert "error" in wrong_method.json()
