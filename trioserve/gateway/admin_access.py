"""Who is admin: the one decision behind ``/admin`` writes and logs (and, later, ``/upstream``
and MCP's admin tools), so that no way in opens a door another keeps shut.

Admin is, in this order: a request on the admin socket (the server marks it, with the peer's
credentials, in ``scope["state"]``); an admin key when ``admin_keys`` is set; with
``admin_keys`` empty, the local admin token from ``{state_dir}/admin.token``, or anyone when
``admin_over_tcp = "open"``. Reads (status, events, usage, the page) stay as open as before:
with ``admin_keys`` set they need a key, without they are open to whoever reaches the port.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from trioserve.config import Config
from trioserve.errors import InvalidApiKey
from trioserve.gateway.asgi import Scope, key_matches, presented_key

__all__ = ["ADMIN_PEER_KEY", "AdminAccess", "Peer", "admin_peer", "log_socket_write"]

log = logging.getLogger(__name__)

# Where the server puts a ``Peer`` in ``scope["state"]`` for a connection on the admin socket
# (trioserve.server.hypercorn_serve). Absent for TCP connections: only the server sets it.
ADMIN_PEER_KEY = "trioserve.admin_peer"
# Reads under this prefix need admin too: a model's logs can hold prompt text (and a new read
# about one model is admin-only until decided otherwise).
_ADMIN_READ_PREFIX = "/admin/models/"


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of an admin socket connection (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


def admin_peer(scope: Scope) -> Peer | None:
    state: dict[str, Any] = scope.get("state") or {}
    peer = state.get(ADMIN_PEER_KEY)
    return peer if isinstance(peer, Peer) else None


class AdminAccess:
    """The admin decision, given the local admin token of this run (None: no token file)."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def is_admin(self, scope: Scope, config: Config) -> bool:
        """True when this request may do what only an admin may."""
        if admin_peer(scope) is not None:
            return True
        key = presented_key(scope)
        admin_keys = config.server.admin_keys
        if admin_keys:
            return key_matches(key, admin_keys)
        if config.server.admin_over_tcp == "open":
            return True
        return self.token is not None and key_matches(key, [self.token])

    def presents_admin_credential(self, scope: Scope, config: Config) -> bool:
        """True when the request itself carries admin: the admin socket, an admin key, or the
        local admin token (not ``admin_over_tcp = "open"``, which makes anyone admin): whose
        calls may be counted as the reserved user ``admin`` rather than its own."""
        if admin_peer(scope) is not None:
            return True
        key = presented_key(scope)
        if config.server.admin_keys:
            return key_matches(key, config.server.admin_keys)
        return self.token is not None and key_matches(key, [self.token])

    def refusal(self, scope: Scope, config: Config) -> InvalidApiKey | None:
        """For a request under ``/admin/``: the error to answer, or None to let it through."""
        if self.is_admin(scope, config):
            return None
        if config.server.admin_keys:
            # Every /admin path needs the key (reads too), as before.
            return InvalidApiKey("an admin key is required (one of server.admin_keys)")
        if not _needs_admin(scope):
            return None
        where = config.admin_socket_path
        socket_hint = f" or the admin socket {where}" if where is not None else ""
        return InvalidApiKey(
            "this admin call needs the local admin token from "
            f"{config.state_dir}/admin.token{socket_hint}: `trioserve` client commands use them "
            "when your account can read them; `trioserve ui` prints the page's address with it"
        )


def _needs_admin(scope: Scope) -> bool:
    """Writes and model logs need admin; other reads are open."""
    if scope["method"] not in ("GET", "HEAD"):
        return True
    # Runs of slashes as one, as the router sees them: "//admin/models/x/logs" is a logs read.
    path = re.sub("/{2,}", "/", scope["path"])
    return path.startswith(_ADMIN_READ_PREFIX)


def log_socket_write(scope: Scope, method: str, path: str) -> None:
    """Say who, by the peer's credentials, made an admin write on the admin socket."""
    peer = admin_peer(scope)
    if peer is None or method in ("GET", "HEAD"):
        return
    # The uid, not a name: a lookup can block on NSS (LDAP, sssd), and this runs in the loop.
    log.info("admin socket: %s %s by uid %d, pid %d", method, path, peer.uid, peer.pid)
