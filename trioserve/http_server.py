"""Hypercorn settings for the gateway: limits that keep slow or hostile clients cheap."""

from __future__ import annotations

import logging

from hypercorn.config import Config as HypercornConfig

from .config import Config

__all__ = ["hypercorn_config"]

# Hypercorn closes a connection whose request has not arrived after this long (its default is
# no limit at all, which lets slowloris clients hold sockets forever).
READ_TIMEOUT = 30
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
    hyper.read_timeout = READ_TIMEOUT
    hyper.h11_max_incomplete_size = MAX_HEADER_BYTES
    hyper.keep_alive_timeout = 75
    # Our own deadlines cover requests; Hypercorn's would cut long streams.
    return hyper
