"""A finished request leaves no reference cycles behind: everything it made is freed by reference
counting at once. Cycles wait for the garbage collector, whose passes hold the GIL, and with it
the /health thread, for tens of milliseconds with 1,000 streams open (bench/load.py b)."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.support.config import echo_cmd, make_config
from tests.support.daemon import running_daemon
from tests.support.http import blocking_exchange, chat, raw_post


@contextmanager
def _garbage_collected() -> Iterator[Counter[str]]:
    """What the collector finds (by type) among what was made inside the block."""
    found: Counter[str] = Counter()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.update(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("non-streaming", chat()),
        ("streaming", chat(stream=True)),
        ("unknown model (404)", chat("nosuch")),
    ],
)
async def test_a_finished_request_leaves_no_garbage_for_the_collector(
    state_dir: Path, name: str, body: dict[str, Any]
) -> None:
    config = make_config(state_dir, {"echo": {"cmd": echo_cmd("--tokens", "5")}})
    async with running_daemon(config, admin=True) as (info, client):
        await client.post("/admin/models/echo/load")
        request = raw_post(body, b"Connection: close")
        for _ in range(5):  # warm up: pools, caches, lazily made objects
            await trio.to_thread.run_sync(blocking_exchange, info.url, request)
        with _garbage_collected() as garbage:
            for _ in range(20):
                # From a plain thread: a trio client would make garbage of its own here.
                answer = await trio.to_thread.run_sync(blocking_exchange, info.url, request)
                assert answer.startswith(b"HTTP/1.1 "), answer[:100]
            # The client read each answer to its end, so the daemon has closed each connection;
            # what is left of its tasks (the relay's, Hypercorn's) ends without waiting.
            await trio.testing.wait_all_tasks_blocked()
        assert not garbage, f"{name}: {garbage.most_common(10)}"
