"""How a client command reaches the daemon (``trioserve_cli/target.py``): the admin socket when
no ``--url`` is given, this account can connect to it and the running daemon is what serves it;
else the URL with ``--api-key``, the config's admin key or the local admin token — those two only
to the URL the running daemon recorded. The decision on its own first (config files, token
files, sockets and a daemon row made in the test), then the commands against a real daemon (in
a thread of the test's process, a ``trioserve start`` where its log is read); HTTPS with
certificates made in the test."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import pytest

from tests.support.admin import admin_token
from tests.support.cli import error_line, invoke
from tests.support.config import echo_cmd, write_config
from tests.support.daemon import DaemonHandle, DaemonProcess, ThreadedDaemon
from tests.support.ports import free_port, port_range
from tests.support.tls import Certificates
from trioserve.host.admin_files import write_admin_token
from trioserve.host.identity import process_start_time, read_boot_id
from trioserve.host.store import DaemonRow, InstanceLock, StateStore
from trioserve_cli.target import ClientOptions, Credential, find_target
from trioserve_cli.ui_cmd import page_url

# -- the decision --------------------------------------------------------------------------------


class Local:
    """A config file naming a state folder with a local admin token in it; no daemon unless
    ``running()`` says one runs."""

    def __init__(
        self, directory: Path, host: str = "127.0.0.1", port: int | None = None, **server: Any
    ) -> None:
        self.state_dir = directory / "s"
        self.state_dir.mkdir()
        self.host = host
        self.port = port or free_port()
        self.config = write_config(
            directory / "c.toml", self.state_dir, self.port, server={"host": host, **server}
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = self.state_dir / "admin.sock"
        self.token = write_admin_token(self.state_dir)

    def options(self, **options: Any) -> ClientOptions:
        return ClientOptions(config_file=self.config, **options)

    def running(self, url: str | None = None) -> Any:
        """This test's process as the state folder's running daemon, recorded at ``url`` (by
        default the config's bind address, as ``trioserve start`` records it)."""
        return running_here(self.state_dir, url or f"http://{self.host}:{self.port}")


@contextmanager
def running_here(state_dir: Path, url: str) -> Iterator[None]:
    """What ``trioserve start`` leaves for the CLI to find, with this process as the daemon:
    the instance lock held, and a row with this pid, its start time, this boot and ``url``."""
    lock = InstanceLock(state_dir)
    lock.acquire()
    store = StateStore(state_dir)
    pid = os.getpid()
    row = DaemonRow(
        instance=uuid.uuid4().hex[:12],
        pid=pid,
        pid_start_time=process_start_time(pid),
        boot_id=read_boot_id(),
        url=url,
        started_at=time.time(),
        stopped_at=None,
    )
    store.record_daemon(row)
    try:
        yield
    finally:
        store.daemon_stopped(row.instance)
        lock.release()


@contextmanager
def listening(path: Path) -> Iterator[None]:
    """A Unix socket listening at ``path`` in this process (the kernel queues connections:
    nobody accepts)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        yield


_REFUSAL = json.dumps(
    {"error": {"message": "an admin key is required", "type": "auth", "code": "unauthorized"}}
).encode()
_ANSWER = (
    b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_REFUSAL), _REFUSAL)
)


class _Recording(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        head = b""
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            head += line
        server: Recorder = self.server  # type: ignore[assignment]
        server.received.append(head)
        self.wfile.write(_ANSWER)


class Recorder(socketserver.TCPServer):
    """Another account's listener on a loopback port: keeps the head of every request and
    refuses it as a daemon refuses a keyless admin call (401 in the daemon's error shape)."""

    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Recording)
        self.port: int = self.server_address[1]
        self.received: list[bytes] = []

    def __enter__(self) -> Recorder:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()


# Another process serving a Unix socket: writes what each connection sent to the log (appends,
# one line of JSON per connection), answers a request 200 "{}".
_IMPOSTOR = r"""
import json, os, socket, sys
path, log = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
print(os.getpid(), flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        conn.settimeout(5)
        data = b""
        try:
            while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                data += chunk
        except OSError:
            pass
        with open(log, "a") as f:
            f.write(json.dumps(data.decode("latin-1")) + "\n")
        if data:
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
"""


@contextmanager
def impostor(path: Path, log: Path) -> Iterator[int]:
    """A process that is not the daemon serving the Unix socket at ``path``; yields its pid."""
    with subprocess.Popen(
        [sys.executable, "-c", _IMPOSTOR, str(path), str(log)], stdout=subprocess.PIPE, text=True
    ) as proc:  # closes its stdout and waits for it
        try:
            assert proc.stdout is not None
            yield int(proc.stdout.readline())
        finally:
            proc.kill()


def connections(log: Path) -> list[str]:
    """What each connection to an impostor sent, in order."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture
def local(short_dir: Path) -> Local:
    return Local(short_dir)


def test_without_url_the_admin_socket_is_used_when_the_daemon_serves_it(local: Local) -> None:
    with local.running(), listening(local.socket):
        target = find_target(local.options())
    assert target.socket == local.socket
    assert (target.api_key, target.credential) == (None, Credential.NONE)
    # Shown in messages and `status`: the daemon's URL is still known.
    assert target.url == local.url


def test_a_socket_file_nobody_listens_on_is_passed_over(local: Local) -> None:
    with listening(local.socket):
        pass
    assert local.socket.exists()  # what a SIGKILLed daemon leaves
    with local.running():
        target = find_target(local.options())
    assert target.socket is None
    assert (target.url, target.api_key, target.credential) == (
        local.url,
        local.token,
        Credential.TOKEN,
    )


def test_a_socket_not_served_by_the_running_daemon_is_passed_over_and_gets_no_key(
    local: Local, short_dir: Path
) -> None:
    log = short_dir / "impostor.log"
    with local.running(), impostor(local.socket, log) as pid:
        assert pid != os.getpid()
        target = find_target(local.options(api_key="sk-mine"))
        assert (target.socket, target.url, target.api_key) == (None, local.url, "sk-mine")
        # Through the command: the request goes to the running daemon's URL (nobody listens
        # there in this test), never to the socket.
        result = invoke(
            ["models", "list", "--api-key", "sk-mine"], TRIOSERVE_CONFIG=str(local.config)
        )
        assert (result.exit_code, result.stderr) == (
            1,
            f"trioserve: no daemon answers at {local.url}\n",
        )
        seen = connections(log)
    # Connected to (that is how its pid is learnt), and never sent a byte.
    assert seen and set(seen) == {""}


def test_a_socket_is_not_even_tried_while_no_daemon_runs(local: Local, short_dir: Path) -> None:
    log = short_dir / "impostor.log"
    with impostor(local.socket, log):
        target = find_target(local.options(api_key="sk-mine"))
        assert target.socket is None
        assert target.local.pid is None
    assert connections(log) == []


def test_the_impostor_socket_is_named_when_admin_is_refused(
    short_dir: Path,
) -> None:
    with Recorder() as daemon_port:
        local = Local(short_dir, port=daemon_port.port)
        (local.state_dir / "admin.token").unlink()  # as if this account could not read it
        log = short_dir / "impostor.log"
        with local.running(), impostor(local.socket, log) as pid:
            result = invoke(["models", "unload", "echo"], TRIOSERVE_CONFIG=str(local.config))
    assert result.exit_code == 1
    assert result.stderr == (
        f"trioserve: POST /admin/models/echo/unload needs admin, and the admin socket "
        f"{local.socket} is served by pid {pid}, not by the daemon (pid {os.getpid()}), so it "
        f"was not used; and this account cannot read {local.state_dir / 'admin.token'}: pass "
        "--api-key with an admin key, or run as the daemon's user (or a member of its "
        "admin_group)\n"
    )
    assert [b"authorization" in head.lower() for head in daemon_port.received] == [False]


@pytest.mark.parametrize("admin_keys", [[], ["adm-1"]], ids=["token", "admin-key"])
def test_the_configs_url_gets_no_token_nor_key_while_no_daemon_runs(
    short_dir: Path, admin_keys: list[str]
) -> None:
    # The daemon is down (its token file left behind); another account listens on its port.
    with Recorder() as other:
        local = Local(short_dir, port=other.port, admin_keys=admin_keys)
        target = find_target(local.options())
        assert (target.url, target.api_key, target.credential) == (
            local.url,
            None,
            Credential.NONE,
        )
        result = invoke(["models", "unload", "echo"], TRIOSERVE_CONFIG=str(local.config))
        explicit = invoke(
            ["models", "unload", "echo", "--url", local.url], TRIOSERVE_CONFIG=str(local.config)
        )
        # Nor into the page's address.
        assert page_url(None, local.config) == f"{local.url}/ui"
    assert result.exit_code == 1
    assert result.stderr == (
        "trioserve: POST /admin/models/echo/unload needs admin, and the state store of "
        f"{local.state_dir} records no running daemon: the config's admin key and the local "
        "admin token go only to the URL the running daemon records; pass --api-key with an "
        f"admin key of the daemon at {local.url}\n"
    )
    assert (explicit.exit_code, explicit.stderr) == (1, result.stderr)
    assert len(other.received) == 2
    for head in other.received:
        assert head.startswith(b"POST /admin/models/echo/unload ")
        assert b"authorization" not in head.lower()
        assert local.token.encode() not in head and b"adm-1" not in head


def test_the_configs_url_gets_no_token_when_the_daemon_recorded_another(local: Local) -> None:
    # Started with another port (the config edited since): the recorded URL is the daemon's.
    elsewhere = f"http://127.0.0.1:{free_port()}"
    with local.running(elsewhere):
        assert find_target(local.options()).url == elsewhere
        assert find_target(local.options()).api_key == local.token
        target = find_target(local.options(url=local.url))
    assert (target.api_key, target.credential) == (None, Credential.NONE)


def test_an_explicit_url_is_never_swapped_for_the_socket(local: Local) -> None:
    with local.running(), listening(local.socket):
        target = find_target(local.options(url=local.url + "/"))
    assert (target.socket, target.url, target.explicit_url) == (None, local.url, True)
    # The running daemon's URL: the token goes with it.
    assert (target.api_key, target.credential) == (local.token, Credential.TOKEN)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{other}",
        "http://localhost:{port}",  # may be another listener ([::1]) than the daemon's
        "https://127.0.0.1:{port}",
        "http://192.0.2.1:{port}",
    ],
)
def test_the_token_goes_only_to_the_running_daemons_url(local: Local, url: str) -> None:
    url = url.format(port=local.port, other=free_port())
    with local.running():
        target = find_target(local.options(url=url))
    assert (target.url, target.api_key, target.credential) == (url, None, Credential.NONE)


def test_a_daemon_on_every_address_is_its_loopback_address(short_dir: Path) -> None:
    local = Local(short_dir, host="0.0.0.0", api_keys=["k"])
    with local.running():
        target = find_target(local.options())
        assert (target.url, target.api_key) == (local.url, local.token)
        wildcard = find_target(local.options(url=f"http://0.0.0.0:{local.port}"))
    assert wildcard.api_key == local.token


def test_a_key_given_wins_then_the_configs_admin_key_then_the_token(short_dir: Path) -> None:
    local = Local(short_dir, admin_keys=["adm-1", "adm-2"])
    with local.running():
        target = find_target(local.options(api_key="mine"))
        assert (target.api_key, target.credential) == ("mine", Credential.API_KEY)
        target = find_target(local.options())
        assert (target.api_key, target.credential) == ("adm-1", Credential.CONFIG_KEY)
        # The config's key, like the token, is only for the running daemon's URL.
        assert find_target(local.options(url=f"http://127.0.0.1:{free_port()}")).api_key is None
        # On the socket a key given is sent too (/v1 paths want a user's key there as well).
        with listening(local.socket):
            target = find_target(local.options(api_key="mine"))
    assert (target.socket, target.api_key) == (local.socket, "mine")


def test_state_directory_wins_under_systemd(
    local: Local, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = short_dir / "systemd"
    elsewhere.mkdir()
    token = write_admin_token(elsewhere)
    monkeypatch.setenv("STATE_DIRECTORY", str(elsewhere))
    with running_here(elsewhere, local.url):
        with listening(elsewhere / "admin.sock"):
            target = find_target(local.options())
        assert (target.local.state_dir, target.socket) == (elsewhere, elsewhere / "admin.sock")
        assert find_target(local.options()).api_key == token


def test_an_invalid_config_still_names_its_state_folder(local: Local) -> None:
    local.config.write_text(local.config.read_text() + "[models.broken\n")
    with local.running():
        target = find_target(local.options())
        with listening(local.socket):
            assert find_target(local.options()).socket == local.socket
    assert target.local.config is None and "invalid TOML" in (target.local.config_error or "")
    assert (target.local.state_dir, target.url, target.api_key) == (
        local.state_dir,
        local.url,
        local.token,
    )


def test_an_invalid_config_keeps_each_server_field_that_is_valid(short_dir: Path) -> None:
    local = Local(short_dir, admin_socket="{state_dir}/other.sock", tls_cert="c.pem")
    # Valid TOML, invalid config: a wrong type elsewhere in [server], and an unknown key.
    text = local.config.read_text().replace("[server]", '[server]\nhealth_port = "x"\nbogus = 1')
    local.config.write_text(text)
    found = find_target(local.options()).local
    assert found.config is None and found.config_error is not None
    assert (found.state_dir, found.socket, found.configured_url) == (
        local.state_dir,
        local.state_dir / "other.sock",
        f"https://127.0.0.1:{local.port}",
    )
    # A field that is itself invalid takes its default.
    local.config.write_text(text.replace(f"port = {local.port}", 'port = "8600"'))
    assert find_target(local.options()).local.configured_url == "https://127.0.0.1:8600"


def test_no_socket_when_the_config_turns_it_off(short_dir: Path) -> None:
    local = Local(short_dir, admin_socket="")
    with local.running(), listening(local.socket):
        target = find_target(local.options())
    assert (target.socket, target.credential) == (None, Credential.TOKEN)


# -- against a daemon ----------------------------------------------------------------------------


Handle = TypeVar("Handle", bound=DaemonHandle)


class Daemon(Generic[Handle]):
    """A daemon with the default admin settings (admin_keys empty, the admin socket at its
    default place, admin_over_tcp = "keys") and one echo model."""

    def __init__(self, proc: Handle, config: Path, state_dir: Path) -> None:
        self.proc = proc
        self.config = config
        self.state_dir = state_dir
        self.url = proc.url
        self.socket = state_dir / "admin.sock"
        self.token_file = state_dir / "admin.token"

    def invoke(self, *args: str, **env: str | None) -> Any:
        """The CLI with this daemon's config in TRIOSERVE_CONFIG (as a user would set it)."""
        return invoke(list(args), TRIOSERVE_CONFIG=str(self.config), **env)

    def hide_token(self) -> None:
        """As if this account could not read the token (the tests run as the daemon's user)."""
        self.token_file.rename(self.state_dir / "hidden.token")

    def state(self, model: str = "echo") -> str:
        status = httpx.get(f"{self.url}/admin/status", timeout=10, trust_env=False).json()
        return str(status["models"][model]["state"])


def start_daemon(
    directory: Path, start: Callable[[Path, str], Handle], **server: Any
) -> Daemon[Handle]:
    """``Daemon``, started by ``start`` (``threaded_daemon`` or ``spawn_daemon``)."""
    state_dir = directory / "s"
    port = free_port()
    config = write_config(
        directory / "c.toml",
        state_dir,
        port,
        {"echo": {"cmd": echo_cmd()}},
        server=server,
        supervisor={"port_range": port_range()},
    )
    return Daemon(start(config, f"http://127.0.0.1:{port}"), config, state_dir)


@pytest.fixture
def daemon(
    short_dir: Path, threaded_daemon: Callable[[Path, str], ThreadedDaemon]
) -> Daemon[ThreadedDaemon]:
    return start_daemon(short_dir, threaded_daemon)


def test_tcp_admin_writes_need_the_token_the_cli_sends(daemon: Daemon[ThreadedDaemon]) -> None:
    # What the CLI is spared: the daemon refuses a keyless admin write over TCP.
    refused = httpx.post(f"{daemon.url}/admin/models/echo/load", timeout=10, trust_env=False)
    assert refused.status_code == 401
    loaded = daemon.invoke("models", "load", "echo", "--url", daemon.url)
    assert loaded.exit_code == 0, loaded.output
    assert daemon.state() == "ready"
    logs = daemon.invoke("logs", "echo", "--tail", "1", "--url", daemon.url)
    assert logs.exit_code == 0, logs.output
    unloaded = daemon.invoke("models", "unload", "echo", "--url", daemon.url)
    assert (unloaded.exit_code, unloaded.stdout) == (0, "echo: stopped\n"), unloaded.output
    assert daemon.state() == "stopped"


def test_without_url_the_admin_socket_needs_no_token(
    short_dir: Path, spawn_daemon: Callable[[Path, str], DaemonProcess]
) -> None:
    # A subprocess: its log is read.
    daemon = start_daemon(short_dir, spawn_daemon)
    if not daemon.socket.exists():
        pytest.skip("this daemon has no admin socket yet")
    daemon.hide_token()
    loaded = daemon.invoke("models", "load", "echo")
    assert loaded.exit_code == 0, loaded.output
    assert daemon.state() == "ready"
    assert daemon.invoke("logs", "echo", "--tail", "1").exit_code == 0
    unloaded = daemon.invoke("models", "unload", "echo", "--force")
    assert (unloaded.exit_code, unloaded.stdout) == (0, "echo: stopped\n"), unloaded.output
    status = daemon.invoke("status")
    assert status.exit_code == 0, status.output
    # The daemon's URL, not the socket's path: what a user would type next.
    assert status.stdout.startswith(f"trioserve 0.1.0 at {daemon.url}: pid {daemon.proc.pid}")
    reloaded = daemon.invoke("reload")
    assert (reloaded.exit_code, reloaded.stdout) == (0, "reloaded: no changes\n")
    # The socket's writes are logged with who made them.
    assert "admin socket: POST /admin/models/echo/unload by uid" in daemon.proc.stderr()


def test_no_socket_no_token_no_key_is_one_line_saying_what_to_do(
    short_dir: Path, threaded_daemon: Any
) -> None:
    daemon = start_daemon(short_dir, threaded_daemon, admin_socket="")
    daemon.hide_token()
    result = daemon.invoke("models", "unload", "echo")
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        "trioserve: POST /admin/models/echo/unload needs admin, and this account can neither "
        f"read {daemon.token_file}: pass --api-key with an admin key, or run as the daemon's "
        "user (or a member of its admin_group)\n"
    )
    logs = daemon.invoke("logs", "echo")
    assert logs.exit_code == 1
    assert error_line(logs).startswith("trioserve: GET /admin/models/echo/logs needs admin, and ")


def test_an_explicit_url_with_the_socket_there_says_to_leave_it_out(
    daemon: Daemon[ThreadedDaemon],
) -> None:
    if not daemon.socket.exists():
        pytest.skip("this daemon has no admin socket yet")
    daemon.hide_token()
    result = daemon.invoke("models", "unload", "echo", TRIOSERVE_URL=daemon.url)
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        "trioserve: POST /admin/models/echo/unload needs admin: pass --api-key, or leave out "
        f"--url (and TRIOSERVE_URL) to use the admin socket {daemon.socket}\n"
    )


def test_a_config_of_another_daemon_sends_no_token(
    daemon: Daemon[ThreadedDaemon], tmp_path: Path
) -> None:
    other = write_config(tmp_path / "other.toml", tmp_path / "other-state", free_port())
    result = invoke(["models", "unload", "echo", "--url", daemon.url], TRIOSERVE_CONFIG=str(other))
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        "trioserve: POST /admin/models/echo/unload needs admin: pass --api-key with an admin "
        f"key, or --config with the config of the daemon at {daemon.url} so that its admin "
        "socket or local admin token can be used\n"
    )
    # Given the key (here: the token, as an admin would paste it), it works from anywhere.
    token = admin_token(daemon.state_dir)
    result = invoke(
        ["models", "unload", "echo", "--url", daemon.url, "--api-key", token],
        TRIOSERVE_CONFIG=str(other),
    )
    assert result.exit_code == 0, result.output


def test_a_key_the_daemon_refuses_is_said_in_its_words(
    short_dir: Path, threaded_daemon: Any
) -> None:
    daemon = start_daemon(short_dir, threaded_daemon, admin_keys=["adm-1"], admin_socket="")
    result = daemon.invoke("models", "unload", "echo", "--api-key", "wrong")
    assert result.exit_code == 1
    assert error_line(result).startswith("trioserve: an admin key is required"), result.stderr
    # No key: the config's own admin key (whoever reads the config holds it anyway).
    assert daemon.invoke("models", "unload", "echo").exit_code == 0


# -- HTTPS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("tls"))


class TlsDaemon:
    def __init__(
        self, directory: Path, threaded_daemon: Any, certs: Certificates, **tls: Any
    ) -> None:
        state_dir = directory / "s"
        port, health = free_port(), free_port()
        self.config = write_config(
            directory / "c.toml",
            state_dir,
            port,
            {"echo": {"cmd": echo_cmd()}},
            server={"health_port": health, "admin_socket": "", **certs.server_settings(**tls)},
            supervisor={"port_range": port_range()},
        )
        # The handle's own client speaks plain HTTP: to the health port.
        self.proc = threaded_daemon(self.config, f"http://127.0.0.1:{health}")
        self.url = f"https://127.0.0.1:{port}"
        self.certs = certs

    def invoke(self, *args: str, **env: str | None) -> Any:
        return invoke([*args, "--url", self.url], TRIOSERVE_CONFIG=str(self.config), **env)


def test_https_with_ca_cert(short_dir: Path, threaded_daemon: Any, certs: Certificates) -> None:
    daemon = TlsDaemon(short_dir, threaded_daemon, certs)
    ca = str(certs.ca_pem)
    status = daemon.invoke("status", "--ca-cert", ca)
    assert status.exit_code == 0, status.output
    assert status.stdout.startswith(f"trioserve 0.1.0 at {daemon.url}: pid {daemon.proc.pid}")
    # Admin writes over HTTPS carry the local admin token: the URL is the config's daemon's.
    loaded = daemon.invoke("models", "load", "echo", TRIOSERVE_CA_CERT=ca)
    assert loaded.exit_code == 0, loaded.output
    unloaded = daemon.invoke("models", "unload", "echo", TRIOSERVE_CA_CERT=ca)
    assert (unloaded.exit_code, unloaded.stdout) == (0, "echo: stopped\n"), unloaded.output

    untrusted = daemon.invoke("status")
    assert untrusted.exit_code == 1
    assert untrusted.stderr == (
        f"trioserve: cannot verify the certificate of {daemon.url} (unable to get local issuer "
        "certificate): pass --ca-cert (TRIOSERVE_CA_CERT) with the CA that signed it\n"
    )
    missing = daemon.invoke("status", "--ca-cert", str(short_dir / "nope.pem"))
    assert missing.exit_code == 2
    assert missing.stderr == (
        f"trioserve: --ca-cert {short_dir / 'nope.pem'}: No such file or directory\n"
    )
    # Plain HTTP to the HTTPS port.
    plain = invoke(["status", "--url", daemon.url.replace("https://", "http://")])
    assert plain.exit_code == 1
    assert "(if it serves HTTPS, use an https:// URL)" in error_line(plain)


def test_https_with_a_client_certificate(
    short_dir: Path, threaded_daemon: Any, certs: Certificates
) -> None:
    daemon = TlsDaemon(short_dir, threaded_daemon, certs, client_ca=True)
    ca = str(certs.ca_pem)
    without = daemon.invoke("models", "list", "--ca-cert", ca)
    assert without.exit_code == 1
    line = error_line(without)
    # Refused with a TLS alert, or (TLS 1.3 often does) hung up on after the handshake.
    assert line.startswith(
        (
            f"trioserve: the TLS handshake with {daemon.url} failed (",
            f"trioserve: talking to the daemon at {daemon.url} failed: ",
        )
    ), line
    assert "client certificate: pass --client-cert and --client-key" in line, line
    # The key and the chain in one file, as curl takes it.
    listed = daemon.invoke(
        "models", "list", "--ca-cert", ca, "--client-cert", str(certs.client_pem)
    )
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.split()[:4] == ["MODEL", "STATE", "echo", "stopped"]
    # The same from the environment, with the key in a file of its own.
    key = short_dir / "client.key"
    cert = short_dir / "client.crt"
    certs.client.private_key_pem.write_to_path(str(key))
    for blob in certs.client.cert_chain_pems:
        blob.write_to_path(str(cert), append=True)
    env = {
        "TRIOSERVE_CA_CERT": ca,
        "TRIOSERVE_CLIENT_CERT": str(cert),
        "TRIOSERVE_CLIENT_KEY": str(key),
    }
    loaded = daemon.invoke("models", "load", "echo", **env)
    assert loaded.exit_code == 0, loaded.output
    lonely = daemon.invoke("status", "--ca-cert", ca, "--client-key", str(key))
    assert (lonely.exit_code, lonely.stderr) == (
        2,
        "trioserve: --client-key needs --client-cert (TRIOSERVE_CLIENT_CERT)\n",
    )


@contextmanager
def resetting_tls_server(certs: Certificates) -> Iterator[str]:
    """An HTTPS port that completes the handshake, then resets the connection (as a server
    refusing a client without a certificate can, under TLS 1.3, instead of an alert)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except (OSError, ssl.SSLError):
                    conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=5)


def test_a_reset_after_the_handshake_suggests_a_client_certificate(
    certs: Certificates,
) -> None:
    with resetting_tls_server(certs) as url:
        refused = invoke(["status", "--url", url, "--ca-cert", str(certs.ca_pem)])
    assert refused.exit_code == 1
    line = error_line(refused)
    assert line.startswith(f"trioserve: talking to the daemon at {url} failed: "), line
    assert "client certificate: pass --client-cert and --client-key" in line, line
