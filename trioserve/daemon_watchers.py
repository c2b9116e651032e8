"""The daemon's own listeners to lifecycle events: the idle-connection sweep and systemd's
status line. Both are watches (``EventBus.watch``), never dropped however far they fall behind.
"""

from __future__ import annotations

import logging

from trioserve.gateway.upstream import KeepAlivePool
from trioserve.host.notify import SystemdNotifier
from trioserve.reload import Reloader
from trioserve.supervision.supervisor import Supervisor

__all__ = ["report_status", "status_line", "sweep_on_model_events"]

log = logging.getLogger("trioserve")


def status_line(supervisor: Supervisor, reloader: Reloader | None = None) -> str:
    """systemd's STATUS: the models' states, and a failed last reload until one succeeds."""
    states: dict[str, int] = {}
    for info in supervisor.status().values():
        states[info.state.value] = states.get(info.state.value, 0) + 1
    ready = states.get("ready", 0)
    line = f"{ready} of {len(supervisor.models)} models ready; " + ", ".join(
        f"{count} {state}" for state, count in sorted(states.items())
    )
    last = reloader.last if reloader is not None else None
    if last is not None and not last.ok:
        line += f"; last reload failed: {last.error}"
    return line


async def sweep_on_model_events(pool: KeepAlivePool, supervisor: Supervisor) -> None:
    """A model that stopped or crashed leaves idle connections to a dead port: close them.
    (A watch, never dropped: after ``LAGGED`` the sweep looks at every connection anyway.)"""
    async with supervisor.events.watch() as events:
        async for _event in events:
            try:
                await pool.sweep()
            except Exception:
                # Housekeeping: a failure here must not take the daemon down.
                log.exception("closing idle upstream connections failed")


async def report_status(
    notifier: SystemdNotifier, supervisor: Supervisor, reloader: Reloader
) -> None:
    """systemd's status line after every lifecycle event. Its send may block (up to a second):
    a watch, never dropped, and each line is made from the current state, so missed events
    (``LAGGED``) cost nothing."""
    if not notifier.enabled:
        return
    async with supervisor.events.watch() as events:
        async for _event in events:
            await notifier.status(status_line(supervisor, reloader))
