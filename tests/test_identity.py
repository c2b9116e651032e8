"""Who a request is: configured users by key, anonymous server keys, `user` strings, addresses."""

from __future__ import annotations

from typing import Any

import pytest

from trioserve.config import Config, parse_config
from trioserve.errors import InvalidApiKey
from trioserve.sharing.identity import (
    ANONYMOUS,
    User,
    bearer_token,
    identify,
    keys_required,
)


def config(**sections: Any) -> Config:
    return parse_config(sections, "test.toml")


WITH_USERS = config(
    server={"api_keys": ["sk-server-1", "sk-server-2"]},
    users={
        "alice": {"api_keys": ["sk-alice"], "weight": 3, "max_concurrency": 2, "max_queue": 5},
        "bob": {"api_keys": ["sk-bob-1", "sk-bob-2"]},
        "carol": {},  # no key: only reachable by name in status, never by a request
    },
)
USERS_ONLY = config(users={"alice": {"api_keys": ["sk-alice"]}})
OPEN = config()


def test_a_users_key_is_that_user_with_its_weight_and_limits() -> None:
    alice = identify(WITH_USERS, b"sk-alice", "someone-else", "10.0.0.1")
    assert alice == User(key="name:alice", name="alice", weight=3.0, max_concurrency=2, max_queue=5)
    # Any of a user's keys is the same user; str tokens work as bytes do.
    assert identify(WITH_USERS, "sk-bob-2", None, None) == identify(
        WITH_USERS, b"sk-bob-1", None, None
    )
    assert identify(WITH_USERS, b"sk-bob-1", None, None).name == "bob"


def test_each_server_key_is_its_own_anonymous_user() -> None:
    first = identify(WITH_USERS, b"sk-server-1", "ann", "10.0.0.1")
    second = identify(WITH_USERS, b"sk-server-2", "ann", "10.0.0.1")
    assert first.name == second.name == "anonymous"
    assert first.key != second.key
    assert (first.weight, first.max_concurrency, first.max_queue) == (1.0, 0, 0)
    # The key wins over the body's `user` and the address, and the scheduling key does not
    # carry the secret.
    assert first == identify(WITH_USERS, b"sk-server-1", "bob", "10.9.9.9")
    assert "sk-server-1" not in first.key


def test_open_gateway_uses_the_user_string_then_the_address() -> None:
    ann = identify(OPEN, None, "ann", "10.0.0.1")
    assert ann == identify(OPEN, None, "ann", "10.0.0.2")
    assert ann != identify(OPEN, None, "ben", "10.0.0.1")
    assert ann.name == "anonymous"
    by_address = identify(OPEN, None, None, "10.0.0.1")
    assert by_address == identify(OPEN, None, "", "10.0.0.1")  # an empty `user` is none
    assert by_address == identify(OPEN, None, 42, "10.0.0.1")  # so is a non-string
    assert by_address != identify(OPEN, None, None, "10.0.0.2")
    assert by_address != ann
    assert identify(OPEN, None, None, None) == ANONYMOUS


def test_a_user_string_cannot_claim_a_configured_user() -> None:
    posing = identify(OPEN, None, "alice", "10.0.0.1")
    assert posing.name == "anonymous" and posing.key != "name:alice"
    # Nor the key of a server key's identity.
    assert identify(OPEN, None, "name:alice", None).key != "name:alice"


def test_long_and_odd_user_strings_get_bounded_keys() -> None:
    long = identify(OPEN, None, "x" * 4_000_000, None)
    assert len(long.key) < 100
    assert long != identify(OPEN, None, "x" * 3_999_999, None)
    # JSON allows lone surrogates; they must not crash the hashing.
    odd = identify(OPEN, None, "\ud800" * 100, None)
    assert odd.name == "anonymous"


@pytest.mark.parametrize("cfg", [WITH_USERS, USERS_ONLY], ids=["server-and-users", "users-only"])
@pytest.mark.parametrize("token", [None, b"", b"wrong", b"sk-alic", b"sk-alice2"])
def test_any_configured_key_makes_one_required(cfg: Config, token: bytes | None) -> None:
    assert keys_required(cfg)
    with pytest.raises(InvalidApiKey) as refused:
        identify(cfg, token, "ann", "10.0.0.1")
    assert refused.value.status == 401


def test_users_keys_count_as_keys() -> None:
    assert USERS_ONLY.all_api_keys == ("sk-alice",)
    assert set(WITH_USERS.all_api_keys) == {
        "sk-server-1",
        "sk-server-2",
        "sk-alice",
        "sk-bob-1",
        "sk-bob-2",
    }
    assert not keys_required(OPEN)
    # Open: a token is ignored, not refused.
    assert identify(OPEN, b"anything", "ann", None) == identify(OPEN, None, "ann", None)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        (b"", None),
        (b"Bearer sk-1", b"sk-1"),
        (b"bearer  sk-1 ", b"sk-1"),
        (b"Basic sk-1", None),
        (b"Bearer", None),
        (b"Bearer ", None),
    ],
)
def test_bearer_token_from_the_header(header: bytes | None, token: bytes | None) -> None:
    assert bearer_token(header) == token
