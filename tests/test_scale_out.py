"""Several nodes behind HAProxy: three ``trioserve start`` daemons (own state dirs, own model
port ranges) behind ``conf/examples/haproxy.cfg`` rendered with their loopback addresses.

Which node answered comes from the header the example sets (``X-Trioserve-Node``); which
node has a model loaded, from each node's own ``/admin/status``.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.haproxy import (
    EXAMPLE,
    MODELS,
    STOP_GRACE,
    Cluster,
    Load,
    Spawn,
    ask,
    balancer,
    haproxy_binary,
    running_cluster,
)
from tests.support.http import chat
from tests.support.processes import eventually, processes_of_state_dir

CLIENTS = 12


@pytest.fixture
def cluster(tmp_path: Path, spawn_daemon: Spawn) -> Iterator[Cluster]:
    """Three nodes behind the rendered example (``running_cluster``)."""
    with running_cluster(tmp_path, spawn_daemon) as cluster:
        yield cluster


def test_the_example_config_passes_haproxy_check() -> None:
    binary = haproxy_binary()
    result = subprocess.run(
        [binary, "-c", "-f", str(EXAMPLE)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_each_model_lives_on_one_node_until_a_flood_spills_it_to_a_second(
    cluster: Cluster,
) -> None:
    answered_by: dict[str, set[str]] = {model: set() for model in MODELS}
    async with balancer(cluster) as client:
        # One after the other: nothing concurrent, so the bounded load never spills.
        for stream in (False, True):
            for model in MODELS:
                node, problem = await ask(client, model, stream=stream)
                assert problem is None, problem
                answered_by[model].add(node)
        # Streaming goes through unbuffered: the first token comes long before the last.
        started = trio.current_time()
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat(MODELS[0], stream=True)
        ) as response:
            first_at = None
            async for chunk in response.aiter_text():
                if first_at is None and "data: {" in chunk:
                    first_at = trio.current_time() - started
            total = trio.current_time() - started
    assert first_at is not None and first_at < total / 2, (first_at, total)
    for model in MODELS:
        # Every request for a model went to one node, and only that node has it loaded.
        assert len(answered_by[model]) == 1, answered_by
        assert await cluster.nodes_with(model) == answered_by[model], model

    # Now a flood on one model: 18 requests at once.
    hot = MODELS[1]
    flood: Counter[str] = Counter()
    problems: list[str] = []

    async def one(client: httpx.AsyncClient) -> None:
        node, problem = await ask(client, hot, stream=False)
        flood[node] += 1
        if problem is not None:
            problems.append(problem)

    async with balancer(cluster) as client, trio.open_nursery() as nursery:
        for _ in range(18):
            nursery.start_soon(one, client)
    assert problems == [], problems
    # No node may hold more than 1.5 x the average in flight (~9 of 18 on three nodes), so
    # the rest went to the next node on the ring, which loaded the model too.
    assert answered_by[hot] < set(flood), flood
    assert max(flood.values()) <= 10, flood
    assert await cluster.nodes_with(hot) == set(flood), flood


async def test_rolling_restart_under_load_fails_no_request_and_cuts_no_stream(
    cluster: Cluster,
) -> None:
    load = Load()
    async with trio.open_nursery() as nursery:
        for index in range(CLIENTS):
            nursery.start_soon(load.client, cluster, index)
        with trio.fail_after(60):
            # Every node has had traffic before it goes: the models are spread already.
            await eventually(
                lambda: load.answered >= 2 * CLIENTS,
                within=20,
                what="the load under way",
            )
            for node in cluster.nodes:
                wanted = load.answered + CLIENTS
                await cluster.restart(node)
                # Traffic went on during the restart, and goes on after it.
                await eventually(
                    lambda: load.answered >= wanted,  # noqa: B023 (awaited in this iteration)
                    within=20,
                    what="requests answered after the restart",
                )
        load.stop.set()
    assert load.failures == [], load.failures[:10]
    # Every answer named the node it came from (HAProxy's header: no answer of its own).
    assert set(load.answers) <= {node.name for node in cluster.nodes}, load.answers
    assert load.answered >= 10 * CLIENTS, load.answers


async def test_a_killed_nodes_models_move_at_once_and_its_guard_leaves_nothing(
    cluster: Cluster,
) -> None:
    async with balancer(cluster) as client:
        homes = {}
        for model in MODELS:
            homes[model], problem = await ask(client, model, stream=False)
            assert problem is None, problem
        victim = cluster.node(homes[MODELS[0]])
        moved = [model for model in MODELS if homes[model] == victim.name]
        assert processes_of_state_dir(victim.state_dir), "the victim runs no model"

        victim.daemon.proc.kill()
        killed_at = trio.current_time()
        await trio.to_thread.run_sync(victim.daemon.proc.wait)
        for model in moved:
            # The first request after the kill already succeeds, on another node: the
            # refused connection is retried there (option redispatch 1), no health check needed.
            node, problem = await ask(client, model, stream=True)
            assert problem is None, problem
            assert node not in ("-", victim.name), node
        took = trio.current_time() - killed_at
    # The model had to start on its new node (cold, ~0.5 s for the echo backend).
    assert took < 5, took
    await trio.to_thread.run_sync(cluster.haproxy.wait_states, {victim.name: "DOWN"}, 1.0)
    # The guard stops the dead daemon's models within stop_grace (+0.5 s, + slack here).
    await eventually(
        lambda: not processes_of_state_dir(victim.state_dir),
        within=STOP_GRACE + 2,
        what="the killed node's models stopped by its guard",
    )
    # The survivors keep their own models where they were.
    for model in set(MODELS) - set(moved):
        assert await cluster.nodes_with(model, but=victim) == {homes[model]}
