"""Identity and fair share on Anthropic's path: ``/v1/messages`` requests with a user's key
(``x-api-key``, as Anthropic's clients send it) queue as that user and share a model's slots
by user, as chat requests do.

Deterministic without wall-clock asserts: one long stream of alice's holds the model's only
slot until the test hangs it up; every arrival is waited for in ``/admin/status`` before the
next; the outcome is the order the answers complete in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio

from tests.support.config import echo_cmd
from tests.support.daemon import running_daemon
from tests.support.http import RawConnection, raw_post
from tests.support.ports import port_range
from tests.support.status import load_model, model_status
from trioserve.config import parse_config

KEYS = {"alice": "sk-alice", "bob": "sk-bob"}


def message(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "echo",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "a b c"}],
        **extra,
    }


async def wait_for_users(client: httpx.AsyncClient, **expected: dict[str, int]) -> None:
    """Poll ``/admin/status`` until each named user's entry has the values given for it."""

    async def seen() -> dict[str, dict[str, int]]:
        users = (await client.get("/admin/status")).json()["users"]
        return {name: {key: users[name][key] for key in keys} for name, keys in expected.items()}

    with trio.move_on_after(5):
        while (now := await seen()) != expected:
            await trio.sleep(0.01)
    assert now == expected


async def test_messages_queue_as_their_user_and_share_slots_fairly(state_dir: Path) -> None:
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "state_dir": str(state_dir)},
            "supervisor": {"port_range": port_range(), "stop_grace": 2, "start_timeout": 20},
            # 1000 tokens 20 ms apart: the long stream holds the slot until it is hung up.
            "models": {
                "echo": {
                    "cmd": echo_cmd("--tokens", "1000", "--token-delay", "0.02"),
                    "max_concurrency": 1,
                }
            },
            "users": {name: {"api_keys": [key]} for name, key in KEYS.items()},
        },
        "test.toml",
    )
    finished: list[str] = []
    async with running_daemon(config, admin=True) as (info, client):
        await load_model(client, "echo")
        async with await RawConnection.open(info.url) as holder:
            header = f"x-api-key: {KEYS['alice']}".encode()
            assert await holder.send(
                raw_post(message(1000, stream=True), header, path="/v1/messages")
            )
            await holder.read(lambda received: b"content_block_delta" in received)
            await wait_for_users(client, alice={"in_flight": 1})

            async def ask(name: str) -> None:
                headers = {"x-api-key": KEYS[name]}
                answer = await client.post("/v1/messages", json=message(2), headers=headers)
                assert answer.status_code == 200, answer.text
                finished.append(name)

            async with trio.open_nursery() as nursery:
                # alice queues twice, then bob once: each arrival seen before the next.
                for name, queued in (("alice", 1), ("alice", 2), ("bob", 1)):
                    nursery.start_soon(ask, name)
                    await wait_for_users(client, **{name: {"queued": queued}})
                info_echo = await model_status(client, "echo")
                assert info_echo["queued_by_user"] == {"alice": 2, "bob": 1}, info_echo
                # alice has had the slot all along, bob none: the freed slot is bob's.
                await holder.aclose()
        assert finished == ["bob", "alice", "alice"]
        await wait_for_users(
            client, alice={"requests": 3, "in_flight": 0}, bob={"requests": 1, "queued": 0}
        )
