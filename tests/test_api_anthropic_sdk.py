"""The official Anthropic SDK, unchanged, against a daemon with keys: ``messages.create``,
``messages.stream`` and ``messages.count_tokens`` with each way it presents a key, counted for
the key's user; and the errors it raises, each of the SDK's own type.

The SDK (2.17) sends ``api_key=`` as ``Authorization: Bearer``, as it does ``auth_token=``;
``x-api-key``, what Claude Code and earlier SDKs send, goes as a header of the request with
``Authorization`` left out (the SDK's ``extra_headers`` and ``omit``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import trio
from anthropic.types import MessageParam, TextBlock

from tests.support.config import echo_cmd
from tests.support.daemon import running_daemon
from tests.support.ports import port_range
from trioserve.backends.echo.model import reply_tokens
from trioserve.config import Config, parse_config

# Three users, one per way of presenting a key.
KEYS = {"alice": "sk-alice", "bob": "sk-bob", "carol": "sk-carol"}
TEAM = "sk-team"  # a server key: no user of its own


@pytest.fixture(autouse=True)
def no_anthropic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the SDK would read from the environment instead of its arguments."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def keyed_config(
    state_dir: Path, models: dict[str, list[str]], users: dict[str, dict[str, Any]]
) -> Config:
    """Echo models (name → echo options), ``server.api_keys = [TEAM]`` and ``users``."""
    return parse_config(
        {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "state_dir": str(state_dir),
                "api_keys": [TEAM],
            },
            "supervisor": {"port_range": port_range(), "stop_grace": 2, "start_timeout": 20},
            "models": {name: {"cmd": echo_cmd(*options)} for name, options in models.items()},
            "users": users,
        },
        "test.toml",
    )


def sdk(
    url: str, *, api_key: str | None = None, auth_token: str | None = None
) -> anthropic.AsyncAnthropic:
    """The SDK's client for the daemon at ``url``, with one of its two credentials."""
    return anthropic.AsyncAnthropic(
        base_url=url, api_key=api_key, auth_token=auth_token, max_retries=0, timeout=30
    )


def said(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


def anthropic_error(error: anthropic.APIStatusError) -> str:
    """The type of the error body in Anthropic's shape that ``error`` was raised for."""
    body = error.body
    assert isinstance(body, dict) and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body
    kind: str = body["error"]["type"]
    return kind


async def user_counts(client: httpx.AsyncClient) -> dict[str, dict[str, int]]:
    """Each user's requests and tokens in ``/admin/status``."""
    users = (await client.get("/admin/status")).json()["users"]
    keys = ("requests", "prompt_tokens", "completion_tokens")
    return {name: {key: entry[key] for key in keys} for name, entry in users.items()}


async def test_sdk_messages_with_each_kind_of_key_count_for_its_user(state_dir: Path) -> None:
    users = {name: {"api_keys": [key]} for name, key in KEYS.items()}
    config = keyed_config(state_dir, {"echo": []}, users)
    async with running_daemon(config, admin=True) as (info, client):
        # The SDK needs a credential of its own for carol; her requests go with x-api-key alone.
        ways: dict[str, tuple[anthropic.AsyncAnthropic, dict[str, Any]]] = {
            "alice": (sdk(info.url, api_key=KEYS["alice"]), {}),
            "bob": (sdk(info.url, auth_token=KEYS["bob"]), {}),
            "carol": (
                sdk(info.url, api_key="never-sent"),
                {"Authorization": anthropic.omit, "X-Api-Key": KEYS["carol"]},
            ),
        }
        texts = {"alice": "hello there", "bob": "one two three", "carol": "a b c d"}
        for name, (client_of, headers) in ways.items():
            text = texts[name]
            words = len(text.split())
            async with client_of:
                made = await client_of.messages.create(
                    model="echo", max_tokens=5, messages=said(text), extra_headers=headers
                )
                async with client_of.messages.stream(
                    model="echo", max_tokens=50, messages=said(text), extra_headers=headers
                ) as stream:
                    pieces = [piece async for piece in stream.text_stream]
                    final = await stream.get_final_message()
                counted = await client_of.messages.count_tokens(
                    model="echo", messages=said(text), extra_headers=headers
                )
            assert [block.type for block in made.content] == ["text"]
            assert isinstance(made.content[0], TextBlock)
            assert made.content[0].text == "".join(reply_tokens(text, 5))
            assert (made.stop_reason, made.usage.input_tokens, made.usage.output_tokens) == (
                "max_tokens",
                words,
                5,
            )
            assert pieces == reply_tokens(text, 8)  # the echo's 8 tokens: under max_tokens
            assert isinstance(final.content[0], TextBlock)
            assert final.content[0].text == "".join(pieces)
            assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == (
                "end_turn",
                words,
                8,
            )
            assert counted.input_tokens == words
        # Each user's three requests (count_tokens, a light request, counts as one, without
        # tokens), and the tokens of its two answers: nothing for anyone else.
        expected = {
            name: {
                "requests": 3,
                "prompt_tokens": 2 * len(texts[name].split()),
                "completion_tokens": 5 + 8,
            }
            for name in KEYS
        }
        expected["anonymous"] = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        # Counted a moment after the client has its answer.
        with trio.move_on_after(5):
            while (counts := await user_counts(client)) != expected:
                await trio.sleep(0.01)
        assert counts == expected


async def test_sdk_raises_its_own_error_types(state_dir: Path) -> None:
    users: dict[str, dict[str, Any]] = {
        "alice": {"api_keys": [KEYS["alice"]]},
        "bob": {"api_keys": [KEYS["bob"]], "max_requests_per_minute": 1},
    }
    # ``crashy`` dies after sending 3 events: the stream has begun when it breaks.
    models = {"echo": [], "crashy": ["--crash-after", "3", "--token-delay", "0.05"]}
    async with (
        running_daemon(keyed_config(state_dir, models, users)) as (info, _),
        sdk(info.url, api_key=KEYS["alice"]) as alice,
        sdk(info.url, api_key=KEYS["bob"]) as bob,
        sdk(info.url, api_key="sk-wrong") as stranger,
    ):
        with pytest.raises(anthropic.AuthenticationError) as unauthorized:
            await stranger.messages.create(model="echo", max_tokens=5, messages=said("hi"))
        assert unauthorized.value.status_code == 401
        assert anthropic_error(unauthorized.value) == "authentication_error"

        with pytest.raises(anthropic.NotFoundError) as not_found:
            await alice.messages.count_tokens(model="nope", messages=said("hi"))
        assert not_found.value.status_code == 404
        assert anthropic_error(not_found.value) == "not_found_error"
        assert "echo" in not_found.value.message  # the known names

        await bob.messages.create(model="echo", max_tokens=1, messages=said("hi"))
        with pytest.raises(anthropic.RateLimitError) as limited:
            await bob.messages.create(model="echo", max_tokens=1, messages=said("hi"))
        assert limited.value.status_code == 429
        assert anthropic_error(limited.value) == "rate_limit_error"
        assert "max_requests_per_minute" in limited.value.message
        assert int(limited.value.response.headers["retry-after"]) > 0

        pieces: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as broken:
            async with alice.messages.stream(
                model="crashy", max_tokens=50, messages=said("hi")
            ) as stream:
                async for piece in stream.text_stream:
                    pieces.append(piece)
        assert pieces, "the stream broke before it began"
        # The daemon's own error event (the model died mid-answer), in Anthropic's shape.
        assert anthropic_error(broken.value) == "api_error"
        assert "'crashy'" in broken.value.message and "mid-answer" in broken.value.message
