"""The GGUF estimate against the real Gemma 3 270M on llama-server: estimated before the first
start, measured once ready, the two within 10 % of each other, so the model carries no
warning (issue 25). Needs ``make real-model``; skipped with the reason otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.config import make_config
from tests.support.daemon import running_supervisor
from tests.support.real_model import MODEL, llama_model, needs_real_model

pytestmark = needs_real_model()

MIB = 2**20


@pytest.mark.parametrize("parallel", [1, 2])
async def test_the_gguf_estimate_is_within_ten_percent_of_the_measured_memory(
    state_dir: Path, parallel: int
) -> None:
    config = make_config(
        state_dir,
        {MODEL: llama_model(parallel=parallel)},
        supervisor={"memory": {"cpu": "2 GiB"}},
    )
    async with running_supervisor(config) as supervisor:
        before = supervisor.status()[MODEL]
        estimated = before.memory["estimated"]["cpu"]
        assert before.warnings == []
        await supervisor.load(MODEL)
        after = supervisor.status()[MODEL]
    measured = after.memory["measured"]["cpu"]
    print(f"parallel {parallel}: estimated {estimated / MIB:.1f}, measured {measured / MIB:.1f}")
    assert abs(measured / estimated - 1) <= 0.10, (estimated / MIB, measured / MIB)
    assert after.warnings == []
