"""The official MCP conformance suite (``@modelcontextprotocol/conformance``, pinned in
``scripts/ensure-node.sh``) as ``scripts/ensure-node.sh`` installs it: where it and its node are,
how to run its server scenarios, and the two lists it is held to — the baseline of expected
failures and the scenario table of ``docs/mcp.md``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon import clean_env
from tests.support.programs import in_ci

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "scripts" / "ensure-node.sh"
# The links ensure-node.sh leaves in the clone.
NODE_LINK = ROOT / ".cache" / "node" / "bin" / "node"
SUITE_LINK = ROOT / ".cache" / "mcp-conformance"
BASELINE = ROOT / "tests" / "mcp-conformance-baseline.yml"
DOCS = ROOT / "docs" / "mcp.md"
DOCS_SECTION = "## Conformance"
HINT = "bash scripts/ensure-node.sh"


def _script_constant(name: str) -> str:
    match = re.search(rf"^{name}=(\S+)$", SCRIPT.read_text(), re.MULTILINE)
    assert match, f"{SCRIPT} sets no {name}"
    return match.group(1)


# The one place each is pinned is the script; these read it there.
PINNED_VERSION = _script_constant("MCP_CONFORMANCE_VERSION")
NODE_MAJOR = int(_script_constant("NODE_MAJOR"))


def _unavailable(why: str) -> None:
    """Fail in CI (whose ``.ci/run`` runs the script, so this is a broken install step), skip
    elsewhere, saying how to get it."""
    if in_ci():
        pytest.fail(f"{why}, but CI is set; CI must run `{HINT}` first")
    pytest.skip(f"{why} (`{HINT}` installs node >= {NODE_MAJOR} and the suite)")


def _node_major(node: str) -> int:
    try:
        out = subprocess.run(
            [node, "-e", "console.log(process.versions.node.split('.')[0])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return int(out.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0


@dataclass(frozen=True)
class Suite:
    node: str
    entry: Path  # dist/index.js

    def command(self, *args: str) -> list[str]:
        return [self.node, str(self.entry), *args]


def installed_suite() -> Suite:
    """The pinned suite and a node >= NODE_MAJOR to run it (the link's, else the system's);
    missing or another version: the test fails in CI and is skipped elsewhere."""
    candidates = [str(NODE_LINK)] if NODE_LINK.exists() else []
    if (system := shutil.which("node")) is not None:
        candidates.append(system)
    node = next((n for n in candidates if _node_major(n) >= NODE_MAJOR), None)
    if node is None:
        _unavailable(f"no node >= {NODE_MAJOR} (tried {candidates or 'none on PATH'})")
    package = SUITE_LINK / "package.json"
    if not package.exists():
        _unavailable(f"the MCP conformance suite is not installed at {SUITE_LINK}")
    version = json.loads(package.read_text())["version"]
    if version != PINNED_VERSION:
        _unavailable(f"{SUITE_LINK} is the suite {version}, not the pinned {PINNED_VERSION}")
    assert node is not None
    return Suite(node, SUITE_LINK / "dist" / "index.js")


# -- the two lists -------------------------------------------------------------------------------


def read_baseline(path: Path = BASELINE) -> list[str]:
    """The scenario names of the baseline's ``server:`` list (the suite's ``--expected-failures``
    format; the file holds only that list, with comments)."""
    names: list[str] = []
    seen_server = False
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if line == "server:":
            seen_server = True
        elif seen_server and (m := re.fullmatch(r"  - ([a-z0-9-]+)", line)):
            names.append(m.group(1))
        else:
            raise AssertionError(f"{path}:{number}: not part of a `server:` list: {raw!r}")
    assert seen_server, f"{path} has no `server:` list"
    return names


@dataclass(frozen=True)
class DocsRow:
    scenario: str
    result: str  # "pass" or "not applicable"
    why: str


def read_docs_table(path: Path = DOCS) -> tuple[str, list[DocsRow]]:
    """The suite version named in docs/mcp.md's conformance section (`` `…conformance@X` ``)
    and its scenario table's rows: | `scenario` | pass or not applicable | why |."""
    text = path.read_text()
    start = text.find(f"\n{DOCS_SECTION}\n")
    assert start >= 0, f"{path} has no {DOCS_SECTION!r} section"
    section = text[start + 1 :]
    if (end := section.find("\n## ", 1)) >= 0:
        section = section[:end]
    version = re.search(r"@modelcontextprotocol/conformance@([0-9][^`\s]*)", section)
    assert version, f"{path}'s {DOCS_SECTION} names no @modelcontextprotocol/conformance@VERSION"
    rows: list[DocsRow] = []
    for line in section.splitlines():
        m = re.fullmatch(r"\|\s*`([a-z0-9-]+)`[^|]*\|\s*([^|]+?)\s*\|\s*(.+?)\s*\|", line.strip())
        if m:
            rows.append(DocsRow(m.group(1), m.group(2), m.group(3)))
    return version.group(1), rows


# -- a run ---------------------------------------------------------------------------------------

# The summary's lines: "✓ ping: 1 passed, 0 failed", "✗ tools-call-image: 0 passed, 1 failed".
_SUMMARY = re.compile(r"^([✓✗]) ([a-z0-9-]+): \d+ passed, \d+ failed$", re.MULTILINE)


@dataclass(frozen=True)
class SuiteRun:
    returncode: int
    output: str
    passed: frozenset[str]
    failed: frozenset[str]
    output_dir: Path

    def failure_details(self, scenarios: Set[str]) -> str:
        """The failed checks of ``scenarios`` (from each scenario's checks.json), one a line."""
        lines = []
        for checks in sorted(self.output_dir.glob("server-*/checks.json")):
            scenario = re.sub(r"^server-|-\d{4}-\d\d-\d\dT.*$", "", checks.parent.name)
            if scenario not in scenarios:
                continue
            for check in json.loads(checks.read_text()):
                if check.get("status") == "FAILURE":
                    message = check.get("errorMessage") or json.dumps(check.get("details"))
                    lines.append(f"{scenario} / {check.get('id')}: {message}")
        return "\n".join(lines)


def run_server_scenarios(
    suite: Suite, url: str, output_dir: Path, baseline: Path = BASELINE, timeout: float = 90
) -> SuiteRun:
    """Every server scenario of the suite (``--suite all``: the active ones and the pending)
    against the MCP endpoint ``url``, with ``baseline`` as the expected failures. Exit 0 means
    exactly the baseline's scenarios failed (a listed one that passes fails the run too)."""
    env = clean_env(NO_PROXY="127.0.0.1,localhost,::1", no_proxy="127.0.0.1,localhost,::1")
    env.pop("NODE_OPTIONS", None)
    env["NO_COLOR"] = "1"
    proc = subprocess.run(
        suite.command(
            "server",
            "--url",
            url,
            "--suite",
            "all",
            "--expected-failures",
            str(baseline),
            "-o",
            str(output_dir),
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=timeout,
    )
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    passed: set[str] = set()
    failed: set[str] = set()
    for mark, name in _SUMMARY.findall(output):
        (passed if mark == "✓" else failed).add(name)
    return SuiteRun(proc.returncode, output, frozenset(passed), frozenset(failed), output_dir)
