"""Who is admin (issue 26): the local admin token, admin keys, ``admin_over_tcp``, and what
another account of the machine can and cannot do.

The daemon runs in this trio run for the HTTP rules. The tests about accounts run it as a
``trioserve start`` subprocess (as root: this interpreter lives under /root, which no other
account may enter) and try its files as ``nobody``, with every folder above them opened (0755)
so that the files' own modes are what is tested; root itself passes any mode, so "its own
account can" is shown by an ``admin_group`` member instead.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.admin import admin_token
from tests.support.config import echo_config, write_config
from tests.support.daemon import DaemonProcess, clean_env, running_daemon
from tests.support.http import assert_openai_error
from tests.support.ports import free_port
from trioserve.daemon import DaemonError, run_daemon
from trioserve.gateway.admin_access import AdminAccess, Peer
from trioserve.host.admin_files import read_admin_token, token_path

ADMIN_KEY = "sk-admin"
ADMIN_GROUP = "adm"  # a group of every Debian system
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching accounts needs root")
UNLOAD = "/admin/models/echo/unload"


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- the decision, without a daemon ---------------------------------------------------------------


def _scope(
    method: str, path: str, *, key: str | None = None, peer: Peer | None = None
) -> dict[str, Any]:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    state = {"trioserve.admin_peer": peer} if peer is not None else {}
    return {"method": method, "path": path, "headers": headers, "state": state}


def test_token_is_admin_only_while_admin_keys_are_empty(state_dir: Path) -> None:
    access = AdminAccess("tok")
    keyless = echo_config(state_dir)
    keyed = echo_config(state_dir, server={"admin_keys": [ADMIN_KEY]})
    assert access.is_admin(_scope("POST", UNLOAD, key="tok"), keyless)
    assert not access.is_admin(_scope("POST", UNLOAD, key="other"), keyless)
    assert not access.is_admin(_scope("POST", UNLOAD), keyless)
    # With admin keys configured, only they count: the token is the keyless machine's door.
    assert not access.is_admin(_scope("POST", UNLOAD, key="tok"), keyed)
    assert access.is_admin(_scope("POST", UNLOAD, key=ADMIN_KEY), keyed)


def test_socket_peer_is_admin_whatever_the_keys(state_dir: Path) -> None:
    access = AdminAccess("tok")
    keyed = echo_config(state_dir, server={"admin_keys": [ADMIN_KEY]})
    assert access.is_admin(_scope("POST", UNLOAD, peer=Peer(pid=1, uid=0, gid=0)), keyed)
    # Only a Peer object counts: a string in that place (which only the server could put
    # there anyway) is not a credential.
    fake = _scope("POST", UNLOAD)
    fake["state"]["trioserve.admin_peer"] = "root"
    assert not access.is_admin(fake, keyed)


def test_open_mode_makes_everyone_admin_without_admin_keys(state_dir: Path) -> None:
    access = AdminAccess("tok")
    config = echo_config(state_dir, server={"admin_over_tcp": "open"})
    assert access.is_admin(_scope("POST", UNLOAD), config)
    keyed = echo_config(state_dir, server={"admin_over_tcp": "open", "admin_keys": [ADMIN_KEY]})
    assert not access.is_admin(_scope("POST", UNLOAD), keyed)


@pytest.mark.parametrize(
    ("method", "path", "refused"),
    [
        ("GET", "/admin/status", False),
        ("GET", "/admin/events", False),
        ("GET", "/admin/history", False),
        ("GET", "/admin/models/echo/logs", True),
        ("POST", "/admin/models/echo/load", True),
        ("POST", UNLOAD, True),
        ("POST", "/admin/reload", True),
    ],
)
def test_writes_and_logs_need_admin_reads_do_not(
    state_dir: Path, method: str, path: str, refused: bool
) -> None:
    refusal = AdminAccess("tok").refusal(_scope(method, path), echo_config(state_dir))
    assert (refusal is not None) is refused
    if refusal is not None:
        assert refusal.status == 401
        assert "admin.token" in refusal.message and "admin socket" in refusal.message


# -- over TCP, in-process daemon -----------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_tcp_admin_write_needs_the_local_token(state_dir: Path) -> None:
    async with running_daemon(echo_config(state_dir)) as (_, client):
        token = read_admin_token(state_dir)
        assert token is not None and len(token) >= 32
        assert _mode(token_path(state_dir)) == 0o600

        refused = await client.post(UNLOAD)
        assert_openai_error(refused, 401, "invalid_api_key")
        assert str(token_path(state_dir)) in refused.json()["error"]["message"]
        wrong = await client.post(UNLOAD, headers=_bearer("not-the-token"))
        assert wrong.status_code == 401

        assert (await client.post(UNLOAD, headers=_bearer(token))).status_code == 200
        # Anthropic's header carries it too.
        assert (await client.post(UNLOAD, headers={"x-api-key": token})).status_code == 200


async def test_reads_stay_open_and_say_whether_the_caller_is_admin(state_dir: Path) -> None:
    async with running_daemon(echo_config(state_dir)) as (_, client):
        token = read_admin_token(state_dir)
        assert token is not None
        status = await client.get("/admin/status")
        assert status.status_code == 200 and status.json()["admin"] is False
        with_token = await client.get("/admin/status", headers=_bearer(token))
        assert with_token.json()["admin"] is True
        assert (await client.get("/ui")).status_code == 200
        # Model logs can hold prompt text: admin only.
        logs = await client.get("/admin/models/echo/logs")
        assert logs.status_code == 401
        logs = await client.get("/admin/models/echo/logs", headers=_bearer(token))
        assert logs.status_code == 200


async def test_admin_over_tcp_open_restores_keyless_writes(state_dir: Path) -> None:
    config = echo_config(state_dir, server={"admin_over_tcp": "open"})
    async with running_daemon(config) as (_, client):
        assert (await client.post(UNLOAD)).status_code == 200
        assert (await client.get("/admin/status")).json()["admin"] is True


async def test_admin_keys_replace_the_token(state_dir: Path) -> None:
    config = echo_config(state_dir, server={"admin_keys": [ADMIN_KEY]})
    async with running_daemon(config) as (_, client):
        token = read_admin_token(state_dir)
        assert token is not None
        assert (await client.post(UNLOAD, headers=_bearer(token))).status_code == 401
        assert (await client.get("/admin/status")).status_code == 401
        assert (await client.post(UNLOAD, headers=_bearer(ADMIN_KEY))).status_code == 200


async def test_token_is_new_at_every_start(state_dir: Path) -> None:
    tokens = []
    for _ in range(2):
        async with running_daemon(echo_config(state_dir)) as (_, client):
            token = read_admin_token(state_dir)
            assert token is not None
            assert (await client.post(UNLOAD, headers=_bearer(token))).status_code == 200
            tokens.append(token)
    assert tokens[0] != tokens[1]


@needs_root
async def test_admin_group_makes_the_token_group_readable(state_dir: Path) -> None:
    config = echo_config(state_dir, server={"admin_group": ADMIN_GROUP})
    async with running_daemon(config):
        info = token_path(state_dir).stat()
        assert _mode(token_path(state_dir)) == 0o660
        assert info.st_gid == grp.getgrnam(ADMIN_GROUP).gr_gid


async def test_doubled_slashes_do_not_skip_the_admin_check(state_dir: Path) -> None:
    async with running_daemon(echo_config(state_dir)) as (info, client):
        await client.post("/admin/models/echo/load", headers=_bearer(admin_token(state_dir)))
        for path in ("//admin/models/echo/unload", "/admin//models/echo/unload"):
            answer = await client.post(path)
            assert answer.status_code in (401, 404, 308), (path, answer.status_code)
        logs = await client.get("//admin/models//echo/logs")
        assert logs.status_code != 200
        assert info.supervisor.status()["echo"].state == "ready"


async def test_open_admin_on_a_network_address_needs_insecure(state_dir: Path) -> None:
    config = echo_config(state_dir, server={"host": "0.0.0.0", "api_keys": ["sk-user"]})
    open_config = config.model_copy(
        update={"server": config.server.model_copy(update={"admin_over_tcp": "open"})}
    )
    with pytest.raises(DaemonError, match='admin_over_tcp = "open"'):
        await run_daemon(open_config)


# -- another account ------------------------------------------------------------------------------

OTHER_USER = "nobody"  # another local account
# The probe runs as another account, which cannot enter this interpreter's home (/root is
# 0700): the system's Python runs it (standard library only).
SYSTEM_PYTHON = "/usr/bin/python3"

# Read the token, then call the admin socket and TCP. One word per attempt: ok, or the
# errno or HTTP status that refused it.
_PROBE = r"""
import errno, json, socket, sys, urllib.error, urllib.request
state_dir, port = sys.argv[1], sys.argv[2]
out = {}
try:
    token = open(state_dir + "/admin.token").read().strip()
    out["token"] = "ok"
except OSError as exc:
    token, out["token"] = None, errno.errorcode[exc.errno]
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(state_dir + "/admin.sock")
    s.sendall(b"POST /admin/models/echo/unload HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n"
              b"connection: close\r\n\r\n")
    out["socket"] = s.recv(64).split(b" ")[1].decode()
except OSError as exc:
    out["socket"] = errno.errorcode[exc.errno]
request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/models/echo/unload",
                                 method="POST", data=b"")
if token:
    request.add_header("authorization", "Bearer " + token)
try:
    out["tcp"] = str(urllib.request.urlopen(request, timeout=10).status)
except urllib.error.HTTPError as exc:
    out["tcp"] = str(exc.code)
print(json.dumps(out))
"""


@pytest.fixture
def open_state_dir() -> Iterator[Path]:
    """A state folder under folders anyone may traverse and list (0755), itself 0755: a 0700
    temporary folder above it (pytest's) would hide a file with a wrong mode."""
    top = Path(tempfile.mkdtemp(prefix="tsa-", dir="/tmp"))
    try:
        top.chmod(0o755)
        state = top / "state"
        state.mkdir()
        state.chmod(0o755)
        yield state
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _probe(
    user: str, state_dir: Path, port: int, *, groups: list[str] | None = None
) -> dict[str, str]:
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", _PROBE, str(state_dir), str(port)],
        user=user,
        group="nogroup" if user == OTHER_USER else user,
        extra_groups=groups or [],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


StartDaemon = Callable[..., tuple[Path, int]]


@pytest.fixture
def daemon_on_open_dir(
    open_state_dir: Path, tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess]
) -> StartDaemon:
    """``start(admin_group="")`` runs ``trioserve start`` on ``open_state_dir``; returns
    (state_dir, port)."""

    def start(group: str = "") -> tuple[Path, int]:
        port = free_port()
        server = {"admin_group": group} if group else None
        config = write_config(tmp_path / "trioserve.toml", open_state_dir, port, server=server)
        spawn_daemon(config, f"http://127.0.0.1:{port}")
        return open_state_dir, port

    return start


@needs_root
def test_another_account_cannot_read_the_token_or_use_the_socket(
    daemon_on_open_dir: StartDaemon,
) -> None:
    state_dir, port = daemon_on_open_dir()
    assert _mode(token_path(state_dir)) == 0o600
    assert _mode(state_dir / "admin.sock") == 0o600
    assert _probe(OTHER_USER, state_dir, port) == {
        "token": "EACCES",
        "socket": "EACCES",
        "tcp": "401",
    }
    # The daemon's own account is admin without any key: the socket, or the token over TCP.
    assert _probe("root", state_dir, port) == {"token": "ok", "socket": "200", "tcp": "200"}


@needs_root
def test_admin_group_members_are_admins_and_others_are_not(
    daemon_on_open_dir: StartDaemon,
) -> None:
    state_dir, port = daemon_on_open_dir(ADMIN_GROUP)
    assert _mode(token_path(state_dir)) == 0o660
    assert _mode(state_dir / "admin.sock") == 0o660
    member = _probe(OTHER_USER, state_dir, port, groups=[ADMIN_GROUP])
    assert member == {"token": "ok", "socket": "200", "tcp": "200"}
    outsider = _probe(OTHER_USER, state_dir, port)
    assert outsider == {"token": "EACCES", "socket": "EACCES", "tcp": "401"}
