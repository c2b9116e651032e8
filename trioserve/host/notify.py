"""The sd_notify protocol, spoken directly over a unix datagram socket.

systemd passes ``NOTIFY_SOCKET`` (and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` and
``WATCHDOG_PID``) to a ``Type=notify`` service. The protocol is one datagram of
newline-separated ``KEY=value`` fields per message, so libsystemd is not needed.

Nothing here raises because systemd went away: a daemon serving models must keep
serving even if the notify socket vanished (e.g. during ``systemctl daemon-reexec``).
Children never see these variables: ``trioserve.host.child_env.child_env`` removes them.
"""

from __future__ import annotations

import logging
import os
import socket as stdlib_socket
from collections.abc import Mapping
from dataclasses import dataclass

import trio

__all__ = ["SystemdNotifier"]

logger = logging.getLogger(__name__)

# systemd drains its notify socket at once; a peer whose queue stays full this long
# is wedged or gone, and waiting longer would only hold up the caller (e.g. the
# daemon's shutdown sending STOPPING=1). The message is dropped with a warning.
_SEND_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class SystemdNotifier:
    """Sends sd_notify messages to systemd; every method is a no-op without a socket.

    Build it with :meth:`from_env`. ``address`` is the socket address as the kernel
    wants it (an abstract name starts with a NUL byte); ``watchdog_usec`` is set only
    when the watchdog applies to this process.
    """

    address: bytes | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from ``environ`` or os.environ."""
        env: Mapping[str, str] = os.environ if environ is None else environ
        address = _parse_notify_socket(env.get("NOTIFY_SOCKET", ""))
        watchdog_usec = None
        if address is not None:
            watchdog_usec = _parse_watchdog(env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"))
        return cls(address=address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self.address is not None

    @property
    def watchdog_enabled(self) -> bool:
        """True when systemd expects ``WATCHDOG=1`` pings from this process."""
        return self.address is not None and self.watchdog_usec is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises."""
        if not self.watchdog_enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    async def notify(self, *fields: str) -> None:
        """Send one datagram made of ``fields`` (``"KEY=value"``) joined by newlines.

        Send failures are logged as warnings and never raised. A field containing a
        newline is a programming error (it would forge another field): ValueError.
        """
        if self.address is None or not fields:
            return
        for field in fields:
            if "\n" in field:
                raise ValueError(f"sd_notify field contains a newline: {field!r}")
        await self._send("\n".join(fields).encode("utf-8"))

    async def ready(self, status: str | None = None) -> None:
        """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        await self.notify(*fields)

    async def status(self, text: str) -> None:
        """Set the free-form status shown by ``systemctl status``."""
        await self.notify(_status_field(text))

    async def stopping(self, status: str | None = None) -> None:
        """Tell systemd the daemon is shutting down (``STOPPING=1``)."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(_status_field(status))
        await self.notify(*fields)

    async def watchdog_ping(self) -> None:
        """Send one ``WATCHDOG=1`` keep-alive."""
        await self.notify("WATCHDOG=1")

    async def run_watchdog(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Ping the watchdog every ``WATCHDOG_USEC / 2`` forever; return at once if disabled.

        The pings come from a trio task on purpose: if the event loop is stuck, they
        stop, and systemd restarts a daemon that can no longer serve anyone.
        """
        task_status.started()
        period = self.watchdog_interval
        if period is None:
            return
        deadline = trio.current_time()
        while True:
            await self.watchdog_ping()
            # Schedule from the previous deadline rather than from "now", so a slow
            # send does not push every later ping back. After a stall longer than a
            # period, restart the schedule instead of sending a burst of catch-ups.
            deadline += period
            now = trio.current_time()
            if deadline <= now:
                deadline = now + period
            await trio.sleep_until(deadline)

    async def _send(self, payload: bytes) -> None:
        assert self.address is not None
        # trio.socket rather than a plain non-blocking stdlib socket: a unix datagram
        # send *can* block (EAGAIN) when systemd's receive queue is full, and trio
        # waits for room without stopping the event loop, cancellably. The socket is
        # connect()ed, not used with sendto(): only for a connected datagram socket
        # does poll() report the peer's queue, so an unconnected one would busy-loop.
        # A fresh socket per message, as sd_notify() does, holds no state across a
        # socket that systemd may re-create.
        sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_DGRAM)
        try:
            with trio.move_on_after(_SEND_TIMEOUT) as scope:
                await sock.connect(self.address)
                await sock.send(payload)
            if scope.cancelled_caught:
                logger.warning(
                    "sd_notify: systemd's notify socket %r did not accept a message within"
                    " %.1f s; dropped %r",
                    self.address,
                    _SEND_TIMEOUT,
                    payload,
                )
        except OSError as exc:
            # Cancelled is not an OSError, so cancellation still propagates.
            logger.warning("sd_notify: could not send %r to %r: %s", payload, self.address, exc)
        finally:
            sock.close()


def _parse_notify_socket(value: str) -> bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # systemd's spelling of the Linux abstract namespace: a leading NUL byte.
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    # sd_notify() refuses relative paths too; newer systemd also offers vsock:
    # addresses, which a local daemon has no use for.
    logger.warning("sd_notify: unsupported NOTIFY_SOCKET %r; notifications disabled", value)
    return None


def _parse_watchdog(usec: str | None, pid: str | None) -> int | None:
    if usec is None:
        return None
    try:
        value = int(usec)
    except ValueError:
        logger.warning("sd_notify: invalid WATCHDOG_USEC %r; watchdog disabled", usec)
        return None
    if value <= 0:
        return None
    if pid is not None:
        # Set by systemd for the main process only: a forked child that kept the
        # env must not ping for its parent.
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            logger.warning("sd_notify: invalid WATCHDOG_PID %r; watchdog disabled", pid)
            return None
    return value


def _status_field(text: str) -> str:
    # A newline would end the STATUS field and start a forged one; status text often
    # comes from a child's stderr, so flatten it rather than refuse it.
    return "STATUS=" + " ".join(text.splitlines())
