"""The echo backend's ``--hold-mib``: a real child whose memory grows as a model's would, for the
tests of measurement and placement by memory (issue 25)."""

from __future__ import annotations

import psutil
import pytest

from tests.support.echo import echo_backend
from trioserve.backends.echo.cli import parse_args

MIB = 2**20
HELD_MIB = 64


def pss(pid: int) -> int:
    return int(psutil.Process(pid).memory_full_info().pss)


async def test_hold_mib_grows_the_pss_by_that_much_before_health_answers() -> None:
    # Measured at the first 200 of /health: the memory is held before the port is bound.
    async with echo_backend("--hold-mib", str(HELD_MIB)) as holding:
        held = pss(holding.process.pid)
        health = await holding.client.get("/health")
        assert health.status_code == 200
    async with echo_backend() as plain:
        baseline = pss(plain.process.pid)
    # Python, trio and Hypercorn alone are ~35-45 MiB of PSS: the figures cannot overlap.
    assert baseline < HELD_MIB * MIB, baseline / MIB
    assert held >= HELD_MIB * MIB, held / MIB
    # The held pages come on top of the same interpreter (a margin for what the two processes'
    # shares of libraries and imports may differ by).
    assert held - baseline >= (HELD_MIB - 4) * MIB, (held / MIB, baseline / MIB)


def test_hold_mib_defaults_to_nothing_and_refuses_a_negative_size() -> None:
    assert parse_args(["--port", "0"]).hold_mib == 0
    assert parse_args(["--port", "0", "--hold-mib", "8"]).hold_mib == 8
    with pytest.raises(SystemExit) as refused:
        parse_args(["--port", "0", "--hold-mib", "-1"])
    assert refused.value.code == 2
