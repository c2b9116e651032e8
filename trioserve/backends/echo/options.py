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
    parallel: int = 4  # slots that /slots, /props and /metrics report; nothing waits for one
    hold_mib: int = 0  # MiB allocated and touched before the port is bound, held until exit


@dataclass(slots=True)
class EchoStats:
    """Generations (requests of every API that generates) by outcome, and the tokens of the
    completed ones (for ``/metrics``).

    ``started == completed + cancelled + (generations in flight)`` holds at every moment.
    """

    started: int = 0
    completed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    predicted_tokens: int = 0

    @property
    def in_flight(self) -> int:
        """Generations started and neither completed nor cancelled yet."""
        return self.started - self.completed - self.cancelled

    def to_json(self) -> bytes:
        """The counters as the ``/stats`` endpoint answers them."""
        return (
            f'{{"started":{self.started},"completed":{self.completed},'
            f'"cancelled":{self.cancelled}}}'
        ).encode()
