"""What a config reload changes (pure: no daemon)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trioserve.config import parse_config
from trioserve.reload_plan import plan_reload

ECHO = {"cmd": ["{python}", "-m", "trioserve.backends.echo", "--port", "{port}"]}


def config(**sections: Any) -> Any:
    data: dict[str, Any] = {"models": {"echo": dict(ECHO)}}
    data.update(sections)
    return parse_config(data)


def test_identical_configs_change_nothing() -> None:
    plan = plan_reload(config(), config())
    assert not plan.changed
    assert plan.refused is None
    assert plan.summary() == "no changes"


@pytest.mark.parametrize(
    ("key", "value"),
    [("host", "127.0.0.2"), ("port", 8700), ("state_dir", "/tmp/elsewhere")],
)
def test_listener_and_state_dir_changes_are_refused_as_needing_a_restart(
    key: str, value: object
) -> None:
    plan = plan_reload(config(), config(server={key: value}))
    assert plan.refused is not None
    assert f"server.{key}" in plan.refused
    assert "restart" in plan.refused
    assert plan.summary().startswith("refused:")


def test_added_and_removed_models_are_named() -> None:
    old = config(models={"echo": ECHO, "old": ECHO})
    new = config(models={"echo": ECHO, "fresh": ECHO})
    plan = plan_reload(old, new)
    assert plan.added == ("fresh",)
    assert plan.removed == ("old",)
    assert plan.replaced == ()
    assert "added: fresh" in plan.summary()
    assert "removed: old" in plan.summary()


@pytest.mark.parametrize(
    "change",
    [
        {"cmd": [*ECHO["cmd"], "--delay", "0.1"]},
        {"env": {"A": "1"}},
        {"health_path": "/v1/models"},
    ],
)
def test_a_process_key_change_replaces_the_process(change: dict[str, object]) -> None:
    plan = plan_reload(config(), config(models={"echo": {**ECHO, **change}}))
    assert plan.replaced == ("echo",)
    assert plan.retuned == ()


@pytest.mark.parametrize(
    "change",
    [{"max_concurrency": 2}, {"max_queue": 3}, {"ttl": 5}, {"aliases": ["e"]}],
)
def test_a_limit_change_retunes_the_running_process(change: dict[str, object]) -> None:
    plan = plan_reload(config(), config(models={"echo": {**ECHO, **change}}))
    assert plan.retuned == ("echo",)
    assert plan.replaced == ()


def test_server_and_supervisor_settings_are_sections() -> None:
    plan = plan_reload(
        config(),
        config(server={"request_timeout": 5}, supervisor={"stop_grace": 1}),
    )
    assert set(plan.sections) == {"server", "supervisor"}
    assert plan.as_dict()["sections"] == list(plan.sections)


def test_turning_the_mcp_endpoint_on_or_off_needs_a_restart(tmp_path: Path) -> None:
    old = parse_config({"server": {"state_dir": str(tmp_path)}})
    new = parse_config({"server": {"state_dir": str(tmp_path)}, "mcp": {"enabled": False}})
    plan = plan_reload(old, new)
    assert plan.refused == "mcp.enabled changed: that needs a restart"
    # The session limits are live.
    tuned = parse_config({"server": {"state_dir": str(tmp_path)}, "mcp": {"max_sessions": 3}})
    assert plan_reload(old, tuned).refused is None
