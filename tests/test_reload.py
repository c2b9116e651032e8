"""Config reload (issue 15), end to end with real model processes: the daemon's config file is
rewritten and ``POST /admin/reload`` (or SIGHUP) puts it in force.

Most tests run the daemon in this trio run, its config loaded from a real TOML file so that
``config.source`` is that file; the SIGHUP and systemd ones run ``trioserve start``.
Processes are compared by pid before and after; answers tell which process served them by
the echo backend's ``--model-name`` (the ``model`` field of its answers).
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support.config import echo_cmd, write_toml
from tests.support.daemon import DaemonProcess, clean_env, running_daemon
from tests.support.gguf import write_gguf
from tests.support.http import assert_openai_error, chat
from tests.support.notify import NotifyPeer
from tests.support.ports import free_port, port_range
from tests.support.processes import alive, eventually
from tests.support.status import load_model, load_models, model_status, wait_for_status
from trioserve.config import Config, load_config
from trioserve.errors import ConfigError

# A generation of 8 tokens at this delay lasts 2 s: long enough to still be in flight while a
# test rewrites the file and reloads, on a loaded machine.
SLOW = ("--token-delay", "0.25")


class ConfigFile:
    """One daemon's config file, rewritten between reloads. The listen port and the models'
    port range stay the same across writes (a changed port is refused)."""

    def __init__(
        self,
        path: Path,
        state_dir: Path,
        *,
        port: int = 0,
        models: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.path = path
        self.state_dir = state_dir
        self.port = port
        self.ports = port_range()
        if models is not None:
            self.write(models)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(
        self,
        models: dict[str, dict[str, Any]],
        *,
        server: dict[str, Any] | None = None,
        supervisor: dict[str, Any] | None = None,
        users: dict[str, dict[str, Any]] | None = None,
    ) -> Path:
        data: dict[str, Any] = {
            "server": {
                "host": "127.0.0.1",
                "port": self.port,
                "state_dir": str(self.state_dir),
                **(server or {}),
            },
            "supervisor": {
                "port_range": self.ports,
                "stop_grace": 2,
                "start_timeout": 20,
                **(supervisor or {}),
            },
        }
        if users:
            data["users"] = users
        data["models"] = models
        return write_toml(self.path, data)

    def load(self) -> Config:
        config = load_config(self.path)
        assert config.source == str(self.path)
        return config


def echo(*options: str, **settings: Any) -> dict[str, Any]:
    """A model section running the echo backend with ``options``."""
    return {"cmd": echo_cmd(*options), **settings}


async def reload(client: httpx.AsyncClient, **kwargs: Any) -> httpx.Response:
    return await client.post("/admin/reload", **kwargs)


async def reloaded(client: httpx.AsyncClient, **kwargs: Any) -> dict[str, Any]:
    """Reload; it must be accepted. Returns the summary."""
    response = await reload(client, **kwargs)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def model_names(client: httpx.AsyncClient) -> dict[str, str]:
    """``/v1/models``: every name and alias → state."""
    data = (await client.get("/v1/models")).json()["data"]
    return {entry["id"]: entry["state"] for entry in data}


def served_by(response: httpx.Response) -> str:
    """The ``--model-name`` of the echo process that answered."""
    assert response.status_code == 200, response.text
    name: str = response.json()["model"]
    return name


class Requests:
    """Requests sent in the background; their answers by key."""

    def __init__(self, client: httpx.AsyncClient, nursery: trio.Nursery) -> None:
        self.client = client
        self.nursery = nursery
        self.answers: dict[str, httpx.Response] = {}

    def send(self, key: str, model: str, **extra: Any) -> None:
        async def one() -> None:
            body = chat(model, text=f"request {key}", **extra)
            self.answers[key] = await self.client.post("/v1/chat/completions", json=body)

        self.nursery.start_soon(one)

    async def admitted(
        self, key: str, model: str, counted_as: str = "in_flight", count: int = 1
    ) -> None:
        """Send ``key`` and wait until ``model``'s status counts ``count`` requests
        ``counted_as`` (``in_flight``, ``queued``)."""
        self.send(key, model)
        await wait_for_status(self.client, model, counted_as, count)


@asynccontextmanager
async def background(client: httpx.AsyncClient) -> AsyncIterator[Requests]:
    """``Requests`` sent in the background; the block ends once all are answered."""
    async with trio.open_nursery() as nursery:
        yield Requests(client, nursery)


# -- models added, removed, replaced, retuned -----------------------------------------------------


async def test_added_model_is_available_at_once_and_stopped(
    tmp_path: Path, state_dir: Path
) -> None:
    file = ConfigFile(tmp_path / "c.toml", state_dir)
    file.write({"echo": echo()})
    async with running_daemon(file.load(), admin=True) as (_, client):
        assert (await client.get("/admin/status")).json()["last_reload"] is None
        before = await load_model(client, "echo")
        file.write({"echo": echo(), "fresh": echo(aliases=["new"])})
        answer = await reloaded(client)
        assert answer == {
            "summary": "added: fresh",
            "added": ["fresh"],
            "removed": [],
            "restarted": [],
            "retuned": [],
            "sections": [],
        }
        # In force when the answer came: listed, stopped, and it starts on the first request.
        assert await model_names(client) == {"echo": "ready", "fresh": "stopped", "new": "stopped"}
        assert (await model_status(client, "fresh"))["state"] == "stopped"
        response = await client.post("/v1/chat/completions", json=chat("new"))
        assert response.status_code == 200, response.text
        assert (await model_status(client, "fresh"))["state"] == "ready"
        # The model whose section did not change kept its process, its pid and its state.
        after = await model_status(client, "echo")
        assert (after["pid"], after["started_at"], after["state"]) == (
            before["pid"],
            before["started_at"],
            "ready",
        )
        last = (await client.get("/admin/status")).json()["last_reload"]
        assert last["ok"] is True and last["error"] is None
        assert abs(last["at"] - time.time()) < 30


async def test_removed_model_finishes_in_flight_and_queued_requests_then_stops(
    tmp_path: Path, state_dir: Path
) -> None:
    models = {"echo": echo(), "slow": echo(*SLOW, max_concurrency=1)}
    file = ConfigFile(tmp_path / "c.toml", state_dir, models=models)
    async with running_daemon(file.load(), admin=True) as (_, client):
        keep, slow = await load_models(client, "echo", "slow")
        async with background(client) as requests:
            await requests.admitted("in-flight", "slow")
            await requests.admitted("queued", "slow", "queued")

            file.write({"echo": echo()})
            answer = await reloaded(client)
            assert answer["removed"] == ["slow"]
            assert answer["summary"] == "removed: slow"
            # Gone for new requests at once, with both of its requests still going.
            assert not requests.answers
            response = await client.post("/v1/chat/completions", json=chat("slow"))
            error = assert_openai_error(response, 404, "model_not_found")
            assert "echo" in error["message"]
            assert "slow" not in (await client.get("/admin/status")).json()["models"]
            assert "slow" not in await model_names(client)
            assert alive(slow["pid"])
        for key in ("in-flight", "queued"):
            assert served_by(requests.answers[key]) == "echo"
            assert requests.answers[key].json()["choices"][0]["message"]["content"]
        # Then its process stops.
        await eventually(lambda: not alive(slow["pid"]), within=10, what="removed model stopped")
        assert (await model_status(client, "echo"))["pid"] == keep["pid"]


async def test_changed_cmd_finishes_in_flight_on_the_old_process_and_next_uses_the_new(
    tmp_path: Path, state_dir: Path
) -> None:
    models = {"echo": echo(*SLOW, "--model-name", "v1"), "other": echo()}
    file = ConfigFile(tmp_path / "c.toml", state_dir, models=models)
    async with running_daemon(file.load(), admin=True) as (_, client):
        old, other = await load_models(client, "echo", "other")
        async with background(client) as requests:
            await requests.admitted("in-flight", "echo")

            file.write({"echo": echo("--model-name", "v2"), "other": echo()})
            answer = await reloaded(client)
            assert answer["restarted"] == ["echo"]
            assert answer["summary"] == "restarted on next use: echo"
            # The old process serves what it has and takes nothing new: stopping at once.
            now = await model_status(client, "echo")
            assert (now["state"], now["pid"]) == ("stopping", old["pid"])
            assert not requests.answers

            # Sent after the reload returned: never to the old process.
            after = await client.post("/v1/chat/completions", json=chat("echo"))
            assert served_by(after) == "v2"
        assert served_by(requests.answers["in-flight"]) == "v1"
        assert not alive(old["pid"])
        new = await model_status(client, "echo")
        assert new["state"] == "ready" and new["pid"] not in (None, old["pid"])
        # The other model's section did not change: same process, same state.
        assert (await model_status(client, "other"))["pid"] == other["pid"]


async def test_request_racing_a_cmd_change_never_reaches_the_old_process_after_it(
    tmp_path: Path, state_dir: Path
) -> None:
    file = ConfigFile(tmp_path / "c.toml", state_dir)
    file.write({"echo": echo("--token-delay", "0.01", "--model-name", "v1")})
    sent: list[tuple[float, float, str, int, str | None]] = []  # start, end, kind, status, by
    async with running_daemon(file.load(), admin=True) as (_, client):
        old = await load_model(client, "echo")
        stop = trio.Event()

        async def client_loop(stream: bool) -> None:
            while not stop.is_set():
                start = trio.current_time()
                body = chat("echo", stream=stream)
                if stream:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        lines = [
                            line async for line in r.aiter_lines() if line.startswith("data: {")
                        ]
                    by = json.loads(lines[0][6:])["model"] if r.status_code == 200 else None
                    status = r.status_code
                else:
                    response = await client.post("/v1/chat/completions", json=body)
                    status = response.status_code
                    by = response.json().get("model") if status == 200 else None
                sent.append(
                    (start, trio.current_time(), "stream" if stream else "plain", status, by)
                )

        def answered(since: float) -> int:
            return sum(start > since for start, *_ in sent)

        async with trio.open_nursery() as nursery:
            for index in range(6):
                nursery.start_soon(client_loop, index % 2 == 0)
            # Every client has been answered by v1 at least once...
            await eventually(lambda: len(sent) >= 6, within=20, what="6 answers before")
            file.write({"echo": echo("--token-delay", "0.01", "--model-name", "v2")})
            reload_sent = trio.current_time()
            await reloaded(client)
            reload_done = trio.current_time()
            # ... and again, by requests sent once the reload had returned.
            await eventually(lambda: answered(reload_done) >= 6, within=20, what="6 answers after")
            stop.set()
    assert sent and all(status == 200 for _, _, _, status, _ in sent), sent
    later = [by for start, _, _, _, by in sent if start > reload_done]
    before = [by for _, end, _, _, by in sent if end < reload_sent]
    assert later and set(later) == {"v2"}, later
    assert before and set(before) == {"v1"}, before
    assert not alive(old["pid"])


async def test_lowered_limits_apply_at_once_and_requests_over_them_finish(
    tmp_path: Path, state_dir: Path
) -> None:
    file = ConfigFile(tmp_path / "c.toml", state_dir)
    file.write({"slow": echo(*SLOW, max_concurrency=3, max_queue=8)})
    async with running_daemon(file.load(), admin=True) as (_, client):
        before = await load_model(client, "slow")
        async with background(client) as requests:
            for key in ("a", "b", "c"):
                requests.send(key, "slow")
            await wait_for_status(client, "slow", "in_flight", 3)

            file.write({"slow": echo(*SLOW, max_concurrency=1, max_queue=0)})
            answer = await reloaded(client)
            assert answer["retuned"] == ["slow"]
            assert answer["summary"] == "limits changed: slow"
            # Three in flight, one allowed, no queue: a new request is refused at once.
            response = await client.post("/v1/chat/completions", json=chat("slow"))
            assert_openai_error(response, 429, "queue_full")
            assert not requests.answers
        assert sorted(requests.answers) == ["a", "b", "c"]
        assert all(served_by(answer) == "echo" for answer in requests.answers.values())
        async with background(client) as requests:
            await requests.admitted("one", "slow")
            requests.send("two", "slow")
        assert requests.answers["one"].status_code == 200
        assert_openai_error(requests.answers["two"], 429, "queue_full")
        after = await model_status(client, "slow")
        assert (after["pid"], after["started_at"]) == (before["pid"], before["started_at"])


async def test_aliases_users_keys_timeouts_and_supervisor_apply_without_a_restart(
    tmp_path: Path, state_dir: Path
) -> None:
    file = ConfigFile(tmp_path / "c.toml", state_dir)
    models = {"a": echo(), "b": echo(), "slow": echo(*SLOW)}
    file.write(models, supervisor={"max_loaded": 1})
    async with running_daemon(file.load(), admin=True) as (_, client):
        before = await load_model(client, "a")

        file.write(
            {**models, "a": echo(aliases=["alias-a"])},
            server={"api_keys": ["sk-server"], "admin_keys": ["adm"], "request_timeout": 1},
            supervisor={"max_loaded": 3},
            users={"alice": {"api_keys": ["sk-alice"], "weight": 2}},
        )
        answer = await reloaded(client)
        assert answer["retuned"] == ["a"]
        assert answer["sections"] == ["server", "supervisor", "users"]
        assert answer["summary"] == "limits changed: a; changed: server, supervisor, users"

        # Keys: required now, on /v1 and on /admin.
        response = await client.post("/v1/chat/completions", json=chat("a"))
        assert_openai_error(response, 401, "invalid_api_key")
        no_key = await client.get("/admin/status", auth=None)
        assert_openai_error(no_key, 401, "invalid_api_key")
        admin = {"authorization": "Bearer adm"}
        alice = {"authorization": "Bearer sk-alice"}
        # The alias, by a user's key: the same process answers.
        body = chat("alias-a")
        response = await client.post("/v1/chat/completions", json=body, headers=alice)
        assert served_by(response) == "echo"
        response = await client.post("/v1/chat/completions", json=chat("a"), headers=alice)
        assert response.status_code == 200
        status = (await client.get("/admin/status", headers=admin)).json()
        assert "alice" in status["users"] and status["users"]["alice"]["requests"] == 2
        assert (status["models"]["a"]["pid"], status["models"]["a"]["started_at"]) == (
            before["pid"],
            before["started_at"],
        )
        # max_loaded 1 → 3: loading b no longer evicts a.
        response = await client.post("/admin/models/b/load", headers=admin)
        assert response.status_code == 200, response.text
        models = (await client.get("/admin/status", headers=admin)).json()["models"]
        assert models["b"]["state"] == "ready"
        assert (models["a"]["state"], models["a"]["pid"]) == ("ready", before["pid"])
        # request_timeout 600 → 1: a 2 s generation is cut at 1 s.
        begin = trio.current_time()
        response = await client.post(
            "/v1/chat/completions", json=chat("slow"), headers={"authorization": "Bearer sk-server"}
        )
        assert_openai_error(response, 504, "timeout")
        assert trio.current_time() - begin < 1.9


async def test_lowered_ttl_applies_to_the_running_process(tmp_path: Path, state_dir: Path) -> None:
    file = ConfigFile(tmp_path / "c.toml", state_dir)
    file.write({"echo": echo(ttl=0)})
    async with running_daemon(file.load(), admin=True) as (_, client):
        before = await load_model(client, "echo")
        file.write({"echo": echo(ttl=1)})
        assert (await reloaded(client))["retuned"] == ["echo"]
        assert (await model_status(client, "echo"))["pid"] == before["pid"]
        # Asserted once the daemon has stopped: a failure raised inside running_daemon cancels
        # it, which leaves its guard process unreaped and fails every later test's teardown.
        with trio.move_on_after(8):
            while (await model_status(client, "echo"))["state"] != "stopped":
                await trio.sleep(0.05)
        state = (await model_status(client, "echo"))["state"]
    assert state == "stopped"
    assert not alive(before["pid"])


# -- refused reloads ------------------------------------------------------------------------------


def _bad_limit(file: ConfigFile) -> tuple[str, ...]:
    file.write({"echo": echo(max_queue=-1), "fresh": echo()})
    return (str(file.path), "models.echo.max_queue", "must be >= 0")


def _bad_toml(file: ConfigFile) -> tuple[str, ...]:
    file.path.write_text("[server\nport = 1\n")
    return (str(file.path), "invalid TOML")


def _missing(file: ConfigFile) -> tuple[str, ...]:
    file.path.unlink()
    return (str(file.path), "cannot read")


def _unknown_key(file: ConfigFile) -> tuple[str, ...]:
    file.write({"echo": echo(), "fresh": echo()}, server={"prot": 1})
    return (str(file.path), "server.prot", "unknown key")


def _never_fits(file: ConfigFile) -> tuple[str, ...]:
    # A llama-server model whose GGUF's estimate is over 11 MiB (the process's own memory).
    model_file = write_gguf(file.path.with_suffix(".gguf"))
    big = {"cmd": ["llama-server", "--port", "{port}", "-m", str(model_file)]}
    file.write({"echo": echo(max_queue=5), "big": big}, supervisor={"memory": {"cpu": "10 MiB"}})
    return (str(file.path), "models.big.memory", "more than its budget of 10.0 MiB")


@pytest.mark.parametrize("spoil", [_bad_limit, _bad_toml, _missing, _unknown_key, _never_fits])
async def test_invalid_file_changes_nothing(
    tmp_path: Path, state_dir: Path, spoil: Callable[[ConfigFile], tuple[str, ...]]
) -> None:
    file = ConfigFile(tmp_path / "c.toml", state_dir)
    file.write({"echo": echo(max_queue=5)})
    async with running_daemon(file.load(), admin=True) as (_, client):
        before = await load_model(client, "echo")
        expected = spoil(file)
        response = await reload(client)
        error = assert_openai_error(response, 400, "invalid_request")
        assert error["message"].startswith("reload refused, nothing changed: ")
        for part in expected:
            assert part in error["message"], error
        status = (await client.get("/admin/status")).json()
        assert status["last_reload"]["ok"] is False
        assert status["last_reload"]["error"] in error["message"]
        for part in expected:
            assert part in status["last_reload"]["error"]
        # Nothing changed: the same models, the same process, still serving.
        assert await model_names(client) == {"echo": "ready"}
        assert status["models"]["echo"]["pid"] == before["pid"]
        response = await client.post("/v1/chat/completions", json=chat("echo"))
        assert response.status_code == 200
        failed_at = status["last_reload"]["at"]

        file.write({"echo": echo(max_queue=5)})
        assert (await reloaded(client))["summary"] == "no changes"
        last = (await client.get("/admin/status")).json()["last_reload"]
        assert last["ok"] is True and last["error"] is None and last["at"] >= failed_at


@pytest.mark.parametrize(
    ("key", "value"),
    [("host", "127.0.0.2"), ("port", "free"), ("state_dir", "elsewhere")],
)
async def test_listener_and_state_dir_changes_are_refused_as_needing_a_restart(
    tmp_path: Path, state_dir: Path, key: str, value: str
) -> None:
    file = ConfigFile(tmp_path / "c.toml", state_dir)
    file.write({"echo": echo()})
    changed: object = {"port": free_port(), "state_dir": str(tmp_path / value)}.get(key, value)
    async with running_daemon(file.load(), admin=True) as (_, client):
        before = await load_model(client, "echo")
        file.write({"echo": echo(), "fresh": echo()}, server={key: changed})
        error = assert_openai_error(await reload(client), 400, "invalid_request")
        assert f"server.{key} changed: that needs a restart" in error["message"]
        assert str(file.path) in error["message"]
        status = (await client.get("/admin/status")).json()
        assert status["last_reload"]["ok"] is False
        assert "needs a restart" in status["last_reload"]["error"]
        assert await model_names(client) == {"echo": "ready"}
        assert status["models"]["echo"]["pid"] == before["pid"]


async def test_concurrent_reloads_are_serialised(tmp_path: Path, state_dir: Path) -> None:
    file = ConfigFile(tmp_path / "c.toml", state_dir)
    file.write({"echo": echo()})
    async with running_daemon(file.load(), admin=True) as (_, client):
        before = await load_model(client, "echo")
        file.write({"echo": echo(), "fresh": echo()})
        answers: list[dict[str, Any]] = []

        async def one() -> None:
            answers.append(await reloaded(client))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
        # One of them took the change; each of the others came after it and found nothing new.
        summaries = sorted(answer["summary"] for answer in answers)
        assert summaries == ["added: fresh"] + ["no changes"] * 7, summaries
        assert await model_names(client) == {"echo": "ready", "fresh": "stopped"}
        assert (await model_status(client, "echo"))["pid"] == before["pid"]


# -- SIGHUP and systemd, with `trioserve start` ---------------------------------------------------


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _reload_messages(peer: NotifyPeer, since: int) -> list[str]:
    return [message for message in peer.messages[since:] if message != "WATCHDOG=1"]


def _wait_ready_again(peer: NotifyPeer, since: int, timeout: float = 20) -> list[str]:
    """Collect until a READY=1 arrived after message ``since``; the messages since then."""
    deadline = time.monotonic() + timeout
    while not any(m.startswith("READY=1") for m in peer.messages[since:]):
        assert time.monotonic() < deadline, peer.messages
        peer.collect(0.1)
    return _reload_messages(peer, since)


def _under_systemd(
    tmp_path: Path,
    spawn_daemon: Callable[..., DaemonProcess],
    peer: NotifyPeer,
    models: dict[str, dict[str, Any]],
    **write: Any,
) -> tuple[ConfigFile, DaemonProcess]:
    """A daemon started from a new config file (``models``, ``write``'s sections) with
    ``peer`` as its NOTIFY_SOCKET, as systemd starts it; returns once it said READY=1."""
    file = ConfigFile(tmp_path / "c.toml", tmp_path / "state", port=free_port())
    file.write(models, **write)
    daemon = spawn_daemon(file.path, file.url, env=clean_env(NOTIFY_SOCKET=peer.notify_socket))
    peer.collect_until("READY=1")
    return file, daemon


def test_sighup_reloads_and_tells_systemd_and_the_daemon_lives_on(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess], peer: NotifyPeer
) -> None:
    file, daemon = _under_systemd(tmp_path, spawn_daemon, peer, {"echo": echo()})
    daemon.load("echo")
    pid = daemon.status()["models"]["echo"]["pid"]

    file.write({"echo": echo(), "fresh": echo()})
    since, begin = len(peer.messages), _monotonic_usec()
    daemon.proc.send_signal(signal.SIGHUP)
    messages = _wait_ready_again(peer, since)
    end = _monotonic_usec()
    reloading = [m for m in messages if m.startswith("RELOADING=1")]
    assert len(reloading) == 1, messages
    fields = dict(line.split("=", 1) for line in reloading[0].split("\n"))
    assert set(fields) == {"RELOADING", "MONOTONIC_USEC"}, reloading
    assert begin <= int(fields["MONOTONIC_USEC"]) <= end
    ready = [m for m in messages if m.startswith("READY=1")]
    assert ready == ["READY=1\nSTATUS=reloaded: added: fresh"], messages
    assert messages.index(reloading[0]) < messages.index(ready[0])
    status = daemon.status()
    assert status["pid"] == daemon.pid and status["last_reload"]["ok"] is True
    assert set(status["models"]) == {"echo", "fresh"}
    assert status["models"]["echo"]["pid"] == pid

    # An invalid file: refused, systemd told so, the daemon serves on.
    file.write({"echo": echo(max_queue=-1)})
    since = len(peer.messages)
    daemon.proc.send_signal(signal.SIGHUP)
    messages = _wait_ready_again(peer, since)
    assert messages[0].startswith("RELOADING=1\nMONOTONIC_USEC="), messages
    failed = [m for m in messages if m.startswith("READY=1")]
    assert failed == [
        f"READY=1\nSTATUS=last reload failed: {file.path}: models.echo.max_queue: must be >= 0"
    ], messages
    assert daemon.proc.poll() is None
    status = daemon.status()
    assert status["last_reload"]["ok"] is False
    assert "models.echo.max_queue" in status["last_reload"]["error"]
    assert set(status["models"]) == {"echo", "fresh"}
    response = httpx.post(f"{file.url}/v1/chat/completions", json=chat("fresh"), timeout=30)
    assert response.status_code == 200

    # SIGHUP is never the default action (which would end the daemon), however often.
    since = len(peer.messages)
    for _ in range(3):
        daemon.proc.send_signal(signal.SIGHUP)
    # Handled as reloads (signals pending at once may count as one): the daemon said READY
    # again, and answers after all three were delivered.
    _wait_ready_again(peer, since)
    assert daemon.proc.poll() is None
    assert daemon.status()["models"]["echo"]["pid"] == pid
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_sighup_with_a_newline_in_the_error_keeps_the_daemon_under_systemd(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess], short_dir: Path
) -> None:
    peer = NotifyPeer.bind("path", short_dir)
    try:
        file, daemon = _under_systemd(tmp_path, spawn_daemon, peer, {"echo": echo()})
        file.write({"echo": echo()})
        # A quoted key may hold a newline; the error names the key.
        text = file.path.read_text().replace("[supervisor]", '"bad\\nkey" = 1\n[supervisor]')
        file.path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape("server.bad\nkey: unknown key")):
            load_config(file.path)
        since = len(peer.messages)
        daemon.proc.send_signal(signal.SIGHUP)
        messages = _wait_ready_again(peer, since)
        assert daemon.proc.poll() is None, daemon.stderr()
        assert any(m.startswith("READY=1\nSTATUS=last reload failed: ") for m in messages)
    finally:
        peer.sock.close()


def test_reload_during_shutdown_is_refused(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess], short_dir: Path
) -> None:
    peer = NotifyPeer.bind("path", short_dir)
    try:
        file, daemon = _under_systemd(
            tmp_path, spawn_daemon, peer, {"slow": echo(*SLOW)}, server={"shutdown_grace": 10}
        )
        daemon.load("slow")
        answers: list[httpx.Response] = []

        def in_flight() -> None:
            body = chat("slow")
            answers.append(httpx.post(f"{file.url}/v1/chat/completions", json=body, timeout=30))

        thread = threading.Thread(target=in_flight)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while daemon.status()["models"]["slow"]["in_flight"] != 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            daemon.proc.send_signal(signal.SIGTERM)
            peer.collect_until("STOPPING=1")
            stopping = len(peer.messages)
            file.write({"slow": echo(*SLOW), "fresh": echo()}, server={"shutdown_grace": 10})
            daemon.proc.send_signal(signal.SIGHUP)
        finally:
            thread.join(30)
        # The drain went on: the request in flight was answered, the daemon exited cleanly,
        # and the reload never began (SIGHUP is not a second stop signal either).
        assert [answer.status_code for answer in answers] == [200]
        assert daemon.wait() == 0
        peer.collect_queued()  # it exited: all it sent is queued
        assert not any(m.startswith("RELOADING=1") for m in peer.messages[stopping:])
        assert "reloaded" not in daemon.stderr()
        assert "second signal" not in daemon.stderr()
    finally:
        peer.sock.close()
