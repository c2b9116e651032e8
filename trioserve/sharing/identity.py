"""Who a request is: the user it is scheduled and counted as, and whether it may use /v1/*.

In this order: the ``[users.NAME]`` whose key it presented; else the ``server.api_keys`` key
itself (each such key its own anonymous user); else the body's ``user`` string; else the
client's address. Anonymous identities each get their own fair share (weight 1, no limits of
their own) but are shown and counted as ``"anonymous"``: a raw ``user`` string or address never
becomes a metrics label.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from trioserve.config import ADMIN_USER_NAME, RESERVED_USER_NAME, Config
from trioserve.errors import InvalidApiKey

__all__ = [
    "ADMIN_USER",
    "ANONYMOUS",
    "ANONYMOUS_NAME",
    "User",
    "bearer_token",
    "identify",
    "keys_required",
]

ANONYMOUS_NAME = RESERVED_USER_NAME
# A `user` string longer than this is hashed for its scheduling key: the key lives as long as
# the user has requests on a model, and a client's 4 MB string need not.
_USER_FIELD_KEPT = 64


@dataclass(frozen=True, slots=True)
class User:
    """A request's identity as admission and accounting see it."""

    key: str  # scheduling key, unique per identity; never shown
    name: str = ANONYMOUS_NAME  # the configured name, or "anonymous": for status and metrics
    weight: float = 1.0
    max_concurrency: int = 0  # per model; 0 = no own limit
    max_queue: int = 0  # per model; 0 = the model's max_queue


# The identity of a request that carries none (and of `slot()` with no user).
ANONYMOUS = User(key=ANONYMOUS_NAME)
# Calls made with an admin credential where no /v1 key is (an admin MCP session, /upstream).
ADMIN_USER = User(key=f"name:{ADMIN_USER_NAME}", name=ADMIN_USER_NAME)


def keys_required(config: Config) -> bool:
    """Once any key is configured (``server.api_keys`` or a user's), /v1/* requires one."""
    return bool(config.all_api_keys)


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


def identify(
    config: Config, token: bytes | str | None, user_field: object, client: str | None
) -> User:
    """The user of one /v1/* request; raises ``InvalidApiKey`` when a key is required and
    ``token`` is none of the configured ones.

    ``user_field`` is the body's ``user`` value (anything; only a non-empty string counts),
    ``client`` the client's host address.
    """
    if isinstance(token, str):
        token = token.encode()
    owner: str | None = None
    server_key: str | None = None
    if token:
        # Every key is compared, without stopping at a match, so timing says nothing about
        # which key (or how much of one) matched.
        for key in config.server.api_keys:
            if hmac.compare_digest(token, key.encode()):
                server_key = key
        for name, user in config.users.items():
            for key in user.api_keys:
                if hmac.compare_digest(token, key.encode()):
                    owner = name
    if owner is not None:
        found = config.users[owner]
        return User(
            key=f"name:{owner}",
            name=owner,
            weight=found.weight,
            max_concurrency=found.max_concurrency,
            max_queue=found.max_queue,
        )
    if server_key is not None:
        # A digest, not the key: scheduling keys may end up in logs or debug output.
        return User(key="key:" + hashlib.sha256(server_key.encode()).hexdigest()[:32])
    if keys_required(config):
        raise InvalidApiKey()
    if isinstance(user_field, str) and user_field:
        if len(user_field) > _USER_FIELD_KEPT:
            # surrogatepass: JSON allows lone surrogates, UTF-8 does not.
            digest = hashlib.sha256(user_field.encode("utf-8", "surrogatepass")).hexdigest()
            return User(key="user#" + digest)
        return User(key="user:" + user_field)
    if client:
        return User(key="addr:" + client)
    return ANONYMOUS
