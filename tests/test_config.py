"""Config through the CLI: `config check`, every kind of bad file, state_dir, the start-up guards.

Errors must read `FILE: KEY.PATH: reason` on one line (prefixed `trioserve: `) and exit 2.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from tests.support.cli import invoke, run_trioserve
from tests.support.config import daemon_config, write_toml
from tests.support.ports import free_port
from trioserve.config import parse_config
from trioserve.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def resolved(result: Result) -> dict[str, Any]:
    """The JSON document `config check` prints before its `FILE: ok` line."""
    text = result.stdout
    data: dict[str, Any] = json.loads(text[: text.rindex("}") + 1])
    return data


def one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# -- config check: a good file -------------------------------------------------------------------


def test_check_default_config_prints_the_resolved_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = invoke(["config", "check", "conf/trioserve.toml"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("conf/trioserve.toml: ok")
    config = resolved(result)
    assert config["server"]["host"] == "127.0.0.1"
    assert config["server"]["port"] == 8600
    assert "~" not in config["server"]["state_dir"]
    # Placeholders filled in, except {port}, which only exists at spawn time.
    assert config["models"]["echo"]["cmd"] == [
        sys.executable,
        "-m",
        "trioserve.backends.echo",
        "--port",
        "{port}",
    ]


def test_trioserve_config_env_names_the_file_when_no_argument(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "env.toml", {"server": {"port": 9123}})
    result = invoke(["config", "check"], TRIOSERVE_CONFIG=str(path))
    assert result.exit_code == 0, result.output
    assert resolved(result)["server"]["port"] == 9123
    assert result.stdout.strip().endswith(f"{path}: ok")


def test_argument_wins_over_trioserve_config(tmp_path: Path) -> None:
    env_file = write_toml(tmp_path / "env.toml", {"server": {"port": 1111}})
    arg_file = write_toml(tmp_path / "arg.toml", {"server": {"port": 2222}})
    result = invoke(["config", "check", str(arg_file)], TRIOSERVE_CONFIG=str(env_file))
    assert result.exit_code == 0, result.output
    assert resolved(result)["server"]["port"] == 2222


def test_state_directory_from_systemd_wins_over_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"server": {"state_dir": str(tmp_path / "mine")}})
    # systemd may pass several directories, colon-separated; the first is ours.
    result = invoke(
        ["config", "check", str(path)],
        STATE_DIRECTORY=f"{tmp_path}/from-systemd:{tmp_path}/other",
    )
    assert result.exit_code == 0, result.output
    assert resolved(result)["server"]["state_dir"] == f"{tmp_path}/from-systemd"


def test_tilde_in_state_dir_is_expanded(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"server": {"state_dir": "~/ts-state"}})
    result = invoke(["config", "check", str(path)], HOME=str(tmp_path / "home"))
    assert result.exit_code == 0, result.output
    state_dir = resolved(result)["server"]["state_dir"]
    assert state_dir == f"{tmp_path}/home/ts-state"
    config = resolved(result)
    assert config["models"] == {}


# -- config check: every kind of bad file --------------------------------------------------------


BAD_CONFIGS = {
    "unknown-key": (
        "[server]\nport = 8600\nprot = 1\n",
        r"server\.prot: unknown key",
    ),
    "unknown-model-key": (
        '[models.echo]\ncmd = ["x"]\nttl_seconds = 3\n',
        r"models\.echo\.ttl_seconds: unknown key",
    ),
    "wrong-type": (
        '[server]\nport = "8600"\n',
        r"server\.port: input should be a valid integer, got '8600'",
    ),
    "wrong-type-list": (
        '[models.echo]\ncmd = "python -m x"\n',
        r"models\.echo\.cmd: input should be a valid list, got 'python -m x'",
    ),
    "negative-number": (
        '[models.echo]\ncmd = ["x"]\nmax_queue = -1\n',
        r"models\.echo\.max_queue: must be >= 0",
    ),
    "negative-timeout": (
        "[server]\nrequest_timeout = -5\n",
        r"server\.request_timeout: must be > 0",
    ),
    "missing-cmd": (
        "[models.echo]\nttl = 5\n",
        r"models\.echo\.cmd: required key is missing",
    ),
    "empty-cmd": (
        "[models.echo]\ncmd = []\n",
        r"models\.echo\.cmd: must not be empty",
    ),
    "unknown-placeholder": (
        '[models.echo]\ncmd = ["x", "--port", "{prot}"]\n',
        r"models\.echo\.cmd: unknown placeholder \{prot\} in '\{prot\}'; known: \{model\}, "
        r"\{port\}, \{python\}, \{state_dir\}",
    ),
    "unknown-placeholder-in-env": (
        '[models.echo]\ncmd = ["x"]\nenv = { HOME = "{home}" }\n',
        r"models\.echo\.env: unknown placeholder \{home\}",
    ),
    "alias-collision": (
        '[models.a]\ncmd = ["x"]\naliases = ["small"]\n[models.b]\ncmd = ["y"]\n'
        'aliases = ["small"]\n',
        r"models\.b\.aliases: 'small' is already used by a",
    ),
    "alias-is-another-model": (
        '[models.a]\ncmd = ["x"]\n[models.b]\ncmd = ["y"]\naliases = ["a"]\n',
        r"models\.b\.aliases: 'a' is already used by a",
    ),
    "user-key-of-another-user": (
        '[users.alice]\napi_keys = ["sk-1"]\n[users.bob]\napi_keys = ["sk-2", "sk-1"]\n',
        r"users\.bob\.api_keys: a key is already used by users\.alice$",
    ),
    "user-key-is-a-server-key": (
        '[server]\napi_keys = ["sk-1"]\n[users.alice]\napi_keys = ["sk-1"]\n',
        r"users\.alice\.api_keys: a key is already used by server\.api_keys$",
    ),
    "user-key-twice": (
        '[users.alice]\napi_keys = ["sk-1", "sk-1"]\n',
        r"users\.alice\.api_keys: a key is listed twice$",
    ),
    "user-key-empty": (
        '[users.alice]\napi_keys = [" "]\n',
        r"users\.alice\.api_keys: an API key must not be empty$",
    ),
    "user-weight-zero": (
        "[users.alice]\nweight = 0\n",
        r"users\.alice\.weight: must be > 0$",
    ),
    "user-weight-negative-float": (
        "[users.alice]\nweight = -0.5\n",
        r"users\.alice\.weight: must be > 0$",
    ),
    "user-weight-infinite": (
        "[users.alice]\nweight = inf\n",
        r"users\.alice\.weight: input should be a finite number$",
    ),
    "user-weight-string": (
        '[users.alice]\nweight = "2"\n',
        r"users\.alice\.weight: input should be a valid number, got '2'$",
    ),
    "user-negative-max-queue": (
        "[users.alice]\nmax_queue = -1\n",
        r"users\.alice\.max_queue: must be >= 0$",
    ),
    "user-negative-max-concurrency": (
        "[users.alice]\nmax_concurrency = -1\n",
        r"users\.alice\.max_concurrency: must be >= 0$",
    ),
    "user-unknown-key": (
        '[users.alice]\napi_key = "sk-1"\n',
        r"users\.alice\.api_key: unknown key$",
    ),
    "user-named-anonymous": (
        "[users.anonymous]\nweight = 2\n",
        r"users\.anonymous: 'anonymous' is reserved for requests without a user's key$",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_bad_config_names_file_key_path_and_reason(tmp_path: Path, kind: str) -> None:
    text, reason = BAD_CONFIGS[kind]
    path = tmp_path / f"{kind}.toml"
    path.write_text(text)
    result = invoke(["config", "check", str(path)])
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert re.fullmatch(rf"trioserve: {re.escape(str(path))}: {reason}.*", line), line


def test_key_errors_never_print_the_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.toml"
    path.write_text(
        '[users.a]\napi_keys = ["sk-secret-1"]\n[users.b]\napi_keys = ["sk-secret-1"]\n'
    )
    result = invoke(["config", "check", str(path)])
    assert result.exit_code == 2
    assert "sk-secret" not in result.output


def test_check_shows_users_with_their_defaults(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text(
        '[server]\napi_keys = ["sk-server"]\n'
        '[users.alice]\napi_keys = ["sk-alice"]\nweight = 3\n'
        "[users.bob]\nmax_concurrency = 2\nmax_queue = 4\nweight = 0.5\n"
    )
    result = invoke(["config", "check", str(path)])
    assert result.exit_code == 0, result.output
    # Keys are shown as server.api_keys are: as written.
    no_budgets = {
        "max_tokens_per_minute": 0,
        "max_tokens_per_day": 0,
        "max_requests_per_minute": 0,
    }
    assert resolved(result)["users"] == {
        "alice": {
            "api_keys": ["sk-alice"],
            "weight": 3.0,
            "max_concurrency": 0,
            "max_queue": 0,
            **no_budgets,
        },
        "bob": {
            "api_keys": [],
            "weight": 0.5,
            "max_concurrency": 2,
            "max_queue": 4,
            **no_budgets,
        },
    }
    assert resolved(result)["server"]["api_keys"] == ["sk-server"]


def test_no_users_section_means_no_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = invoke(["config", "check", "conf/trioserve.toml"])
    assert result.exit_code == 0, result.output
    assert resolved(result)["users"] == {}


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[server]\nport = = 3\n")
    result = invoke(["config", "check", str(path)])
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    # No key path for a file that does not parse: FILE: reason (with the line).
    assert re.fullmatch(rf"trioserve: {re.escape(str(path))}: invalid TOML: .*line 2.*", line)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    result = invoke(["config", "check", str(path)])
    assert result.exit_code == 2
    assert one_error_line(result) == f"trioserve: {path}: cannot read: No such file or directory"


def test_every_command_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = -1\n")
    for args in (["start"], ["stop"], ["cleanup", "--dry-run"], ["status"]):
        result = invoke([*args, "--config", str(path)])
        assert result.exit_code == 2, (args, result.output)
        assert one_error_line(result) == f"trioserve: {path}: server.port: must be >= 0"


# -- start-up guards -----------------------------------------------------------------------------


def test_start_refuses_non_loopback_host_without_api_keys(tmp_path: Path) -> None:
    config, _ = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    port = free_port()
    result = invoke(["start", "--config", str(config), "--host", "0.0.0.0", "--port", str(port)])
    assert result.exit_code == 1, result.output
    line = one_error_line(result)
    assert "refusing to listen on 0.0.0.0 with no api_keys" in line
    assert "--insecure" in line
    # Refused before anything started: no lock taken, no store written.
    assert not (tmp_path / "state" / "state.db").exists()


@pytest.mark.slow
def test_start_with_insecure_listens_on_all_addresses(tmp_path: Path, spawn_daemon: Any) -> None:
    config, _ = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    port = free_port()
    daemon = spawn_daemon(
        config, f"http://127.0.0.1:{port}", "--host", "0.0.0.0", "--port", str(port), "--insecure"
    )
    assert daemon.status()["models"]["echo"]["state"] == "stopped"
    result = invoke(["stop", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert daemon.wait() == 0


def test_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path, spawn_daemon: Any) -> None:
    config, url = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    first = spawn_daemon(config, url)
    result = invoke(["start", "--config", str(config), "--port", str(free_port())])
    assert result.exit_code == 1, result.output
    line = one_error_line(result)
    assert f"{tmp_path / 'state'} is already used by a running daemon" in line
    assert f"pid {first.pid}" in line and url in line
    # The first one is untouched.
    assert first.status()["pid"] == first.pid


def test_start_on_a_port_in_use_fails_with_one_line(tmp_path: Path) -> None:
    # Through the console script: Hypercorn leaks the socket whose bind failed, which is
    # harmless in a process that exits, but not inside the test process.
    config, _ = daemon_config(tmp_path / "c.toml", tmp_path / "state")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_trioserve("start", "--config", str(config), "--port", str(port))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"trioserve: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


@pytest.mark.parametrize(
    ("server", "key", "reason"),
    [
        ({"tls_cert": "c.pem"}, "server.tls_key", "tls_cert and tls_key go together"),
        ({"tls_key": "k.pem"}, "server.tls_cert", "tls_cert and tls_key go together"),
        ({"tls_client_ca": "ca.pem"}, "server.tls_client_ca", "client certificates need TLS"),
        ({"health_port": 8600}, "server.health_port", "must differ from server.port"),
        ({"admin_over_tcp": "maybe"}, "server.admin_over_tcp", "'keys' or 'open'"),
        ({"state_dir": "/tmp/" + "d" * 120}, "server.admin_socket", "over the 107"),
    ],
)
def test_server_security_keys_are_checked(server: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": server}, "x.toml")
    assert f"x.toml: {key}: " in str(caught.value)
    assert reason in str(caught.value)


def test_a_long_state_dir_is_fine_without_an_admin_socket() -> None:
    config = parse_config({"server": {"state_dir": "/tmp/" + "d" * 120, "admin_socket": ""}})
    assert config.admin_socket_path is None


@pytest.mark.parametrize("name", ["admin", "anonymous"])
def test_reserved_user_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="is reserved"):
        parse_config({"users": {name: {}}}, "x.toml")
