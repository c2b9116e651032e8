"""The sockets the server opens besides Hypercorn's own: the admin socket and the health port.

**The admin socket** (``[server] admin_socket``) serves the same app on a Unix socket whose
file's mode is the boundary: 0600 for the daemon's user, or 0660 with ``admin_group`` (the
pattern of HAProxy's runtime socket and Docker's). The mode is set between ``bind`` and
``listen``: until ``listen`` nobody can connect, so there is no moment with a wider mode
(``fchmod`` on a socket does not change its file on Linux, and the umask is process-wide). Each
connection's peer credentials (``SO_PEERCRED``) go into that connection's
``scope["state"]`` as a ``Peer`` (``hypercorn_serve``); the gateway treats those requests as
admin and logs who made each write.

**The health port** (``[server] health_port``): plain HTTP on loopback, answered at accept time
by the same machinery as the main port (``listener.py``, made to listen by ``listening.py``),
also when the main port speaks TLS.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from pathlib import Path

import trio

from trioserve.gateway.admin_access import Peer
from trioserve.host.admin_files import AdminFileError, restrict

__all__ = ["HEALTH_PORT_HOST", "AdminSocket", "ListenError", "bind_health_port", "peer_of"]

# The health port is for the machine's own probes (systemd, a local balancer's agent): never
# reachable from the network, so it needs no key and no TLS.
HEALTH_PORT_HOST = "127.0.0.1"
# struct ucred: pid_t (signed), uid_t and gid_t (unsigned: ids past 2**31 exist, e.g. in user
# namespaces and with SSSD/AD id mapping, and must not come out negative).
_UCRED = struct.Struct("iII")


class ListenError(Exception):
    """One of the server's own sockets cannot be opened; the message says which and why."""


def peer_of(conn: socket.socket | trio.socket.SocketType) -> Peer:
    """The process at the other end of a Unix socket connection, as the kernel saw it when it
    connected (``SO_PEERCRED``): it cannot be forged by what the client sends."""
    pid, uid, gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid=pid, uid=uid, gid=gid)


class AdminSocket:
    """The admin socket's listening socket, and its file, removed by ``remove`` (only if it is
    still the one this object made)."""

    def __init__(self, path: Path, group: str, backlog: int) -> None:
        """Replace a stale file at ``path``, bind, give the file the admin mode, then listen."""
        self.path = path
        _remove_stale(path)
        self._identity: tuple[int, int] | None = None
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.socket.bind(os.fsencode(path))
            made = os.stat(path)
            self._identity = (made.st_dev, made.st_ino)
            restrict(path, group)
            self.socket.listen(backlog)
            self.socket.setblocking(False)
        except BaseException as exc:
            self.socket.close()
            self.remove()
            if isinstance(exc, OSError):
                raise ListenError(
                    f"cannot create the admin socket {path}: {exc.strerror or exc}"
                ) from exc
            if isinstance(exc, AdminFileError):
                hint = (
                    f" (is the daemon's user a member of admin_group {group!r}?)"
                    if group and isinstance(exc.__cause__, PermissionError)
                    else ""
                )
                raise ListenError(f"cannot create the admin socket: {exc}{hint}") from exc
            raise

    def remove(self) -> None:
        """Remove the socket's file, unless another one has replaced it meanwhile."""
        if self._identity is None:
            return
        with contextlib.suppress(OSError):
            now = os.stat(self.path)
            if (now.st_dev, now.st_ino) == self._identity:
                self.path.unlink()


def _remove_stale(path: Path) -> None:
    """Remove a socket file nobody listens on (left by a daemon that was killed). The state
    dir's instance lock says no other daemon of this state dir runs; a socket someone does
    listen on (an ``admin_socket`` outside the state dir, shared by mistake) or a file that is
    no socket is refused rather than removed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(f"cannot create the admin socket {path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        raise ListenError(
            f"cannot create the admin socket {path}: a file that is not a socket is in the way; "
            "remove it or choose another [server] admin_socket"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(os.fsencode(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ListenError(
                    f"cannot create the admin socket {path}: {exc.strerror or exc}"
                ) from exc
        else:
            raise ListenError(
                f"cannot create the admin socket {path}: another process listens on it"
            )
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ListenError(
            f"cannot remove the stale admin socket {path}: {exc.strerror or exc}"
        ) from exc


def bind_health_port(port: int) -> socket.socket:
    """The health port's socket, bound on loopback and not yet listening: it listens as the
    main port's plain sockets do (``listening.Listening.accept_at_once``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((HEALTH_PORT_HOST, port))
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"cannot listen on {HEALTH_PORT_HOST}:{port} ([server] health_port): "
            f"{exc.strerror or exc}"
        ) from exc
    return sock
