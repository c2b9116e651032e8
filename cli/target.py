"""Where a client command goes — the admin socket, or a URL with a key — decided here alone.

The rule, in order:

1. ``--url`` / ``TRIOSERVE_URL`` given: that URL, over TCP, always. An address the user named is
   never swapped for the local socket (as ``DOCKER_HOST`` replaces Docker's socket): it may be
   another machine's daemon, or the user may be trying the TCP side on purpose.
2. Otherwise the admin socket of the config's state folder, when this account can connect to it
   and the process serving it (``SO_PEERCRED``) is the state folder's running daemon: admin calls
   need no key there. A socket served by any other process is passed over as if it were absent:
   whoever could create the file (a configured path outside the state folder, while the daemon
   is down) must not be handed ``--api-key``.
3. Otherwise the URL the running daemon of that state folder recorded in the state store, else
   the config's ``host`` and ``port`` (``https`` with ``tls_cert``), else the default URL.

"The running daemon" is ``live_daemon``'s: the instance lock is held and the recorded pid is
alive with its recorded start time. Nothing else proves who listens anywhere.

The key sent is ``--api-key`` / ``TRIOSERVE_API_KEY`` when given (on the socket too: ``/v1``
paths ask for a user's key there as well). Without one, and only when the URL is the one the
running daemon recorded, the config's first ``admin_keys`` entry (whoever may read the config
holds it anyway), else the local admin token of ``{state_dir}/admin.token`` when this account
can read it. Any other URL gets neither — the config's own URL included while no daemon runs
there: on a shared machine another account may listen on a port the daemon is not holding.

The state folder comes from the config the way ``status`` finds it: ``--config`` /
``TRIOSERVE_CONFIG``, else ``conf/trioserve.toml``; ``$STATE_DIRECTORY`` wins under systemd. An
invalid config (``systemctl reload`` after a bad edit) still names its state folder as far as
it can be read; with no config file at all, the default state folder is used.
"""

from __future__ import annotations

import enum
import functools
import inspect
import os
import re
import socket
import sqlite3
import ssl
import stat
import struct
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import ValidationError

from trioserve.config import Config, ServerConfig
from trioserve.host.admin_files import read_admin_token, token_path
from trioserve.host.running import live_daemon
from trioserve.host.store import StateStore

from .common import (
    DEFAULT_URL,
    EXIT_USAGE,
    ApiKeyOption,
    CaCertOption,
    ClientCertOption,
    ClientKeyOption,
    ConfigOption,
    UrlOption,
    config_path,
    die,
    load_if_valid,
)

__all__ = [
    "ClientOptions",
    "Credential",
    "LocalDaemon",
    "Target",
    "base_url",
    "client_command",
    "find_local",
    "find_target",
]

R = TypeVar("R")

# Connecting to a local socket takes microseconds; this only bounds a wedged daemon's backlog.
_SOCKET_PROBE_TIMEOUT = 1.0
# struct ucred (SO_PEERCRED): pid_t, uid_t, gid_t.
_UCRED = struct.Struct("iII")
_SERVER_HEADER = re.compile(r"\[\s*server\s*\]")
# A daemon bound to every address is reached on loopback; the URL it records names the wildcard.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}
# What an invalid config is still read for: where its daemon is (see `_salvaged`).
_WHERE = ("state_dir", "admin_socket", "host", "port", "tls_cert")


def base_url(url: str | None) -> str:
    return (url or DEFAULT_URL).rstrip("/")


class Credential(enum.Enum):
    """What vouches for this client: shown in the hint of a refusal."""

    NONE = "none"
    API_KEY = "--api-key"
    CONFIG_KEY = "the config's admin key"
    TOKEN = "the local admin token"


# -- the state folder and its daemon ------------------------------------------------------------


@dataclass(frozen=True)
class LocalDaemon:
    """What the config (or its absence) and the state store say about this machine's daemon."""

    state_dir: Path
    socket: Path | None  # the configured admin socket; it may not exist
    config: Config | None
    config_error: str | None
    configured_url: str
    # The running daemon (``live_daemon``: lock held, pid alive with its recorded start time):
    # its pid and the URL it recorded; None when none runs or the store cannot be read.
    pid: int | None
    recorded_url: str | None
    store_error: str | None
    admin_keys: tuple[str, ...]

    @property
    def url(self) -> str:
        return self.recorded_url or self.configured_url

    @property
    def token_path(self) -> Path:
        return token_path(self.state_dir)

    def live_at(self, url: str) -> bool:
        """True when ``url`` is the URL the running daemon recorded (scheme, host and port alike;
        a wildcard bind counts as its loopback address): the one URL its credentials may go to.

        The config's own URL does not count by itself: while no daemon holds that port, any
        account of the machine may listen on it.
        """
        if self.recorded_url is None:
            return False
        endpoint = _endpoint(url)
        return endpoint is not None and endpoint == _endpoint(self.recorded_url)

    def configured_at(self, url: str) -> bool:
        """True when ``url`` is the config's own URL, whoever listens there."""
        endpoint = _endpoint(url)
        return endpoint is not None and endpoint == _endpoint(self.configured_url)

    def socket_peer(self) -> int | None:
        """The pid of the process serving the admin socket, or None when there is no socket or
        this account cannot connect to it."""
        return _peer_pid(self.socket) if self.socket is not None else None

    def socket_usable(self) -> bool:
        """True when this account can connect to the admin socket and the running daemon is
        what serves it. No daemon running: not even tried."""
        return self.pid is not None and self.socket_peer() == self.pid


def _endpoint(url: str) -> tuple[str, str, int] | None:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname or ""  # lower case, without the brackets of an IPv6 address
    if scheme not in ("http", "https") or not host:
        return None
    return scheme, _WILDCARDS.get(host, host), port or (443 if scheme == "https" else 80)


def _url(host: str, port: int, *, tls: bool) -> str:
    """The URL of a daemon bound to ``host``:``port``, where a client reaches it.

    trioserve/daemon.py's ``_configured_url`` builds the same URL (the one the daemon records
    before it is bound); it is not imported because importing ``trioserve.daemon`` loads the
    whole server (~160 ms) into every client command. Unlike it, a wildcard host becomes its
    loopback address here: the client has to connect somewhere.
    """
    host = _WILDCARDS.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def _loopback(url: str) -> str:
    """``url`` with a wildcard host replaced by loopback: where a client can reach it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host not in _WILDCARDS:
        return base_url(url)
    return base_url(_url(host, parts.port or 80, tls=parts.scheme == "https"))


def _server_section(text: str) -> dict[str, object]:
    """The ``[server]`` table of ``text``; when the whole is not TOML (the error may be
    anywhere), the lines of its ``[server]`` section alone, parsed by themselves."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        lines: list[str] = []
        inside = False
        for line in text.splitlines():
            if line.lstrip().startswith("["):
                inside = _SERVER_HEADER.fullmatch(line.split("#", 1)[0].strip()) is not None
            elif inside:
                lines.append(line)
        try:
            return tomllib.loads("\n".join(lines))
        except tomllib.TOMLDecodeError:
            return {}
    server = data.get("server")
    return server if isinstance(server, dict) else {}


def _salvaged(path: Path) -> Config:
    """What an invalid (or missing) config file still says about where its daemon is.

    The one path that works without a valid config: after a bad edit, ``systemctl reload`` and
    ``status`` must still reach the daemon the file was written for. So each ``[server]`` field
    of ``_WHERE`` that is valid on its own is kept, the rest take their defaults, and the result
    is a ``Config``: its own ``state_dir``, ``admin_socket_path`` and ``tls`` then apply, the
    rules written once in trioserve/config.py. Its admin keys are never used (an invalid file's
    keys may be what the running daemon refuses).
    """
    try:
        raw = _server_section(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        raw = {}
    kept: dict[str, object] = {}
    for name in _WHERE:
        if name not in raw:
            continue
        try:
            ServerConfig.model_validate({name: raw[name]})
        except ValidationError:
            continue
        kept[name] = raw[name]
    return Config.model_validate({"server": kept})


def find_local(config_file: Path | None) -> LocalDaemon:
    """The state folder of the config named by ``--config`` / TRIOSERVE_CONFIG (or the default
    one), its admin socket, and its running daemon's pid and URL."""
    path = config_path(config_file)
    config, config_error = load_if_valid(path)
    where = config if config is not None else _salvaged(path)
    state_dir = where.state_dir
    pid: int | None = None
    recorded: str | None = None
    store_error: str | None = None
    try:
        row = live_daemon(StateStore(state_dir))
    except (sqlite3.Error, OSError) as exc:
        store_error = f"cannot use the state store in {state_dir}: {exc}"
    else:
        if row is not None:
            pid, recorded = row.pid, _loopback(row.url)
    return LocalDaemon(
        state_dir=state_dir,
        socket=where.admin_socket_path,
        config=config,
        config_error=config_error,
        configured_url=_url(where.server.host, where.server.port, tls=where.tls),
        pid=pid,
        recorded_url=recorded,
        store_error=store_error,
        admin_keys=tuple(config.server.admin_keys) if config is not None else (),
    )


def _peer_pid(path: Path) -> int | None:
    """The pid of the process serving the Unix socket at ``path``, or None when this account
    cannot connect to it now.

    Trying is the only honest test: the file outlives a daemon that was killed, and its mode,
    group and the folders above it all decide whether a connect is allowed. The pid is the
    kernel's (``SO_PEERCRED``: the process that called ``listen``), which the other end cannot
    forge. Nothing is sent on this connection.
    """
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return None
    except OSError:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_SOCKET_PROBE_TIMEOUT)
        try:
            probe.connect(os.fspath(path))
            credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return None
    pid, _uid, _gid = _UCRED.unpack(credentials)
    # 0: the peer is in another pid namespace, which no daemon of this state folder is.
    return pid or None


# -- the options every client command takes -----------------------------------------------------


@dataclass(frozen=True)
class ClientOptions:
    """``--url``, ``--api-key``, the TLS files and ``--config``, as one value."""

    url: str | None = None
    api_key: str | None = None
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    config_file: Path | None = None

    def target(self) -> Target:
        return find_target(self)


# The parameters `client_command` adds, with the options typer makes of them.
_OPTIONS: dict[str, Any] = {
    "url": UrlOption,
    "api_key": ApiKeyOption,
    "ca_cert": CaCertOption,
    "client_cert": ClientCertOption,
    "client_key": ClientKeyOption,
    "config_file": ConfigOption,
}
assert set(_OPTIONS) == {field.name for field in fields(ClientOptions)}


def client_command(command: Callable[..., R]) -> Callable[..., R]:
    """Give ``command`` the options of every client command (``--url``, ``--api-key``,
    ``--ca-cert``, ``--client-cert``, ``--client-key``, ``--config``); it receives them as one
    ``client: ClientOptions`` argument, its own parameters unchanged.

    Typer reads a command's parameters from its signature, so this hands typer a signature with
    the options added, and bundles them again on the way in.
    """
    signature = inspect.signature(command, eval_str=True)
    own = [param for name, param in signature.parameters.items() if name != "client"]
    if len(own) == len(signature.parameters):
        raise TypeError(f"{command.__name__} has no `client: ClientOptions` parameter")
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option)
        for name, option in _OPTIONS.items()
    ]

    @functools.wraps(command)
    def with_options(**arguments: Any) -> R:
        client = ClientOptions(**{name: arguments.pop(name) for name in _OPTIONS})
        return command(client=client, **arguments)

    parameters = [*own, *added]
    # Set on the function object: typer (through inspect) takes the signature from here.
    with_options.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    with_options.__annotations__ = {param.name: param.annotation for param in parameters}
    return with_options


# -- the decision ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where requests go: ``socket`` when set, else ``url``; and what to present."""

    url: str  # the daemon's URL (also shown when the socket is used)
    socket: Path | None
    api_key: str | None
    credential: Credential
    local: LocalDaemon
    ssl_context: ssl.SSLContext | None  # https URLs only
    explicit_url: bool
    client_cert: bool = False  # a client certificate is presented (https only)

    @property
    def where(self) -> str:
        """What ``no daemon answers at …`` names."""
        return str(self.socket) if self.socket is not None else self.url


def find_target(options: ClientOptions) -> Target:
    """The transport and credential for a client command (see the module's docstring)."""
    local = find_local(options.config_file)
    explicit = options.url is not None and options.url != ""
    if not explicit and local.socket is not None and local.socket_usable():
        return Target(
            url=local.url,
            socket=local.socket,
            api_key=options.api_key,
            credential=Credential.API_KEY if options.api_key else Credential.NONE,
            local=local,
            ssl_context=None,
            explicit_url=False,
        )
    url = base_url(options.url) if explicit else local.url
    api_key, credential = options.api_key, Credential.API_KEY
    if not api_key:
        api_key, credential = None, Credential.NONE
        if local.live_at(url):
            if local.admin_keys:
                api_key, credential = local.admin_keys[0], Credential.CONFIG_KEY
            elif (token := read_admin_token(local.state_dir)) is not None:
                api_key, credential = token, Credential.TOKEN
    context = _ssl_context(options) if urlsplit(url).scheme.lower() == "https" else None
    return Target(
        url=url,
        socket=None,
        api_key=api_key,
        credential=credential,
        local=local,
        ssl_context=context,
        explicit_url=explicit,
        client_cert=context is not None and options.client_cert is not None,
    )


def _ssl_context(options: ClientOptions) -> ssl.SSLContext:
    """Verification against ``--ca-cert`` (else the system's CAs), and the client certificate."""
    try:
        context = ssl.create_default_context(
            cafile=os.fspath(options.ca_cert) if options.ca_cert is not None else None
        )
    except (OSError, ssl.SSLError) as exc:
        die(f"--ca-cert {options.ca_cert}: {_file_error(exc)}", EXIT_USAGE)
    if options.client_cert is None:
        if options.client_key is not None:
            die("--client-key needs --client-cert (TRIOSERVE_CLIENT_CERT)", EXIT_USAGE)
        return context
    try:
        context.load_cert_chain(
            os.fspath(options.client_cert),
            os.fspath(options.client_key) if options.client_key is not None else None,
        )
    except (OSError, ssl.SSLError) as exc:
        files = f"--client-cert {options.client_cert}"
        if options.client_key is not None:
            files += f" / --client-key {options.client_key}"
        die(f"{files}: {_file_error(exc)}", EXIT_USAGE)
    return context


def _file_error(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"not a usable PEM file ({exc.reason or exc})"
    return exc.strerror or str(exc)
