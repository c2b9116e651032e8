"""Scale-out behind HAProxy: requests failed in a rolling restart, and how long a dead node's
models take to be served by another node.

Run with ``.venv/bin/python bench/scale_out.py`` (``--rounds``, ``--clients``,
``--test-checks``). Each round starts three daemons (echo models, own state dirs and port
ranges) behind ``conf/examples/haproxy.cfg`` rendered with their loopback addresses, with the
example's own health checks (every 2 s, 2 to change state) unless ``--test-checks`` (100 ms, 1),
then:

* **rolling restart**: ``--clients`` clients send streams and plain requests without pause
  while each node in turn gets SIGTERM, is started again and is waited for until HAProxy has it
  UP again; counts the requests answered, the failures (any status but 200, a transport error,
  a stream without ``[DONE]`` or with an error event) and the streams cut;
* **dead node**: the node that serves the first model is SIGKILLed; the time from the kill to
  the first token from another node of a stream asked for each of its models right after the
  kill (the model has to load there, cold: the echo backend's start is most of it; the first
  token comes 50 ms after that), and until HAProxy marks the node DOWN.

Prints each round and the totals; exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.daemon import DaemonProcess
from tests.support.haproxy import (
    MODELS,
    TEST_CHECKS,
    Cluster,
    Load,
    ask,
    balancer,
    running_cluster,
)
from tests.support.http import chat, sse_lines
from tests.support.processes import kill_and_wait, processes_of_state_dir


async def rolling_restart(cluster: Cluster, clients: int) -> tuple[int, list[str], float]:
    """(answered, failures, seconds) of a rolling restart of every node under load."""
    load = Load()
    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(load.client, cluster, index)
        while load.answered < 2 * clients:
            await trio.sleep(0.05)
        started = time.monotonic()
        for node in cluster.nodes:
            await cluster.restart(node)
        took = time.monotonic() - started
        await trio.sleep(1)
        load.stop.set()
    return load.answered, load.failures, took


async def first_token(
    client: httpx.AsyncClient, model: str, since: float
) -> tuple[str, float, str | None]:
    """A stream through the balancer: (node, seconds from ``since`` to its first token, what
    failed or None); read to its end, which must be ``[DONE]``."""
    async with client.stream("POST", "/v1/chat/completions", json=chat(model, stream=True)) as r:
        lines = []
        first_at = math.inf
        async for line in sse_lines(r):
            if first_at == math.inf and line.startswith("data: {"):
                first_at = time.monotonic() - since
            lines.append(line)
    ok = r.status_code == 200 and lines[-1:] == ["data: [DONE]"]
    problem = None if ok else f"{model}: {r.status_code} {lines[-2:]}"
    return r.headers.get("x-trioserve-node", "-"), first_at, problem


async def dead_node(cluster: Cluster) -> tuple[dict[str, float], float, list[str]]:
    """Seconds from a SIGKILL to each moved model's first token from another node (all asked
    at once, right after the kill), and to HAProxy's DOWN."""
    failures: list[str] = []
    moved: dict[str, float] = {}
    async with balancer(cluster) as client:
        homes = {}
        for model in MODELS:
            homes[model], problem = await ask(client, model, stream=False)
            if problem:
                failures.append(problem)
        victim = cluster.node(homes[MODELS[0]])
        killed_at = time.monotonic()
        victim.daemon.proc.kill()
        await trio.to_thread.run_sync(victim.daemon.proc.wait)

        async def one(model: str) -> None:
            node, took, problem = await first_token(client, model, killed_at)
            if problem or node == victim.name:
                failures.append(problem or f"{model} still answered by {node}")
            moved[model] = took

        async with trio.open_nursery() as nursery:
            for model in MODELS:
                if homes[model] == victim.name:
                    nursery.start_soon(one, model)
    await trio.to_thread.run_sync(cluster.haproxy.wait_states, {victim.name: "DOWN"}, 30.0)
    return moved, time.monotonic() - killed_at, failures


def one_round(
    directory: Path, clients: int, checks: str | None
) -> tuple[int, list[str], float, dict[str, float], float]:
    """A fresh cluster: its rolling restart, then its dead node."""
    daemons: list[DaemonProcess] = []

    def spawn(config: Path, url: str, *, healthy: bool = True) -> DaemonProcess:
        daemon = DaemonProcess.start(config, url, directory / f"daemon-{len(daemons)}.log")
        daemons.append(daemon)
        if healthy:
            daemon.wait_healthy()
        return daemon

    try:
        with running_cluster(directory, spawn, checks=checks) as cluster:
            answered, failures, took = trio.run(rolling_restart, cluster, clients)
            moved, down, dead_failures = trio.run(dead_node, cluster)
    finally:
        for daemon in daemons:
            daemon.stop()
        # The SIGKILLed node's models are its guard's to stop; whatever is left, is ours.
        kill_and_wait(processes_of_state_dir(directory))
    return answered, failures + dead_failures, took, moved, down


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--test-checks", action="store_true", help="100 ms health checks")
    options = parser.parse_args()
    all_failures: list[str] = []
    answered_total = 0
    moves: list[float] = []
    for round_ in range(1, options.rounds + 1):
        with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
            answered, failures, took, moved, down = one_round(
                Path(tmp), options.clients, TEST_CHECKS if options.test_checks else None
            )
        all_failures += failures
        answered_total += answered
        moves += moved.values()
        print(
            f"round {round_}: rolling restart of 3 nodes in {took:.1f}s under "
            f"{options.clients} clients: {answered} answered, {len(failures)} failed "
            "(dead-node requests included); "
            "SIGKILL: "
            + ", ".join(f"{m} first token elsewhere after {s:.2f}s" for m, s in moved.items())
            + f", node DOWN in HAProxy after {down:.2f}s",
            flush=True,
        )
    print(
        f"total: {answered_total} requests in rolling restarts, {len(all_failures)} failed; "
        f"dead node's models' first token from another node {min(moves):.2f}-{max(moves):.2f}s "
        "after the SIGKILL (cold start there included)"
    )
    for failure in all_failures[:10]:
        print("  failed:", failure)
    return 1 if all_failures else 0


if __name__ == "__main__":
    sys.exit(main())
