"""The admin socket, server side: the daemon listens on ``{state_dir}/admin.sock`` (mode 0600,
or 0660 with ``admin_group``), serves the admin API there without a key, with each
connection's peer credentials (``SO_PEERCRED``), and removes the file at stop; a stale file is
replaced, anything else in the way refuses the start."""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.config import echo_config
from tests.support.daemon import leak_checked_daemon, running_daemon
from tests.support.tls import Certificates
from trioserve.daemon import DaemonError, run_daemon
from trioserve.gateway.admin_access import Peer
from trioserve.server.sockets import AdminSocket, ListenError, peer_of


@asynccontextmanager
async def _over(path: Path) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost", timeout=30, trust_env=False
    ) as client:
        yield client


def _group_we_may_give() -> str:
    """A group this process may give a file it owns: any as root, else one of its own."""
    if os.geteuid() == 0:
        return "daemon"
    return grp.getgrgid(os.getegid()).gr_name


def test_peer_credentials_are_the_connecting_process() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert peer_of(left) == Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())


class _CredentialsOf:
    """A connection whose ``SO_PEERCRED`` is the C ``struct ucred`` of the given ids."""

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.ucred = pid.to_bytes(4, sys.byteorder, signed=True) + b"".join(
            number.to_bytes(4, sys.byteorder) for number in (uid, gid)
        )

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option, size) == (socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return self.ucred


def test_user_and_group_ids_past_2_31_are_read_unsigned() -> None:
    # uid_t and gid_t are unsigned: ids this large exist (user namespaces, SSSD's id mapping),
    # and a negative one in the admin log (or compared to a uid) would be wrong.
    conn = _CredentialsOf(pid=4321, uid=2**32 - 2, gid=2**31 + 5)
    assert peer_of(conn) == Peer(pid=4321, uid=2**32 - 2, gid=2**31 + 5)  # type: ignore[arg-type]


async def test_the_admin_socket_is_admin_without_a_key_and_tcp_is_not(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve.gateway.admin_access")
    path = state_dir / "admin.sock"
    async with leak_checked_daemon(echo_config(state_dir)) as (_, tcp):
        mode = os.stat(path)
        assert stat.S_ISSOCK(mode.st_mode)
        assert stat.S_IMODE(mode.st_mode) == 0o600, oct(mode.st_mode)
        assert mode.st_uid == os.geteuid()
        async with _over(path) as admin:
            assert (await admin.get("/health")).json() == {"status": "ok"}
            loaded = await admin.post("/admin/models/echo/load")
            assert loaded.status_code == 200, loaded.text
            # The same write over TCP, no key: refused (no admin_keys, so the local token
            # or this socket would be needed).
            refused = await tcp.post("/admin/models/echo/unload")
            assert refused.status_code == 401, refused.text
            assert "admin socket" in refused.json()["error"]["message"]
            unloaded = await admin.post("/admin/models/echo/unload")
            assert unloaded.status_code == 200, unloaded.text
            # The relay and reads work on the socket as on TCP.
            assert (await admin.get("/v1/models")).status_code == 200
            assert (await admin.get("/admin/status")).status_code == 200
    assert not path.exists()
    # Who made each write, by the kernel's word on the connection (this process).
    written = [r.getMessage() for r in caplog.records if "admin socket: POST" in r.getMessage()]
    assert len(written) == 2, written
    assert written[1].startswith("admin socket: POST /admin/models/echo/unload by uid"), written
    assert written[1].endswith(f" by uid {os.getuid()}, pid {os.getpid()}"), written


async def test_admin_group_makes_the_socket_0660_with_that_group(state_dir: Path) -> None:
    group = _group_we_may_give()
    config = echo_config(state_dir, server={"admin_group": group})
    async with running_daemon(config):
        mode = os.stat(state_dir / "admin.sock")
        assert stat.S_IMODE(mode.st_mode) == 0o660, oct(mode.st_mode)
        assert mode.st_gid == grp.getgrnam(group).gr_gid
        async with _over(state_dir / "admin.sock") as admin:
            assert (await admin.get("/admin/status")).status_code == 200


async def test_a_stale_socket_file_is_replaced(state_dir: Path) -> None:
    path = state_dir / "admin.sock"
    # What a killed daemon leaves: the file of a socket nobody listens on.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    path.chmod(0o777)
    async with running_daemon(echo_config(state_dir)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with _over(path) as admin:
            assert (await admin.get("/health")).status_code == 200
    assert not path.exists()


async def test_a_tls_daemon_keeps_its_admin_socket_plain(state_dir: Path, tmp_path: Path) -> None:
    certs = Certificates(tmp_path / "tls")
    async with running_daemon(echo_config(state_dir, server=certs.server_settings())) as (info, _):
        assert info.url.startswith("https://")
        async with _over(state_dir / "admin.sock") as admin:
            assert (await admin.post("/admin/models/echo/load")).status_code == 200


async def test_an_empty_admin_socket_setting_makes_none(state_dir: Path) -> None:
    async with running_daemon(echo_config(state_dir, server={"admin_socket": ""})) as (_, tcp):
        assert (await tcp.get("/health")).status_code == 200
        assert not any(entry.is_socket() for entry in state_dir.iterdir())


async def test_the_socket_may_live_outside_the_state_dir(state_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.sock"
    config = echo_config(state_dir, server={"admin_socket": str(path)})
    async with running_daemon(config), _over(path) as admin:
        assert (await admin.post("/admin/models/echo/load")).status_code == 200
    assert not path.exists()


@pytest.mark.parametrize("obstacle", ["a plain file", "a live socket", "a missing group"])
async def test_what_the_daemon_may_not_replace_refuses_the_start(
    state_dir: Path, obstacle: str
) -> None:
    path = state_dir / "admin.sock"
    server: dict[str, str] = {}
    live = None
    if obstacle == "a plain file":
        path.write_text("mine\n")
    elif obstacle == "a live socket":
        live = socket.socket(socket.AF_UNIX)
        live.bind(str(path))
        live.listen()
    else:
        server["admin_group"] = "no-such-group-trioserve"
    try:
        with pytest.raises(DaemonError) as refused:
            await run_daemon(echo_config(state_dir, server=server))
    finally:
        if live is not None:
            live.close()
    message = str(refused.value)
    if obstacle == "a plain file":
        assert message.startswith(f"cannot create the admin socket {path}: "), message
        assert "not a socket" in message and path.read_text() == "mine\n"
    elif obstacle == "a live socket":
        assert "another process listens on it" in message and path.exists()
    else:
        assert "no-such-group-trioserve" in message and not path.exists()


def test_a_socket_that_cannot_get_its_group_is_not_left_behind(tmp_path: Path) -> None:
    # (The daemon refuses such a group already for the admin token, written first.)
    path = tmp_path / "admin.sock"
    with pytest.raises(ListenError) as refused:
        AdminSocket(path, "no-such-group-trioserve", backlog=8)
    assert str(refused.value) == (
        "cannot create the admin socket: admin_group 'no-such-group-trioserve': no such group "
        "on this machine"
    )
    assert not path.exists()
