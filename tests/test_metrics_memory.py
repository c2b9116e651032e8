"""``/metrics`` on memory placement, scraped from a real daemon: each budgeted device's
budget, used and free, each model's estimated and measured memory per device, and which
models wait for memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.config import echo_cmd, make_config
from tests.support.daemon import running_daemon
from tests.support.http import chat, streaming
from tests.support.status import load_model, wait_for_status

MIB = 2**20
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    """Every sample of ``/metrics``, by name and sorted labels."""
    text = (await client.get("/metrics")).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def named(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (each, labels), value in samples.items() if each == name}


async def waiting_for_memory(client: httpx.AsyncClient, model: str) -> dict[str, Any]:
    """Poll ``/admin/status`` until ``model`` waits for memory; returns the status."""
    with trio.fail_after(10):
        while True:
            status: dict[str, Any] = (await client.get("/admin/status")).json()
            if (status["models"][model]["waiting_for"] or "").startswith("waiting for memory"):
                return status
            await trio.sleep(0.01)


async def test_metrics_show_budgets_model_memory_and_a_model_waiting_for_it(
    state_dir: Path,
) -> None:
    config = make_config(
        state_dir,
        {
            # Slow: one streamed request keeps it busy for 20 s.
            "a": {"cmd": echo_cmd("--token-delay", "0.5", "--tokens", "40"), "memory": "150 MiB"},
            "b": {"cmd": echo_cmd(), "memory": "150 MiB"},
        },
        supervisor={"memory": {"cpu": "250 MiB"}, "swap_after": 600},
    )
    slow = chat("a", stream=True)
    async with running_daemon(config, admin=True) as (_, client):
        await load_model(client, "a")
        async with streaming(client, slow), trio.open_nursery() as nursery:  # a is busy

            async def ask_b() -> None:
                await client.post("/v1/chat/completions", json=chat("b"))

            nursery.start_soon(ask_b)
            status = await waiting_for_memory(client, "b")
            samples = await scrape(client)
            nursery.cancel_scope.cancel()
        # Once b no longer waits (its request went away), the gauge says so.
        await wait_for_status(client, "b", "waiting_for", None)
        after = await scrape(client)
    measured = status["models"]["a"]["memory"]["measured"]["cpu"]
    cpu = (("device", "cpu"),)
    assert named(samples, "trioserve_device_memory_budget_bytes") == {cpu: 250 * MIB}
    assert named(samples, "trioserve_device_memory_used_bytes") == {cpu: 150 * MIB}
    assert named(samples, "trioserve_device_memory_free_bytes") == {cpu: 100 * MIB}
    assert named(samples, "trioserve_model_memory_bytes") == {
        (("device", "cpu"), ("kind", "estimated"), ("model", "a")): 150 * MIB,
        (("device", "cpu"), ("kind", "measured"), ("model", "a")): measured,
        (("device", "cpu"), ("kind", "estimated"), ("model", "b")): 150 * MIB,
    }
    waiting = "trioserve_model_waiting_for_memory"
    assert named(samples, waiting) == {(("model", "a"),): 0, (("model", "b"),): 1}
    assert named(after, waiting) == {(("model", "a"),): 0, (("model", "b"),): 0}


async def test_metrics_without_budgets_have_no_device_series(state_dir: Path) -> None:
    config = make_config(state_dir, {"m": {"cmd": echo_cmd()}})
    async with running_daemon(config, admin=True) as (_, client):
        before = await scrape(client)
        measured = (await load_model(client, "m"))["memory"]["measured"]["cpu"]
        after = await scrape(client)
    for key in ("budget", "used", "free"):
        assert named(after, f"trioserve_device_memory_{key}_bytes") == {}
    # Nothing known before the first start (no size declared, no GGUF to estimate from).
    assert named(before, "trioserve_model_memory_bytes") == {}
    assert named(after, "trioserve_model_memory_bytes") == {
        (("device", "cpu"), ("kind", "measured"), ("model", "m")): measured
    }
    assert named(after, "trioserve_model_waiting_for_memory") == {(("model", "m"),): 0}
