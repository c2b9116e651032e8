"""Rich tables shared by ``status``, ``users`` and ``cleanup``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.table import Table
from rich.text import Text

from trioserve.host.cleanup import Leftover
from trioserve.sizes import format_size

__all__ = [
    "devices_table",
    "duration",
    "first_line",
    "leftovers_table",
    "memory_cell",
    "models_table",
    "usage_table",
    "users_table",
]

_LAST_ERROR_CHARS = 80


def duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def first_line(text: str | None, limit: int = _LAST_ERROR_CHARS) -> str:
    """The first line of ``text``, cut to ``limit`` characters (an error can be 20 lines)."""
    if not text:
        return "-"
    lines = text.strip().splitlines() or [""]
    line = lines[0]
    if len(line) > limit or len(lines) > 1:
        line = line[: limit - 1].rstrip() + "…"
    return line


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def memory_cell(model: Mapping[str, Any]) -> str:
    """A model's memory per device, the measured figure where there is one, else the estimated
    (declared or from its GGUF): ``cpu 1.2 GiB``, ``cuda:0 5.9 GiB + cpu 0.8 GiB``; ``-``
    while nothing is known."""
    memory = model.get("memory") or {}
    estimated: Mapping[str, int] = memory.get("estimated") or {}
    measured: Mapping[str, int] = memory.get("measured") or {}
    # Its own devices first, in its order; then others it was measured on (a GPU model's host
    # memory on "cpu").
    devices = dict.fromkeys([*(model.get("devices") or []), *estimated, *measured])
    parts = [
        f"{device} {format_size(measured[device] if device in measured else estimated[device])}"
        for device in devices
        if device in measured or device in estimated
    ]
    return " + ".join(parts) or "-"


def _state_cell(model: Mapping[str, Any]) -> str:
    """The state, with what keeps the model loaded: ``ready (pinned, preload)``."""
    marks = [mark for mark in ("pinned", "preload") if model.get(mark)]
    state = _cell(model.get("state"))
    return f"{state} ({', '.join(marks)})" if marks else state


def models_table(status: Mapping[str, Any]) -> Table:
    """The models of an ``/admin/status`` answer."""
    # The daemon's clock, not ours: uptime is its "now" minus the model's start.
    now = float(status.get("started_at") or 0) + float(status.get("uptime_s") or 0)
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ("MODEL", "STATE", "PID", "PORT", "IN-FLIGHT", "QUEUED", "UPTIME", "RESTARTS")
    for column in (*columns, "MEMORY"):
        if column in ("PID", "PORT", "IN-FLIGHT", "QUEUED", "RESTARTS"):
            table.add_column(column, justify="right", no_wrap=True)
        else:
            table.add_column(column, no_wrap=True)
    table.add_column("LAST ERROR", overflow="fold")
    models: Mapping[str, Mapping[str, Any]] = status.get("models") or {}
    for name, model in models.items():
        started = model.get("started_at")
        table.add_row(
            name,
            _state_cell(model),
            _cell(model.get("pid")),
            _cell(model.get("port")),
            _cell(model.get("in_flight")),
            _cell(model.get("queued")),
            duration(now - float(started))
            if started is not None and model.get("pid") is not None
            else "-",
            _cell(model.get("restarts")),
            memory_cell(model),
            first_line(model.get("last_error")),
        )
    return table


def devices_table(status: Mapping[str, Any]) -> Table:
    """The memory budgets of an ``/admin/status`` answer: per device, its budget, what the
    models holding memory count on it, and what is left."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("DEVICE", no_wrap=True)
    for column in ("BUDGET", "USED", "FREE"):
        table.add_column(column, justify="right", no_wrap=True)
    devices: Mapping[str, Mapping[str, int]] = status.get("devices") or {}
    for device, figures in devices.items():
        sizes = (format_size(int(figures[key])) for key in ("budget", "used", "free"))
        table.add_row(Text(device), *sizes)
    return table


_ANONYMOUS = "anonymous"
# The columns of `users_table` and the keys of an ``/admin/status`` user entry they show.
_USER_COLUMNS = (
    ("IN-FLIGHT", "in_flight"),
    ("QUEUED", "queued"),
    ("REQUESTS", "requests"),
    ("PROMPT-TOKENS", "prompt_tokens"),
    ("COMPLETION-TOKENS", "completion_tokens"),
)


def users_table(status: Mapping[str, Any]) -> Table:
    """The users of an ``/admin/status`` answer: in flight and queued now (over all models),
    requests and tokens since the daemon started."""
    return _per_user(status.get("users") or {}, _USER_COLUMNS)


# The columns of `usage_table` and the keys of an ``/admin/usage`` user entry they show.
_USAGE_COLUMNS = (
    ("REQUESTS", "requests"),
    ("PROMPT-TOKENS", "prompt_tokens"),
    ("COMPLETION-TOKENS", "completion_tokens"),
)


def usage_table(usage: Mapping[str, Any]) -> Table:
    """The per-user totals of an ``/admin/usage`` answer (over its ``since`` .. ``until``)."""
    return _per_user(usage.get("users") or {}, _USAGE_COLUMNS)


def _per_user(
    users: Mapping[str, Mapping[str, Any]], columns: tuple[tuple[str, str], ...]
) -> Table:
    """A row per user with ``columns`` (header, key), numbers right-aligned."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("USER", no_wrap=True)
    for column, _ in columns:
        table.add_column(column, justify="right", no_wrap=True)
    # By name, everyone without a user's key last ("anonymous" is no configured user's name).
    for name in sorted(users, key=lambda name: (name == _ANONYMOUS, name)):
        # Text, not a str: a configured name is never read as rich markup.
        row = (_cell(users[name].get(key)) for _, key in columns)
        table.add_row(Text(name), *row)
    return table


def leftovers_table(items: Iterable[Leftover], *, outcome: bool = False) -> Table:
    """Processes (and store rows) left by a daemon that is gone."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("MODEL", no_wrap=True)
    table.add_column("PID", justify="right", no_wrap=True)
    table.add_column("PORT", justify="right", no_wrap=True)
    table.add_column("INSTANCE", no_wrap=True)
    table.add_column("ALIVE", no_wrap=True)
    table.add_column("FOUND BY", no_wrap=True)
    if outcome:
        table.add_column("DONE", no_wrap=True)
    table.add_column("NOTE", overflow="fold")
    for item in items:
        row = [
            item.model,
            str(item.pid),
            _cell(item.port),
            item.instance,
            "yes" if item.alive else "no",
            item.source,
        ]
        if outcome:
            row.append(item.outcome)
        row.append(item.note)
        table.add_row(*row)
    return table
