"""llama.cpp's llama-server and the Gemma 3 270M GGUF that ``make real-model`` provides, for
the real-model tests and bench/real_model.py: where they are and how trioserve runs them.

``TRIOSERVE_LLAMA_SERVER`` and ``TRIOSERVE_GGUF`` point at another build or model file.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support.config import make_config
from tests.support.ports import free_port
from trioserve.gateway.assemble import ASSEMBLED_PATHS, upstream_body

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemma-3-270m"
# How long llama-server may take to load the model and answer /health with a 200.
START_TIMEOUT = 60.0
# Between two looks at llama-server's /slots.
POLL_INTERVAL = 0.02


def llama_server() -> Path:
    """The llama-server binary."""
    override = os.environ.get("TRIOSERVE_LLAMA_SERVER")
    return Path(override) if override else ROOT / ".cache/llama-server/bin/llama-server"


def gguf() -> Path:
    """The model file: the override, else where ``make real-model`` recorded or put it."""
    override = os.environ.get("TRIOSERVE_GGUF")
    if override:
        return Path(override)
    recorded = ROOT / ".cache/gemma-3-270m.path"
    if recorded.is_file():
        return Path(recorded.read_text().strip())
    return ROOT / ".cache/models/gemma-3-270m-q4_k_m.gguf"


def missing() -> list[str]:
    """What of llama-server and the GGUF is not there (empty when both are)."""
    server, model = llama_server(), gguf()
    return [
        str(path)
        for path, ok in ((server, os.access(server, os.X_OK)), (model, model.is_file()))
        if not ok
    ]


def needs_real_model() -> list[pytest.MarkDecorator]:
    """The marks of a test module that runs them (``pytestmark = [*needs_real_model()]``):
    ``real_model``, and a skip that names what is missing."""
    absent = missing()
    return [
        pytest.mark.real_model,
        pytest.mark.skipif(
            bool(absent),
            reason=f"needs llama-server and the Gemma GGUF; missing {', '.join(absent)} "
            "(run `make real-model`)",
        ),
    ]


def llama_cmd(
    port: int | str = "{port}",
    *,
    model_file: Path | None = None,
    parallel: int = 1,
    threads: int = 1,
) -> list[str]:
    """llama-server serving ``model_file`` (default: ``gguf()``) as ``MODEL`` on ``port``, with
    ``parallel`` slots of 2048 tokens each."""
    return [
        str(llama_server()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-m",
        str(model_file if model_file is not None else gguf()),
        "--alias",
        MODEL,
        # The GGUF carries no chat template (llama-server would fall back to ChatML); "gemma"
        # names the built-in one, which only --no-jinja makes it look up.
        "--no-jinja",
        "--chat-template",
        "gemma",
        "-c",
        str(2048 * parallel),
        "--parallel",
        str(parallel),
        "--fit",
        "off",  # -c is given; skips a trial load of the model (a second or two per start)
        # One thread by default: on a busy 2-core machine two threads stall each other at
        # every sync point (35-49 vs 8 tokens/s measured at load average 5).
        "--threads",
        str(threads),
        "--slots",
        "--metrics",
        "--no-webui",
    ]


def llama_model(
    *, model_file: Path | None = None, parallel: int = 1, threads: int = 1
) -> dict[str, Any]:
    """The ``[models.MODEL]`` entry of a config serving it through llama-server."""
    return {
        "cmd": llama_cmd(model_file=model_file, parallel=parallel, threads=threads),
        "health_path": "/health",  # llama-server answers 503 while it loads the model
        "max_concurrency": parallel,  # one request per llama-server slot
        "ttl": 0,
    }


@contextmanager
def started_llama(log: Path, *, parallel: int = 1) -> Iterator[str]:
    """A llama-server of the test's own (no test leaves a child behind), on a free loopback
    port, its output in ``log``; stopped and reaped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen(
            llama_cmd(port, parallel=parallel),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(base_url=url, trust_env=False, timeout=5) as client:
            while True:
                assert process.poll() is None, f"llama-server exited:\n{log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"not ready:\n{log.read_text()[-2000:]}"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)  # polling a starting child is the honest tool here
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def upstream_stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> tuple[int, str, list[bytes]]:
    """``body`` to ``path`` as ``upstream_body`` turns it into a stream: the answer's status,
    content type, and raw reads, as they came."""
    async with client.stream(
        "POST",
        path,
        content=upstream_body(ASSEMBLED_PATHS[path], body),
        headers={"content-type": "application/json"},
    ) as response:
        reads = [chunk async for chunk in response.aiter_raw()]
        return response.status_code, response.headers["content-type"], reads


def llama_config(state_dir: Path, **server: Any) -> Any:
    """One llama-server slot behind trioserve, ``stream_upstream`` as by default."""
    return make_config(state_dir, {MODEL: llama_model(parallel=1)}, server=server or None)


async def slots(direct: httpx.AsyncClient) -> list[dict[str, Any]]:
    """llama-server's own view of its slots."""
    response = await direct.get("/slots")
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()
    return result


def decoded(slot: dict[str, Any]) -> int:
    return int(slot.get("next_token", [{}])[0].get("n_decoded", 0))


async def wait_until_generating(direct: httpx.AsyncClient, tokens: int) -> None:
    """Until slot 0 has generated ``tokens`` tokens: prompt done, the answer under way."""
    with trio.fail_after(30):
        while True:
            slot = (await slots(direct))[0]
            if slot["is_processing"] and decoded(slot) >= tokens:
                return
            await trio.sleep(POLL_INTERVAL)


async def busy_for(direct: httpx.AsyncClient, since: float, *, within: float = 30) -> float:
    """Seconds from ``since`` until no slot is processing, polled every POLL_INTERVAL."""
    with trio.fail_after(within):
        while any(slot["is_processing"] for slot in await slots(direct)):
            await trio.sleep(POLL_INTERVAL)
    return trio.current_time() - since
