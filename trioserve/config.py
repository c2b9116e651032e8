"""The TOML config: typed, validated, and every error names the file, the key path and the reason.

Placeholders in a model's ``cmd`` and ``env`` (``{port}``, ``{python}``, ``{model}``,
``{state_dir}``) are checked at load time and filled in at spawn time, when the port is known.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from trioserve.errors import ConfigError
from trioserve.sizes import format_size, parse_size

__all__ = [
    "ADMIN_USER_NAME",
    "PLACEHOLDERS",
    "RESERVED_USER_NAME",
    "Config",
    "McpConfig",
    "ModelConfig",
    "ServerConfig",
    "SupervisorConfig",
    "UserConfig",
    "check_memory_fits",
    "is_loopback",
    "load_config",
    "parse_config",
    "placeholder_values",
    "render",
    "resolved_dict",
]

PLACEHOLDERS = frozenset({"port", "python", "model", "state_dir"})
DEFAULT_STATE_DIR = "~/.local/state/trioserve"
ADMIN_SOCKET_DEFAULT = "{state_dir}/admin.sock"
# sun_path holds 108 bytes with its terminating NUL.
UNIX_PATH_MAX = 107


def _int_as_float(value: object) -> object:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _no_empty_keys(keys: list[str]) -> list[str]:
    if any(not key.strip() for key in keys):
        raise ValueError("an API key must not be empty")
    return keys


# A float that may be written as an int: strict mode refuses an int for a float field, and TOML
# users write `600`, not `600.0`.
_Float = Annotated[float, BeforeValidator(_int_as_float)]
_ApiKeys = Annotated[list[str], AfterValidator(_no_empty_keys)]


def _size(value: object) -> int:
    # parse_size's ValueError becomes the config error's reason.
    return parse_size(value)


def _memory(value: object) -> int | str:
    return "auto" if value == "auto" else parse_size(value)


_DEVICE = re.compile(r"cpu|cuda:\d+")


def _device(name: str) -> str:
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"{name!r} is not a device: 'cpu' or 'cuda:N' (N the GPU's NVML index)")
    return name


# Sizes: bytes as an int, or a string such as "6 GiB" (strict mode would refuse the string).
_Size = Annotated[int, BeforeValidator(_size)]
_Device = Annotated[str, AfterValidator(_device)]


class _Section(BaseModel):
    # strict: TOML already has types, so "8600" for a port is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8600, ge=0, le=65535)
    state_dir: str = DEFAULT_STATE_DIR
    request_timeout: _Float = Field(600, gt=0)
    first_byte_timeout: _Float = Field(180, gt=0)
    stream_idle_timeout: _Float = Field(60, gt=0)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1)
    # Multipart uploads (/v1/audio/*): streamed to the model, never held whole in memory.
    max_upload_bytes: int = Field(100 * 1024 * 1024, ge=1)
    api_keys: _ApiKeys = Field(default_factory=list)
    admin_keys: _ApiKeys = Field(default_factory=list)
    loading_progress: bool = True
    # The admin API without a key on a Unix socket: the file's mode (0600, or 0660 with
    # admin_group) is the boundary. "" = no socket.
    admin_socket: str = ADMIN_SOCKET_DEFAULT
    # Set: the admin socket and {state_dir}/admin.token are 0660 with this group (the docker
    # group pattern), so a team's admins need no sudo.
    admin_group: str = ""
    # "keys": admin writes and logs over TCP need an admin key, or the local admin token when
    # admin_keys is empty. "open": anyone who reaches the port (a single-user machine).
    admin_over_tcp: Literal["keys", "open"] = "keys"
    # /upstream/{model}/{path}: a model server's every path (it can change the server's state,
    # e.g. erase a slot). "admin": admin only (as /admin writes); "users": /v1's keys; "off".
    upstream_passthrough: Literal["admin", "users", "off"] = "admin"
    # PEM files; both set = HTTPS (and HTTP/2 where the client offers it).
    tls_cert: str = ""
    tls_key: str = ""
    # Set: clients must present a certificate signed by this CA.
    tls_client_ca: str = ""
    # 0 = /health on the main port only; N = also plain-HTTP /health on loopback:N.
    health_port: int = Field(0, ge=0, le=65535)
    # Not in the minimal config: how long shutdown lets in-flight requests finish.
    shutdown_grace: _Float = Field(15, ge=0)
    # Not in the minimal config: on a stop, /health says 503 "draining" while requests are
    # still served, until none has been in flight for this long (at most half the grace).
    # Behind a balancer without retries, set it above the balancer's time to notice the 503.
    drain_quiet: _Float = Field(0.1, ge=0)
    # Not in the minimal config: dotted names a request's Host may carry besides the bind
    # address (addresses, dotless names and *.localhost always may); others get 403, which is
    # what stops DNS rebinding. "*" turns the check off (behind a proxy that checks Host).
    allowed_hosts: list[str] = Field(default_factory=list)

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or any(c in name for c in " /:@[]"):
                raise ValueError(f"{name!r} is not a host name (no port, scheme or path)")
        return [name.lower() for name in value]


class SupervisorConfig(_Section):
    max_loaded: int = Field(2, ge=1)
    start_timeout: _Float = Field(120, gt=0)
    stop_grace: _Float = Field(10, ge=0)
    port_range: list[int] = Field(default_factory=lambda: [20000, 20999])
    max_start_failures: int = Field(3, ge=1)
    failure_cooldown: _Float = Field(30, ge=0)
    health_interval: _Float = Field(10, gt=0)
    unhealthy_after: int = Field(3, ge=1)
    # Budget per device ("cpu", "cuda:0", ...); a device without one has no memory limit.
    memory: dict[_Device, _Size] = Field(default_factory=dict)
    # s: a model that took memory keeps it this long while it has work before a model waiting
    # for that memory may take it (a time slice: under alternating demand, one swap per slice
    # rather than one per request). 0 = swap as soon as the holder's requests in flight end.
    swap_after: _Float = Field(10, ge=0)

    @field_validator("port_range")
    @classmethod
    def _valid_range(cls, value: list[int]) -> list[int]:
        if len(value) != 2:
            raise ValueError("must be [first, last]")
        first, last = value
        if not (1 <= first <= last <= 65535):
            raise ValueError("must be [first, last] with 1 <= first <= last <= 65535")
        return value


class ModelConfig(_Section):
    cmd: list[str] = Field(min_length=1)
    health_path: str = "/health"
    ttl: _Float = Field(300, ge=0)
    max_concurrency: int = Field(8, ge=1)
    max_queue: int = Field(128, ge=0)
    aliases: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    # Non-streaming chat/completions requests go upstream as streams and are assembled back,
    # so a hang-up or deadline stops the generation (llama-server notices a closed connection
    # only while it writes a stream). false relays them as they came.
    stream_upstream: bool = True
    # "auto": estimated from the GGUF the command serves, then measured; or a size per device.
    memory: Annotated[int | str, BeforeValidator(_memory)] = "auto"
    devices: list[_Device] = Field(default_factory=lambda: ["cpu"], min_length=1)
    # Started with the daemon (and by a reload that adds it); restarted after a crash.
    preload: bool = False
    # Never stopped by ttl, LRU or memory pressure; only by unload, reload or stop.
    pinned: bool = False

    @property
    def declared_memory(self) -> int | None:
        """The configured size per device, or None for "auto"."""
        return self.memory if isinstance(self.memory, int) else None

    @field_validator("devices")
    @classmethod
    def _distinct_devices(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a device is listed twice")
        return value

    @field_validator("health_path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("cmd")
    @classmethod
    def _cmd_placeholders(cls, argv: list[str]) -> list[str]:
        if not argv[0].strip():
            raise ValueError("the program (first element) must not be empty")
        for arg in argv:
            _check_placeholders(arg)
        return argv

    @field_validator("env")
    @classmethod
    def _env_placeholders(cls, env: dict[str, str]) -> dict[str, str]:
        for value in env.values():
            _check_placeholders(value)
        return env


class UserConfig(_Section):
    api_keys: _ApiKeys = Field(default_factory=list)
    # allow_inf_nan: an infinite weight would take every slot, a NaN would break the order.
    weight: _Float = Field(1.0, gt=0, allow_inf_nan=False)
    max_concurrency: int = Field(0, ge=0)
    max_queue: int = Field(0, ge=0)
    # Budgets; 0 = none. Tokens are prompt + completion. Minutes: a sliding 60 s window;
    # days: UTC calendar days.
    max_tokens_per_minute: int = Field(0, ge=0)
    max_tokens_per_day: int = Field(0, ge=0)
    max_requests_per_minute: int = Field(0, ge=0)

    @property
    def has_budget(self) -> bool:
        return bool(
            self.max_tokens_per_minute or self.max_tokens_per_day or self.max_requests_per_minute
        )


class McpConfig(_Section):
    # The MCP endpoint /mcp (Streamable HTTP).
    enabled: bool = True
    # Open sessions at most; beyond it a new one gets 503 with Retry-After.
    max_sessions: int = Field(256, ge=1)
    # s: a session with no request and no open stream for this long is closed.
    session_idle_timeout: _Float = Field(3600, gt=0)


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)  # type: ignore[arg-type]
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)  # type: ignore[arg-type]
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    users: dict[str, UserConfig] = Field(default_factory=dict)
    mcp: McpConfig = Field(default_factory=McpConfig)  # type: ignore[arg-type]
    # Where the file came from; not a TOML key.
    _source: str = PrivateAttr(default="<memory>")

    @property
    def source(self) -> str:
        return self._source

    @property
    def state_dir(self) -> Path:
        """``$STATE_DIRECTORY`` (set by systemd's ``StateDirectory=``) wins over the file."""
        from_systemd = os.environ.get("STATE_DIRECTORY")
        if from_systemd:
            # systemd may pass several colon-separated dirs; the first is ours.
            return Path(from_systemd.split(":")[0])
        return Path(self.server.state_dir).expanduser()

    @property
    def admin_socket_path(self) -> Path | None:
        """Where the admin socket listens (``{state_dir}`` filled in), or None for none."""
        if not self.server.admin_socket:
            return None
        return Path(
            self.server.admin_socket.replace("{state_dir}", str(self.state_dir))
        ).expanduser()

    @property
    def tls(self) -> bool:
        return bool(self.server.tls_cert)

    @property
    def all_api_keys(self) -> tuple[str, ...]:
        """Every key accepted on /v1/*: ``server.api_keys`` and each user's."""
        # Not cached: ``model_copy`` would carry a cached value over to a changed copy.
        keys = list(self.server.api_keys)
        for user in self.users.values():
            keys.extend(user.api_keys)
        return tuple(keys)

    def resolve_name(self, name: str) -> str | None:
        """The model's own name for ``name`` (a name or an alias), or None."""
        if name in self.models:
            return name
        for model_name, model in self.models.items():
            if name in model.aliases:
                return model_name
        return None

    def known_names(self) -> list[str]:
        names = list(self.models)
        for model in self.models.values():
            names.extend(model.aliases)
        return names


def _check_placeholders(text: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise ValueError(
            f"bad placeholder syntax in {text!r}: {exc} (write '{{{{' for '{{')"
        ) from exc
    for field in fields:
        if field not in PLACEHOLDERS:
            known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
            raise ValueError(f"unknown placeholder {{{field}}} in {text!r}; known: {known}")


def render(text: str, values: Mapping[str, object]) -> str:
    """Fill the placeholders of one ``cmd`` or ``env`` string."""
    return text.format_map(dict(values))


def placeholder_values(config: Config, model: str, port: int | str) -> dict[str, object]:
    return {
        "port": port,
        "python": sys.executable,
        "model": model,
        "state_dir": str(config.state_dir),
    }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _key_path(loc: tuple[int | str, ...]) -> str:
    # pydantic marks an error in a dict's key with a "[key]" step: the key is the path's end.
    return ".".join(str(part) for part in loc if part != "[key]")


def _number(bound: object) -> object:
    # A bound on a float field can come back as 0.0; the file's author wrote 0.
    return int(bound) if isinstance(bound, float) and bound.is_integer() else bound


def _reason(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    given = error.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "greater_than_equal":
        return f"must be >= {_number(ctx['ge'])}"
    if kind == "greater_than":
        return f"must be > {_number(ctx['gt'])}"
    if kind == "less_than_equal":
        return f"must be <= {_number(ctx['le'])}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    message = str(error["msg"])
    message = message[0].lower() + message[1:]
    return f"{message}, got {given!r}" if kind.endswith("_type") else message


def parse_config(data: Mapping[str, Any], source: str = "<memory>") -> Config:
    """Validate a decoded TOML document; raise ``ConfigError`` for the first problem."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(source, _key_path(first["loc"]), _reason(first)) from None
    _check_names(config, source)
    _check_users(config, source)
    _check_server(config, source)
    _check_pinned(config, source)
    check_memory_fits(config, {}, source)
    config._source = source
    return config


def _check_names(config: Config, source: str) -> None:
    seen: dict[str, str] = {}
    for name, model in config.models.items():
        for alias in [name, *model.aliases]:
            if not alias or alias != alias.strip():
                raise ConfigError(source, f"models.{name}", f"bad model name or alias {alias!r}")
            if alias in seen and seen[alias] != name:
                raise ConfigError(
                    source, f"models.{name}.aliases", f"{alias!r} is already used by {seen[alias]}"
                )
            if alias in seen and alias != name:
                raise ConfigError(source, f"models.{name}.aliases", f"{alias!r} is listed twice")
            seen[alias] = name


# The name status and metrics give every request without a configured user's key.
RESERVED_USER_NAME = "anonymous"
# The name model calls made in an MCP session opened with an admin key are counted as.
ADMIN_USER_NAME = "admin"


def _check_server(config: Config, source: str) -> None:
    server = config.server
    if bool(server.tls_cert) != bool(server.tls_key):
        raise ConfigError(
            source,
            "server.tls_key" if server.tls_cert else "server.tls_cert",
            "tls_cert and tls_key go together (both PEM paths, or both empty)",
        )
    if server.tls_client_ca and not server.tls_cert:
        raise ConfigError(
            source, "server.tls_client_ca", "client certificates need TLS: set tls_cert and tls_key"
        )
    if server.health_port and server.health_port == server.port:
        raise ConfigError(
            source, "server.health_port", "must differ from server.port (or 0 for none)"
        )
    socket_path = config.admin_socket_path
    if socket_path is not None:
        size = len(os.fsencode(socket_path))
        if size > UNIX_PATH_MAX:
            raise ConfigError(
                source,
                "server.admin_socket",
                f"{socket_path} is {size} bytes, over the {UNIX_PATH_MAX} a Unix socket path "
                'may have: choose a shorter state_dir or admin_socket, or "" for none',
            )
    if server.admin_group and not server.admin_group.strip():
        raise ConfigError(source, "server.admin_group", "must be a group name or empty")


def _check_users(config: Config, source: str) -> None:
    # Keys are secrets: a message says where a key is used again, never the key.
    owners = dict.fromkeys(config.server.api_keys, "server.api_keys")
    for name, user in config.users.items():
        path = f"users.{name}"
        if not name or name != name.strip():
            raise ConfigError(source, path, f"bad user name {name!r}")
        if name == RESERVED_USER_NAME:
            raise ConfigError(
                source, path, f"{name!r} is reserved for requests without a user's key"
            )
        if name == ADMIN_USER_NAME:
            raise ConfigError(
                source, path, f"{name!r} is reserved for model calls made with an admin key"
            )
        for key in user.api_keys:
            if key in owners:
                where = owners[key]
                reason = (
                    "a key is listed twice"
                    if where == path
                    else f"a key is already used by {where}"
                )
                raise ConfigError(source, f"{path}.api_keys", reason)
            owners[key] = path


def _check_pinned(config: Config, source: str) -> None:
    pinned = [name for name, model in config.models.items() if model.pinned]
    limit = config.supervisor.max_loaded
    if len(pinned) > limit:
        raise ConfigError(
            source,
            f"models.{pinned[limit]}.pinned",
            f"{len(pinned)} models are pinned ({', '.join(pinned)}) but max_loaded is {limit}: "
            "pinned models never stop, so they must all fit at once",
        )


def check_memory_fits(
    config: Config, figures: Mapping[str, Mapping[str, int]], source: str | None = None
) -> None:
    """Refuse a model that can never fit: larger than one of its devices' budgets, or than
    what the pinned models leave of it. ``figures`` holds what is known beyond the config
    (estimates, measurements: model -> device -> bytes); a declared size is used otherwise."""
    source = config.source if source is None else source
    budgets = config.supervisor.memory

    def need(name: str, device: str) -> int:
        known = figures.get(name, {})
        declared = config.models[name].declared_memory
        return known.get(device, declared if declared is not None else 0)

    for device, budget in budgets.items():
        users = [name for name, model in config.models.items() if device in model.devices]
        pinned = {name: need(name, device) for name in users if config.models[name].pinned}
        for name in users:
            size = need(name, device)
            if size > budget:
                raise ConfigError(
                    source,
                    f"models.{name}.memory",
                    f"needs {format_size(size)} on {device}, more than its budget of "
                    f"{format_size(budget)} (supervisor.memory): it could never start",
                )
            others = {other: held for other, held in pinned.items() if other != name}
            if others and size + sum(others.values()) > budget:
                left = budget - sum(others.values())
                raise ConfigError(
                    source,
                    f"models.{name}.memory",
                    f"needs {format_size(size)} on {device}, but the pinned models "
                    f"({', '.join(others)}) leave {format_size(max(left, 0))} of its "
                    f"{format_size(budget)} budget: it could never start",
                )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(source, "", "not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"invalid TOML: {exc}") from None
    return parse_config(data, source)


def resolved_dict(config: Config) -> dict[str, Any]:
    """The config as it will be used: paths expanded, placeholders filled but ``{port}``."""
    data: dict[str, Any] = config.model_dump()
    data["server"]["state_dir"] = str(config.state_dir)
    socket_path = config.admin_socket_path
    data["server"]["admin_socket"] = "" if socket_path is None else str(socket_path)
    for name, model in data["models"].items():
        values = placeholder_values(config, name, "{port}")
        model["cmd"] = [render(arg, values) for arg in model["cmd"]]
        model["env"] = {key: render(value, values) for key, value in model["env"].items()}
    return data
