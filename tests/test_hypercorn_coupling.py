"""The Hypercorn insides trioserve relies on (all in trioserve/server/hypercorn_serve.py) are
what that module was written against. Each failure names what changed and what to re-check."""

from __future__ import annotations

import ast
import gc
import hashlib
import importlib
import inspect
import socket
import tomllib
import weakref
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import TrioSingleTask, WorkerContext
from hypercorn.utils import ShutdownError, raise_shutdown, wrap_app

from trioserve.config import parse_config
from trioserve.server import hypercorn_serve
from trioserve.server.hypercorn_serve import UPSTREAM_FINGERPRINTS, LeanTCPServer

ROOT = Path(__file__).resolve().parent.parent
MODULE = "trioserve/server/hypercorn_serve.py"

# What of ours follows each upstream object, for the failure message.
FOLLOWERS = {
    "hypercorn.trio.serve": "serve",
    # Its listeners are opened for serve by trioserve/server/listening.py (no Hypercorn names).
    "hypercorn.trio.run.worker_serve": "serve (and the listeners listening.py opens for it)",
    "hypercorn.trio.tcp_server.TCPServer": "LeanTCPServer (protocol_send, run, idle_task)",
}

# Every Hypercorn callable hypercorn_serve.py calls or overrides: its parameters, and whether
# it is awaited. A change here means a call in the module no longer matches.
CALLED = {
    "hypercorn.trio.tcp_server.TCPServer.__init__": (
        "self, app, config, context, state, stream",
        False,
    ),
    "hypercorn.trio.tcp_server.TCPServer.run": ("self", True),
    "hypercorn.trio.tcp_server.TCPServer.protocol_send": ("self, event", True),
    "hypercorn.protocol.ProtocolWrapper.handle": ("self, event", True),
    # _IdleTimer stands in for TCPServer.idle_task (a TrioSingleTask): the same two methods,
    # called by TCPServer (its fingerprint above), its task spawned in the connection's group.
    "hypercorn.trio.worker_context.TrioSingleTask.restart": ("self, task_group, action", True),
    "hypercorn.trio.worker_context.TrioSingleTask.stop": ("self", True),
    "hypercorn.trio.task_group.TaskGroup.spawn": ("self, func, args", False),
    "hypercorn.trio.lifespan.Lifespan.__init__": ("self, app, config, state", False),
    "hypercorn.trio.lifespan.Lifespan.handle_lifespan": ("self, *, task_status", True),
    "hypercorn.trio.lifespan.Lifespan.wait_for_startup": ("self", True),
    "hypercorn.trio.lifespan.Lifespan.wait_for_shutdown": ("self", True),
    "hypercorn.trio.worker_context.WorkerContext.__init__": ("self, max_requests", False),
    "hypercorn.trio.worker_context.EventWrapper.wait": ("self", True),
    "hypercorn.trio.worker_context.EventWrapper.set": ("self", True),
    "hypercorn.utils.wrap_app": ("app, wsgi_max_body_size, mode", False),
    "hypercorn.utils.raise_shutdown": ("shutdown_event", True),
    "hypercorn.utils.repr_socket_addr": ("family, address", False),
    "hypercorn.config.Config.create_sockets": ("self", False),
    "hypercorn.config.Config.create_ssl_context": ("self", False),
    "hypercorn.config.Config.set_statsd_logger_class": ("self, statsd_logger", False),
    "hypercorn.trio.statsd.StatsdLogger.__init__": ("self, config", False),
}


def _resolve(dotted: str) -> Any:
    """The object at ``dotted``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def _fingerprint(obj: Any) -> str:
    """As UPSTREAM_FINGERPRINTS records it: the code, not its formatting or comments."""
    return hashlib.sha256(ast.dump(ast.parse(inspect.getsource(obj))).encode()).hexdigest()


def _parameters(function: Any) -> str:
    names: list[str] = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY and "*" not in names:
            names.append("*")
        names.append(parameter.name)
    return ", ".join(names)


def test_the_installed_hypercorn_is_the_pinned_one_the_module_names() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [pin] = [d for d in pyproject["project"]["dependencies"] if d.lower().startswith("hypercorn")]
    pin = pin.replace(" ", "")
    doc = hypercorn_serve.__doc__ or ""
    assert pin in doc, (
        f"pyproject.toml pins {pin!r}, but {MODULE}'s docstring does not name that pin: the "
        "module was written against Hypercorn 0.18; re-check everything it relies on "
        "(this file) before changing the pin, then name the new pin there"
    )
    installed = version("hypercorn")
    assert installed.split(".")[:2] == ["0", "18"], (
        f"Hypercorn {installed} is installed, but {MODULE} was written against 0.18 "
        f"(pyproject.toml: {pin})"
    )


@pytest.mark.parametrize("name", sorted(UPSTREAM_FINGERPRINTS))
def test_the_upstream_code_we_fork_or_override_is_unchanged(name: str) -> None:
    now = _fingerprint(_resolve(name))
    assert now == UPSTREAM_FINGERPRINTS[name], (
        f"{name} changed in Hypercorn {version('hypercorn')}: re-read it, bring "
        f"{FOLLOWERS[name]} in {MODULE} in line with it, then set "
        f"UPSTREAM_FINGERPRINTS[{name!r}] = {now!r}"
    )


@pytest.mark.parametrize("name", sorted(CALLED))
def test_the_hypercorn_callables_we_use_keep_their_signatures(name: str) -> None:
    expected, awaited = CALLED[name]
    try:
        function = _resolve(name)
    except (AttributeError, ModuleNotFoundError) as exc:
        pytest.fail(
            f"{name} is gone from Hypercorn {version('hypercorn')} ({exc}); {MODULE} uses it"
        )
    now = _parameters(function)
    assert now == expected, (
        f"{name} now takes ({now}), not ({expected}): update its use in {MODULE}, then this table"
    )
    assert inspect.iscoroutinefunction(function) is awaited, (
        f"{name} is {'no longer' if awaited else 'now'} a coroutine function: {MODULE} "
        f"{'awaits' if awaited else 'calls'} it"
    )


async def test_tcp_server_keeps_the_attributes_lean_tcp_server_uses() -> None:
    left, right = socket.socketpair()
    with left, right:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(right))
        server = TCPServer(_http_app, HypercornConfig(), WorkerContext(None), {}, stream)  # type: ignore[arg-type]
        assert isinstance(server.send_lock, trio.Lock), (
            "TCPServer.send_lock is no longer a trio.Lock: LeanTCPServer.protocol_send sends "
            "without it when it is free and under it otherwise"
        )
        assert server.stream is stream, "TCPServer.stream is no longer the connection's stream"
        assert "protocol" in inspect.getsource(TCPServer.run), (
            "TCPServer.run no longer sets self.protocol: LeanTCPServer uses it "
            "(handle(Closed())) and deletes it to cut the connection's reference cycle"
        )
        assert isinstance(server.idle_task, TrioSingleTask), (
            "TCPServer.idle_task is no longer a TrioSingleTask: LeanTCPServer replaces it with "
            "_IdleTimer, which has its interface (restart, stop)"
        )
        # Our own attribute must not shadow one of Hypercorn's.
        assert not hasattr(server, "_plain_socket"), (
            "Hypercorn's TCPServer now has an attribute _plain_socket, which LeanTCPServer "
            "sets for itself: rename ours"
        )
        await stream.aclose()


async def test_raise_shutdown_raises_shutdown_error_once_the_trigger_returns() -> None:
    # serve() tells a requested shutdown from a failure by this exception.
    with pytest.raises(ShutdownError):
        await raise_shutdown(trio.lowlevel.checkpoint)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_every_setting_hypercorn_config_makes_is_one_hypercorn_has(
    tmp_path: Path, tls: bool
) -> None:
    server = {"state_dir": str(tmp_path)}
    if tls:
        # Only named: the files are read when the server starts.
        server.update(tls_cert="c.pem", tls_key="k.pem", tls_client_ca="ca.pem")
    config = parse_config({"server": server, "models": {}})
    ours = hypercorn_serve.hypercorn_config(config)
    # Setting a name Hypercorn no longer has would silently do nothing.
    unknown = [
        name
        for name in vars(ours)
        if not name.startswith("_") and not hasattr(HypercornConfig, name)
    ]
    assert not unknown, f"hypercorn.config.Config has no setting {unknown}: {MODULE} sets them"


async def _http_app(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def no_collector() -> Iterator[None]:
    """Only reference counting frees objects while the test runs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_a_finished_connection_is_freed_without_the_garbage_collector(
    no_collector: None,
) -> None:
    hyper = HypercornConfig()
    with socket.create_server(("127.0.0.1", 0)) as listening:
        client = socket.create_connection(listening.getsockname())
        conn, _ = listening.accept()
    with client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        server = LeanTCPServer(
            wrap_app(_http_app, hyper.wsgi_max_body_size, None),
            hyper,
            WorkerContext(None),
            {},
            trio.SocketStream(trio.socket.from_stdlib_socket(conn)),
        )
        alive = weakref.ref(server)
        with trio.fail_after(10):
            await server.run()
        del server
        assert client.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert alive() is None, (
        "a finished LeanTCPServer is kept alive by a reference cycle, so every connection "
        "waits for the garbage collector. LeanTCPServer.run cuts server.protocol -> "
        "ProtocolWrapper.send (our bound protocol_send) -> server; if it still does, Hypercorn "
        f"made another: find it (gc.get_referrers) and cut it there too ({MODULE})"
    )


def _hypercorn_imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hypercorn"):
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("hypercorn"))


def test_no_other_module_reaches_into_hypercorn() -> None:
    # The echo backend serves itself through Hypercorn's public API only.
    public = {"hypercorn.config.Config", "hypercorn.trio.serve"}
    found = {
        f"{path.relative_to(ROOT)}: {name}"
        for directory in ("trioserve", "cli")
        for path in sorted((ROOT / directory).rglob("*.py"))
        if path.relative_to(ROOT).as_posix() != MODULE
        for name in _hypercorn_imports(path)
        if name not in public and not name.startswith("hypercorn.typing.")
    }
    assert not found, f"Hypercorn internals used outside {MODULE}: {sorted(found)}; move them there"
