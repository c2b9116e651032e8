"""Certificates made in the test (``trustme``): a CA, the daemon's certificate for 127.0.0.1
and localhost, a client certificate, and the client-side SSL contexts that trust them."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import trustme


class Certificates:
    """A test CA and what it issued, written as PEM files under ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_pem = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert = directory / "server.crt"
        self.server_key = directory / "server.key"
        self.server_cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
        server.private_key_pem.write_to_path(str(self.server_key))
        self.client = self.ca.issue_cert("client@example.org")
        # The client's key and chain in one file, as ``load_cert_chain`` and curl take it.
        self.client_pem = directory / "client.pem"
        self.client.private_key_and_cert_chain_pem.write_to_path(str(self.client_pem))

    def server_settings(self, *, client_ca: bool = False) -> dict[str, Any]:
        """The ``[server]`` keys for HTTPS with these files (and client certificates)."""
        settings: dict[str, Any] = {
            "tls_cert": str(self.server_cert),
            "tls_key": str(self.server_key),
        }
        if client_ca:
            settings["tls_client_ca"] = str(self.ca_pem)
        return settings

    def client_context(self, *, with_cert: bool = False) -> ssl.SSLContext:
        """A client context that trusts the test CA (and presents the client certificate)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if with_cert:
            self.client.configure_cert(context)
        return context
