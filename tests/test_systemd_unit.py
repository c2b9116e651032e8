"""conf/trioserve.service: the directives we rely on, and `systemd-analyze verify`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.programs import required_program

UNIT = Path(__file__).resolve().parent.parent / "conf" / "trioserve.service"
BINARY = "/usr/local/bin/trioserve"
CONFIG = "/etc/trioserve/trioserve.toml"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → every value assigned, in order (systemd's INI dialect, enough of it)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):  # continuation: glued to the next line with a space
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


REQUIRED: list[tuple[str, str, str]] = [
    ("Service", "Type", "notify"),
    ("Service", "NotifyAccess", "main"),
    ("Service", "ExecStart", f"{BINARY} start --config {CONFIG}"),
    # `systemctl reload` waits for the command, which returns once the new config is in force.
    ("Service", "ExecReload", f"{BINARY} reload --config {CONFIG}"),
    ("Service", "Environment", f"TRIOSERVE_CONFIG={CONFIG}"),
    ("Service", "Restart", "on-failure"),
    ("Service", "RestartSec", "2"),
    ("Service", "KillMode", "mixed"),
    ("Service", "TimeoutStopSec", "60"),
    ("Service", "WatchdogSec", "30"),
    ("Service", "StateDirectory", "trioserve"),
    ("Service", "DynamicUser", "no"),
    ("Service", "User", "trioserve"),
    ("Service", "NoNewPrivileges", "yes"),
    ("Service", "ProtectSystem", "strict"),
    ("Service", "ProtectHome", "read-only"),
    ("Service", "PrivateTmp", "yes"),
    ("Service", "ProtectKernelTunables", "yes"),
    ("Service", "ProtectKernelModules", "yes"),
    ("Service", "ProtectControlGroups", "yes"),
    ("Service", "RestrictSUIDSGID", "yes"),
    ("Service", "LockPersonality", "yes"),
    ("Service", "RestrictNamespaces", "yes"),
    ("Service", "SystemCallArchitectures", "native"),
    ("Service", "RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"),
    ("Install", "WantedBy", "multi-user.target"),
]


@pytest.mark.parametrize(("section", "key", "value"), REQUIRED, ids=[r[1] for r in REQUIRED])
def test_unit_sets_directive(
    unit: dict[str, dict[str, list[str]]], section: str, key: str, value: str
) -> None:
    assert unit.get(section, {}).get(key) == [value]


@pytest.mark.parametrize("key", ["PrivateDevices", "MemoryDenyWriteExecute"])
def test_unit_leaves_gpu_breaking_hardening_unset(
    unit: dict[str, dict[str, list[str]]], key: str
) -> None:
    # PrivateDevices hides /dev/nvidia*, /dev/dri, /dev/kfd; MemoryDenyWriteExecute
    # breaks CUDA/JIT code generation. Both must stay off, with the reason written down.
    for section in unit.values():
        assert key not in section
    comments = [line for line in UNIT.read_text().splitlines() if line.lstrip().startswith("#")]
    assert any(key in line for line in comments), f"say in the unit why {key} is not set"


def test_unit_comments_document_paths_and_user() -> None:
    comments = "\n".join(
        line for line in UNIT.read_text().splitlines() if line.lstrip().startswith("#")
    )
    assert CONFIG in comments
    assert "venv" in comments  # the binary path may be changed, e.g. to a venv
    assert "DynamicUser" in comments
    assert "useradd" in comments


# --- systemd-analyze verify ---------------------------------------------------------


def _systemd_analyze() -> str:
    return required_program("systemd-analyze", "systemd")


def _runnable_copy(text: str, directory: Path) -> Path:
    """The unit with the binary of ExecStart and ExecReload swapped for one that exists here.

    verify refuses an Exec binary that is not executable, and trioserve is not
    installed at /usr/local/bin on a test machine. The file keeps its name: verify
    derives the unit name from it.
    """
    stand_in = "/bin/true" if os.access("/bin/true", os.X_OK) else sys.executable
    lines = text.splitlines()
    for key in ("ExecStart", "ExecReload"):
        lines = [
            line.replace(f"{key}={BINARY} ", f"{key}={stand_in} ", 1)
            if line.startswith(f"{key}=")
            else line
            for line in lines
        ]
    assert f"ExecStart={stand_in} start --config {CONFIG}" in lines
    assert f"ExecReload={stand_in} reload --config {CONFIG}" in lines
    path = directory / UNIT.name
    path.write_text("\n".join(lines) + "\n")
    return path


def _verify(path: Path) -> tuple[int, list[str]]:
    """Run verify; return its exit status and every output line about our unit.

    verify exits 0 even for unknown keys or unparsable values (it logs "..., ignoring"),
    so any line naming the unit counts as a failure. Lines about other units (e.g. a
    host's broken unit pulled in via multi-user.target) are not ours to judge.
    """
    result = subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
        check=False,
    )
    output = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in output if path.name in line]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # User=trioserve need not exist: verify (systemd 252 checked) does not resolve
    # users; that happens when the service starts.
    returncode, about_unit = _verify(_runnable_copy(UNIT.read_text(), tmp_path))
    assert returncode == 0, about_unit
    assert about_unit == []


def test_exec_reload_runs_the_same_binary_as_exec_start(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    # A unit edited for a venv must change both lines; the comment says so.
    start, reload = unit["Service"]["ExecStart"][0], unit["Service"]["ExecReload"][0]
    assert start.split()[0] == reload.split()[0]
    assert reload.split()[1:] == ["reload", "--config", CONFIG]


def test_verify_check_catches_a_bad_directive(tmp_path: Path) -> None:
    # Guards the test above: a typo must show up even though verify exits 0 for it.
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd\nRestartSecs=2")
    _, about_unit = _verify(_runnable_copy(broken, tmp_path))
    assert any("KillMode" in line or "kill mode" in line for line in about_unit), about_unit
    assert any("RestartSecs" in line for line in about_unit), about_unit
