"""Generated bodies and headers against one daemon (issue 7): never a 500, never a hang, every
error in the OpenAI shape, and the daemon (and its model) healthy and quiet afterwards.

The daemon is the real console script, started once for the whole property: Hypothesis runs
its examples inside this one test, against that process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.config import daemon_config, echo_cmd

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
# Headers httpx sets itself from the body, or that would change the connection, not the request.
_MANAGED = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te"}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
messages = st.one_of(
    json_values,
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | json_values},
            optional={"content": st.text(max_size=50) | json_values},
        ),
        max_size=3,
    ),
)
requests = st.fixed_dictionaries(
    {"model": st.sampled_from(["echo", "parrot", "Echo", "echo ", ""]) | json_values},
    optional={
        "messages": messages,
        "prompt": st.text(max_size=50) | json_values,
        "input": st.text(max_size=50) | json_values,
        "stream": st.booleans() | json_values,
        "max_tokens": st.integers(min_value=-5, max_value=20) | json_values,
        "temperature": json_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    requests.map(lambda value: json.dumps(value).encode()),
    # Almost valid: a valid request with a few bytes changed.
    st.tuples(requests, st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=3))
    .map(lambda t: (json.dumps(t[0]).encode(), t[1], t[2]))
    .map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]),
)
header_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,24}\Z").filter(
    lambda name: name.lower() not in _MANAGED
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60
).map(str.strip)
headers = st.dictionaries(header_names, header_values, max_size=6) | st.fixed_dictionaries(
    {},
    optional={
        "content-type": st.sampled_from(
            ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]
        ),
        "content-encoding": st.sampled_from(["gzip", "br", "identity", "x"]),
        "authorization": header_values,
        "expect": st.just("100-continue"),
        "accept": st.sampled_from(["text/event-stream", "*/*", "application/json"]),
    },
)


def _check(response: httpx.Response, sent: dict[str, Any]) -> None:
    status = response.status_code
    # The model is healthy throughout: no 5xx of any kind, least of all a 500.
    assert status < 500, (status, response.text[:500], sent)
    if status >= 400:
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "code"}, (error, sent)
        assert isinstance(error["message"], str) and error["message"], (error, sent)


@pytest.mark.slow
def test_generated_bodies_and_headers_never_get_500_or_hang(
    tmp_path: Path, spawn_daemon: Any
) -> None:
    config, url = daemon_config(
        tmp_path / "property.toml",
        tmp_path / "state",
        {"echo": {"cmd": echo_cmd("--tokens", "3"), "aliases": ["parrot"]}},
        server={"max_body_bytes": 4096},
    )
    daemon = spawn_daemon(config, url)
    daemon.load("echo")
    pid = daemon.status()["models"]["echo"]["pid"]
    with httpx.Client(base_url=url, timeout=15, trust_env=False) as client:

        @settings(
            max_examples=200,
            deadline=None,
            database=None,
            derandomize=True,  # the same examples on every run: a failure is reproducible
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(path=st.sampled_from(PATHS), body=bodies, extra=headers)
        def throw(path: str, body: bytes, extra: dict[str, str]) -> None:
            sent = {"path": path, "body": body[:300], "headers": extra}
            # A timeout here (httpx.TimeoutException) is a hang, and fails the property.
            with client.stream("POST", path, content=body, headers=extra) as response:
                response.read()
            _check(response, sent)

        throw()

        assert client.get("/health").status_code == 200
        model = client.get("/admin/status").json()["models"]["echo"]
    # Nothing crashed: the daemon runs, its model is the one it loaded, and nothing went
    # unhandled into its log.
    assert daemon.proc.poll() is None
    assert model["pid"] == pid and model["state"] == "ready" and model["restarts"] == 0
    log = daemon.stderr()
    assert "Traceback" not in log and "Error in ASGI Framework" not in log, log[-3000:]
