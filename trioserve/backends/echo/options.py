"""How the echo server behaves, and what it counts: shared by the app and the command line."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EchoOptions", "EchoStats"]


@dataclass(frozen=True, slots=True)
class EchoOptions:
    """How the echo server behaves; every field has a command-line option of the same name."""

    host: str = "127.0.0.1"
    port: int = 0
    tokens: int = 8
    token_delay: float = 0.0
    startup_delay: float = 0.0
    crash_after: int | None = None
    response_delay: float = 0.0
    model_name: str = "echo"


@dataclass(slots=True)
class EchoStats:
    """Generations (chat and completions requests) by outcome.

    ``started == completed + cancelled + (generations in flight)`` holds at every moment.
    """

    started: int = 0
    completed: int = 0
    cancelled: int = 0

    def to_json(self) -> bytes:
        """The counters as the ``/stats`` endpoint answers them."""
        return (
            f'{{"started":{self.started},"completed":{self.completed},'
            f'"cancelled":{self.cancelled}}}'
        ).encode()
