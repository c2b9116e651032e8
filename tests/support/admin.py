"""Admin calls from the tests and the benchmarks, the one way in: how a test is the daemon's
admin changes here and nowhere else.

Today that is the local admin token (issue 26): with ``admin_keys`` empty, the daemon writes a
new one to ``{state_dir}/admin.token`` at every start, and admin writes and model logs over TCP
need it. The tests run as the daemon's own user, so they read the file as any local admin would.

- ``AdminAuth(state_dir)``: for an httpx client or one call (``auth=``). ``running_daemon(config,
  admin=True)`` and ``DaemonProcess.admin`` (used by ``DaemonProcess.load``) are made of it.
- ``admin_header(state_dir)``: the header line for requests written byte for byte.

A test *about* who is admin uses a client without it (``running_daemon``'s default) and sends
what it means to send.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import httpx

from trioserve.host.admin_files import read_admin_token, token_path

__all__ = ["AdminAuth", "admin_header", "admin_token"]

# Only admin paths (/admin, and /upstream, admin-only by default): a key on /v1 would change
# whose request it is (the user is who the key names).
_ADMIN_PREFIXES = ("/admin/", "/upstream/")


def admin_token(state_dir: Path) -> str:
    """The local admin token of the daemon running on ``state_dir``."""
    token = read_admin_token(state_dir)
    assert token is not None, f"no local admin token in {token_path(state_dir)}"
    return token


def admin_header(state_dir: Path) -> bytes:
    """The admin's header line, for requests written byte for byte (no CRLF)."""
    return b"Authorization: Bearer " + admin_token(state_dir).encode()


class AdminAuth(httpx.Auth):
    """Makes an httpx client (or one call: ``auth=``) the admin of the daemon on
    ``state_dir``: its requests under ``/admin/`` and ``/upstream/`` carry the local admin
    token, unless they carry a key of their own. The token is read at each request: a
    restarted daemon has a new one. Without a token file nothing is added, and the daemon's
    401 names the file."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        has_key = "authorization" in request.headers or "x-api-key" in request.headers
        if request.url.path.startswith(_ADMIN_PREFIXES) and not has_key:
            token = read_admin_token(self.state_dir)
            if token is not None:
                request.headers["authorization"] = f"Bearer {token}"
        yield request
