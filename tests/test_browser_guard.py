"""The Host check (DNS rebinding) and the cross-site check, request by request."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.config import make_config
from trioserve.errors import ConfigError
from trioserve.gateway.browser_guard import BrowserGuard, host_name

OWN = "127.0.0.1:8600"


def headers(**fields: str) -> list[tuple[bytes, bytes]]:
    return [(key.replace("_", "-").encode(), value.encode()) for key, value in fields.items()]


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("127.0.0.1:8600", "127.0.0.1"),
        ("LOCALHOST:8600", "localhost"),
        ("[::1]:8600", "::1"),
        ("[::1]", "::1"),
        ("example.org", "example.org"),
    ],
)
def test_host_name_drops_the_port(host: str, name: str) -> None:
    assert host_name(host.encode()) == name


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:8600",
        "localhost:8600",
        "localhost",
        "[::1]:8600",
        "10.1.2.3:8600",  # an address: the browser was pointed at it, no name was rebound
        f"{socket.gethostname()}:8600",
        "x",  # a dotless name comes from this machine's resolver, never an attacker's zone
        "app.localhost:8600",  # browsers resolve *.localhost to loopback themselves
    ],
)
def test_own_names_and_addresses_pass(host: str) -> None:
    guard = BrowserGuard("127.0.0.1", [])
    assert guard.check("GET", headers(host=host)) is None


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8600", "localhost.evil.example", "127.0.0.1.nip.io"]
)
def test_another_name_is_refused_with_403(host: str) -> None:
    refused = BrowserGuard("127.0.0.1", []).check("GET", headers(host=host))
    assert refused is not None
    assert refused.status == 403
    assert "allowed_hosts" in refused.message


def test_configured_names_and_the_bind_name_pass() -> None:
    guard = BrowserGuard("gpu-box.lan", ["llm.example.com"])
    assert guard.check("GET", headers(host="LLM.example.com:443")) is None
    assert guard.check("GET", headers(host="gpu-box.lan:8600")) is None
    assert guard.check("GET", headers(host="other.example.com")) is not None


def test_star_turns_the_host_check_off() -> None:
    assert BrowserGuard("127.0.0.1", ["*"]).check("GET", headers(host="any.example")) is None


def test_no_host_header_is_not_a_browser() -> None:
    assert BrowserGuard("127.0.0.1", []).check("GET", []) is None


def test_a_client_that_is_not_a_browser_may_post_anything() -> None:
    # curl, the CLI and SDKs send neither Origin nor Sec-Fetch-Site.
    assert BrowserGuard("127.0.0.1", []).check("POST", headers(host=OWN)) is None


@pytest.mark.parametrize(
    "fields",
    [
        # A cross-site form post, and a no-cors fetch from another origin.
        {"origin": "http://evil.example", "content_type": "application/x-www-form-urlencoded"},
        {"origin": "http://evil.example", "content_type": "text/plain"},
        # Cross-origin even with JSON (it would have needed a preflight nobody answers).
        {"origin": "http://localhost:9999", "content_type": "application/json"},
        {"origin": "null", "content_type": "application/json"},
        {"sec_fetch_site": "cross-site", "content_type": "application/json"},
        {"sec_fetch_site": "same-site", "content_type": "application/json"},
        # Same origin, but a type a form could send: refused, a form could have made it.
        {"origin": f"http://{OWN}", "content_type": "text/plain"},
        {"origin": f"http://{OWN}", "sec_fetch_site": "same-origin"},
    ],
)
def test_browser_writes_from_elsewhere_or_without_json_are_refused(fields: dict[str, str]) -> None:
    refused = BrowserGuard("127.0.0.1", []).check("POST", headers(host=OWN, **fields))
    assert refused is not None
    assert refused.status == 403


def test_the_page_s_own_json_post_passes() -> None:
    fields = headers(
        host=OWN,
        origin=f"http://{OWN}",
        sec_fetch_site="same-origin",
        content_type="application/json",
    )
    assert BrowserGuard("127.0.0.1", []).check("POST", fields) is None


def test_reads_from_a_browser_need_no_json() -> None:
    fields = headers(host=OWN, origin="http://evil.example", sec_fetch_site="cross-site")
    # Without CORS headers the other site cannot read the answer; GET changes nothing.
    assert BrowserGuard("127.0.0.1", []).check("GET", fields) is None


@pytest.mark.parametrize("name", ["http://llm.example.com", "llm.example.com:443", "a/b", ""])
def test_allowed_hosts_takes_bare_names_only(name: str, state_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.allowed_hosts"):
        make_config(state_dir, server={"allowed_hosts": [name]})


def test_allowed_hosts_are_matched_without_case(state_dir: Path) -> None:
    config = make_config(state_dir, server={"allowed_hosts": ["LLM.Example.com"]})
    assert config.server.allowed_hosts == ["llm.example.com"]
