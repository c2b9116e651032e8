"""An OpenAI-compatible model server that echoes its input: the default model and the test double.

It is a raw ASGI 3 application served by Hypercorn's trio worker, so it runs on the same stack as
the gateway, and it is the denominator of the benchmarks (1000 concurrent streams, 64 streams at
full speed). Per-token work is therefore a dictionary look-up of pre-encoded bytes and one ASGI
send; JSON is built with string formatting, never with ``json.dumps`` per chunk.

Run it with ``python -m trioserve.backends.echo --port 8081``; ``--help`` lists the options that
make it slow to start, slow to answer, or crash, for fault tests.

It speaks every API llama-server speaks, so that trioserve's relay of each can be tested
without a model: OpenAI's chat, completions, embeddings, Responses and audio; Anthropic's
Messages; rerank; llama.cpp's own ``/completion``, ``/infill``, ``/tokenize``, ``/detokenize``,
``/apply-template``, ``/slots``, ``/props`` and ``/metrics``.

It runs as a child process of the daemon, so it imports nothing of the rest of trioserve. Its
modules, pure ones first:

- ``model``, ``vocab``: what the model says (``reply_tokens``, ``embed``), whatever the API, and
  its tokenizer.
- ``request``, ``wire``: what parsing every API's request shares, and ``RequestError``; what
  their answers' bytes share.
- ``generation``, ``replies``: chat and completions (the request, then the answer's bytes);
  ``generation``'s docstring lists the request fields and test triggers they understand.
- ``work``: what the app needs of any generated answer (``Work``).
- one module per later API: ``embeddings``, ``responses``, ``messages``, ``native``
  (``/completion``, ``/infill``), ``rerank``, ``transcription``, ``speech``, ``tokens``
  (tokenize, detokenize, apply-template), ``status`` (slots, props, metrics).
- ``asgi``, ``runner``, ``app``: the ASGI application (routes; the timing of generations:
  delays, disconnects, counters); ``app``'s docstring says how an API is added.
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
