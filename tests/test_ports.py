"""Port allocation: never a port a live child holds, never one another program has bound;
and finding who listens on a port."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest

import trioserve.supervision.ports
from trioserve.supervision.ports import (
    NoFreePort,
    PortAllocator,
    _listening_inodes_netlink,
    _listening_inodes_proc,
    listening_inodes,
)


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_run(length: int) -> int:
    """The first port of ``length`` consecutive ports nobody has bound right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        start = int(s.getsockname()[1])
    for first in range(start, 65535 - length):
        if all(_bindable(port) for port in range(first, first + length)):
            return first
    raise RuntimeError("no run of free ports")


@contextmanager
def bound(port: int, *, listen: bool) -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        if listen:
            s.listen()
        yield


def test_hands_out_distinct_ports_then_refuses() -> None:
    first = free_run(3)
    ports = PortAllocator(first, first + 2)
    taken = {ports.allocate() for _ in range(3)}
    assert taken == {first, first + 1, first + 2}
    with pytest.raises(NoFreePort, match=rf"\[{first}, {first + 2}\]"):
        ports.allocate()


def test_never_hands_out_a_held_port_even_before_the_child_binds_it() -> None:
    # A child that is still starting has not bound its port yet: only our book says it is
    # taken. A bind test alone would give the same port to the next model.
    first = free_run(1)
    ports = PortAllocator(first, first)
    assert ports.allocate() == first
    assert _bindable(first)
    with pytest.raises(NoFreePort):
        ports.allocate()
    ports.release(first)
    assert ports.allocate() == first


@pytest.mark.parametrize("listen", [True, False], ids=["listening", "bound"])
def test_skips_a_port_another_program_has_bound(listen: bool) -> None:
    first = free_run(2)
    ports = PortAllocator(first, first + 1)
    with bound(first, listen=listen):
        assert ports.allocate() == first + 1


def test_refuses_when_every_port_is_bound_elsewhere() -> None:
    first = free_run(2)
    ports = PortAllocator(first, first + 1)
    with ExitStack() as stack:
        stack.enter_context(bound(first, listen=True))
        stack.enter_context(bound(first + 1, listen=True))
        with pytest.raises(NoFreePort, match="bound by other programs"):
            ports.allocate()
    assert ports.held() == frozenset()


def test_a_released_port_is_not_the_next_one_handed_out() -> None:
    first = free_run(3)
    ports = PortAllocator(first, first + 2)
    a = ports.allocate()
    ports.release(a)
    assert ports.allocate() != a, "round-robin: the next port, not the one just released"


@pytest.mark.parametrize("find", [_listening_inodes_netlink, _listening_inodes_proc])
def test_listening_inodes_finds_only_the_listener(find: Callable[[int], set[int]]) -> None:
    def inode(sock: socket.socket) -> int:
        return os.fstat(sock.fileno()).st_ino

    with socket.socket() as listener, socket.socket(socket.AF_INET6) as listener6:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert find(port) == {inode(listener)}
        # A connection to it (both ends use the port) is not a listener.
        with socket.create_connection(("127.0.0.1", port)), listener.accept()[0]:
            assert find(port) == {inode(listener)}
        listener6.bind(("::1", 0))
        listener6.listen()
        assert find(listener6.getsockname()[1]) == {inode(listener6)}
    with socket.socket() as bound_only:
        bound_only.bind(("127.0.0.1", 0))
        assert find(bound_only.getsockname()[1]) == set()


def test_listening_inodes_falls_back_to_proc_without_netlink(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_netlink(port: int) -> set[int]:
        raise PermissionError("netlink is not allowed here")

    monkeypatch.setattr(trioserve.supervision.ports, "_listening_inodes_netlink", no_netlink)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert listening_inodes(listener.getsockname()[1]) == {os.fstat(listener.fileno()).st_ino}


def test_a_port_left_in_time_wait_is_free_again() -> None:
    # The side that closes a connection first keeps its port in TIME_WAIT for a minute. A
    # stopping model closes its connections first: its port must still be handed out again.
    first = free_run(1)
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", first))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", first))
        served, _ = listener.accept()
        served.close()  # the server side closes first: TIME_WAIT on its port
        client.recv(1)
        client.close()
    assert not _bindable(first), "precondition: the port is in TIME_WAIT"
    assert PortAllocator(first, first).allocate() == first
