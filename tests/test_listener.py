"""``/health`` without the event loop: answered at accept time or by the take-over thread, even
while the loop is blocked; every other request still reaches Hypercorn intact."""

from __future__ import annotations

import gc
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
from typer.testing import CliRunner

from tests.support.config import daemon_config, echo_cmd, make_config
from tests.support.daemon import running_daemon
from tests.support.http import blocking_exchange, raw_address
from trioserve import daemon
from trioserve.config import Config
from trioserve.server import listener
from trioserve.server.first_bytes import Verdict, classify
from trioserve.supervision.supervisor import Supervisor
from trioserve_cli import daemon_cmds
from trioserve_cli.main import app

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("first_bytes", "verdict"),
    [
        (HEALTH, Verdict.HEALTH),
        (b"HEAD /health HTTP/1.0\r\n\r\n", Verdict.HEALTH),
        (b"GET /heal", Verdict.OTHER),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n", Verdict.OTHER),
        (b"GET /healthz HTTP/1.1\r\n\r\n", Verdict.OTHER),
        (b"GET /health?verbose=1 HTTP/1.1\r\n\r\n", Verdict.OTHER),
        (b"POST /health HTTP/1.1\r\n\r\n", Verdict.OTHER),
        (b"POST /v1/chat/completions HTTP/1.1\r\n", Verdict.OTHER),
        (b"GET /health HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", Verdict.OTHER),
        (b"", Verdict.GONE),
    ],
)
def test_first_bytes_are_classified(first_bytes: bytes, verdict: Verdict) -> None:
    assert classify(first_bytes) is verdict


# A bound against a hang, for a thread the test waits for: never a measure of speed.
HANG = 30.0


def _in_thread(url: str, request: bytes, results: list[bytes]) -> threading.Thread:
    """``blocking_exchange`` in a thread of its own (the loop may be blocked)."""
    thread = threading.Thread(target=lambda: results.append(blocking_exchange(url, request)))
    thread.start()
    return thread


def _block_the_loop_until(thread: threading.Thread) -> None:
    """Run nothing of the loop until ``thread`` has finished (a blocking join, on purpose)."""
    thread.join(timeout=HANG)
    assert not thread.is_alive(), "the probe got no answer while the loop was blocked"


def _config(state_dir: Path):  # type: ignore[no-untyped-def]
    return make_config(state_dir, {"echo": {"cmd": echo_cmd()}})


async def test_health_is_answered_while_the_event_loop_is_blocked(state_dir: Path) -> None:
    async with running_daemon(_config(state_dir)) as (info, _client):
        results: list[bytes] = []
        probe = _in_thread(info.url, HEALTH, results)
        # The loop runs nothing from before the probe connects until it has its answer:
        # neither an accept nor any request.
        _block_the_loop_until(probe)
        [answer] = results
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert answer.endswith(b'{"status":"ok"}')


async def test_other_requests_sent_while_the_loop_is_blocked_are_served_after(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed_over = threading.Event()
    give = listener._TakeOverThread._give

    def giving(self: listener._TakeOverThread, conn: socket.socket) -> None:
        give(self, conn)
        handed_over.set()

    monkeypatch.setattr(listener._TakeOverThread, "_give", giving)
    async with running_daemon(_config(state_dir)) as (info, _client):
        results: list[bytes] = []
        request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        probe = _in_thread(info.url, request, results)
        # The loop stays blocked until the thread has taken the connection and handed it over.
        assert handed_over.wait(timeout=HANG), "the take-over thread took no connection"
        await trio.to_thread.run_sync(probe.join, HANG)
        [answer] = results
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert [m["id"] for m in json.loads(body)["data"]] == ["echo"]


async def test_health_says_stalled_when_the_loop_has_not_run(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener, "LOOP_STALL_AFTER", 0.3)
    async with running_daemon(_config(state_dir)) as (info, client):
        results: list[bytes] = []

        def late_probe() -> None:
            # Only a lower bound: the loop is blocked until this probe has its answer, so it
            # has been stuck longer than LOOP_STALL_AFTER by then however slow the machine.
            time.sleep(0.8)
            results.append(blocking_exchange(info.url, HEALTH))

        probe = threading.Thread(target=late_probe)
        probe.start()
        _block_the_loop_until(probe)
        [answer] = results
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b'"status":"stalled"' in answer
        # Once the loop runs again (its next tick), it is healthy again.
        with trio.fail_after(HANG):
            while (health := await client.get("/health")).status_code != 200:
                await trio.sleep(0.05)
        assert health.json() == {"status": "ok"}


async def test_head_health_has_no_body(state_dir: Path) -> None:
    async with running_daemon(_config(state_dir)) as (info, _client):
        answer = await trio.to_thread.run_sync(
            blocking_exchange, info.url, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b"\r\n\r\n")
        assert b"content-length: 15" in answer


async def test_a_client_slow_to_send_its_request_is_still_served(state_dir: Path) -> None:
    async with running_daemon(_config(state_dir)) as (info, _client):
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await trio.to_thread.run_sync(
            partial(blocking_exchange, info.url, request, send_after=listener.PEEK_WAIT + 0.3)
        )
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b'{"status":"ok"}')


async def test_listening_socket_is_closed_after_shutdown(state_dir: Path) -> None:
    async with running_daemon(_config(state_dir)) as (info, _client):
        url = info.url
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(raw_address(url), timeout=2).close()


async def test_a_failed_take_over_thread_is_logged_and_the_daemon_keeps_serving(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: object) -> None:
        raise RuntimeError("take-over thread broke")

    monkeypatch.setattr(listener._TakeOverThread, "run", broken)
    async with running_daemon(_config(state_dir)) as (_info, client):
        # The loop accepts everything itself, /health included.
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/v1/models")).status_code == 200
    assert "the accept take-over thread failed" in caplog.text
    assert "take-over thread broke" in caplog.text


def test_the_thread_never_blocks_a_stop_while_trio_takes_no_more_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listener, "MAX_HANDED_OVER", 1)
    handed: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        thread = listener._TakeOverThread(server, handed.append, listener.Liveness())
        first, second = socket.socketpair()
        try:
            thread._give(first)  # takes the only slot; trio never takes it (shutting down)
            thread.stop()
            # Would wait for a slot forever (a daemon thread: a failure leaves no process hung).
            giving = threading.Thread(target=thread._give, args=(second,), daemon=True)
            giving.start()
            giving.join(timeout=HANG)
            assert not giving.is_alive(), "_give waits for a slot after the stop"
            assert handed == [first]
            assert second.fileno() == -1  # closed, not leaked
        finally:
            first.close()
            second.close()
            thread.close()


def _process_settings() -> tuple[int, tuple[int, int, int], float]:
    return gc.get_freeze_count(), gc.get_threshold(), sys.getswitchinterval()


@pytest.fixture
def restore_process_settings() -> Iterator[None]:
    """Puts back what ``trioserve start`` sets for the whole process."""
    _, threshold, interval = _process_settings()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)


async def test_an_in_process_daemon_changes_no_process_wide_setting(state_dir: Path) -> None:
    before = _process_settings()
    async with running_daemon(_config(state_dir)) as (_info, client):
        assert (await client.get("/health")).status_code == 200
        assert _process_settings() == before
    assert _process_settings() == before


def test_start_asks_for_1ms_gil_hand_overs_and_freezes_the_daemon_once_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_process_settings: None
) -> None:
    # The health thread needs the GIL several times per probe; the default 5 ms per hand-over
    # made probes under load take up to 28 ms (bench/load.py b).
    real_run_daemon = daemon.run_daemon
    supervisors: list[int] = []  # not frozen, before and after on_ready
    settings: list[tuple[int, tuple[int, int, int], float]] = []

    def supervisors_collectable() -> int:
        # gc.get_objects() leaves out what gc.freeze() moved to the permanent generation.
        return sum(isinstance(o, Supervisor) for o in gc.get_objects())

    async def run_until_ready(
        config: Config, *, insecure: bool, on_ready: Callable[[], None]
    ) -> None:
        ready = trio.Event()

        def check_then_stop() -> None:
            supervisors.append(supervisors_collectable())
            on_ready()
            supervisors.append(supervisors_collectable())
            settings.append(_process_settings())
            ready.set()

        await real_run_daemon(
            config, insecure=insecure, on_ready=check_then_stop, shutdown_trigger=ready.wait
        )

    monkeypatch.setattr(daemon, "run_daemon", run_until_ready)
    gc.unfreeze()
    config_file, _url = daemon_config(
        tmp_path / "trioserve.toml", tmp_path / "state", {"echo": {"cmd": echo_cmd()}}
    )
    result = CliRunner().invoke(app, ["start", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    # What the daemon built at startup is frozen: full collections never walk it again.
    [before, after] = supervisors
    assert before >= 1  # this daemon's (an earlier test may have left one for the collector)
    assert after == 0
    [(frozen, threshold, interval)] = settings
    assert frozen > 0
    assert threshold == daemon_cmds.GC_THRESHOLDS
    assert interval == daemon_cmds.SWITCH_INTERVAL <= 0.001


async def test_one_accept_drains_the_queue_and_answers_a_probe_queued_behind_others() -> None:
    # 1,000 clients connecting at once must not put a probe behind hundreds of loop passes.
    with socket.create_server(("127.0.0.1", 0)) as listen_socket:
        listen_socket.setblocking(False)
        address = listen_socket.getsockname()
        others = [socket.create_connection(address) for _ in range(20)]
        for conn in others:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        probe = socket.create_connection(address)
        probe.sendall(HEALTH)
        direct = listener.DirectListener(
            listen_socket, listener.TakenOverConnections(listen_socket)
        )
        streams: list[trio.SocketStream] = []
        try:
            first = await direct.accept()
            # Answered in that same pass, before any other connection was handed out.
            probe.setblocking(False)
            assert probe.recv(65536).startswith(b"HTTP/1.1 200 ")
            # The rest come without waiting for the socket again (the bound is against a hang).
            with trio.fail_after(HANG):
                streams = [first] + [await direct.accept() for _ in range(19)]
            ports = {s.socket.getpeername()[1] for s in streams}
            assert ports == {c.getsockname()[1] for c in others}
        finally:
            for stream in streams:
                await stream.aclose()
            for conn in [*others, probe]:
                conn.close()
            await direct.aclose()
