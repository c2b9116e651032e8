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
from typing import Any, Final, Literal, TypeGuard

from prometheus_client import CollectorRegistry, Counter, Histogram

from trioserve.config import ADMIN_USER_NAME, UserConfig
from trioserve.host.store import UsageRow
from trioserve.sharing.budgets import HOUR, Budgets
from trioserve.sharing.identity import ANONYMOUS_NAME, User

__all__ = [
    "StreamUsage",
    "UsageBook",
    "UsageKind",
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

# Which API a stream speaks, for ``StreamUsage``: OpenAI's chat and text completions (the
# default), the Responses API, Anthropic's Messages, or llama.cpp's own ``/completion`` (and
# ``/infill``), whose every event counts ``tokens_evaluated`` and ``tokens_predicted``.
UsageKind = Literal["chat", "completion", "responses", "messages", "native"]


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
    """(prompt, completion) tokens from an answer, chunk or event object, if it has usage:
    OpenAI's ``usage`` (``prompt_tokens``, ``completion_tokens``; an embedding's or rerank's
    has no completion), the Responses and Messages APIs' (``input_tokens``,
    ``output_tokens``; also in a Responses event's ``response`` and ``message_start``'s
    ``message``), llama.cpp's own ``tokens_evaluated`` and ``tokens_predicted``."""
    if not isinstance(answer, dict):
        return None
    usage = answer.get("usage")
    if usage is None:
        if "tokens_predicted" in answer:
            return _counts(answer.get("tokens_evaluated", 0), answer["tokens_predicted"])
        inner = answer.get("response") or answer.get("message")
        if isinstance(inner, dict):
            usage = inner.get("usage")
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage or "output_tokens" in usage:
        prompt = usage.get("input_tokens", 0)
        # Anthropic counts the prompt tokens read from its cache, and those written to it,
        # apart from input_tokens (OpenAI's counts include them): all of them were the prompt.
        for key in _CACHED_INPUT:
            cached = usage.get(key)
            if _count(cached) and _count(prompt):
                prompt += cached
        return _counts(prompt, usage.get("output_tokens", 0))
    return _counts(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))


def usage_in_body(body: bytes) -> tuple[int, int] | None:
    """The usage of a whole JSON answer (None when it is not JSON or has none). A JSON list
    (llama.cpp's ``/completion`` for several prompts: one result each) counts them all."""
    if b'"usage"' not in body and b'"tokens_predicted"' not in body:
        return None
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(answer, list):
        return usage_of(answer)
    found = [usage for usage in map(usage_of, answer) if usage is not None]
    if not found:
        return None
    return sum(prompt for prompt, _ in found), sum(completion for _, completion in found)


def usage_in_stream_tail(tail: bytes) -> tuple[int, int] | None:
    """The usage in the last event that has one, within some complete events."""
    found = _last_event(tail, b'"usage"')
    return usage_of(found) if found is not None else None


class StreamUsage:
    """Finds a streamed answer's usage as its chunks go by: the last complete event that
    carries one, however long it is (llama-server's final event has its ``timings``; ``n``
    choices make it longer still). No per-chunk JSON: a chunk is searched for the end of an
    event and for ``"usage"``, and only the event that has it is kept.

    ``kind`` is the API the stream speaks (``UsageKind``; None: OpenAI's chat or completions).
    A Responses stream has its usage in its last event, ``response.completed``; a Messages
    stream has the input tokens in ``message_start`` and the output tokens in the last
    ``message_delta``: the first event with usage is kept too, for that kind. llama.cpp's own
    stream counts the tokens in every event (``"tokens_predicted"`` is looked for instead).
    """

    __slots__ = (
        "_event",
        "_first",
        "_found",
        "_kind",
        "_last",
        "_marker",
        "_needle",
        "_skipping",
        "events",
    )

    def __init__(self, kind: UsageKind | None = None) -> None:
        self._kind: UsageKind = kind if kind is not None else "chat"
        self._needle = b'"tokens_predicted"' if kind == "native" else b'"usage"'
        # What counts the tokens generated: one C-level scan per read (a marker split between
        # two reads is missed, which an estimate can afford). Every `data:` line of an OpenAI
        # or llama.cpp stream is one; of the others, their deltas only, by their quoted type
        # (a quote inside a JSON string is escaped: the text generated cannot match it).
        self._marker = _TOKEN_MARKER.get(self._kind, b"data:")
        self._event = bytearray()  # the event in progress: everything after the last blank line
        self._found = b""  # the last complete event that mentions the needle, and those after
        # Messages: the first such event (message_start) and those after; b"" until found.
        self._first: bytes | None = b"" if kind == "messages" else None
        self._skipping = False  # the event in progress outgrew MAX_EVENT_BYTES
        self._last = b""  # the last read: whether the stream got to its end (``whole``)
        self.events = 0  # token events seen: what `counted()` falls back on

    def feed(self, chunk: bytes) -> None:
        self.events += chunk.count(self._marker)
        self._last = chunk
        event = self._event
        if not event:
            # The usual read: whole events. Looked at in place; only a partial event at its
            # end is copied.
            end = _after_last_blank_line(chunk, len(chunk))
            if end >= 0:
                at = _last_usage(chunk, 0, end, self._needle)
                if at >= 0:
                    self._found = chunk[max(_after_last_blank_line(chunk, at), 0) : end]
                    if self._first == b"":
                        self._keep_first(chunk, 0, end)
                if end < len(chunk):
                    event += chunk[end:]
                return
        event += chunk
        if b"\n" in chunk:
            end = _after_last_blank_line(event, len(event))
            if end >= 0:
                # The rest of an event too long to keep ends at the first blank line.
                start = _after_first_blank_line(event) if self._skipping else 0
                at = _last_usage(event, start, end, self._needle)
                if at >= 0:
                    begins = max(_after_last_blank_line(event, at), start)
                    self._found = bytes(event[begins:end])
                    if self._first == b"":
                        self._keep_first(event, start, end)
                self._skipping = False
                del event[:end]
        if len(event) > MAX_EVENT_BYTES:
            # Only its last bytes matter now: a blank line may begin in them.
            self._skipping = True
            del event[:-3]

    def _keep_first(self, data: bytes | bytearray, start: int, end: int) -> None:
        """Keeps the first event with usage in ``data[start:end]`` (there is one)."""
        at = data.find(self._needle, start, end)
        self._first = bytes(data[max(_after_last_blank_line(data, at), start) : end])

    def usage(self) -> tuple[int, int] | None:
        """(prompt, completion) from the last event with usage (and for Messages, the
        first); also an unterminated last event (a stream that ended without its blank
        line)."""
        needle = self._needle
        found: Any = None
        if not self._skipping and needle in self._event:
            found = _last_event(bytes(self._event), needle)
        if found is None and self._found:
            found = _last_event(self._found, needle)
        if self._kind != "messages":
            return usage_of(found)
        # Cumulative counts: the last message_delta's replace message_start's, as the
        # anthropic SDK merges them.
        if not isinstance(found, dict) or found.get("type") != "message_delta":
            return None
        merged = dict(self._start_usage())
        delta = found.get("usage")
        if isinstance(delta, dict):
            merged.update((key, value) for key, value in delta.items() if value is not None)
        return usage_of({"usage": merged})

    def _start_usage(self) -> dict[str, Any]:
        """The usage ``message_start`` reported (the input tokens); {} before it came."""
        start = _first_event(self._first, self._needle) if self._first else None
        if not isinstance(start, dict) or start.get("type") != "message_start":
            return {}
        message = start.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        return usage if isinstance(usage, dict) else {}

    @property
    def whole(self) -> bool:
        """True once the stream got to its end: the last read ended in ``data: [DONE]``;
        the last event with usage is ``response.completed`` (or ``.incomplete``,
        ``.failed``); the last read has ``message_stop``; the last event of llama.cpp's own
        stream has ``"stop": true``. Then every event of the answer came."""
        kind = self._kind
        if kind == "responses":
            head = self._found[:_HEAD_BYTES]
            return any(end in head for end in _RESPONSE_ENDS)
        if kind == "messages":
            return b'"message_stop"' in self._last
        if kind == "native":
            found = _last_event(self._found, self._needle) if self._found else None
            return isinstance(found, dict) and found.get("stop") is True
        return _ends_in_done(self._last)

    def counted(self) -> tuple[int, int] | None:
        """What an answer cut short (client gone, deadline, crash) is counted as: ``usage()``,
        or else ``generated(events)`` (with the prompt tokens ``message_start`` reported);
        but an answer that got to its end was whole, and counts only its usage, as a
        complete answer does (see ``generated``)."""
        found = self.usage()
        if found is not None or self.whole:
            return found
        prompt = usage_of({"usage": self._start_usage()}) if self._first else None
        return generated(self.events, prompt[0] if prompt is not None else 0)


def generated(events: int, prompt: int = 0) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a streamed answer cut short (client gone, deadline,
    crash) before its usage, from its number of token events. Only for those: a complete
    answer without usage counts none (the upstream said nothing of its tokens), and its
    ``[DONE]``, its finish and usage events are no tokens.

    The usage comes in the last event, which such an answer never got; llama-server, vLLM and
    OpenAI send one token per event, so the events are the tokens generated until then. (Give
    or take one: OpenAI's and vLLM's first event, and llama-server's since late 2024, carry
    only the role. ``[DONE]`` is never among them: an answer that got it was whole.) vLLM
    with ``stream_options.continuous_usage_stats`` sends a usage in every event, and
    ``usage()`` finds the last one: then that is exact. The prompt is counted only when the
    stream told it before its end (``prompt``: Messages' ``message_start``): without the
    model's tokenizer the relay cannot tell its length (a budget then holds what was
    generated).
    """
    return (prompt, events) if events > 0 or prompt > 0 else None


# The tokens generated, one per event of these (every `data:` line of the others).
_TOKEN_MARKER: Final[dict[str, bytes]] = {
    # response.output_text.delta, .reasoning_text.delta, .function_call_arguments.delta, ...
    "responses": b'.delta"',
    "messages": b'"content_block_delta"',
}
# The Responses events that end a stream, with the response and its usage.
_RESPONSE_ENDS: Final = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')
# Where an event's type is: near its start (its `event:` line, the start of its data).
_HEAD_BYTES: Final = 200
# Anthropic's prompt tokens that input_tokens leaves out.
_CACHED_INPUT: Final = ("cache_read_input_tokens", "cache_creation_input_tokens")


def _ends_in_done(chunk: bytes) -> bool:
    """Whether ``chunk`` (a read of an event stream) ends in the ``data: [DONE]`` event. Its
    last bytes only: a JSON event ends in ``}``, never in ``[DONE]``."""
    tail = chunk[-24:].rstrip()
    if not tail.endswith(b"[DONE]"):
        return False
    before = tail[:-6].rstrip()
    return not before or before.endswith(b"data:")


def _events_with(tail: bytes, needle: bytes) -> list[bytes]:
    """The data of each event in ``tail`` that mentions ``needle``, in order."""
    found = []
    for event in tail.replace(b"\r\n", b"\n").split(b"\n\n"):
        if needle not in event:
            continue
        data = [
            line[6:] if line[5:6] == b" " else line[5:]
            for line in event.strip().split(b"\n")
            if line.startswith(b"data:")
        ]
        if data:
            found.append(b"\n".join(data))
    return found


def _parsed(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _last_event(tail: bytes, needle: bytes) -> Any:
    """The last event in ``tail`` whose data mentions ``needle`` and has usage, parsed."""
    for data in reversed(_events_with(tail, needle)):
        parsed = _parsed(data)
        if usage_of(parsed) is not None:
            return parsed
    return None


def _first_event(tail: bytes, needle: bytes) -> Any:
    """The first event in ``tail`` whose data mentions ``needle`` and parses, parsed."""
    for data in _events_with(tail, needle):
        parsed = _parsed(data)
        if isinstance(parsed, dict):
            return parsed
    return None


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


def _last_usage(data: bytes | bytearray, start: int, end: int, needle: bytes) -> int:
    """Where the last key ``needle`` (``"usage"``) with a value (not ``null``, as OpenAI's
    chunks before the last one have it) is in ``data[start:end]``; -1 when there is none. A
    string that is no key (a token ``usage`` is ``"usage"`` in its event) is not followed by
    a colon."""
    at = data.rfind(needle, start, end)
    while at >= 0:
        value = at + len(needle)
        after = bytes(data[value : value + 7]).replace(b" ", b"")
        if not after.startswith(b":null") and after.startswith(b":"):
            return at
        at = data.rfind(needle, start, at)
    return at


def _counts(prompt: object, completion: object) -> tuple[int, int] | None:
    if _count(prompt) and _count(completion):
        return prompt, completion
    return None


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
