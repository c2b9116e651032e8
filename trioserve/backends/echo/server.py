"""Serving the echo app with Hypercorn's trio worker, the same stack as the gateway's."""

from __future__ import annotations

import mmap
from collections.abc import Awaitable, Callable
from typing import Final

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from trioserve.backends.echo.app import build_app
from trioserve.backends.echo.options import EchoOptions

__all__ = ["serve"]

# Hypercorn listens with a backlog of 100. A benchmark that opens 1000 streams at once overflows
# that queue; the kernel then drops SYNs and each dropped client waits a full second for the
# retransmit, which would be measured as our latency. Linux caps this at net.core.somaxconn.
_BACKLOG: Final = 4096


def _hold(mib: int) -> mmap.mmap | None:
    """``mib`` MiB of anonymous memory with every page written, or None for 0.

    Allocating is not enough: the kernel maps untouched pages to nothing, and RSS/PSS (what
    trioserve measures) only grow once a page is written. One byte per page makes each one
    resident, like a model's weights once they are loaded. Private, as a heap is: a shared
    mapping would count as shmem and be shared with any process forked from this one.
    """
    if mib == 0:
        return None
    held = mmap.mmap(-1, mib * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    held[:: mmap.PAGESIZE] = b"\x01" * len(range(0, len(held), mmap.PAGESIZE))
    return held


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    options: EchoOptions,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the echo app with Hypercorn until ``shutdown_trigger`` returns or we are cancelled.

    ``task_status.started`` receives the bound URLs, e.g. ``["http://127.0.0.1:8081"]``, which
    tells the real port when ``options.port`` is 0. With ``options.hold_mib``, that memory is
    allocated and touched before the port is bound, and held until this returns.
    """
    held = _hold(options.hold_mib)
    config = Config()
    config.bind = [_bind(options.host, options.port)]
    config.accesslog = None
    config.backlog = _BACKLOG
    try:
        await hypercorn_serve(
            build_app(options), config, shutdown_trigger=shutdown_trigger, task_status=task_status
        )
    finally:
        if held is not None:
            held.close()
