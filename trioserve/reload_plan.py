"""What a config reload changes: a pure comparison of the running config with the new one.

The daemon applies a plan in one step with no checkpoint in between, so requests see the old
config or the new one, never a mix. Only what cannot change without a new listener or a new
state store is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from trioserve.config import Config, ModelConfig

__all__ = ["RESTART_ONLY", "ReloadPlan", "plan_reload"]

# Server keys a running daemon cannot take over: the bound socket and the state store (with
# its single-instance lock) were set up from them.
RESTART_ONLY = (
    "host",
    "port",
    "state_dir",
    # Files and listeners made once at start.
    "admin_socket",
    "admin_group",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "health_port",
)
# A model whose process must be replaced when one of these changes; every other model key
# (limits, ttl, aliases) applies to the running process.
PROCESS_KEYS = ("cmd", "env", "health_path", "devices")


@dataclass(frozen=True)
class ReloadPlan:
    """The difference between two configs, as the daemon acts on it."""

    refused: str | None = None
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    # cmd, env, health_path or devices (CUDA_VISIBLE_DEVICES) changed: the old process
    # finishes its requests, the next request starts the new command.
    replaced: tuple[str, ...] = ()
    # only limits, ttl or aliases changed: applied to the running process.
    retuned: tuple[str, ...] = ()
    # other sections whose values changed: "server", "supervisor", "users".
    sections: tuple[str, ...] = field(default=())

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.replaced or self.retuned or self.sections)

    def summary(self) -> str:
        """One line for the CLI, the log and the admin API."""
        if self.refused is not None:
            return f"refused: {self.refused}"
        if not self.changed:
            return "no changes"
        parts = []
        for label, names in (
            ("added", self.added),
            ("removed", self.removed),
            ("restarted on next use", self.replaced),
            ("limits changed", self.retuned),
        ):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        if self.sections:
            parts.append(f"changed: {', '.join(self.sections)}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {
            "summary": self.summary(),
            "added": list(self.added),
            "removed": list(self.removed),
            "restarted": list(self.replaced),
            "retuned": list(self.retuned),
            "sections": list(self.sections),
        }


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Compare ``old`` (running) with ``new`` (just read and validated)."""
    moved = [
        f"server.{key}"
        for key in RESTART_ONLY
        if getattr(old.server, key) != getattr(new.server, key)
    ]
    if old.state_dir != new.state_dir and "server.state_dir" not in moved:
        moved.append("server.state_dir")
    # The MCP endpoint's session manager is made (or not) once, at start.
    if old.mcp.enabled != new.mcp.enabled:
        moved.append("mcp.enabled")
    if moved:
        keys = ", ".join(moved)
        return ReloadPlan(refused=f"{keys} changed: that needs a restart")
    added = tuple(name for name in new.models if name not in old.models)
    removed = tuple(name for name in old.models if name not in new.models)
    replaced: list[str] = []
    retuned: list[str] = []
    for name, model in new.models.items():
        before = old.models.get(name)
        if before is None or before == model:
            continue
        (replaced if _process_changed(before, model) else retuned).append(name)
    sections = tuple(
        section for section in _sections(new) if _section(old, section) != _section(new, section)
    )
    return ReloadPlan(
        added=added,
        removed=removed,
        replaced=tuple(replaced),
        retuned=tuple(retuned),
        sections=sections,
    )


def _process_changed(old: ModelConfig, new: ModelConfig) -> bool:
    return any(getattr(old, key) != getattr(new, key) for key in PROCESS_KEYS)


def _sections(config: Config) -> list[str]:
    return [name for name in type(config).model_fields if name != "models"]


def _section(config: Config, name: str) -> object:
    value: object = getattr(config, name, None)
    return value.model_dump() if isinstance(value, BaseModel) else value
