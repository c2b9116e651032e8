"""llama.cpp's llama-server and the Gemma 3 270M GGUF that ``make real-model`` provides, for
the real-model tests and bench/real_model.py: where they are and how trioserve runs them.

``TRIOSERVE_LLAMA_SERVER`` and ``TRIOSERVE_GGUF`` point at another build or model file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemma-3-270m"


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
