"""The files that make a local account an admin: the local admin token and the admin socket's
mode. Whoever can read ``{state_dir}/admin.token`` (mode 0600, or 0660 with ``admin_group``)
or connect to the admin socket is admin; no other account of the machine is.

The token is new at every start: a copy taken while someone was admin stops working at the next
restart. It is written to a temporary file with its final mode already set and then renamed, so
no reader ever sees it with a wider mode or half written.
"""

from __future__ import annotations

import contextlib
import grp
import os
import secrets
from pathlib import Path

__all__ = [
    "TOKEN_FILE",
    "AdminFileError",
    "admin_mode",
    "read_admin_token",
    "restrict",
    "token_path",
    "write_admin_token",
]

TOKEN_FILE = "admin.token"
# 32 random bytes, URL-safe: it travels in a URL fragment (``trioserve ui``).
_TOKEN_BYTES = 32


class AdminFileError(Exception):
    """The token or the socket cannot be given the owner, group or mode asked for."""


def token_path(state_dir: Path) -> Path:
    return state_dir / TOKEN_FILE


def admin_mode(group: str) -> int:
    """0600 for the daemon's user alone; 0660 when ``admin_group`` shares it."""
    return 0o660 if group else 0o600


def _gid(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise AdminFileError(f"admin_group {group!r}: no such group on this machine") from None


def restrict(path: Path, group: str) -> None:
    """Give ``path`` the admin files' mode, and ``group`` when one is set."""
    try:
        if group:
            os.chown(path, -1, _gid(group))
        os.chmod(path, admin_mode(group))
    except OSError as exc:
        raise AdminFileError(f"cannot restrict {path}: {exc.strerror or exc}") from exc


def write_admin_token(state_dir: Path, group: str = "") -> str:
    """Make a new local admin token, write it to ``{state_dir}/admin.token`` and return it."""
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    path = token_path(state_dir)
    temporary = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    # O_EXCL with the mode at creation: never readable by others, not even for a moment.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(token + "\n")
        restrict(temporary, group)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return token


def read_admin_token(state_dir: Path) -> str | None:
    """The local admin token, or None when there is none or this account may not read it."""
    try:
        token = token_path(state_dir).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None
