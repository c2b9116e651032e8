"""The command line: ``python -m trioserve.backends.echo --port N [options]`` (``__main__``).

``--help`` lists the options that make the server slow to start, slow to answer, or crash,
for fault tests.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Iterable

import trio

from trioserve.backends.echo.options import EchoOptions
from trioserve.backends.echo.server import serve

__all__ = ["main", "parse_args"]


async def _serve_until_signalled(options: EchoOptions) -> None:
    # The receiver is open before the socket is bound, so a SIGTERM sent as soon as /health
    # answers can never meet Python's default handler.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def first_signal() -> None:
            async for _ in signals:
                return

        await serve(options, shutdown_trigger=first_signal)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 seconds or more, not {text}")
    return value


def parse_args(argv: Iterable[str] | None = None) -> EchoOptions:
    """Options from the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog="python -m trioserve.backends.echo",
        description="An OpenAI-compatible server whose model echoes the last user message.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, required=True, help="port to bind (0: any free port)")
    parser.add_argument(
        "--tokens", type=_non_negative_int, default=8, help="reply length in tokens (default: 8)"
    )
    parser.add_argument(
        "--token-delay", type=_seconds, default=0.0, help="seconds per generated token"
    )
    parser.add_argument(
        "--startup-delay",
        type=_seconds,
        default=0.0,
        help="seconds during which /health answers 503 loading, as llama-server does",
    )
    parser.add_argument(
        "--crash-after",
        type=_positive_int,
        default=None,
        help="exit abruptly with status 1 after this many streamed token chunks in total",
    )
    parser.add_argument(
        "--response-delay",
        type=_seconds,
        default=0.0,
        help="extra seconds a non-streaming answer waits, as a slow LLM call (also a streamed "
        "one that asks for usage: how trioserve relays a non-streaming request)",
    )
    parser.add_argument("--model-name", default="echo", help="model id in answers (default: echo)")
    parser.add_argument(
        "--parallel",
        type=_positive_int,
        default=4,
        help="slots that /slots, /props and /metrics report, as llama-server's --parallel; "
        "generations beyond them are shown as deferred but never wait (default: 4)",
    )
    parser.add_argument(
        "--hold-mib",
        type=_non_negative_int,
        default=0,
        help="MiB of memory to allocate and touch before binding the port, held until exit, so "
        "that the process's RSS/PSS grows by as much as a model's weights would (default: 0)",
    )
    args = parser.parse_args(None if argv is None else list(argv))
    return EchoOptions(
        host=args.host,
        port=args.port,
        tokens=args.tokens,
        token_delay=args.token_delay,
        startup_delay=args.startup_delay,
        crash_after=args.crash_after,
        response_delay=args.response_delay,
        model_name=args.model_name,
        parallel=args.parallel,
        hold_mib=args.hold_mib,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the echo server until SIGTERM or SIGINT, then exit 0 after a graceful shutdown."""
    trio.run(_serve_until_signalled, parse_args(argv))
