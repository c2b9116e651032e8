"""Users over HTTP (issue 13): keys with and without ``[users.*]``, the fair share of a model's
slots (flood, per-user limits, push-out, order within a user), disconnects and deadlines of
queued requests, per-user status and bounded metrics labels.

Scheduling tests are deterministic without wall-clock asserts: the model's slot is held by a
long stream that the test hangs up when it chooses (``holding_a_slot``), every arrival is
waited for in ``/admin/status`` before the next one, and outcomes are counted (completion
order, statuses, queue counts), never timed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.config import echo_cmd
from tests.support.daemon import running_daemon
from tests.support.http import (
    RawConnection,
    assert_openai_error,
    chat,
    raw_post,
    read_sse,
    response_complete,
    status_of,
)
from tests.support.ports import port_range
from tests.support.status import backend_stats, load_model, model_status, wait_for_status
from trioserve.config import Config, parse_config

ALICE = "sk-alice"
BOB = "sk-bob"
SERVER = "sk-server"
TWO_USERS = {"alice": {"api_keys": [ALICE]}, "bob": {"api_keys": [BOB]}}
KEY_OF = {"alice": ALICE, "bob": BOB}
OTHER = {"alice": "bob", "bob": "alice"}
# One long stream holds a slot (1000 tokens x 20 ms = 20 s, far beyond any test) until the test
# hangs it up; every other request asks for SHORT tokens (40 ms).
LONG_ECHO = ("--tokens", "1000", "--token-delay", "0.02")
SHORT = 2


def config_data(
    state_dir: Path,
    *echo_options: str,
    users: dict[str, dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
    **model: Any,
) -> dict[str, Any]:
    """A config document with one ``echo`` model (``model`` its settings) and ``users``."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "state_dir": str(state_dir), **(server or {})},
        "supervisor": {"port_range": port_range(), "stop_grace": 2, "start_timeout": 20},
        "models": {"echo": {"cmd": echo_cmd(*echo_options), **model}},
        "users": users if users is not None else TWO_USERS,
    }


def users_config(
    state_dir: Path,
    *echo_options: str,
    users: dict[str, dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
    **model: Any,
) -> Config:
    return parse_config(
        config_data(state_dir, *echo_options, users=users, server=server, **model), "test.toml"
    )


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def auth_line(key: str) -> bytes:
    return f"Authorization: Bearer {key}".encode()


def short_chat(**extra: Any) -> dict[str, Any]:
    return chat(max_tokens=SHORT, **extra)


async def users_status(client: httpx.AsyncClient) -> dict[str, dict[str, int]]:
    users: dict[str, dict[str, int]] = (await client.get("/admin/status")).json()["users"]
    return users


async def wait_for_user(
    client: httpx.AsyncClient, name: str, within: float = 5.0, **expected: int
) -> dict[str, int]:
    """Poll ``/admin/status`` until user ``name``'s entry has the ``expected`` values."""
    with trio.fail_after(within):
        while True:
            entry = (await users_status(client))[name]
            if all(entry[key] == value for key, value in expected.items()):
                return entry
            await trio.sleep(0.01)


@asynccontextmanager
async def holding_a_slot(url: str, key: str) -> AsyncIterator[RawConnection]:
    """A long stream of ``key``'s user that holds one slot of ``echo`` (past its first byte,
    so no first_byte_timeout applies to it) until the block ends; then it hangs up, which
    frees the slot."""
    async with await RawConnection.open(url) as connection:
        assert await connection.send(raw_post(chat(stream=True), auth_line(key)))
        await connection.read(lambda received: b"data: {" in received)
        yield connection


async def queued_raw(url: str, key: str, **extra: Any) -> RawConnection:
    """A connection that has sent one short chat request of ``key``'s user."""
    connection = await RawConnection.open(url)
    assert await connection.send(raw_post(short_chat(**extra), auth_line(key)))
    return connection


async def answer_of(connection: RawConnection) -> int:
    """The status of the whole answer on ``connection``."""
    return status_of(await connection.read(response_complete))


# -- keys ----------------------------------------------------------------------------------------


KEY_SETUPS = {
    "server_key_only": ({}, {"api_keys": [SERVER]}),
    "user_keys_only": (TWO_USERS, {}),
    "server_and_user_keys": (TWO_USERS, {"api_keys": [SERVER]}),
}


@pytest.mark.parametrize("setup", sorted(KEY_SETUPS))
async def test_once_any_key_is_configured_v1_needs_one_and_refuses_a_wrong_one(
    state_dir: Path, setup: str
) -> None:
    users, server = KEY_SETUPS[setup]
    config = users_config(state_dir, users=users, server=server)
    async with running_daemon(config) as (_, client):
        for path in ("/v1/chat/completions", "/v1/models"):
            method = "POST" if path.endswith("completions") else "GET"
            body = chat() if method == "POST" else None
            missing = await client.request(method, path, json=body)
            assert_openai_error(missing, 401, "invalid_api_key")
            wrong = await client.request(method, path, json=body, headers=auth("sk-wrong"))
            assert_openai_error(wrong, 401, "invalid_api_key")
            not_bearer = await client.request(
                method, path, json=body, headers={"authorization": f"Basic {ALICE}"}
            )
            assert_openai_error(not_bearer, 401, "invalid_api_key")


async def test_a_users_key_and_a_server_key_are_both_accepted(state_dir: Path) -> None:
    config = users_config(state_dir, server={"api_keys": [SERVER]})
    async with running_daemon(config) as (_, client):
        for key in (ALICE, BOB, SERVER):
            answer = await client.post("/v1/chat/completions", json=chat(), headers=auth(key))
            assert answer.status_code == 200, (key, answer.text)
            assert (await client.get("/v1/models", headers=auth(key))).status_code == 200
        users = await users_status(client)
        assert [users[name]["requests"] for name in ("alice", "bob", "anonymous")] == [1, 1, 1]


@pytest.mark.parametrize("users", [{}, {"carol": {"weight": 2}}], ids=["no_users", "keyless_user"])
async def test_with_no_key_configured_v1_is_open(
    state_dir: Path, users: dict[str, dict[str, Any]]
) -> None:
    config = users_config(state_dir, users=users)
    async with running_daemon(config) as (_, client):
        for headers in ({}, auth("sk-anything")):
            answer = await client.post("/v1/chat/completions", json=chat(), headers=headers)
            assert answer.status_code == 200, answer.text
            assert (await client.get("/v1/models", headers=headers)).status_code == 200


# -- fair share ----------------------------------------------------------------------------------


async def test_flood_of_one_user_delays_another_by_at_most_two_requests(state_dir: Path) -> None:
    config = users_config(state_dir, *LONG_ECHO, max_concurrency=1, max_queue=64)
    async with running_daemon(config, admin=True) as (info, client):
        await load_model(client, "echo")
        finished: list[str] = []

        async def call(name: str) -> None:
            answer = await client.post(
                "/v1/chat/completions", json=short_chat(), headers=auth(KEY_OF[name])
            )
            assert answer.status_code == 200, answer.text
            finished.append(name)

        async with trio.open_nursery() as nursery, holding_a_slot(info.url, ALICE):
            for _ in range(10):
                nursery.start_soon(call, "alice")
            await wait_for_user(client, "alice", in_flight=1, queued=10)
            nursery.start_soon(call, "bob")
            await wait_for_user(client, "bob", queued=1)
        assert sorted(finished) == ["alice"] * 10 + ["bob"]
        assert finished.index("bob") <= 2, finished


async def test_user_at_its_max_concurrency_waits_while_another_user_is_served(
    state_dir: Path,
) -> None:
    users: dict[str, dict[str, Any]] = {
        "alice": {"api_keys": [ALICE], "max_concurrency": 1},
        "bob": {"api_keys": [BOB]},
    }
    config = users_config(state_dir, *LONG_ECHO, users=users, max_concurrency=3, max_queue=10)
    async with running_daemon(config, admin=True) as (info, client):
        await load_model(client, "echo")
        async with trio.open_nursery() as nursery:
            statuses: list[int] = []

            async def alice_again() -> None:
                answer = await client.post(
                    "/v1/chat/completions", json=short_chat(), headers=auth(ALICE)
                )
                statuses.append(answer.status_code)

            async with holding_a_slot(info.url, ALICE):
                nursery.start_soon(alice_again)
                # Two slots are free, but alice is at her own limit: she waits.
                await wait_for_user(client, "alice", in_flight=1, queued=1)
                assert (await model_status(client, "echo"))["in_flight"] == 1
                for _ in range(2):
                    served = await client.post(
                        "/v1/chat/completions", json=short_chat(), headers=auth(BOB)
                    )
                    assert served.status_code == 200, served.text
                assert (await users_status(client))["alice"]["queued"] == 1
                assert statuses == []
        assert statuses == [200]


async def test_user_over_its_own_max_queue_gets_429_while_another_is_still_admitted(
    state_dir: Path,
) -> None:
    users: dict[str, dict[str, Any]] = {
        "alice": {"api_keys": [ALICE], "max_queue": 2},
        "bob": {"api_keys": [BOB]},
    }
    config = users_config(state_dir, *LONG_ECHO, users=users, max_concurrency=1, max_queue=10)
    async with running_daemon(config, admin=True) as (info, client):
        await load_model(client, "echo")
        async with holding_a_slot(info.url, BOB):
            alice = [await queued_raw(info.url, ALICE) for _ in range(2)]
            await wait_for_user(client, "alice", queued=2)
            refused = await client.post(
                "/v1/chat/completions", json=short_chat(), headers=auth(ALICE)
            )
            assert_openai_error(refused, 429, "queue_full")
            assert int(refused.headers["retry-after"]) >= 1
            # Bob has one in flight already and queues more; alice's limit is hers alone.
            bob = [await queued_raw(info.url, BOB) for _ in range(3)]
            await wait_for_user(client, "bob", in_flight=1, queued=3)
            assert (await users_status(client))["alice"]["queued"] == 2
        for connection in [*alice, *bob]:
            async with connection:
                assert await answer_of(connection) == 200


async def test_full_queue_pushes_out_the_flooders_newest_request_for_another_users(
    state_dir: Path,
) -> None:
    config = users_config(state_dir, *LONG_ECHO, max_concurrency=1, max_queue=3)
    async with running_daemon(config, admin=True) as (info, client):
        await load_model(client, "echo")
        async with holding_a_slot(info.url, ALICE):
            alice: list[RawConnection] = []
            for count in (1, 2, 3):
                alice.append(await queued_raw(info.url, ALICE, text=f"alice {count}"))
                await wait_for_user(client, "alice", queued=count)
            bob = await queued_raw(info.url, BOB)
            # Bob's request is admitted; alice's newest gets the 429 instead.
            pushed_out = await alice[2].read(response_complete)
            assert status_of(pushed_out) == 429
            error = json.loads(pushed_out.split(b"\r\n\r\n", 1)[1])["error"]
            assert error["code"] == "queue_full", error
            assert b"\r\nretry-after: " in pushed_out.lower()
            info_echo = await model_status(client, "echo")
            assert info_echo["queued"] == 3
            assert info_echo["queued_by_user"] == {"alice": 2, "bob": 1}
            # The flooder itself, with the most waiting, is refused at once: nobody is pushed.
            refused = await client.post(
                "/v1/chat/completions", json=short_chat(), headers=auth(ALICE)
            )
            assert_openai_error(refused, 429, "queue_full")
            assert (await model_status(client, "echo"))["queued_by_user"] == {"alice": 2, "bob": 1}
        await alice[2].aclose()
        for connection in [alice[0], alice[1], bob]:
            async with connection:
                assert await answer_of(connection) == 200


async def test_each_users_requests_keep_their_order(state_dir: Path) -> None:
    config = users_config(
        state_dir, *LONG_ECHO, server={"api_keys": [SERVER]}, max_concurrency=1, max_queue=20
    )
    async with running_daemon(config, admin=True) as (info, client):
        await load_model(client, "echo")
        finished: list[tuple[str, int]] = []

        async def call(name: str, index: int) -> None:
            answer = await client.post(
                "/v1/chat/completions", json=short_chat(), headers=auth(KEY_OF[name])
            )
            assert answer.status_code == 200, answer.text
            finished.append((name, index))

        async with trio.open_nursery() as nursery, holding_a_slot(info.url, SERVER):
            for index in range(5):
                for name in ("alice", "bob"):
                    nursery.start_soon(call, name, index)
                    await wait_for_user(client, name, queued=index + 1)
        for name in ("alice", "bob"):
            assert [index for who, index in finished if who == name] == [0, 1, 2, 3, 4]


# -- a queued request that goes away -------------------------------------------------------------


@pytest.mark.parametrize("victim", ["alice", "bob"])
async def test_disconnect_of_a_queued_request_leaves_the_queue_and_the_other_user_proceeds(
    state_dir: Path, victim: str
) -> None:
    config = users_config(
        state_dir, *LONG_ECHO, server={"api_keys": [SERVER]}, max_concurrency=1, max_queue=10
    )
    survivor = OTHER[victim]
    async with running_daemon(config, admin=True) as (info, client):
        port = (await load_model(client, "echo"))["port"]
        async with holding_a_slot(info.url, SERVER):
            waiting: dict[str, list[RawConnection]] = {"alice": [], "bob": []}
            for count in (1, 2):
                for name in ("alice", "bob"):
                    waiting[name].append(await queued_raw(info.url, KEY_OF[name]))
                    await wait_for_user(client, name, queued=count)
            await waiting[victim][0].aclose()
            await wait_for_user(client, victim, queued=1)
            await wait_for_status(client, "echo", "queued", 3)
            assert (await users_status(client))[survivor]["queued"] == 2
        for connection in [*waiting[survivor], waiting[victim][1]]:
            async with connection:
                assert await answer_of(connection) == 200
        # The hung-up request never reached the model: the holder and the three others did.
        assert (await backend_stats(port))["started"] == 4


@pytest.mark.parametrize("victim", ["alice", "bob"])
async def test_first_byte_timeout_of_a_queued_request_leaves_the_queue_and_the_other_user_proceeds(
    state_dir: Path, victim: str
) -> None:
    # The victim's request arrives GAP seconds before the other user's: its deadline passes
    # while both wait (the holder, past its first byte, has none); then the slot is freed,
    # well before the other one's deadline.
    limit, gap = 3.0, 1.5
    config = users_config(
        state_dir,
        *LONG_ECHO,
        server={"api_keys": [SERVER], "first_byte_timeout": limit},
        max_concurrency=1,
        max_queue=10,
    )
    survivor = OTHER[victim]
    async with running_daemon(config, admin=True) as (info, client):
        port = (await load_model(client, "echo"))["port"]
        async with trio.open_nursery() as nursery:
            answers: dict[str, httpx.Response] = {}
            victim_answered = trio.Event()

            async def call(name: str) -> None:
                answers[name] = await client.post(
                    "/v1/chat/completions", json=short_chat(), headers=auth(KEY_OF[name])
                )
                if name == victim:
                    victim_answered.set()

            async with holding_a_slot(info.url, SERVER):
                nursery.start_soon(call, victim)
                await wait_for_user(client, victim, queued=1)
                await trio.sleep(gap)  # real time apart: the deadlines are real time
                nursery.start_soon(call, survivor)
                await wait_for_user(client, survivor, queued=1)
                with trio.fail_after(limit + 5):
                    await victim_answered.wait()
                error = assert_openai_error(answers[victim], 504, "timeout")
                assert "first_byte_timeout" in error["message"], error
                # Out of the queue by the time its 504 was sent.
                users = await users_status(client)
                assert (users[victim]["queued"], users[survivor]["queued"]) == (0, 1)
                assert (await model_status(client, "echo"))["queued_by_user"] == {survivor: 1}
        assert answers[survivor].status_code == 200, answers[survivor].text
        # The holder and the survivor reached the model; the victim never did.
        assert (await backend_stats(port))["started"] == 2


@pytest.mark.parametrize("victim", ["alice", "bob"])
async def test_request_timeout_of_a_queued_request_leaves_the_queue_and_the_other_user_proceeds(
    state_dir: Path, victim: str
) -> None:
    # Every request has the same request_timeout from its arrival, so a queued request can
    # only outlive the slot holder's deadline if someone who came later took the slot first:
    # the victim's own stream held it, so the freed slot goes to the other user, whose stream
    # then holds it while the victim's queued request reaches its deadline. GAP: between the
    # two users' arrivals, so that the survivor's stream is still within its own deadline
    # when the victim's request has passed its own.
    limit, gap = 3.0, 1.5
    config = users_config(
        state_dir,
        *LONG_ECHO,
        server={"request_timeout": limit},
        max_concurrency=1,
        max_queue=10,
    )
    survivor = OTHER[victim]
    async with running_daemon(config, admin=True) as (info, client):
        port = (await load_model(client, "echo"))["port"]
        async with trio.open_nursery() as nursery:
            answers: dict[str, httpx.Response] = {}
            victim_answered = trio.Event()

            async def call() -> None:
                answers[victim] = await client.post(
                    "/v1/chat/completions", json=short_chat(), headers=auth(KEY_OF[victim])
                )
                victim_answered.set()

            async with holding_a_slot(info.url, KEY_OF[victim]) as holder:
                nursery.start_soon(call)
                await wait_for_user(client, victim, in_flight=1, queued=1)
                await trio.sleep(gap)  # real time apart: the deadlines are real time
                async with await RawConnection.open(info.url) as other:
                    body = chat(stream=True)
                    assert await other.send(raw_post(body, auth_line(KEY_OF[survivor])))
                    await wait_for_user(client, survivor, queued=1)
                    # The holder's deadline ends its stream; the survivor's stream begins.
                    await holder.read(lambda received: b'"code": "timeout"' in received)
                    await other.read(lambda received: b"data: {" in received, within=limit + 5)
                    with trio.fail_after(limit + 5):
                        await victim_answered.wait()
                    error = assert_openai_error(answers[victim], 504, "timeout")
                    assert "request_timeout" in error["message"], error
                    users = await users_status(client)
                    assert (users[victim]["queued"], users[victim]["in_flight"]) == (0, 0)
                    assert (users[survivor]["queued"], users[survivor]["in_flight"]) == (0, 1)
                    assert (await model_status(client, "echo"))["queued"] == 0
                    assert status_of(other.received) == 200
        # The two streams reached the model; the victim's queued request never did.
        assert (await backend_stats(port))["started"] == 2


# -- /admin/status -------------------------------------------------------------------------------


def _usage_of_stream(lines: list[str]) -> tuple[int, int]:
    found = [
        chunk["usage"]
        for line in lines
        if line.startswith("data: {") and (chunk := json.loads(line[len("data: ") :])).get("usage")
    ]
    assert len(found) == 1, lines
    return found[0]["prompt_tokens"], found[0]["completion_tokens"]


async def test_status_counts_requests_and_tokens_per_user_from_the_upstream_usage(
    state_dir: Path,
) -> None:
    config = users_config(state_dir, "--tokens", "5", server={"api_keys": [SERVER]})
    async with running_daemon(config) as (_, client):
        expected = {
            name: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
            for name in ("alice", "bob", "anonymous")
        }

        def count(name: str, usage: tuple[int, int]) -> None:
            expected[name]["requests"] += 1
            expected[name]["prompt_tokens"] += usage[0]
            expected[name]["completion_tokens"] += usage[1]

        # Not streamed: the usage of the JSON answer.
        for name, key, text in [("alice", ALICE, "one two three"), ("anonymous", SERVER, "x")]:
            answer = await client.post(
                "/v1/chat/completions", json=chat(text=text), headers=auth(key)
            )
            assert answer.status_code == 200, answer.text
            usage = answer.json()["usage"]
            count(name, (usage["prompt_tokens"], usage["completion_tokens"]))
        # Streamed, with the usage asked for in a last chunk of its own, and without it.
        streams: list[dict[str, Any]] = [{"stream_options": {"include_usage": True}}, {}]
        for options in streams:
            body = chat(stream=True, text="four five six seven", max_tokens=3, **options)
            async with client.stream(
                "POST", "/v1/chat/completions", json=body, headers=auth(BOB)
            ) as response:
                assert response.status_code == 200
                lines = await read_sse(response)
            assert lines[-1] == "data: [DONE]"
            count("bob", _usage_of_stream(lines))
        # Completions too, not streamed.
        answer = await client.post(
            "/v1/completions",
            json={"model": "echo", "prompt": "eight nine", "max_tokens": 4},
            headers=auth(ALICE),
        )
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        count("alice", (usage["prompt_tokens"], usage["completion_tokens"]))

        assert all(each["prompt_tokens"] > 0 for each in expected.values()), expected
        users = await users_status(client)
        assert set(users) == {"alice", "bob", "anonymous"}
        for name, totals in expected.items():
            assert users[name] == {**totals, "in_flight": 0, "queued": 0}, (name, users)


async def test_status_shows_in_flight_and_queued_per_user_and_per_model(state_dir: Path) -> None:
    config = users_config(
        state_dir, *LONG_ECHO, server={"api_keys": [SERVER]}, max_concurrency=2, max_queue=10
    )
    async with running_daemon(config, admin=True) as (info, client):
        await load_model(client, "echo")
        assert (await model_status(client, "echo"))["queued_by_user"] == {}
        async with holding_a_slot(info.url, ALICE), holding_a_slot(info.url, SERVER):
            waiting = [await queued_raw(info.url, key) for key in (ALICE, BOB, BOB, SERVER, SERVER)]
            await wait_for_status(client, "echo", "queued", 5)
            status = (await client.get("/admin/status")).json()
            assert status["users"]["alice"] == {
                "in_flight": 1,
                "queued": 1,
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
            }
            assert (status["users"]["bob"]["in_flight"], status["users"]["bob"]["queued"]) == (
                0,
                2,
            )
            anonymous = status["users"]["anonymous"]
            assert (anonymous["in_flight"], anonymous["queued"]) == (1, 2)
            echo = status["models"]["echo"]
            assert (echo["in_flight"], echo["queued"]) == (2, 5)
            assert echo["queued_by_user"] == {"alice": 1, "bob": 2, "anonymous": 2}
        for connection in waiting:
            async with connection:
                assert await answer_of(connection) == 200
        await wait_for_status(client, "echo", "in_flight", 0)
        status = (await client.get("/admin/status")).json()
        assert status["models"]["echo"]["queued_by_user"] == {}
        assert all(
            (each["in_flight"], each["queued"]) == (0, 0) for each in status["users"].values()
        ), status["users"]


# -- /metrics ------------------------------------------------------------------------------------

USER_FAMILIES = (
    "trioserve_user_requests",
    "trioserve_user_tokens",
    "trioserve_user_queue_wait_seconds",
)


def user_labels(text: str) -> dict[str, set[str]]:
    """The values of the ``user`` label of each per-user metric family."""
    labels: dict[str, set[str]] = {family: set() for family in USER_FAMILIES}
    for family in text_string_to_metric_families(text):
        if family.name in labels:
            labels[family.name] |= {sample.labels["user"] for sample in family.samples}
    return labels


@pytest.mark.parametrize("keys", [False, True], ids=["open", "keys"])
async def test_metrics_user_labels_are_configured_names_or_anonymous(
    state_dir: Path, keys: bool
) -> None:
    users = TWO_USERS if keys else {"carol": {}}
    server = {"api_keys": [SERVER]} if keys else {}
    config = users_config(state_dir, users=users, server=server)
    async with running_daemon(config) as (_, client):
        # Many distinct identities: body `user` strings (with a key or without), addresses.
        keyed = [ALICE, SERVER] if keys else [None]
        for key in keyed:
            headers = auth(key) if key else {}
            for index in range(25):
                body = chat(user=f"raw-user-{index}")
                answer = await client.post("/v1/chat/completions", json=body, headers=headers)
                assert answer.status_code == 200, answer.text
            answer = await client.post("/v1/chat/completions", json=chat(), headers=headers)
            assert answer.status_code == 200, answer.text
        text = (await client.get("/metrics")).text
        expected = {"alice", "anonymous"} if keys else {"anonymous"}
        labels = user_labels(text)
        assert labels == dict.fromkeys(USER_FAMILIES, expected), labels
        assert "raw-user-" not in text
        assert 'user="127.0.0.1"' not in text
        requests = next(
            family
            for family in text_string_to_metric_families(text)
            if family.name == "trioserve_user_requests"
        )
        counts = {
            sample.labels["user"]: sample.value
            for sample in requests.samples
            if sample.name == "trioserve_user_requests_total"
        }
        assert counts == ({"alice": 26.0, "anonymous": 26.0} if keys else {"anonymous": 26.0})
