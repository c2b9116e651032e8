"""The admin and observability API, and loading progress for streaming clients."""

from __future__ import annotations

import json
from contextlib import aclosing
from pathlib import Path

import trio

from tests.support.config import echo_config, make_config
from tests.support.daemon import running_daemon
from tests.support.http import chat, read_sse, sse_lines
from tests.support.status import load_model, wait_for_status


async def test_models_list_has_state_and_aliases(state_dir: Path) -> None:
    config = echo_config(state_dir, aliases=["parrot"])
    async with running_daemon(config, admin=True) as (_, client):
        listing = (await client.get("/v1/models")).json()
        assert listing["object"] == "list"
        assert {m["id"]: m["state"] for m in listing["data"]} == {
            "echo": "stopped",
            "parrot": "stopped",
        }
        await load_model(client, "echo")
        listing = (await client.get("/v1/models")).json()
        assert {m["state"] for m in listing["data"]} == {"ready"}


async def test_admin_status_has_every_contract_field(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir), admin=True) as (info, client):
        await load_model(client, "echo")
        status = (await client.get("/admin/status")).json()
        assert set(status) >= {"pid", "version", "instance", "started_at", "uptime_s", "models"}
        assert status["instance"] == info.instance
        echo = status["models"]["echo"]
        assert set(echo) >= {
            "state",
            "pid",
            "port",
            "started_at",
            "last_used_at",
            "in_flight",
            "queued",
            "restarts",
            "last_error",
        }
        assert echo["state"] == "ready" and echo["pid"] and echo["port"]


async def test_load_and_unload_and_force(state_dir: Path) -> None:
    config = echo_config(state_dir, "--response-delay", "30")
    async with running_daemon(config, admin=True) as (_, client):
        loaded = await client.post("/admin/models/echo/load")
        assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
        unloaded = await client.post("/admin/models/echo/unload")
        assert unloaded.json()["state"] == "stopped"
        await load_model(client, "echo")
        results = []

        async def call() -> None:
            results.append(await client.post("/v1/chat/completions", json=chat()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await wait_for_status(client, "echo", "in_flight", 1)
            # The request would take 30 s; force does not wait for it.
            with trio.fail_after(5):
                forced = await client.post("/admin/models/echo/unload?force=true")
            assert forced.json()["state"] == "stopped"
        assert results[0].status_code == 502
        unknown = await client.post("/admin/models/nope/load")
        assert unknown.status_code == 404


async def test_logs_endpoint_returns_the_childs_output(state_dir: Path) -> None:
    cmd = [
        "{python}",
        "-c",
        "import sys; [print('line', i, flush=True) for i in range(50)]; sys.exit(1)",
    ]
    config = make_config(state_dir, {"noisy": {"cmd": cmd}})
    async with running_daemon(config, admin=True) as (_, client):
        await client.post("/admin/models/noisy/load")
        logs = await client.get("/admin/models/noisy/logs?tail=5")
        assert logs.headers["content-type"].startswith("text/plain")
        lines = logs.text.splitlines()
        assert len(lines) == 5
        assert "line 49" in logs.text
        bad = await client.get("/admin/models/noisy/logs?tail=abc")
        assert bad.status_code == 400


async def test_events_stream_lifecycle_transitions(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir), admin=True) as (_, client):
        seen: list[dict[str, object]] = []
        async with trio.open_nursery() as nursery:
            subscribed = trio.Event()

            async def listen() -> None:
                async with (
                    client.stream("GET", "/admin/events") as response,
                    aclosing(sse_lines(response)) as lines,
                ):
                    async for line in lines:
                        subscribed.set()
                        if line.startswith("data: "):
                            seen.append(json.loads(line[6:]))
                            if seen[-1]["to"] == "ready":
                                nursery.cancel_scope.cancel()

            nursery.start_soon(listen)
            with trio.fail_after(10):
                await subscribed.wait()
                await client.post("/admin/models/echo/load")
                await trio.sleep_forever()
        assert [(e["from"], e["to"]) for e in seen] == [
            ("stopped", "starting"),
            ("starting", "ready"),
        ]
        assert all(set(e) == {"model", "from", "to", "at", "reason"} for e in seen)


async def test_metrics_are_prometheus_text_with_trioserve_names(state_dir: Path) -> None:
    async with running_daemon(make_config(state_dir)) as (_, client):
        await client.post("/v1/chat/completions", json=chat())
        await client.post("/v1/chat/completions", json=chat("nope"))
        text = (await client.get("/metrics")).text
        for name in [
            'trioserve_requests_total{model="echo",status="200"} 1.0',
            "trioserve_request_duration_seconds_bucket",
            "trioserve_time_to_first_byte_seconds_bucket",
            'trioserve_in_flight{model="echo"}',
            'trioserve_queued{model="echo"}',
            'trioserve_model_state{model="echo",state="ready"} 1.0',
            'trioserve_model_starts_total{model="echo"} 1.0',
            "trioserve_model_failures_total",
            "trioserve_upstream_cancellations_total",
        ]:
            assert name in text, name


async def test_streaming_client_sees_loading_progress_while_its_model_starts(
    state_dir: Path,
) -> None:
    config = echo_config(state_dir, "--startup-delay", "2.5")
    async with running_daemon(config) as (_, client):
        async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = await read_sse(resp)
        comments = [line for line in lines if line.startswith(": loading model echo (")]
        assert len(comments) >= 2
        first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
        assert all(lines.index(c) < first_data for c in comments)
        assert lines[-1] == "data: [DONE]"


async def test_loading_progress_can_be_turned_off(state_dir: Path) -> None:
    config = echo_config(state_dir, "--startup-delay", "1.5", server={"loading_progress": False})
    async with running_daemon(config) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
        assert response.status_code == 200
        assert not any(line.startswith(":") for line in response.text.splitlines())


async def test_start_that_fails_after_progress_began_ends_with_an_error_event(
    state_dir: Path,
) -> None:
    cmd = ["{python}", "-c", "import time, sys; time.sleep(1.5); print('boom'); sys.exit(2)"]
    config = make_config(state_dir, {"bad": {"cmd": cmd}})
    async with running_daemon(config) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat("bad", stream=True))
        assert response.status_code == 200
        lines = [line for line in response.text.splitlines() if line]
        assert lines[0].startswith(": loading model bad")
        assert lines[-1].startswith("data: {")
        assert json.loads(lines[-1][6:])["error"]["code"] == "upstream_error"
