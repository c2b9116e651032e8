"""sd_notify: the test is systemd's side of NOTIFY_SOCKET, with real unix sockets."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.support.notify import NotifyPeer
from trioserve.host.notify import SystemdNotifier

# For the tests that fill the peer's queue with a plain socket: it sends to a path, not to the
# "@name" spelling of an abstract address.
on_a_path = pytest.mark.parametrize("peer", ["path"], indirect=True)


def _watchdog_notifier(peer: NotifyPeer, **env: str) -> SystemdNotifier:
    """A notifier for ``peer`` with a 2 s watchdog: a ping every second."""
    return SystemdNotifier.from_env(
        {"NOTIFY_SOCKET": peer.notify_socket, "WATCHDOG_USEC": "2000000", **env}
    )


# --- parsing the environment ------------------------------------------------------


def test_abstract_notify_socket_maps_at_sign_to_nul() -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@/org/freedesktop/systemd1/notify"})
    assert notifier.address == b"\0/org/freedesktop/systemd1/notify"
    assert notifier.enabled


def test_path_notify_socket_is_kept_as_is() -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify"})
    assert notifier.address == b"/run/systemd/notify"


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_unusable_notify_socket_disables_notifications(value: str) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert not notifier.watchdog_enabled


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@from-os-environ")
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = SystemdNotifier.from_env()
    assert notifier.address == b"\0from-os-environ"
    assert notifier.watchdog_interval == 2.0


def test_watchdog_pid_of_this_process_enables_watchdog() -> None:
    notifier = SystemdNotifier.from_env(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert notifier.watchdog_enabled
    assert notifier.watchdog_interval == 15.0


@pytest.mark.parametrize("usec", ["", "abc", "0", "-5"])
def test_invalid_watchdog_usec_disables_watchdog(usec: str) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": usec})
    assert notifier.enabled
    assert not notifier.watchdog_enabled
    assert notifier.watchdog_interval is None


# --- messages -----------------------------------------------------------------------


async def test_ready_status_stopping_arrive_in_order(peer: NotifyPeer) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": peer.notify_socket})
    await notifier.ready("listening on 127.0.0.1:8600")
    await notifier.status("2 models loaded")
    await notifier.stopping()
    await notifier.ready()
    await notifier.stopping("draining 3 requests")
    assert peer.drain() == [
        b"READY=1\nSTATUS=listening on 127.0.0.1:8600",
        b"STATUS=2 models loaded",
        b"STOPPING=1",
        b"READY=1",
        b"STOPPING=1\nSTATUS=draining 3 requests",
    ]


async def test_notify_joins_fields_with_newlines(peer: NotifyPeer) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": peer.notify_socket})
    await notifier.notify("RELOADING=1", "STATUS=reloading config", "MONOTONIC_USEC=1")
    await notifier.watchdog_ping()
    await notifier.notify()  # nothing to say: nothing sent
    assert peer.drain() == [
        b"RELOADING=1\nSTATUS=reloading config\nMONOTONIC_USEC=1",
        b"WATCHDOG=1",
    ]


async def test_status_with_newlines_cannot_forge_fields(peer: NotifyPeer) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": peer.notify_socket})
    await notifier.status("model crashed:\nREADY=1\r\nsee logs")
    assert peer.drain() == [b"STATUS=model crashed: READY=1 see logs"]
    with pytest.raises(ValueError, match="newline"):
        await notifier.notify("STATUS=a\nREADY=1")
    assert peer.drain() == []


async def test_utf8_status_is_sent_as_utf8(peer: NotifyPeer) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": peer.notify_socket})
    await notifier.status("modèle prêt ✓")
    assert peer.drain() == ["STATUS=modèle prêt ✓".encode()]


async def test_without_notify_socket_nothing_is_sent(
    monkeypatch: pytest.MonkeyPatch, peer: NotifyPeer
) -> None:
    def no_socket_expected(*args: object, **kwargs: object) -> None:
        raise AssertionError("a socket was opened without NOTIFY_SOCKET")

    monkeypatch.setattr(trio.socket, "socket", no_socket_expected)
    notifier = SystemdNotifier.from_env({"WATCHDOG_USEC": "2000000"})
    assert not notifier.enabled
    assert not notifier.watchdog_enabled
    await notifier.ready("up")
    await notifier.status("fine")
    await notifier.watchdog_ping()
    await notifier.stopping()
    await notifier.notify("X=1")
    with trio.fail_after(1):
        await notifier.run_watchdog()  # returns at once instead of pinging forever
    assert peer.drain() == []


# --- systemd's socket gone or wedged ----------------------------------------------


async def test_peer_socket_deleted_does_not_raise(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    peer = NotifyPeer.bind("path", short_dir)
    path = Path(peer.notify_socket)
    peer.sock.close()
    path.unlink()
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": str(path)})
    with caplog.at_level(logging.WARNING, logger="trioserve.host.notify"):
        await notifier.ready()
        await notifier.watchdog_ping()
        await notifier.stopping()
    assert len(caplog.records) == 3
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert "READY=1" in caplog.records[0].getMessage()


async def test_peer_socket_closed_but_file_left_does_not_raise(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    peer = NotifyPeer.bind("path", short_dir)
    path = Path(peer.notify_socket)
    peer.sock.close()  # the inode stays: connect() gets ECONNREFUSED, not ENOENT
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": str(path)})
    with caplog.at_level(logging.WARNING, logger="trioserve.host.notify"):
        await notifier.status("still here")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def fill_queue(peer: NotifyPeer) -> int:
    """Fill ``peer``'s receive queue (net.unix.max_dgram_qlen) the way a wedged systemd would
    leave it: the kernel answers EAGAIN to further sends. Returns how many datagrams it holds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.setblocking(False)
        queued = 0
        try:
            while True:
                filler.sendto(b"FILLER=1", peer.notify_socket)
                queued += 1
        except BlockingIOError:
            return queued


async def test_abstract_peer_gone_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": f"@trioserve-absent-{uuid.uuid4().hex}"})
    with caplog.at_level(logging.WARNING, logger="trioserve.host.notify"):
        await notifier.ready()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


@on_a_path
async def test_peer_with_full_queue_drops_message_after_timeout(
    autojump_clock: trio.testing.MockClock, peer: NotifyPeer, caplog: pytest.LogCaptureFixture
) -> None:
    queued = fill_queue(peer)
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": peer.notify_socket})
    start = trio.current_time()
    with caplog.at_level(logging.WARNING, logger="trioserve.host.notify"):
        await notifier.stopping()
    # Waited (in virtual time) for room, gave up after the send timeout, returned.
    assert trio.current_time() - start == pytest.approx(1.0)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert peer.drain() == [b"FILLER=1"] * queued


@on_a_path
async def test_cancellation_while_waiting_for_room_propagates(
    autojump_clock: trio.testing.MockClock, peer: NotifyPeer
) -> None:
    fill_queue(peer)
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": peer.notify_socket})
    with trio.move_on_after(0.5) as scope:
        await notifier.stopping()
    assert scope.cancelled_caught  # the caller's cancel, not swallowed as a send error


# --- watchdog -------------------------------------------------------------------------


async def test_watchdog_pings_every_half_of_watchdog_usec(
    autojump_clock: trio.testing.MockClock, peer: NotifyPeer
) -> None:
    notifier = _watchdog_notifier(peer)
    assert notifier.watchdog_interval == 1.0
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(notifier.run_watchdog)
        # Pings at t = 0, 1, 2, 3, 4, 5 s. Look half-way between two pings, so no
        # wake-up ties with a ping, and drain with a non-blocking recv: a blocking
        # one would freeze autojump_clock's notion of "all tasks are idle".
        per_step = []
        for step in range(6):
            await trio.sleep_until(start + step + 0.5)
            per_step.append(peer.drain())
        nursery.cancel_scope.cancel()
    assert per_step == [[b"WATCHDOG=1"]] * 6
    assert trio.current_time() - start == pytest.approx(5.5)


async def test_watchdog_total_count_over_five_seconds(
    autojump_clock: trio.testing.MockClock, peer: NotifyPeer
) -> None:
    notifier = _watchdog_notifier(peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog)
        await trio.sleep(5.5)
        nursery.cancel_scope.cancel()
    # One ping at start, then one per second: t = 0, 1, 2, 3, 4, 5.
    assert peer.drain() == [b"WATCHDOG=1"] * 6


async def test_watchdog_after_a_stalled_loop_pings_once_not_a_burst(
    autojump_clock: trio.testing.MockClock, peer: NotifyPeer
) -> None:
    notifier = _watchdog_notifier(peer)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(notifier.run_watchdog)
        await trio.sleep_until(start + 0.5)
        assert peer.drain() == [b"WATCHDOG=1"]  # t = 0
        # The event loop "stalls" for 3 s: the 1 s and 2 s deadlines are missed.
        autojump_clock.jump(3.0)
        await trio.sleep_until(start + 3.6)
        assert peer.drain() == [b"WATCHDOG=1"]  # t = 3.5, no catch-up burst
        await trio.sleep_until(start + 4.6)
        assert peer.drain() == [b"WATCHDOG=1"]  # t = 4.5, schedule restarted
        nursery.cancel_scope.cancel()


async def test_watchdog_pid_of_another_process_disables_watchdog(
    autojump_clock: trio.testing.MockClock, peer: NotifyPeer
) -> None:
    notifier = _watchdog_notifier(peer, WATCHDOG_PID=str(os.getpid() + 1))
    assert notifier.enabled
    assert not notifier.watchdog_enabled
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog)
    # The nursery closed on its own: run_watchdog returned right after started().
    assert trio.current_time() == start
    await trio.sleep(10)
    assert peer.drain() == []


async def test_watchdog_without_watchdog_usec_returns_at_once(peer: NotifyPeer) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": peer.notify_socket})
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run_watchdog)
    assert peer.drain() == []
