"""Client commands: ``models list|load|unload`` and ``logs``, thin calls to the admin API."""

from __future__ import annotations

import json
import signal
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Annotated, Any, TypeVar

import trio
import typer
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

from .client import ClientError, DaemonClient
from .common import JsonOption, die, make_console
from .tables import first_line
from .target import ClientOptions, client_command

__all__ = ["models_app", "new_lines", "register"]

# `logs --follow` asks for this many lines per poll: more than a chatty server writes in one
# poll interval, small enough that a poll stays cheap.
FOLLOW_WINDOW = 1000
FOLLOW_INTERVAL = 0.5
# How often the progress line of `models load` is redrawn on a terminal.
PROGRESS_REFRESH = 0.1

T = TypeVar("T")

models_app = typer.Typer(help="List, load and unload models.", no_args_is_help=True)

NameArgument = Annotated[str, typer.Argument(help="model name or alias", show_default=False)]


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    """``trio.run`` with the client's errors as one line and exit 1.

    Ctrl-C comes out as KeyboardInterrupt, also when it hit a task inside a nursery (``_load``'s,
    or the one ``trio.open_tcp_stream`` races its connection attempts in), which raises it
    wrapped in a BaseExceptionGroup that no ``except KeyboardInterrupt`` would see.
    """
    try:
        return trio.run(fn)
    except ClientError as exc:
        die(str(exc))
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        raise KeyboardInterrupt from group


# -- models list -------------------------------------------------------------------------------


@models_app.command("list")
@client_command
def list_models(client: ClientOptions, as_json: JsonOption = False) -> None:
    """The configured models and aliases with their state (GET /v1/models)."""
    target = client.target()

    async def fetch() -> Any:
        async with DaemonClient(target) as api:
            return await api.get_json("/v1/models")

    answer = _run(fetch)
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("MODEL", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    for entry in answer.get("data", []):
        table.add_row(str(entry.get("id")), str(entry.get("state", "-")))
    make_console().print(table)


# -- models load -------------------------------------------------------------------------------


async def _load(client: DaemonClient, name: str, out: Console) -> dict[str, Any]:
    """Subscribe to lifecycle events, then ask for the load; print each state change until the
    load call answers (ready, or the error that made it fail)."""
    begin = trio.current_time()
    state = ["requested"]
    answer: list[dict[str, Any]] = []
    failure: list[ClientError] = []

    def elapsed() -> float:
        return trio.current_time() - begin

    async with client.events() as events, trio.open_nursery() as nursery:

        async def follow() -> None:
            while (event := await events.receive()) is not None:
                if event.get("model") != name:
                    continue
                state[0] = str(event.get("to"))
                reason = str(event.get("reason") or "")
                why = f": {first_line(reason)}" if reason else ""
                out.print(
                    f"{name}: {event.get('from')} -> {event.get('to')} ({elapsed():.1f}s){why}",
                    markup=False,
                )

        async def request() -> None:
            try:
                answer.append(await client.post_json(f"/admin/models/{name}/load"))
            except ClientError as exc:
                failure.append(exc)
            finally:
                nursery.cancel_scope.cancel()

        nursery.start_soon(follow)
        nursery.start_soon(request)
        if out.is_terminal:
            # Redrawn by this task rather than rich's refresh thread: no threads of our own.
            spinner = Spinner("dots")
            with Live(spinner, console=out, auto_refresh=False, transient=True) as live:
                while True:
                    spinner.update(text=f"loading {name}: {state[0]} {elapsed():.1f}s")
                    live.refresh()
                    await trio.sleep(PROGRESS_REFRESH)
    if failure:
        raise failure[0]
    return {**answer[0], "elapsed": elapsed()}


@models_app.command("load")
@client_command
def load(client: ClientOptions, name: NameArgument) -> None:
    """Start a model and show its progress until it is ready (exit 1 if it fails)."""
    out = make_console()
    target = client.target()

    async def run() -> dict[str, Any]:
        async with DaemonClient(target) as api:
            return await _load(api, name, out)

    result = _run(run)
    out.print(
        f"{result.get('model', name)}: {result.get('state')} on port {result.get('port')} "
        f"({result['elapsed']:.1f}s)",
        markup=False,
    )


# -- models unload -----------------------------------------------------------------------------


@models_app.command("unload")
@client_command
def unload(
    client: ClientOptions,
    name: NameArgument,
    force: Annotated[
        bool, typer.Option("--force", help="kill now instead of letting requests finish")
    ] = False,
) -> None:
    """Stop a model: after its in-flight requests finish, or at once with --force."""
    target = client.target()

    async def run() -> Any:
        async with DaemonClient(target) as api:
            params = {"force": "true"} if force else None
            return await api.post_json(f"/admin/models/{name}/unload", params=params)

    result = _run(run)
    make_console().print(f"{result.get('model', name)}: {result.get('state')}", markup=False)


# -- logs --------------------------------------------------------------------------------------


def new_lines(seen: Sequence[str], current: Sequence[str]) -> list[str]:
    """The lines of ``current`` (a tail of the log) that come after ``seen`` (an earlier tail).

    The logs endpoint has no cursor, so this dedupes by counting lines: when the earlier tail is
    a prefix of the new one, what follows it is new. Once the daemon's ring buffer has dropped
    old lines, the longest suffix of ``seen`` that starts ``current`` marks the overlap. The last
    line of ``seen`` may have been a partial one that has grown since, so it is dropped if
    nothing lines up with it. Lines repeated verbatim at the seam can be under-counted, and when
    more than the whole window was written between two polls the window is printed as is: for
    following a log by eye that is acceptable.
    """
    for earlier in (list(seen), list(seen[:-1])):
        if not earlier:
            break
        if list(current[: len(earlier)]) == earlier:
            return list(current[len(earlier) :])
        for overlap in range(min(len(earlier), len(current)), 0, -1):
            if earlier[-overlap:] == list(current[:overlap]):
                return list(current[overlap:])
    return list(current)


async def _until_ctrl_c(work: Callable[[], Awaitable[None]]) -> None:
    """``await work()`` until SIGINT (Ctrl-C), which cancels it: then this returns normally.

    SIGINT is received here rather than left to trio's KeyboardInterrupt, which cannot be relied
    on to end ``logs --follow``: a process that starts with SIGINT ignored (as a non-interactive
    shell's ``cmd &`` and all it starts) never gets one, since trio installs its handler only
    over Python's default one; one raised inside a weakref callback (trio keeps every async
    generator in a WeakSet) is printed as "ignored" and lost; one raised while httpx connects
    comes out in a BaseExceptionGroup. A cancellation unwinds through all of that. A ClientError
    of ``work`` is raised as it is, not wrapped in the nursery's group.
    """
    failure: list[ClientError] = []
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        async with trio.open_nursery() as nursery:

            async def cancel_on_ctrl_c() -> None:
                async for _ in interrupts:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_on_ctrl_c)
            try:
                await work()
            except ClientError as exc:
                failure.append(exc)
            nursery.cancel_scope.cancel()
    if failure:
        raise failure[0]


@client_command
def logs(
    client: ClientOptions,
    name: NameArgument,
    tail: Annotated[int, typer.Option("--tail", "-n", min=0, help="lines to show")] = 100,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new lines until Ctrl-C")
    ] = False,
) -> None:
    """A model's output (stdout and stderr), the last --tail lines; --follow for new ones."""
    path = f"/admin/models/{name}/logs"

    def show(lines: Sequence[str]) -> None:
        if lines:
            typer.echo("\n".join(lines))

    target = client.target()

    async def run() -> None:
        async with DaemonClient(target) as api:
            window = max(tail, FOLLOW_WINDOW) if follow else tail
            seen = (await api.get_text(path, params={"tail": str(window)})).splitlines()
            show(seen[-tail:] if tail else [])
            while follow:
                # Polling is the honest tool here: the endpoint has no stream or cursor.
                await trio.sleep(FOLLOW_INTERVAL)
                text = await api.get_text(path, params={"tail": str(window)})
                current = text.splitlines()
                show(new_lines(seen, current))
                seen = current

    try:
        # `_until_ctrl_c` turns Ctrl-C into a cancellation; at the very start or end of the run
        # it may still arrive as KeyboardInterrupt.
        _run(partial(_until_ctrl_c, run) if follow else run)
    except KeyboardInterrupt:
        # Ctrl-C is how --follow ends: not an error.
        return


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.command("logs")(logs)
