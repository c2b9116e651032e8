"""Configs for tests: validated ones for a daemon in this process, TOML files for a daemon
subprocess, and the model commands that go in them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from tests.support.ports import free_port, port_range
from trioserve.config import Config, parse_config

# -- model commands ------------------------------------------------------------------------------

_ECHO = ["{python}", "-m", "trioserve.backends.echo", "--port", "{port}"]


def echo_cmd(*options: str) -> list[str]:
    """The echo backend's ``cmd`` with ``options``, e.g. ``echo_cmd("--token-delay", "0.1")``."""
    return [*_ECHO, *options]


def script_cmd(script: str, *args: str) -> list[str]:
    """A model ``cmd`` running the Python source ``script`` with ``args`` (``"{port}"`` among
    them is filled in; the script's own braces are not placeholders)."""
    return ["{python}", "-c", script.replace("{", "{{").replace("}", "}}"), *args]


# A tiny HTTP server for supervisor tests: /health answers 200 at once (no trio, no Hypercorn,
# so it starts in ~50 ms). Options after the port:
#   --ignore-sigterm   SIGTERM does nothing (a child that must be SIGKILLed)
#   --slow-exit S      on SIGTERM, wait S seconds, then exit 0 (a slow but polite child)
#   --record PATH      write argv, pid, pgid, sid and environment to PATH as JSON first
#   --unhealthy-probes N   /health answers 503 the first N times (a model loading: the
#                      supervisor probes every 25 ms of its clock, so N sets a mocked start time)
# Anything else is ignored, so argv handling can be checked with arbitrary extra arguments.
HEALTH_SERVER = r"""
import http.server, json, os, signal, sys, time
port, opts = int(sys.argv[1]), sys.argv[2:]
if "--ignore-sigterm" in opts:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "--slow-exit" in opts:
    delay = float(opts[opts.index("--slow-exit") + 1])
    def slow_exit(signum, frame):
        time.sleep(delay)
        os._exit(0)
    signal.signal(signal.SIGTERM, slow_exit)
if "--record" in opts:
    with open(opts[opts.index("--record") + 1], "w") as f:
        json.dump({"argv": sys.argv, "pid": os.getpid(), "pgid": os.getpgid(0),
                   "sid": os.getsid(0), "env": dict(os.environ)}, f)
unhealthy = int(opts[opts.index("--unhealthy-probes") + 1]) if "--unhealthy-probes" in opts else 0
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global unhealthy
        if self.path == "/health" and unhealthy > 0:
            unhealthy -= 1
            self.send_response(503)
        else:
            self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
print("serving on", port, flush=True)
server.serve_forever()
"""


def health_server_cmd(*options: str) -> list[str]:
    """A model ``cmd`` running ``HEALTH_SERVER`` on ``{port}`` with ``options``."""
    return script_cmd(HEALTH_SERVER, "{port}", *options)


_MODEL_SERVER = """
import http.server, json, socket, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # /health, for the supervisor
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
%s
    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def model_server_cmd(do_post: str) -> list[str]:
    """A model ``cmd``: a tiny HTTP server whose POST handler is ``do_post`` (Python source,
    run with ``self`` and the request ``body`` in scope; ``json`` and ``socket`` imported)."""
    script = _MODEL_SERVER % textwrap.indent(textwrap.dedent(do_post), " " * 8)
    return script_cmd(script, "{port}")


class SpawnCounter:
    """Counts model starts in the child itself: each start appends a line to a file, then
    execs the real backend (so the count cannot be faked by our own bookkeeping)."""

    _WRAPPER = (
        "import os, sys\n"
        "path, port, flag, rest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]\n"
        "with open(path, 'a') as f:\n"
        "    f.write('x\\n')\n"
        "if flag and os.path.exists(flag):\n"
        "    print('refusing to start: ' + flag + ' exists', flush=True)\n"
        "    sys.exit(2)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'trioserve.backends.echo',"
        " '--port', port, *rest])\n"
    )

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / f"spawns-{name}.txt"

    def cmd(self, name: str, *echo_options: str, fail_while: Path | None = None) -> list[str]:
        """A cmd that counts under ``name``, then runs the echo backend with ``echo_options``;
        it exits with code 2 instead while the file ``fail_while`` exists."""
        flag = str(fail_while) if fail_while is not None else ""
        return script_cmd(self._WRAPPER, str(self.path(name)), "{port}", flag, *echo_options)

    def count(self, name: str) -> int:
        path = self.path(name)
        return len(path.read_text().splitlines()) if path.exists() else 0


# -- configs -------------------------------------------------------------------------------------


def _sections(
    state_dir: Path,
    port: int,
    models: dict[str, dict[str, Any]] | None,
    server: dict[str, Any] | None,
    supervisor: dict[str, Any] | None,
    mcp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    sections: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "state_dir": str(state_dir),
            **(server or {}),
        },
        "supervisor": {
            "port_range": port_range(),
            "stop_grace": 2,
            "start_timeout": 20,
            **(supervisor or {}),
        },
        "models": models if models is not None else {"echo": {"cmd": echo_cmd()}},
    }
    if mcp is not None:
        sections["mcp"] = mcp
    return sections


# A daemon subprocess of a test that is not about MCP leaves the endpoint off: it spares the
# SDK's import (~0.6 s of CPU) at each start, and a suite starts many. A daemon in the test's
# own process keeps the default (the import is done once per worker).
NO_MCP = {"enabled": False}


def make_config(
    state_dir: Path,
    models: dict[str, dict[str, Any]] | None = None,
    *,
    server: dict[str, Any] | None = None,
    supervisor: dict[str, Any] | None = None,
) -> Config:
    """A validated config on port 0 (any free port) with a private port range for the models;
    ``models`` defaults to one plain ``echo``."""
    return parse_config(_sections(state_dir, 0, models, server, supervisor), "test.toml")


def echo_config(
    state_dir: Path,
    *echo_options: str,
    name: str = "echo",
    server: dict[str, Any] | None = None,
    supervisor: dict[str, Any] | None = None,
    **settings: Any,
) -> Config:
    """``make_config`` with one model, ``name``, running the echo backend with ``echo_options``
    and the model ``settings`` (``max_concurrency=1``, ...)."""
    models = {name: {"cmd": echo_cmd(*echo_options), **settings}}
    return make_config(state_dir, models, server=server, supervisor=supervisor)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"no TOML for {value!r}")


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write ``{"section": {...}, "models": {"name": {...}}}`` as TOML."""
    lines: list[str] = []
    for section, body in data.items():
        if section == "models":
            for name, model in body.items():
                lines.append(f"[models.{json.dumps(name)}]")
                lines.extend(f"{key} = {_toml_value(val)}" for key, val in model.items())
        else:
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(val)}" for key, val in body.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def daemon_config(
    path: Path,
    state_dir: Path,
    models: dict[str, dict[str, Any]] | None = None,
    *,
    server: dict[str, Any] | None = None,
    supervisor: dict[str, Any] | None = None,
    mcp: dict[str, Any] | None = NO_MCP,
) -> tuple[Path, str]:
    """``make_config``'s config as a TOML file, for a daemon subprocess on a free loopback
    port; returns (path, url)."""
    port = free_port()
    write_config(path, state_dir, port, models, server=server, supervisor=supervisor, mcp=mcp)
    return path, f"http://127.0.0.1:{port}"


def write_config(
    path: Path,
    state_dir: Path,
    port: int,
    models: dict[str, dict[str, Any]] | None = None,
    *,
    server: dict[str, Any] | None = None,
    supervisor: dict[str, Any] | None = None,
    mcp: dict[str, Any] | None = NO_MCP,
) -> Path:
    """``make_config``'s config as a TOML file for a daemon on ``port``; a file rewritten in
    place keeps its models' ports with ``supervisor={"port_range": ...}``."""
    return write_toml(path, _sections(state_dir, port, models, server, supervisor, mcp))
