"""Client commands: ``models``, ``logs`` (filled in by the CLI work)."""

from __future__ import annotations

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    return None
