"""Ports for model children: never one a live child holds, never one another program bound."""

from __future__ import annotations

import socket
import struct

__all__ = ["NoFreePort", "PortAllocator", "listening_inodes"]

# Netlink sock_diag (linux/sock_diag.h, linux/inet_diag.h): asks the kernel for its listening
# TCP sockets only, which is a walk of the small listening hash. Reading /proc/net/tcp instead
# makes the kernel format every connection on the machine (milliseconds on a busy host).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; inet_diag_sockid: sport, dport (big
# endian), src[16], dst[16], interface, cookie[2].
_REQUEST = struct.Struct("=BBBBI2s2s16s16sI8s")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue, uid,
# inode.
_MESSAGE = struct.Struct("=BBBB2s2s16s16sI8sIIIII")


class NoFreePort(RuntimeError):
    pass


class PortAllocator:
    """Hands out ports from ``[first, last]`` round-robin.

    Round-robin rather than lowest-first: a port a child just released may still be in
    TIME_WAIT or about to be reused by the next child of the same model, which confuses logs.
    """

    def __init__(self, first: int, last: int, host: str = "127.0.0.1") -> None:
        self.first = first
        self.last = last
        self.host = host
        self._held: set[int] = set()
        self._next = first

    def allocate(self) -> int:
        span = self.last - self.first + 1
        for _ in range(span):
            port = self._next
            self._next = self.first + (port - self.first + 1) % span
            if port in self._held:
                continue
            if not self._is_free(port):
                continue
            self._held.add(port)
            return port
        raise NoFreePort(
            f"no free port in port_range [{self.first}, {self.last}]: "
            f"{len(self._held)} held by models, the rest bound by other programs"
        )

    def release(self, port: int) -> None:
        self._held.discard(port)

    def set_range(self, first: int, last: int) -> None:
        """A new ``port_range`` (a config reload): ports held now stay held until released."""
        self.first, self.last = first, last
        self._next = first

    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    def _is_free(self, port: int) -> bool:
        # A bind test is a quick syscall, not blocking I/O, so it is fine on the event loop.
        # With SO_REUSEADDR, as the servers we start set it: a port left in TIME_WAIT by the
        # last child's connections is free for the next one (without it, a model restarted
        # within a minute would find every recently used port "taken"), while a port another
        # program listens on, or has bound without SO_REUSEADDR, still refuses the bind.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, port))
            except OSError:
                return False
        return True


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets (IPv4 and IPv6) listening on ``port`` in our namespace."""
    try:
        return _listening_inodes_netlink(port)
    except OSError:  # no netlink (some sandboxes): the slow but sure way
        return _listening_inodes_proc(port)


def _listening_inodes_netlink(port: int) -> set[int]:
    inodes: set[int] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
            # Any address, any port, no cookie: a dump of every listening socket.
            no_cookie = b"\xff" * 8
            request = _REQUEST.pack(
                family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN, b"", b"", b"", b"", 0, no_cookie
            )
            header = _NLMSGHDR.pack(
                _NLMSGHDR.size + len(request),
                _SOCK_DIAG_BY_FAMILY,
                _NLM_F_REQUEST | _NLM_F_DUMP,
                1,
                0,
            )
            nl.send(header + request)
            done = False
            while not done:
                data = nl.recv(65536)
                offset = 0
                while offset + _NLMSGHDR.size <= len(data):
                    length, kind = _NLMSGHDR.unpack_from(data, offset)[:2]
                    if length < _NLMSGHDR.size:
                        raise OSError("malformed sock_diag answer")
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        raise OSError("sock_diag refused the request")
                    fields = _MESSAGE.unpack_from(data, offset + _NLMSGHDR.size)
                    if int.from_bytes(fields[4], "big") == port:
                        inodes.add(fields[-1])
                    offset += (length + 3) & ~3
                if not data:
                    break
    return inodes


def _listening_inodes_proc(port: int) -> set[int]:
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)  # the header
                for line in f:
                    # sl local_address rem_address st ... inode
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(int(fields[9]))
        except FileNotFoundError:  # no IPv6
            continue
    return inodes
