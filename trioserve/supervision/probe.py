"""Health checks of model children: a starting child until it is ready, a ready one."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import trio

from trioserve.supervision.process import ChildProcess

__all__ = [
    "ERROR_TAIL_LINES",
    "PROBE_LIMIT",
    "HealthProbe",
    "Readiness",
    "StartFailed",
    "output_tail",
]

# How often a starting child's health endpoint is probed. Short, because the time from "the
# backend is ready" to "the first request is forwarded" is this interval at worst; a probe is
# one HTTP request, cheap next to a model load.
START_PROBE_INTERVAL = 0.025
# The longest one probe may take; a slower answer counts as unhealthy.
PROBE_LIMIT = 5.0
# Lines of child output quoted in an error.
ERROR_TAIL_LINES = 20


class StartFailed(Exception):
    """A start that did not lead to a healthy child; ``reason`` says why, for the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def output_tail(child: ChildProcess) -> str:
    """The child's last lines of output, as a suffix for an error message."""
    lines = child.output.tail(ERROR_TAIL_LINES)
    if not lines:
        return ""
    return "; last output:\n" + "\n".join(lines)


class HealthProbe:
    """HTTP health checks over one client shared by every model.

    ``owns_port(pid, port)`` is the blocking check (run in a worker thread) that the process
    tree of ``pid`` is what listens on ``port``: a 200 from another program does not count.
    """

    def __init__(self, client: httpx.AsyncClient, *, owns_port: Callable[[int, int], bool]):
        self._client = client
        self._owns_port = owns_port

    async def healthy(self, url: str, *, limit: float = PROBE_LIMIT) -> bool:
        """True when ``url`` answers 200 within ``limit`` seconds."""
        with trio.move_on_after(limit):
            try:
                response = await self._client.get(url)
            except httpx.HTTPError:
                return False
            return response.status_code == 200
        return False

    async def owns_port(self, pid: int, port: int) -> bool:
        """True when the process tree of ``pid`` is what listens on ``port``."""
        return await trio.to_thread.run_sync(self._owns_port, pid, port)


class Readiness:
    """One starting child, probed until it answers 200 on its health URL or exits.

    Run ``wait`` under the start timeout's cancel scope; then ``healthy`` says whether it
    passed, and ``failure`` explains why not.
    """

    def __init__(self, probe: HealthProbe, child: ChildProcess, port: int, url: str) -> None:
        self._probe = probe
        self.child = child
        self.port = port
        self.url = url
        self.healthy = False
        # Something answered 200 on the port, but not the child's process tree.
        self.impostor = False

    async def wait(self) -> None:
        """Return once the child is healthy or has exited (its pidfd tells at once)."""
        child = self.child
        while not child.exited.is_set():
            if await self._probe.healthy(self.url):
                # Between our bind test and the child's bind, another program may have taken
                # the port: a 200 counts only if the child's own process tree listens there.
                if await self._probe.owns_port(child.pid, self.port):
                    self.healthy = True
                    return
                self.impostor = True
            with trio.move_on_after(START_PROBE_INTERVAL):
                await child.exited.wait()

    async def failure(self, start_timeout: float) -> StartFailed:
        """Why the child is not healthy: it exited (with its last words), or it timed out."""
        child = self.child
        if child.exited.is_set():
            await child.last_words()
            return StartFailed(
                f"process exited with code {child.returncode} before it became healthy"
                + output_tail(child)
            )
        impostor = ""
        if self.impostor:
            impostor = (
                f"; port {self.port} answers, but another program holds it, not the model's process"
            )
        return StartFailed(
            f"not healthy within start_timeout ({start_timeout:g}s) at {self.url}"
            + impostor
            + output_tail(child)
        )
