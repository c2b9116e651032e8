"""HTTPS on the main port (``[server] tls_cert``, ``tls_key``, ``tls_client_ca``), with
certificates made in the test: the OpenAI SDK over it, HTTP/2 where the client offers it,
client certificates, and a TLS client that takes nothing is cut off as a plain one is."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import httpx2
import openai
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.worker_context import WorkerContext

from tests.support.config import echo_config
from tests.support.daemon import leak_checked_daemon, running_daemon
from tests.support.http import chat, read_sse, sse_lines
from tests.support.status import backend_stats, direct_client, wait_for_stats
from tests.support.tls import Certificates
from trioserve.daemon import DaemonError, run_daemon
from trioserve.server import hypercorn_serve
from trioserve.server.hypercorn_serve import LeanTCPServer

# openai's stream iterator stops at [DONE] without closing its inner async generator; under
# trio that is reported when the generator is collected. Not a leak of ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning"
)


# A bound against a hang while a cancellation is awaited, not a measure of how fast it is.
UNTIL_CANCELLED = 30


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("tls"))


def _https(url: str, context: ssl.SSLContext, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, verify=context, timeout=30, trust_env=False, **options)


async def test_the_openai_sdk_over_https(state_dir: Path, certs: Certificates) -> None:
    config = echo_config(state_dir, "--tokens", "4", server=certs.server_settings())
    async with leak_checked_daemon(config) as (info, _):
        assert info.url.startswith("https://127.0.0.1:"), info.url
        # The SDK's own HTTP client (openai 3 is built on httpx2), trusting the test CA.
        async with httpx2.AsyncClient(verify=certs.client_context(), timeout=30) as sdk_http:
            sdk = openai.AsyncOpenAI(
                base_url=info.url + "/v1", api_key="unused", max_retries=0, http_client=sdk_http
            )
            reply = await sdk.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hello"}]
            )
            assert reply.choices[0].message.content == "hello hello hello hello"
            stream = await sdk.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            text = ""
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            assert text.split() == ["hi"] * 4
            await stream.close()
        async with _https(info.url, certs.client_context()) as http:
            # /health on the main port is the app's over TLS, from the same liveness.
            health = await http.get("/health")
            assert (health.status_code, health.json()) == (200, {"status": "ok"})
        # Plain HTTP to the HTTPS port gets no answer: it is not served in the clear.
        async with httpx.AsyncClient(timeout=5, trust_env=False) as plain:
            with pytest.raises(httpx.TransportError):
                await plain.get(info.url.replace("https://", "http://") + "/health")
        # A client that does not trust the daemon's CA refuses it.
        async with httpx.AsyncClient(base_url=info.url, timeout=5, trust_env=False) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.get("/health")


async def test_http2_where_the_client_offers_it(state_dir: Path, certs: Certificates) -> None:
    config = echo_config(state_dir, "--tokens", "3", server=certs.server_settings())
    async with running_daemon(config) as (info, _):
        async with _https(info.url, certs.client_context(), http2=True) as http:
            models = await http.get("/v1/models")
            assert (models.http_version, models.status_code) == ("HTTP/2", 200)
            # A stream and a request at once on the one HTTP/2 connection.
            async with http.stream(
                "POST", "/v1/chat/completions", json=chat(stream=True, text="x")
            ) as streamed:
                other = await http.post("/v1/chat/completions", json=chat(text="y"))
                assert other.http_version == "HTTP/2"
                assert other.json()["choices"][0]["message"]["content"] == "y y y"
                lines = await read_sse(streamed)
            assert streamed.http_version == "HTTP/2"
            assert lines[-1] == "data: [DONE]", lines
        async with _https(info.url, certs.client_context()) as http1:
            assert (await http1.get("/v1/models")).http_version == "HTTP/1.1"


async def test_a_client_certificate_is_required_when_tls_client_ca_is_set(
    state_dir: Path, certs: Certificates
) -> None:
    config = echo_config(state_dir, server=certs.server_settings(client_ca=True))
    async with running_daemon(config) as (info, _):
        async with _https(info.url, certs.client_context()) as without:
            # TLS 1.3 ends the handshake on the client's side before the server has checked
            # the client's certificate: the refusal may come as a failed read.
            with pytest.raises(httpx.TransportError):
                await without.get("/v1/models")
        async with _https(info.url, certs.client_context(with_cert=True)) as with_cert:
            assert (await with_cert.get("/v1/models")).status_code == 200
        # A certificate from another CA is refused too.
        stranger = Certificates(state_dir.parent / "stranger")
        context = certs.client_context()
        stranger.client.configure_cert(context)
        async with _https(info.url, context) as foreign:
            with pytest.raises(httpx.TransportError):
                await foreign.get("/v1/models")


@pytest.mark.parametrize(
    ("broken", "named"),
    [("missing", "tls_cert"), ("key_of_another", "tls_key"), ("garbage_ca", "tls_client_ca")],
)
async def test_unusable_tls_files_refuse_the_start_naming_them(
    state_dir: Path, certs: Certificates, broken: str, named: str
) -> None:
    settings = certs.server_settings(client_ca=True)
    if broken == "missing":
        settings["tls_cert"] = str(state_dir / "nowhere.crt")
    elif broken == "key_of_another":
        other = Certificates(state_dir.parent / "other")
        settings["tls_key"] = str(other.server_key)
    else:
        garbage = state_dir / "garbage.pem"
        garbage.write_text("not a certificate\n")
        settings["tls_client_ca"] = str(garbage)
    with pytest.raises(DaemonError) as refused:
        await run_daemon(echo_config(state_dir, server=settings))
    message = str(refused.value)
    assert message.startswith("cannot use the TLS files"), message
    assert f"{named} {settings[named]}" in message, message
    # Refused before any socket was made (the TLS files are checked first): no admin socket.
    assert not (state_dir / "admin.sock").exists()


class _Protocol:
    """The protocol side of a connection, recording what the server tells it."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def handle(self, event: Event) -> None:
        self.events.append(event)


async def test_a_tls_client_that_takes_nothing_is_cut_off(
    certs: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hypercorn_serve, "SEND_LIMIT", 0.3)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certs.server_cert, certs.server_key)
    left, right = socket.socketpair()
    for end in (left, right):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server_stream = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(left)), server_context, server_side=True
    )
    client_stream = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(right)),
        certs.client_context(),
        server_hostname="localhost",
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_stream.do_handshake)
        await server_stream.do_handshake()
    server = LeanTCPServer(None, HypercornConfig(), WorkerContext(None), {}, server_stream)
    protocol = _Protocol()
    server.protocol = protocol  # type: ignore[assignment]
    # The client reads nothing: a send far larger than every buffer on the way never ends.
    with trio.fail_after(5):
        await server.protocol_send(RawData(b"x" * 4_000_000))
    assert [type(event) for event in protocol.events] == [Closed]
    with pytest.raises(trio.ClosedResourceError):
        await server_stream.send_all(b"more")
    await client_stream.transport_stream.aclose()


async def test_a_client_gone_mid_stream_over_tls_cancels_upstream(
    state_dir: Path, certs: Certificates
) -> None:
    config = echo_config(
        state_dir, "--tokens", "200", "--token-delay", "0.05", server=certs.server_settings()
    )
    async with running_daemon(config) as (info, _), direct_client() as direct:
        async with (
            _https(info.url, certs.client_context()) as https,
            https.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as streamed,
        ):
            # Kept referenced: a generator left by ``break`` would be collected and close
            # the response (and so the connection) at once.
            lines = sse_lines(streamed)
            # The first chunk (after ": loading model" comments, if the start took a second).
            first = await lines.__anext__()
            while first.startswith(":"):
                first = await lines.__anext__()
            assert first.startswith("data: {")
            async with _https(info.url, certs.client_context()) as other:
                status = (await other.get("/admin/status")).json()
            port = status["models"]["echo"]["port"]
            assert (await backend_stats(port, direct))["cancelled"] == 0
            del lines
        # HTTP/1.1 over TLS: the closed connection says it. The bound is only against a hang:
        # that the backend was cancelled and did not complete (200 tokens take 10 s) is what
        # shows the relay noticed the client gone.
        stats = await wait_for_stats(port, "cancelled", 1, within=UNTIL_CANCELLED, client=direct)
        assert stats["completed"] == 0


async def test_an_http2_stream_reset_cancels_upstream_and_keeps_the_connection(
    state_dir: Path, certs: Certificates
) -> None:
    # httpx never resets an HTTP/2 stream it stops reading; browsers, curl and Go do.
    config = echo_config(
        state_dir, "--tokens", "200", "--token-delay", "0.05", server=certs.server_settings()
    )
    async with running_daemon(config) as (info, _), direct_client() as direct:
        host, port = info.url.removeprefix("https://").rsplit(":", 1)
        context = certs.client_context()
        context.set_alpn_protocols(["h2"])
        stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=context)
        async with stream:
            await stream.do_handshake()
            assert stream.selected_alpn_protocol() == "h2"
            h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            h2conn.initiate_connection()

            async def request(stream_id: int, method: str, path: str, body: bytes) -> None:
                h2conn.send_headers(
                    stream_id,
                    [
                        (":method", method),
                        (":path", path),
                        (":scheme", "https"),
                        (":authority", "localhost"),
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                    ],
                    end_stream=not body,
                )
                if body:
                    h2conn.send_data(stream_id, body, end_stream=True)
                await stream.send_all(h2conn.data_to_send())

            async def until(stream_id: int, kind: type[h2.events.Event]) -> bytes:
                """Read until ``stream_id`` gets an event of ``kind``; its data so far."""
                data = b""
                with trio.fail_after(10):
                    while True:
                        for event in h2conn.receive_data(await stream.receive_some(65536)):
                            if getattr(event, "stream_id", None) != stream_id:
                                continue
                            if isinstance(event, h2.events.DataReceived):
                                data += event.data
                                h2conn.acknowledge_received_data(
                                    event.flow_controlled_length, stream_id
                                )
                            if isinstance(event, kind):
                                await stream.send_all(h2conn.data_to_send())
                                return data
                        await stream.send_all(h2conn.data_to_send())

            await request(1, "POST", "/v1/chat/completions", json.dumps(chat(stream=True)).encode())
            assert (await until(1, h2.events.DataReceived)).startswith(b"data: {")
            await request(3, "GET", "/admin/status", b"")
            backend = json.loads(await until(3, h2.events.StreamEnded))["models"]["echo"]["port"]
            assert (await backend_stats(backend, direct))["cancelled"] == 0
            h2conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
            await stream.send_all(h2conn.data_to_send())
            # Cancelled, not completed (200 tokens take 10 s): the reset reached the relay.
            # No timing assert: the daemon runs in this test's loop.
            stats = await wait_for_stats(
                backend, "cancelled", 1, within=UNTIL_CANCELLED, client=direct
            )
            assert stats["completed"] == 0
            # The connection serves on.
            await request(5, "GET", "/v1/models", b"")
            assert json.loads(await until(5, h2.events.StreamEnded))["object"] == "list"
