"""``trioserve reload``: the running daemon re-reads its config file (``POST /admin/reload``).

The daemon is found as ``stop`` finds it: the state store of the config's ``state_dir`` records
its URL (``--url`` / ``TRIOSERVE_URL`` names it instead). The file it re-reads is its own, the
one it was started with; ``--config`` only says where to look for the daemon. An invalid file
is the daemon's to refuse, with its reason, so it is not refused here: the state dir is then
read from the file as far as it can be (that is what ``systemctl reload`` after a bad edit
needs to hear).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tomllib
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from trioserve.config import DEFAULT_STATE_DIR
from trioserve.host.running import live_daemon
from trioserve.host.store import StateStore

from .client import ClientError, DaemonClient, base_url
from .common import (
    EXIT_FAILURE,
    ApiKeyOption,
    ConfigOption,
    JsonOption,
    UrlOption,
    config_path,
    die,
    load_if_valid,
    make_console,
)

__all__ = ["register"]

# A reload reads one file and switches over without waiting on any model: a few
# milliseconds. The default only matters when the daemon's loop is stuck.
DEFAULT_TIMEOUT = 60.0
_SERVER_HEADER = re.compile(r"\[\s*server\s*\]")


class _Target:
    """Where the reload goes: the daemon's URL and the key to present."""

    def __init__(self, url: str, api_key: str | None, config_error: str | None) -> None:
        self.url = url
        self.api_key = api_key
        # The local copy of the file is invalid: said only if no daemon is there to say it.
        self.config_error = config_error


def _server_section(text: str) -> dict[str, object]:
    """The ``[server]`` table of ``text``; when the whole is not TOML (the error may be
    anywhere), the lines of its ``[server]`` section alone, parsed by themselves."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        lines: list[str] = []
        inside = False
        for line in text.splitlines():
            if line.lstrip().startswith("["):
                inside = _SERVER_HEADER.fullmatch(line.split("#", 1)[0].strip()) is not None
            elif inside:
                lines.append(line)
        try:
            return tomllib.loads("\n".join(lines))
        except tomllib.TOMLDecodeError:
            return {}
    server = data.get("server")
    return server if isinstance(server, dict) else {}


def _state_dir_of_invalid(path: Path) -> Path:
    """The state dir an invalid config most likely names: ``$STATE_DIRECTORY``, else its
    ``server.state_dir`` as far as it can be read, else the default."""
    from_systemd = os.environ.get("STATE_DIRECTORY")
    if from_systemd:
        return Path(from_systemd.split(":")[0])
    try:
        raw = _server_section(path.read_text(encoding="utf-8")).get("state_dir")
    except (OSError, UnicodeDecodeError):
        raw = None
    return Path(raw if isinstance(raw, str) else DEFAULT_STATE_DIR).expanduser()


def _find(config_file: Path | None, url: str | None, api_key: str | None) -> _Target:
    """The daemon to reload; exit 1 when none runs."""
    path = config_path(config_file)
    config, config_error = load_if_valid(path)
    if api_key is None and config is not None and config.server.admin_keys:
        # Whoever may read the config holds its admin keys anyway; this is what lets
        # `systemctl reload` work without a key on its command line.
        api_key = config.server.admin_keys[0]
    if url:
        return _Target(base_url(url), api_key, config_error)
    state_dir = config.state_dir if config is not None else _state_dir_of_invalid(path)
    try:
        row = live_daemon(StateStore(state_dir))
    except (sqlite3.Error, OSError) as exc:
        die(f"cannot use the state store in {state_dir}: {exc}")
    if row is None:
        where = f"no daemon is running for state_dir {state_dir}"
        if config_error is not None:
            die(f"{where}; and the config is invalid: {config_error}")
        die(where)
    return _Target(base_url(row.url), api_key, config_error)


async def _reload(target: _Target, limit: float) -> dict[str, Any] | None:
    """The daemon's answer to ``POST /admin/reload``; None if it took over ``limit`` s."""
    async with DaemonClient(target.url, target.api_key) as client:
        with trio.move_on_after(limit):
            answer: dict[str, Any] = await client.post_json("/admin/reload")
            return answer
    return None


def reload(
    config_file: ConfigOption = None,
    timeout: Annotated[
        float,
        typer.Option(help="seconds to wait for the daemon's answer", min=0),
    ] = DEFAULT_TIMEOUT,
    as_json: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Make the running daemon re-read its config; returns once it is in force (exit 0) or
    refused (exit 1, with the daemon's reason, nothing changed)."""
    target = _find(config_file, url, api_key)
    try:
        answer = trio.run(_reload, target, timeout)
    except ClientError as exc:
        message = str(exc)
        if target.config_error is not None and target.config_error not in message:
            message += f" (and the config is invalid: {target.config_error})"
        die(message)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if answer is None:
        die(
            f"the daemon at {target.url} did not answer within {timeout:g}s; the reload may "
            "still happen: see `last_reload` in `trioserve status --json`",
            EXIT_FAILURE,
        )
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    summary = answer.get("summary") if isinstance(answer, dict) else None
    make_console().print(f"reloaded: {summary or 'done'}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("reload")(reload)
