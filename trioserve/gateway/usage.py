"""Per-user accounting: requests, tokens and queue waits, for ``/admin/status`` and ``/metrics``;
the budgets they are counted against; the per-hour totals waiting to be written to the state
store (``usage_keeper.py`` writes them).

Labels are bounded: a user is its configured name or ``anonymous``, never a raw ``user``
string or address (an unbounded label set breaks Prometheus).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from trioserve.config import ADMIN_USER_NAME, UserConfig
from trioserve.host.store import UsageRow
from trioserve.sharing.budgets import HOUR, Budgets
from trioserve.sharing.identity import ANONYMOUS_NAME, User

__all__ = [
    "StreamUsage",
    "UsageBook",
    "UserTotals",
    "generated",
    "usage_in_body",
    "usage_in_stream_tail",
    "usage_of",
]

# One event longer than this (no blank line for 16 MiB) is not looked into for usage: the
# bound on what a stream may make us keep. A usage event with llama-server's timings, or with
# many choices, is a few KB.
MAX_EVENT_BYTES = 16 * 1024 * 1024
_WAIT_BUCKETS = (0.005, 0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(slots=True)
class UserTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class UsageBook:
    """Totals per user name since the daemon started, and their Prometheus series; the users'
    budgets; what is not yet in the state store."""

    def __init__(
        self, registry: CollectorRegistry, users: Mapping[str, UserConfig] | Iterable[str]
    ) -> None:
        self.totals: dict[str, UserTotals] = {}
        # Completion tokens per model since start: the activity chart's tokens/s.
        self.completion_by_model: dict[str, int] = {}
        self.budgets = Budgets()
        # Not yet written to the state store: (UTC hour, user, model) → [requests, prompt,
        # completion]. One dict update per request; a task takes it whole each second.
        self._pending: dict[tuple[int, str, str], list[int]] = {}
        self.set_users(users)
        self._requests = Counter(
            "trioserve_user_requests",
            "Relayed requests by user, model and HTTP status",
            ["user", "model", "status"],
            registry=registry,
        )
        self._tokens = Counter(
            "trioserve_user_tokens",
            "Tokens by user, model and kind (prompt or completion), from the upstream's usage",
            ["user", "model", "kind"],
            registry=registry,
        )
        self._wait = Histogram(
            "trioserve_user_queue_wait_seconds",
            "Time a request waited for a slot of its model",
            ["user", "model"],
            registry=registry,
            buckets=_WAIT_BUCKETS,
        )

    def set_users(self, users: Mapping[str, UserConfig] | Iterable[str]) -> None:
        """The configured users (at start and on reload): a removed user's totals go (its
        budget windows are kept aside, ``Budgets.set_users``), a changed budget applies from
        the next request. No I/O: a reload's apply calls it."""
        names = [*users, ANONYMOUS_NAME]
        if ADMIN_USER_NAME in self.totals:
            names.append(ADMIN_USER_NAME)  # shown once an admin session made a model call
        self.totals = {name: self.totals.get(name, UserTotals()) for name in names}
        self.budgets.set_users(users, time.time())

    def take_pending(self) -> list[UsageRow]:
        """What finished since the last call, per hour, user and model; forgotten here."""
        pending, self._pending = self._pending, {}
        return [UsageRow(*key, *counts) for key, counts in pending.items()]

    def restore_pending(self, rows: Iterable[UsageRow]) -> None:
        """Rows a write could not store, kept for the next one."""
        for row in rows:
            self._add_pending(
                (row.hour, row.user, row.model),
                row.requests,
                row.prompt_tokens,
                row.completion_tokens,
            )

    def _add_pending(
        self, key: tuple[int, str, str], requests: int, prompt: int, completion: int
    ) -> None:
        counts = self._pending.get(key)
        if counts is None:
            self._pending[key] = [requests, prompt, completion]
        else:
            counts[0] += requests
            counts[1] += prompt
            counts[2] += completion

    def waited(self, user: User, model: str, seconds: float) -> None:
        self._wait.labels(user.name, model).observe(seconds)

    def finished(self, user: User, model: str, status: int, usage: tuple[int, int] | None) -> None:
        name = user.name
        totals = self.totals.get(name)
        if totals is None and name == ADMIN_USER_NAME:
            # The reserved name of model calls made in an admin MCP session.
            totals = self.totals[name] = UserTotals()
        elif totals is None:  # a user removed by a reload while its request ran
            totals = self.totals[ANONYMOUS_NAME]
        totals.requests += 1
        self._requests.labels(name, model, str(status)).inc()
        now = time.time()
        prompt, completion = usage if usage is not None else (0, 0)
        # Under the user's own name even when a reload removed it meanwhile (a name that
        # was configured: bounded), in the store as in its day's window, so that the name
        # configured again, now or after a restart, is counted the same.
        self._add_pending((int(now // HOUR), name, model), 1, prompt, completion)
        if usage is None:
            return
        if name != ANONYMOUS_NAME:
            self.budgets.spend(name, now, prompt + completion)
        totals.prompt_tokens += prompt
        totals.completion_tokens += completion
        self.completion_by_model[model] = self.completion_by_model.get(model, 0) + completion
        self._tokens.labels(name, model, "prompt").inc(prompt)
        self._tokens.labels(name, model, "completion").inc(completion)


def usage_of(answer: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI answer or chunk object, if it has usage."""
    if not isinstance(answer, dict):
        return None
    usage = answer.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", 0)
    completion = usage.get("completion_tokens", 0)
    if not (_count(prompt) and _count(completion)):
        return None
    return prompt, completion


def usage_in_body(body: bytes) -> tuple[int, int] | None:
    """The usage of a whole JSON answer (None when it is not JSON or has none)."""
    if b'"usage"' not in body:
        return None
    try:
        return usage_of(json.loads(body))
    except (ValueError, RecursionError):
        return None


def usage_in_stream_tail(tail: bytes) -> tuple[int, int] | None:
    """The usage in the last ``data:`` event that has one, within some complete events."""
    for event in reversed(tail.replace(b"\r\n", b"\n").split(b"\n\n")):
        line = event.strip()
        if not line.startswith(b"data:") or b'"usage"' not in line:
            continue
        try:
            found = usage_of(json.loads(line[5:]))
        except (ValueError, RecursionError):
            continue
        if found is not None:
            return found
    return None


class StreamUsage:
    """Finds a streamed answer's usage as its chunks go by: the last complete event that
    carries one, however long it is (llama-server's final event has its ``timings``; ``n``
    choices make it longer still). No per-chunk JSON: a chunk is searched for the end of an
    event and for ``"usage"``, and only the event that has it is kept."""

    __slots__ = ("_event", "_found", "_last", "_skipping", "events")

    def __init__(self) -> None:
        self._event = bytearray()  # the event in progress: everything after the last blank line
        self._found = b""  # the last complete event that mentions "usage"
        self._skipping = False  # the event in progress outgrew MAX_EVENT_BYTES
        self._last = b""  # the last read: whether the stream got to its [DONE] (``whole``)
        # `data:` lines seen: what `counted()` falls back on (one C-level scan per read; a
        # marker split between two reads is missed, which an estimate can afford).
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        self.events += chunk.count(b"data:")
        self._last = chunk
        event = self._event
        if not event:
            # The usual read: whole events. Looked at in place; only a partial event at its
            # end is copied.
            end = _after_last_blank_line(chunk, len(chunk))
            if end >= 0:
                at = _last_usage(chunk, 0, end)
                if at >= 0:
                    self._found = chunk[max(_after_last_blank_line(chunk, at), 0) : end]
                if end < len(chunk):
                    event += chunk[end:]
                return
        event += chunk
        if b"\n" in chunk:
            end = _after_last_blank_line(event, len(event))
            if end >= 0:
                # The rest of an event too long to keep ends at the first blank line.
                start = _after_first_blank_line(event) if self._skipping else 0
                at = _last_usage(event, start, end)
                if at >= 0:
                    begins = max(_after_last_blank_line(event, at), start)
                    self._found = bytes(event[begins:end])
                self._skipping = False
                del event[:end]
        if len(event) > MAX_EVENT_BYTES:
            # Only its last bytes matter now: a blank line may begin in them.
            self._skipping = True
            del event[:-3]

    def usage(self) -> tuple[int, int] | None:
        """(prompt, completion) from the last event with usage; also an unterminated last
        event (a stream that ended without its blank line)."""
        if not self._skipping and b'"usage"' in self._event:
            found = usage_in_stream_tail(bytes(self._event))
            if found is not None:
                return found
        return usage_in_stream_tail(self._found) if self._found else None

    @property
    def whole(self) -> bool:
        """True once the last read ended in ``data: [DONE]``: every event of the answer came."""
        return _ends_in_done(self._last)

    def counted(self) -> tuple[int, int] | None:
        """What an answer cut short (client gone, deadline, crash) is counted as: ``usage()``,
        or else ``generated(events)``; but an answer that got to its ``[DONE]`` was whole,
        and counts only its usage, as a complete answer does (see ``generated``)."""
        found = self.usage()
        if found is not None or self.whole:
            return found
        return generated(self.events)


def generated(events: int) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a streamed answer cut short (client gone, deadline,
    crash) before its usage, from its number of ``data:`` events. Only for those: a complete
    answer without usage counts none (the upstream said nothing of its tokens), and its
    ``[DONE]``, its finish and usage events are no tokens.

    The usage comes in the last event, which such an answer never got; llama-server, vLLM and
    OpenAI send one token per event, so the events are the tokens generated until then. (Give
    or take one: OpenAI's and vLLM's first event, and llama-server's since late 2024, carry
    only the role. ``[DONE]`` is never among them: an answer that got it was whole.) vLLM
    with ``stream_options.continuous_usage_stats`` sends a usage in every event, and
    ``usage()`` finds the last one: then that is exact. The prompt is not counted: without
    the model's tokenizer the relay cannot tell its length (a budget then holds what was
    generated).
    """
    return (0, events) if events > 0 else None


def _ends_in_done(chunk: bytes) -> bool:
    """Whether ``chunk`` (a read of an event stream) ends in the ``data: [DONE]`` event. Its
    last bytes only: a JSON event ends in ``}``, never in ``[DONE]``."""
    tail = chunk[-24:].rstrip()
    if not tail.endswith(b"[DONE]"):
        return False
    before = tail[:-6].rstrip()
    return not before or before.endswith(b"data:")


# A blank line ends an event: "\n\n", or with CRs "\n\r\n" (which "\r\n\r\n" ends in).
_BLANK_LINES = (b"\n\n", b"\n\r\n")


def _after_last_blank_line(data: bytes | bytearray, before: int) -> int:
    """Where the text after the last blank line (an event's end) before ``before`` starts;
    -1 when there is none."""
    ends = [at + len(blank) for blank in _BLANK_LINES if (at := data.rfind(blank, 0, before)) >= 0]
    return max(ends) if ends else -1


def _after_first_blank_line(data: bytearray) -> int:
    ends = [at + len(blank) for blank in _BLANK_LINES if (at := data.find(blank)) >= 0]
    return min(ends) if ends else len(data)


def _last_usage(data: bytes | bytearray, start: int, end: int) -> int:
    """Where the last ``"usage"`` with a value (not ``null``, as OpenAI's chunks before the
    last one have it) is in ``data[start:end]``; -1 when there is none."""
    at = data.rfind(b'"usage"', start, end)
    while at >= 0 and bytes(data[at + 7 : at + 14]).replace(b" ", b"").startswith(b":null"):
        at = data.rfind(b'"usage"', start, at)
    return at


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
