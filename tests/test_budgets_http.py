"""Budgets over HTTP (issue 26): a user over budget gets 429 ``rate_limited`` with a
``Retry-After`` that is when its window frees, while another user is served; OpenAI's
``x-ratelimit-*`` headers on every answer to a user with a budget; ``/admin/status``'s
``remaining``; a budget changed by a reload applies to the next request; an answer cut short
counts what was generated, a complete one without usage counts none.

The echo model counts a prompt's words as its prompt tokens and answers ``max_tokens`` tokens,
so every request here costs a known number of tokens: ``a b c`` + 5 = 8.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.config import echo_cmd, write_toml
from tests.support.daemon import running_daemon
from tests.support.http import RawConnection, assert_openai_error, chat, raw_post
from tests.support.ports import port_range
from tests.support.status import load_model
from trioserve.config import load_config, parse_config

ALICE = "sk-alice"
BOB = "sk-bob"
COST = 3 + 5  # tokens of one `cheap()` request: "a b c" and 5 generated
CHAT = "/v1/chat/completions"
RATELIMIT = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


def config_data(state_dir: Path, alice: dict[str, Any], *echo_options: str) -> dict[str, Any]:
    """One echo model; alice with the budgets ``alice``, bob with none."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "state_dir": str(state_dir)},
        "supervisor": {"port_range": port_range(), "stop_grace": 2, "start_timeout": 20},
        "models": {"echo": {"cmd": echo_cmd(*echo_options)}},
        "users": {"alice": {"api_keys": [ALICE], **alice}, "bob": {"api_keys": [BOB]}},
    }


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def cheap(**extra: Any) -> dict[str, Any]:
    return chat(max_tokens=5, **extra)


async def user_entry(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    entry: dict[str, Any] = (await client.get("/admin/status")).json()["users"][name]
    return entry


async def wait_counted(client: httpx.AsyncClient, name: str, requests: int) -> dict[str, Any]:
    """``name``'s ``/admin/status`` entry once ``requests`` of its requests have finished (a
    request is counted a moment after its client has the answer)."""
    with trio.fail_after(10):
        while (entry := await user_entry(client, name))["requests"] < requests:
            await trio.sleep(0.01)
    return entry


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float | None:
    """The value of the ``/metrics`` sample ``name`` with ``labels``; None when there is none."""
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def first_bytes(client: httpx.AsyncClient, model: str) -> float:
    """How many answers of ``model`` got their first upstream read."""
    found = await metric(client, "trioserve_time_to_first_byte_seconds_count", model=model)
    return found or 0.0


def reset_seconds(text: str) -> float:
    """An ``x-ratelimit-reset-*`` value (``1m0s``, ``57s``, ``250ms``) in seconds."""
    found = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?", text)
    assert found is not None and text, text
    hours, minutes, seconds, millis = (int(part or 0) for part in found.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def test_reset_seconds_reads_openais_durations() -> None:
    assert [reset_seconds(text) for text in ("0s", "250ms", "57s", "1m0s", "1h2m3s")] == [
        0,
        0.25,
        57,
        60,
        3723,
    ]


async def test_over_tokens_per_minute_429_until_the_window_frees_while_others_are_served(
    state_dir: Path,
) -> None:
    config = parse_config(config_data(state_dir, {"max_tokens_per_minute": COST}), "t.toml")
    async with running_daemon(config, admin=True) as (_, client):
        await load_model(client, "echo")
        start = time.time()
        first = await client.post(CHAT, json=cheap(), headers=auth(ALICE))
        assert first.status_code == 200, first.text
        await wait_counted(client, "alice", 1)
        counted = time.time()

        before = time.time()
        refused = await client.post(CHAT, json=cheap(), headers=auth(ALICE))
        after = time.time()
        error = assert_openai_error(refused, 429, "rate_limited")
        assert "max_tokens_per_minute" in error["message"], error
        # The window frees when the second the first answer's tokens were counted in leaves
        # it: 60 s after that second began.
        retry = int(refused.headers["retry-after"])
        assert (
            math.ceil(math.floor(start) + 60 - after) <= retry <= math.ceil(counted + 60 - before)
        )
        assert 1 <= retry <= 60
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"

        # Another user is served meanwhile, and is never limited by alice's budget.
        for _ in range(3):
            served = await client.post(CHAT, json=cheap(), headers=auth(BOB))
            assert served.status_code == 200, served.text
            assert not any(name in served.headers for name in RATELIMIT)
        # Streamed too: alice is refused before anything starts.
        again = await client.post(CHAT, json=cheap(stream=True), headers=auth(ALICE))
        assert_openai_error(again, 429, "rate_limited")
        # Refused requests are not relayed: alice has one request, bob three.
        await wait_counted(client, "bob", 3)
        assert (await user_entry(client, "alice"))["requests"] == 1


async def test_answers_to_a_user_with_budgets_carry_openais_ratelimit_headers(
    state_dir: Path,
) -> None:
    alice = {"max_requests_per_minute": 10, "max_tokens_per_minute": 1000}
    config = parse_config(config_data(state_dir, alice), "t.toml")
    async with running_daemon(config, admin=True) as (_, client):
        await load_model(client, "echo")
        start = time.time()
        first = await client.post(CHAT, json=cheap(), headers=auth(ALICE))
        assert first.status_code == 200, first.text
        assert {name: first.headers[name] for name in RATELIMIT} == {
            "x-ratelimit-limit-requests": "10",
            "x-ratelimit-remaining-requests": "9",
            # Counted in this second: gone from the window 59 to 60 s from now.
            "x-ratelimit-reset-requests": "1m0s",
            "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "1000",  # the answer's tokens count once it ends
            "x-ratelimit-reset-tokens": "0s",
        }
        await wait_counted(client, "alice", 1)
        counted = time.time()

        before = time.time()
        async with client.stream("POST", CHAT, json=cheap(stream=True), headers=auth(ALICE)) as r:
            after = time.time()
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-ratelimit-remaining-requests"] == "8"
            assert r.headers["x-ratelimit-remaining-tokens"] == str(1000 - COST)
            # The first answer's tokens leave the window 60 s after the second they were
            # counted in began (that second is between `start` and `counted`), as seen when
            # this one was admitted (between `before` and `after`); whole seconds, rounded up.
            reset = reset_seconds(r.headers["x-ratelimit-reset-tokens"])
            assert (
                math.ceil(math.floor(start) + 60 - after)
                <= reset
                <= math.ceil(counted + 60 - before)
            ), (reset, start, counted, before, after)
            await r.aread()
        await wait_counted(client, "alice", 2)

        # Errors too: every answer to this user carries them.
        missing = await client.post(CHAT, json=cheap(model="nope"), headers=auth(ALICE))
        assert_openai_error(missing, 404, "model_not_found")
        assert missing.headers["x-ratelimit-remaining-requests"] == "7"
        assert missing.headers["x-ratelimit-remaining-tokens"] == str(1000 - 2 * COST)

        status = await user_entry(client, "alice")
        assert status["remaining"] == {"requests_per_minute": 7, "tokens_per_minute": 1000 - 16}
        assert "remaining" not in await user_entry(client, "bob")
        assert "remaining" not in await user_entry(client, "anonymous")


async def test_requests_per_minute_refuse_the_request_over_the_limit(state_dir: Path) -> None:
    config = parse_config(config_data(state_dir, {"max_requests_per_minute": 2}), "t.toml")
    async with running_daemon(config, admin=True) as (_, client):
        await load_model(client, "echo")
        statuses = [
            (await client.post(CHAT, json=cheap(), headers=auth(ALICE))).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
        refused = await client.post(CHAT, json=cheap(), headers=auth(ALICE))
        error = assert_openai_error(refused, 429, "rate_limited")
        assert "max_requests_per_minute" in error["message"]
        assert refused.headers["x-ratelimit-limit-requests"] == "2"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(refused.headers["retry-after"]) <= 60


async def test_a_budget_changed_by_a_reload_applies_to_the_next_request(
    state_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "c.toml"
    data = config_data(state_dir, {"max_tokens_per_minute": COST})

    async def reload(alice: dict[str, Any]) -> None:
        data["users"]["alice"] = {"api_keys": [ALICE], **alice}
        write_toml(path, data)
        response = await client.post("/admin/reload")
        assert response.status_code == 200, response.text

    write_toml(path, data)
    async with running_daemon(load_config(path), admin=True) as (_, client):
        await load_model(client, "echo")
        assert (await client.post(CHAT, json=cheap(), headers=auth(ALICE))).status_code == 200
        await wait_counted(client, "alice", 1)
        assert (await client.post(CHAT, json=cheap(), headers=auth(ALICE))).status_code == 429

        # Raised: the very next request is in, counted against what alice already spent.
        await reload({"max_tokens_per_minute": 1000})
        raised = await client.post(CHAT, json=cheap(), headers=auth(ALICE))
        assert raised.status_code == 200, raised.text
        assert raised.headers["x-ratelimit-limit-tokens"] == "1000"
        assert raised.headers["x-ratelimit-remaining-tokens"] == str(1000 - COST)
        await wait_counted(client, "alice", 2)

        # Lowered to a requests budget: two requests were admitted this minute already.
        await reload({"max_requests_per_minute": 2})
        lowered = await client.post(CHAT, json=cheap(), headers=auth(ALICE))
        assert_openai_error(lowered, 429, "rate_limited")
        assert "max_requests_per_minute" in lowered.json()["error"]["message"]
        assert "x-ratelimit-limit-tokens" not in lowered.headers

        # Removed: no limit, no headers.
        await reload({})
        free = await client.post(CHAT, json=cheap(), headers=auth(ALICE))
        assert free.status_code == 200, free.text
        assert not any(name in free.headers for name in RATELIMIT)
        assert "remaining" not in await user_entry(client, "alice")


async def test_a_stream_the_client_hangs_up_counts_the_tokens_it_generated(
    state_dir: Path,
) -> None:
    alice = {"max_tokens_per_minute": 100_000}
    config = parse_config(
        config_data(state_dir, alice, "--tokens", "1000", "--token-delay", "0.01"), "t.toml"
    )
    async with running_daemon(config, admin=True) as (info, client):
        await load_model(client, "echo")
        async with await RawConnection.open(info.url) as connection:
            request = raw_post(chat(stream=True), f"Authorization: Bearer {ALICE}".encode())
            assert await connection.send(request)
            received = await connection.read(lambda data: data.count(b"data: {") >= 20)
        events = received.count(b"data: {")
        entry = await wait_counted(client, "alice", 1)
        # No usage ever came (it is in the last event): each event is a token generated (the
        # relay may have read a few more than the client did before it noticed the hang-up).
        assert entry["prompt_tokens"] == 0
        assert events <= entry["completion_tokens"] < 1000, (events, entry)
        assert entry["remaining"]["tokens_per_minute"] == 100_000 - entry["completion_tokens"]


async def test_a_non_streamed_answer_the_client_hangs_up_on_counts_the_tokens_it_generated(
    state_dir: Path,
) -> None:
    alice = {"max_tokens_per_minute": 100_000}
    config = parse_config(
        config_data(state_dir, alice, "--tokens", "1000", "--token-delay", "0.01"), "t.toml"
    )
    async with running_daemon(config, admin=True) as (info, client):
        await load_model(client, "echo")
        async with await RawConnection.open(info.url) as connection:
            # Sent upstream as a stream and assembled (stream_upstream): its events are seen.
            request = raw_post(chat(), f"Authorization: Bearer {ALICE}".encode())
            assert await connection.send(request)
            # Hang up once the answer's first upstream read is in the relay: its time to first
            # byte is counted (``/metrics``) and the read fed to the assembler with no
            # checkpoint between, so its event (a token) is seen by then.
            with trio.fail_after(10):
                while await first_bytes(client, "echo") < 1:
                    await trio.sleep(0.01)
        entry = await wait_counted(client, "alice", 1)
        assert 0 < entry["completion_tokens"] < 1000, entry
        assert entry["remaining"]["tokens_per_minute"] == 100_000 - entry["completion_tokens"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "assembled"])
async def test_a_complete_answer_without_usage_counts_no_tokens(
    state_dir: Path, stream: bool
) -> None:
    # The echo model fails after 4 tokens with an error event, and no usage, as llama-server
    # ends a stream that fails: the answer is complete (the upstream ended it), so nothing
    # is estimated from its events; it counts what the upstream said: nothing.
    alice = {"max_tokens_per_minute": 100_000}
    config = parse_config(config_data(state_dir, alice), "t.toml")
    async with running_daemon(config, admin=True) as (_, client):
        await load_model(client, "echo")
        body = chat(stream=stream, max_tokens=10, echo_error_after=4)
        answer = await client.post(CHAT, json=body, headers=auth(ALICE))
        if stream:
            assert answer.status_code == 200, answer.text
            assert answer.text.count("data: {") == 5 and '"error"' in answer.text, answer.text
        else:
            assert answer.status_code == 500, answer.text
        entry = await wait_counted(client, "alice", 1)
        assert (entry["prompt_tokens"], entry["completion_tokens"]) == (0, 0), entry
        assert entry["remaining"]["tokens_per_minute"] == 100_000
        # Nor in Prometheus.
        for kind in ("prompt", "completion"):
            tokens = await metric(
                client, "trioserve_user_tokens_total", user="alice", model="echo", kind=kind
            )
            assert not tokens, (kind, tokens)
