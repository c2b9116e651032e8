"""Hundreds of requests racing unload, TTL expiry and eviction of the same models (issue 7).

Run twice: with graceful unloads, and with half of them forced (``?force=true``), which kills
models under requests that hold them: those requests get a 502 or an error event, never a
broken answer.

Every request gets an answer — a success or a clean error from the contract's table, never a
500, never a hang — and the process table never shows two processes of one model, sampled over
and over from a thread while the race runs.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support.config import echo_cmd, make_config
from tests.support.daemon import running_daemon
from tests.support.http import CLEAN_ERROR_CODES, assert_clean_answer, chat
from tests.support.processes import Resources, model_groups, model_processes, wait_for_baseline
from tests.support.status import wait_for_status

MODELS = ("a", "b")
CLIENTS = 25
REQUESTS_PER_CLIENT = 10


class _ProcessSampler:
    """Samples the model processes of one instance from a thread until stopped."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.samples = 0
        self.most: Counter[str] = Counter()  # model -> most processes seen at once
        self.worst: dict[str, list[int]] = {}  # model -> the process groups seen then
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            seen = model_groups(self.instance)
            self.samples += 1
            for model, groups in seen.items():
                if len(groups) > self.most[model]:
                    self.most[model] = len(groups)
                    self.worst[model] = sorted(groups)
            self._stop.wait(0.005)

    def stop(self) -> None:
        self._stop.set()


async def _send(http: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, bytes] | None:
    """(status, body), or None when the connection closed (or was reset) before a complete
    answer."""
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            return response.status_code, await response.aread()
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return None  # counted, and failed on, by the caller


def _check_stream(status: int, body: bytes) -> None:
    """A streamed answer: a clean error, or a 200 stream ending with [DONE] or an error event
    of the contract's table."""
    if status != 200:
        assert_clean_answer(status, body)
        return
    events = [line for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events, body[:500]
    last = events[-1].removeprefix("data: ")
    if last == "[DONE]":
        return
    error = json.loads(last)["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert error["code"] in CLEAN_ERROR_CODES.values(), error


@pytest.mark.slow
@pytest.mark.parametrize("force", [False, True], ids=["unload", "unload-force"])
async def test_requests_racing_unload_ttl_and_eviction_all_get_clean_answers(
    state_dir: Path, force: bool
) -> None:
    model = {
        "cmd": echo_cmd("--tokens", "5", "--token-delay", "0.01"),
        "ttl": 0.1,
        "max_concurrency": 8,
        "max_queue": 64,
    }
    config = make_config(
        state_dir,
        dict.fromkeys(MODELS, model),
        server={"first_byte_timeout": 15, "request_timeout": 20},
        supervisor={"max_loaded": 1, "stop_grace": 2},
    )
    before = Resources.baseline()
    statuses: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    broken: list[str] = []
    async with running_daemon(config, admin=True) as (info, client):
        sampler = _ProcessSampler(info.instance)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()

        async def record_events() -> None:
            async with info.supervisor.events.subscribe() as events:
                async for event in events:
                    if event.to_state.value == "stopping":
                        reasons[event.reason.split(" ")[0]] += 1
                        reasons["force"] += "(force)" in event.reason

        async def user(rng: random.Random, http: httpx.AsyncClient) -> None:
            for _ in range(REQUESTS_PER_CLIENT):
                body = chat(rng.choice(MODELS), stream=rng.random() < 0.5)
                with trio.fail_after(25):  # never a hang
                    answer = await _send(http, body)
                if answer is None:
                    broken.append(repr(body))
                    continue
                status, content = answer
                statuses[status] += 1
                if body["stream"]:
                    _check_stream(status, content)
                else:
                    assert_clean_answer(status, content)
                # Think time now and then, so a model sometimes idles past its TTL.
                if rng.random() < 0.3:
                    await trio.sleep(rng.uniform(0.05, 0.5))

        async def operator(rng: random.Random) -> None:
            while True:
                await trio.sleep(rng.uniform(0.05, 0.3))
                name = rng.choice(MODELS)
                if rng.random() < 0.2:
                    response = await client.post(f"/admin/models/{name}/load")
                else:
                    forced = force and rng.random() < 0.5
                    response = await client.post(
                        f"/admin/models/{name}/unload", params={"force": str(forced).lower()}
                    )
                assert_clean_answer(response.status_code, response.content)

        try:
            limits = httpx.Limits(max_connections=CLIENTS + 5)
            async with (
                httpx.AsyncClient(
                    base_url=info.url, timeout=30, trust_env=False, limits=limits
                ) as http,
                trio.open_nursery() as outer,
            ):
                outer.start_soon(record_events)
                async with trio.open_nursery() as race:
                    race.start_soon(operator, random.Random(7))
                    async with trio.open_nursery() as users:
                        for i in range(CLIENTS):
                            users.start_soon(user, random.Random(1000 + i), http)
                    race.cancel_scope.cancel()
                in_race = reasons.copy()
                # Then b evicts a, and b expires: each way of stopping happens at least once
                # whatever the race did.
                for name in MODELS:
                    response = await http.post("/v1/chat/completions", json=chat(name))
                    assert response.status_code == 200, response.text
                for name in MODELS:
                    await wait_for_status(client, name, "pid", None, within=10)
                outer.cancel_scope.cancel()
        finally:
            sampler.stop()
            thread.join(5)

        assert not broken, f"{len(broken)} answers cut short: {broken[:3]}"
        assert sum(statuses.values()) == CLIENTS * REQUESTS_PER_CLIENT
        assert 500 not in statuses
        assert statuses[200] >= CLIENTS * REQUESTS_PER_CLIENT // 2, statuses
        # The race really happened: models were unloaded and evicted under load.
        assert in_race["unloaded"] >= 3 and in_race["evicted"] >= 1, in_race
        assert (in_race["force"] >= 1) is force, in_race
        assert reasons["idle"] >= 1, reasons
        # Never two processes of one model, in any of many samples taken during the race.
        assert sampler.samples >= 100, sampler.samples
        assert max(sampler.most.values(), default=0) <= 1, sampler.worst
        assert model_processes(info.instance) == {}
        print(
            f"statuses {dict(statuses)}, stops in the "
            f"race {dict(in_race)}, {sampler.samples} samples"
        )
    await wait_for_baseline(before, within=5)
    assert Resources.now().fds == before.fds
