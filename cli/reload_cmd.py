"""``trioserve reload``: the running daemon re-reads its config file (``POST /admin/reload``).

The daemon is found as every client command finds it (``target.py``): the admin socket of the
config's ``state_dir``, else the URL its state store records (``--url`` / ``TRIOSERVE_URL``
names it instead). The file it re-reads is its own, the one it was started with; ``--config``
only says where to look for the daemon. An invalid file is the daemon's to refuse, with its
reason, so it is not refused here: the state dir is then read from the file as far as it can be
(that is what ``systemctl reload`` after a bad edit needs to hear).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import trio
import typer

from .client import ClientError, DaemonClient
from .common import EXIT_FAILURE, JsonOption, die, make_console
from .target import ClientOptions, Target, client_command

__all__ = ["register"]

# A reload reads one file and switches over without waiting on any model: a few
# milliseconds. The default only matters when the daemon's loop is stuck.
DEFAULT_TIMEOUT = 60.0


def _find(client: ClientOptions) -> Target:
    """The daemon to reload; exit 1 when none runs."""
    target = client.target()
    local = target.local
    if target.socket is not None or target.explicit_url or local.recorded_url is not None:
        return target
    if local.store_error is not None:
        die(local.store_error)
    where = f"no daemon is running for state_dir {local.state_dir}"
    if local.config_error is not None:
        die(f"{where}; and the config is invalid: {local.config_error}")
    die(where)


async def _reload(target: Target, limit: float) -> dict[str, Any] | None:
    """The daemon's answer to ``POST /admin/reload``; None if it took over ``limit`` s."""
    async with DaemonClient(target) as api:
        with trio.move_on_after(limit):
            answer: dict[str, Any] = await api.post_json("/admin/reload")
            return answer
    return None


@client_command
def reload(
    client: ClientOptions,
    timeout: Annotated[
        float,
        typer.Option(help="seconds to wait for the daemon's answer", min=0),
    ] = DEFAULT_TIMEOUT,
    as_json: JsonOption = False,
) -> None:
    """Make the running daemon re-read its config; returns once it is in force (exit 0) or
    refused (exit 1, with the daemon's reason, nothing changed)."""
    target = _find(client)
    config_error = target.local.config_error
    try:
        answer = trio.run(_reload, target, timeout)
    except ClientError as exc:
        message = str(exc)
        if config_error is not None and config_error not in message:
            message += f" (and the config is invalid: {config_error})"
        die(message)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if answer is None:
        die(
            f"the daemon at {target.where} did not answer within {timeout:g}s; the reload may "
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
