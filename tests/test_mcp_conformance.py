"""The official MCP conformance suite (``@modelcontextprotocol/conformance``, the version pinned
in ``scripts/ensure-node.sh``) against ``trioserve start``'s ``/mcp``: exactly the scenarios of
``tests/mcp-conformance-baseline.yml`` fail, and ``docs/mcp.md``'s scenario table says the same.

The suite needs Node >= 22 and is installed by ``scripts/ensure-node.sh`` (``.ci/run`` runs it);
without them the run is skipped, or fails in CI (``tests.support.conformance``). It sends no API
key, so the daemon has none; it never closes its sessions (~32 a run), so the daemon has room.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.config import daemon_config
from tests.support.conformance import (
    BASELINE,
    DOCS,
    PINNED_VERSION,
    installed_suite,
    read_baseline,
    read_docs_table,
    run_server_scenarios,
)

# The scenarios that test the protocol rather than the suite's own fixtures (issue 23: "every
# scenario that does not depend on the suite's own fixture tools/prompts must pass"). The
# baseline may never excuse one of them.
PROTOCOL_SCENARIOS = frozenset(
    {
        "server-initialize",
        "ping",
        "logging-set-level",
        "completion-complete",
        "tools-list",
        "resources-list",
        "resources-subscribe",
        "resources-unsubscribe",
        "prompts-list",
        "server-sse-multiple-streams",
        "dns-rebinding-protection",
    }
)


def _duplicates(names: list[str]) -> list[str]:
    return [name for name, count in Counter(names).items() if count > 1]


def test_docs_table_and_baseline_agree() -> None:
    version, rows = read_docs_table()
    assert version == PINNED_VERSION, (
        f"{DOCS} describes the suite {version}; scripts/ensure-node.sh pins {PINNED_VERSION}"
    )
    names = [row.scenario for row in rows]
    assert names, f"{DOCS} has no scenario table"
    assert not _duplicates(names), f"{DOCS} lists twice: {_duplicates(names)}"
    odd = {row.scenario: row.result for row in rows if row.result not in ("pass", "not applicable")}
    assert not odd, f"{DOCS}: a result is `pass` or `not applicable`: {odd}"
    baseline = read_baseline()
    assert not _duplicates(baseline), f"{BASELINE} lists twice: {_duplicates(baseline)}"
    not_applicable = {row.scenario for row in rows if row.result == "not applicable"}
    assert not_applicable == set(baseline), (
        f"{DOCS} says not applicable but {BASELINE} expects it to pass: "
        f"{sorted(not_applicable - set(baseline))}; "
        f"{BASELINE} expects a failure that {DOCS} says passes: "
        f"{sorted(set(baseline) - not_applicable)}"
    )
    assert set(baseline) <= set(names), (
        f"{BASELINE} names scenarios {DOCS} does not list: {sorted(set(baseline) - set(names))}"
    )


def test_baseline_excuses_only_fixture_scenarios() -> None:
    excused = PROTOCOL_SCENARIOS & set(read_baseline())
    assert not excused, (
        f"{BASELINE} lists protocol scenarios, which must pass; fix /mcp instead: {sorted(excused)}"
    )


@pytest.mark.slow
def test_conformance_suite_fails_exactly_the_baseline(
    spawn_daemon: Any, tmp_path: Path, state_dir: Path
) -> None:
    suite = installed_suite()
    config, url = daemon_config(tmp_path / "trioserve.toml", state_dir, mcp=None)  # echo, no keys
    # Room for the ~32 sessions a run leaves open (the suite never sends DELETE /mcp).
    with config.open("a") as file:
        file.write("[mcp]\nenabled = true\nmax_sessions = 256\n")
    spawn_daemon(config, url)

    run = run_server_scenarios(suite, f"{url}/mcp", tmp_path / "results")

    _, rows = read_docs_table()
    documented = {row.scenario for row in rows}
    ran = run.passed | run.failed
    assert ran == documented, (
        f"the suite {PINNED_VERSION} ran scenarios {DOCS} does not list: "
        f"{sorted(ran - documented)}; {DOCS} lists scenarios it did not run: "
        f"{sorted(documented - ran)}\n{run.output}"
    )
    baseline = set(read_baseline())
    newly_failing = run.failed - baseline
    newly_passing = run.passed & baseline
    assert not newly_failing and not newly_passing, (
        f"failing, not in {BASELINE.name} (fix /mcp; only a scenario that needs the suite's "
        f"fixtures may be excused there and in docs/mcp.md): {sorted(newly_failing)}\n"
        f"passing, but listed in {BASELINE.name} (remove them, and mark them `pass` in "
        f"docs/mcp.md): {sorted(newly_passing)}\n"
        f"{run.failure_details(newly_failing)}"
    )
    # And the suite agrees (its own baseline check).
    assert run.returncode == 0, run.output
