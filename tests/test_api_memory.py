"""Memory placement as clients and admins see it: ``/admin/status``'s ``devices`` and model
fields, the ``: waiting for memory …`` comments of a stream whose model waits for memory, the
504 that gives that reason, and configs refused (at start, at reload) for a model whose GGUF
estimate could never fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.config import echo_cmd, make_config
from tests.support.daemon import running_daemon, running_supervisor
from tests.support.gguf import write_gguf
from tests.support.http import assert_openai_error, streaming
from tests.support.status import load_model
from trioserve.daemon import DaemonError, run_daemon
from trioserve.errors import ConfigError

MIB = 2**20
WAITING = "waiting for memory: needs 150.0 MiB on cpu, 100.0 MiB free, held by a (busy)"


def two_models(state_dir: Path, **server: Any) -> Any:
    # a generates slowly: a request to it keeps it busy for seconds.
    return make_config(
        state_dir,
        {
            "a": {"cmd": echo_cmd("--token-delay", "0.5", "--tokens", "40"), "memory": "150 MiB"},
            "b": {"cmd": echo_cmd(), "memory": "150 MiB"},
        },
        server=server,
        supervisor={"memory": {"cpu": "250 MiB"}, "swap_after": 600},
    )


async def test_the_status_shows_budgets_figures_and_placement(state_dir: Path) -> None:
    config = two_models(state_dir)
    async with running_daemon(config, admin=True) as (_, client):
        a = await load_model(client, "a")
        status = (await client.get("/admin/status")).json()
    assert status["devices"] == {"cpu": {"budget": 250 * MIB, "used": 150 * MIB, "free": 100 * MIB}}
    measured = a["memory"]["measured"]["cpu"]
    assert a["memory"] == {"estimated": {"cpu": 150 * MIB}, "measured": {"cpu": measured}}
    assert (a["devices"], a["preload"], a["pinned"], a["waiting_for"]) == (
        ["cpu"],
        False,
        False,
        None,
    )
    b = status["models"]["b"]
    assert b["memory"] == {"estimated": {"cpu": 150 * MIB}, "measured": {}}
    assert b["warnings"] == []


async def test_a_request_waiting_for_memory_is_told_why_and_504_says_it(state_dir: Path) -> None:
    config = two_models(state_dir, first_byte_timeout=2.5)
    chat = {"model": "b", "messages": [{"role": "user", "content": "hi"}]}
    slow = {"model": "a", "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with running_daemon(config, admin=True) as (_, client):
        await load_model(client, "a")
        async with streaming(client, slow):  # a is busy
            comments: list[str] = []
            async with client.stream(
                "POST", "/v1/chat/completions", json={**chat, "stream": True}
            ) as stream:
                async for line in stream.aiter_lines():
                    if line.startswith(":"):
                        comments.append(line)
                        break
            answer = await client.post("/v1/chat/completions", json=chat)
    assert comments[0].startswith(f": {WAITING} ("), comments
    error = assert_openai_error(answer, 504, "timeout")
    assert f"its start was {WAITING}" in error["message"]


def gguf_model(path: Path) -> dict[str, Any]:
    """A llama-server model serving a tiny GGUF: never started here, only estimated (the
    process's own memory alone is over 11 MiB)."""
    return {"cmd": ["llama-server", "--port", "{port}", "-m", str(write_gguf(path))]}


async def test_a_daemon_refuses_to_start_with_a_model_whose_estimate_never_fits(
    state_dir: Path, tmp_path: Path
) -> None:
    config = make_config(
        state_dir,
        {"echo": {"cmd": echo_cmd()}, "m": gguf_model(tmp_path / "m.gguf")},
        supervisor={"memory": {"cpu": "5 MiB"}},
    )
    refused = r"models\.m\.memory: needs [\d.]+ MiB on cpu, more than its budget of 5\.0 MiB"
    with pytest.raises(DaemonError, match=refused):
        await run_daemon(config)


async def test_a_reload_is_refused_for_a_model_whose_estimate_never_fits(
    state_dir: Path, tmp_path: Path
) -> None:
    config = make_config(state_dir, {"echo": {"cmd": echo_cmd()}})
    more = make_config(
        state_dir,
        {"echo": {"cmd": echo_cmd()}, "m": gguf_model(tmp_path / "m.gguf")},
        supervisor={"memory": {"cpu": "5 MiB"}},
    )
    async with running_supervisor(config) as supervisor:
        with pytest.raises(ConfigError, match=r"more than its budget of 5\.0 MiB"):
            await supervisor.vet(more)


async def test_a_gguf_missing_at_start_is_estimated_once_it_is_there(
    state_dir: Path, tmp_path: Path
) -> None:
    model_file = tmp_path / "later.gguf"
    config = make_config(
        state_dir,
        {"m": {"cmd": ["llama-server", "--port", "{port}", "-m", str(model_file)]}},
        supervisor={"memory": {"cpu": "1 GiB"}},
    )
    async with running_supervisor(config) as supervisor:
        before = supervisor.status()["m"]
        assert before.memory["estimated"] == {}
        assert "no estimate: " in before.warnings[0]
        write_gguf(model_file)
        await supervisor.vet(config)  # as a reload does
        after = supervisor.status()["m"]
    assert after.memory["estimated"]["cpu"] > 11 * MIB
    assert after.warnings == []
