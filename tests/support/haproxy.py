"""HAProxy in tests and benches: ``conf/examples/haproxy.cfg`` rendered for loopback nodes,
run in the foreground, asked for its servers' states over its stats socket, always stopped;
and a cluster of ``trioserve start`` daemons behind it, with the clients that load it."""

from __future__ import annotations

import contextlib
import csv
import io
import re
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from tests.support.config import daemon_config, echo_cmd
from tests.support.daemon import DaemonProcess
from tests.support.http import chat, read_sse
from tests.support.ports import free_port
from tests.support.programs import required_program

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf/examples/haproxy.cfg"
BACKEND = "trioserve"
# Health checks in tests: every 100 ms, one result changes a node's state, so a test waits
# a tenth of a second, not the example's seconds, for HAProxy to see a node stop or start.
TEST_CHECKS = "default-server check inter 100ms fastinter 100ms downinter 100ms fall 1 rise 1"
# Generous: only reached when something is broken.
START_TIMEOUT = 10.0


def haproxy_binary() -> str:
    """haproxy's path; missing, the test is skipped (fails in CI, which installs it)."""
    return required_program("haproxy", "haproxy")


def _replace_line(text: str, pattern: str, replacement: str) -> str:
    """Replace the one whole line matching ``pattern`` (a regex for the line's content,
    indentation aside); fails naming it when the example no longer has exactly one."""
    regex = re.compile(rf"^([ \t]*){pattern}[ \t]*$", re.MULTILINE)
    found = regex.findall(text)
    assert len(found) == 1, f"{EXAMPLE.name}: expected one line matching {pattern!r}"
    return regex.sub(lambda m: m.group(1) + replacement if replacement else "", text)


def render(
    nodes: list[str],
    *,
    port: int,
    stats_socket: Path,
    checks: str | None = TEST_CHECKS,
    source: Path = EXAMPLE,
) -> str:
    """The example config for ``nodes`` (``host:port`` each), listening on 127.0.0.1:``port``.

    Changed from the example, each change checked to apply to exactly one line: the servers'
    addresses (as many ``server`` lines as nodes), the bind address, ``checks`` for the
    ``default-server`` line (None: the example's own), the stats socket's path, and no
    syslog, chroot, user or background mode (the test runs it as itself, in the foreground,
    logging to its output)."""
    text = source.read_text()
    text = _replace_line(text, r"log /dev/log local0", "log stdout format raw local0")
    for line in (r"chroot \S+", r"user \S+", r"group \S+", r"daemon"):
        text = _replace_line(text, line, "")
    text = _replace_line(
        text, r"stats socket \S+ (.*)", f"stats socket {stats_socket} mode 600 level admin"
    )
    text = _replace_line(text, r"bind :\d+", f"bind 127.0.0.1:{port}")
    if checks is not None:
        text = _replace_line(text, r"default-server check .*", checks)
    servers = re.findall(r"^[ \t]*server \S+ \S+[ \t]*$", text, re.MULTILINE)
    assert servers, f"{EXAMPLE.name}: no server lines"
    first, *rest = servers
    for line in rest:
        text = text.replace(line + "\n", "")
    indent = first[: len(first) - len(first.lstrip())]
    lines = [f"{indent}server node{i} {address}" for i, address in enumerate(nodes, 1)]
    return text.replace(first, "\n".join(lines))


def show_stat(stats_socket: Path) -> list[dict[str, str]]:
    """HAProxy's ``show stat``: one dict per proxy and server, by the CSV's column names."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    text = data.decode().removeprefix("# ")
    return list(csv.DictReader(io.StringIO(text)))


@dataclass
class HAProxy:
    """A running haproxy and what a test asks of it."""

    proc: subprocess.Popen[bytes]
    url: str
    stats_socket: Path
    log: Path

    def server_states(self) -> dict[str, str]:
        """``{server name: "UP" | "DOWN" | ...}`` for the trioserve backend."""
        return {
            row["svname"]: row["status"].split()[0]
            for row in show_stat(self.stats_socket)
            if row["pxname"] == BACKEND and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def wait_states(self, wanted: dict[str, str], timeout: float = START_TIMEOUT) -> None:
        """Poll until each server in ``wanted`` has its state (HAProxy announces nothing)."""
        deadline = time.monotonic() + timeout
        while (states := self.server_states()) and any(
            states.get(name) != state for name, state in wanted.items()
        ):
            assert self.proc.poll() is None, f"haproxy exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"not {wanted} within {timeout}s: {states}"
            time.sleep(0.02)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_haproxy(
    nodes: list[str], directory: Path, *, checks: str | None = TEST_CHECKS
) -> Iterator[HAProxy]:
    """haproxy in front of ``nodes`` with the rendered example, in the foreground; yields once
    it listens and every node is UP. Always stopped and reaped on exit."""
    binary = haproxy_binary()
    port = free_port()
    stats_socket = directory / "haproxy.sock"
    config = directory / "haproxy.cfg"
    config.write_text(render(nodes, port=port, stats_socket=stats_socket, checks=checks))
    log = directory / "haproxy.log"
    with open(log, "wb") as output:
        # -db: stay in the foreground, whatever the config says.
        proc = subprocess.Popen(
            [binary, "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    haproxy = HAProxy(proc, f"http://127.0.0.1:{port}", stats_socket, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not stats_socket.exists():
            assert proc.poll() is None, f"haproxy exited:\n{haproxy.output()}"
            assert time.monotonic() < deadline, f"haproxy did not start:\n{haproxy.output()}"
            time.sleep(0.02)
        haproxy.wait_states({f"node{i}": "UP" for i in range(1, len(nodes) + 1)})
        yield haproxy
    finally:
        # Nothing of a test's HAProxy is worth a graceful stop (one process, no children).
        proc.kill()
        proc.wait()


# -- a cluster behind it -------------------------------------------------------------------------

MODELS = ("alpha", "beta", "gamma")
# 8 tokens 50 ms apart: a request takes ~0.4 s, so concurrent ones overlap and a stream is
# still running when its node is told to stop.
ECHO = ("--tokens", "8", "--token-delay", "0.05")
STOP_GRACE = 2
SHUTDOWN_GRACE = 4
# ``spawn(config, url, healthy=...)``: the ``spawn_daemon`` fixture, or a bench's own.
Spawn = Callable[..., DaemonProcess]


@dataclass
class Node:
    name: str
    config: Path
    url: str
    state_dir: Path
    daemon: DaemonProcess

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")

    async def loaded(self) -> set[str]:
        """The models ready on this node, from its own status."""
        async with httpx.AsyncClient(base_url=self.url, timeout=10, trust_env=False) as client:
            models = (await client.get("/admin/status")).json()["models"]
        return {name for name, info in models.items() if info["state"] == "ready"}


@dataclass
class Cluster:
    nodes: list[Node]
    haproxy: HAProxy
    spawn: Spawn

    def node(self, name: str) -> Node:
        (node,) = [n for n in self.nodes if n.name == name]
        return node

    async def nodes_with(self, model: str, *, but: Node | None = None) -> set[str]:
        """The nodes (all, or all ``but`` one) that have ``model`` loaded."""
        return {
            node.name for node in self.nodes if node is not but and model in await node.loaded()
        }

    async def restart(self, node: Node) -> None:
        """SIGTERM, wait for the exit, start it again (same port and state dir), and wait
        until HAProxy has it back in rotation. Blocking steps run in threads: the clients
        keep running meanwhile."""
        await trio.to_thread.run_sync(node.daemon.stop)
        assert node.daemon.proc.returncode == 0, node.daemon.stderr()
        node.daemon = self.spawn(node.config, node.url, healthy=False)
        await trio.to_thread.run_sync(node.daemon.wait_healthy)
        await trio.to_thread.run_sync(self.haproxy.wait_states, {node.name: "UP"})


@contextlib.contextmanager
def running_cluster(
    directory: Path, spawn: Spawn, *, checks: str | None = TEST_CHECKS
) -> Iterator[Cluster]:
    """Three nodes serving ``MODELS`` (the echo backend), each with its own state dir and
    model port range, behind the rendered example. The daemons are ``spawn``'s to stop."""
    haproxy_binary()  # skip before starting anything when it is missing
    models = {name: {"cmd": echo_cmd(*ECHO)} for name in MODELS}
    nodes = []
    for i in range(1, 4):
        state_dir = directory / f"node{i}"
        state_dir.mkdir()
        config, url = daemon_config(
            directory / f"node{i}.toml",
            state_dir,
            models,
            server={"shutdown_grace": SHUTDOWN_GRACE},
            supervisor={"max_loaded": len(MODELS), "stop_grace": STOP_GRACE},
        )
        nodes.append(Node(f"node{i}", config, url, state_dir, spawn(config, url, healthy=False)))
    for node in nodes:  # started together, waited for one by one
        node.daemon.wait_healthy()
    with running_haproxy([node.address for node in nodes], directory, checks=checks) as haproxy:
        yield Cluster(nodes, haproxy, spawn)


def balancer(cluster: Cluster) -> httpx.AsyncClient:
    """A client of the cluster's HAProxy."""
    return httpx.AsyncClient(base_url=cluster.haproxy.url, timeout=30, trust_env=False)


async def ask(client: httpx.AsyncClient, model: str, *, stream: bool) -> tuple[str, str | None]:
    """One request through the balancer: ``(the node that answered, what failed or None)``.
    A stream counts only when it ends with ``[DONE]`` and has no error event."""
    body = chat(model, stream=stream)
    try:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = await read_sse(response)
            failed = response.status_code != 200 or lines[-1:] != ["data: [DONE]"]
            if not failed and any(line.startswith('data: {"error"') for line in lines):
                failed = True
            problem = f"stream {response.status_code}: {lines[-2:]}" if failed else None
        else:
            response = await client.post("/v1/chat/completions", json=body)
            ok = response.status_code == 200 and response.json()["choices"][0]["message"]
            problem = None if ok else f"{response.status_code}: {response.text[:200]}"
    except httpx.HTTPError as exc:
        return "-", f"{model} stream={stream}: {exc!r}"
    return response.headers.get("x-trioserve-node", "-"), problem


@dataclass
class Load:
    """Clients that keep asking through the balancer until told to stop; what they got."""

    answers: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)

    @property
    def answered(self) -> int:
        return sum(self.answers.values())

    async def client(self, cluster: Cluster, index: int) -> None:
        """Client ``index``: one model (by index), streams and plain requests in turn."""
        model = MODELS[index % len(MODELS)]
        async with balancer(cluster) as client:
            count = 0
            while not self.stop.is_set():
                node, problem = await ask(client, model, stream=(count + index) % 2 == 0)
                count += 1
                self.answers[node] += 1
                if problem is not None:
                    self.failures.append(problem)
