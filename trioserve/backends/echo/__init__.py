"""An OpenAI-compatible model server that echoes its input: the default model and the test double.

It is a raw ASGI 3 application served by Hypercorn's trio worker, so it runs on the same stack as
the gateway, and it is the denominator of the benchmarks (1000 concurrent streams, 64 streams at
full speed). Per-token work is therefore a dictionary look-up of pre-encoded bytes and one ASGI
send; JSON is built with string formatting, never with ``json.dumps`` per chunk.

Run it with ``python -m trioserve.backends.echo --port 8081``; ``--help`` lists the options that
make it slow to start, slow to answer, or crash, for fault tests.

It runs as a child process of the daemon, so it imports nothing of the rest of trioserve. Its
modules, pure ones first:

- ``model``: what the model says (``reply_tokens``, ``embed``), whatever the API.
- ``request``: what parsing every API's request shares, and ``RequestError``.
- ``generation``, ``replies``: chat and completions (the request, then the answer's bytes);
  ``generation``'s docstring lists the request fields and test triggers they understand.
- ``embeddings``: ``/v1/embeddings``.
- ``asgi``, ``app``: the ASGI application (routes, delays, disconnects, counters); its
  docstring says how an API is added.
- ``options``, ``server``, ``cli``: options and counters, serving with Hypercorn, the command
  line (``__main__``).
"""

from trioserve.backends.echo.app import EchoApp, build_app
from trioserve.backends.echo.cli import main, parse_args
from trioserve.backends.echo.model import embed, reply_tokens
from trioserve.backends.echo.options import EchoOptions, EchoStats
from trioserve.backends.echo.server import serve

__all__ = [
    "EchoApp",
    "EchoOptions",
    "EchoStats",
    "build_app",
    "embed",
    "main",
    "parse_args",
    "reply_tokens",
    "serve",
]
