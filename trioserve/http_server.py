"""Hypercorn settings for the gateway: limits that keep slow or hostile clients cheap."""

from __future__ import annotations

import logging

from hypercorn.config import Config as HypercornConfig

from .config import Config

__all__ = ["hypercorn_config"]

# Hypercorn's read_timeout applies to every read of a connection, also while a long response
# streams and the client rightly sends nothing, so it must outlast any request. Slow request
# bodies are bounded by the relay's own body deadline instead.
READ_TIMEOUT_MARGIN = 30
# The kernel's accept queue: 1,000 clients connecting at once must not see SYN drops (each
# costs a second of retransmit). Capped by net.core.somaxconn.
BACKLOG = 4096
KEEP_ALIVE_TIMEOUT = 5
# Request line plus headers; larger gets 431 from h11 / 400, never our memory.
MAX_HEADER_BYTES = 32 * 1024


def hypercorn_config(config: Config) -> HypercornConfig:
    hyper = HypercornConfig()
    host = config.server.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    hyper.bind = [f"{host}:{config.server.port}"]
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.graceful_timeout = config.server.shutdown_grace
    hyper.read_timeout = int(config.server.request_timeout) + READ_TIMEOUT_MARGIN
    hyper.backlog = BACKLOG
    hyper.h11_max_incomplete_size = MAX_HEADER_BYTES
    # An idle keep-alive connection is closed after this long. Short, because a client that
    # vanished after a streamed response leaves its socket in CLOSE_WAIT until then.
    hyper.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    # Our own deadlines cover requests; Hypercorn's would cut long streams.
    return hyper
