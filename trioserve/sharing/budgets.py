"""Per-user budgets: requests and tokens per sliding minute, tokens per UTC day. Pure: no trio,
no I/O; every call is given the time.

The time is the wall clock in UNIX seconds (``time.time()``), for both windows: a day is a UTC
calendar day, which only the wall clock knows, and one clock for both keeps the two windows of
one answer consistent. A clock that steps back is absorbed: what happens then is counted in the
newest second already kept, never in one before it.

The minute is a sliding 60 s window of per-second buckets: a request or a token counted at time
``t`` leaves the window at ``floor(t) + 60``, so it counts for between 59 and 60 s. Each call
is O(1) (amortized: a bucket is added once and dropped once), but for the walks over at most
60 buckets that find when a window frees, which only a refused request or an answer's
``reset`` header makes.

Tokens are counted when an answer ends, requests when they are admitted: a user may go over a
token budget by what its requests in flight generate, never start a request while over it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from trioserve.config import UserConfig

__all__ = [
    "DAY",
    "HOUR",
    "WINDOW",
    "Budgets",
    "Limits",
    "Refusal",
    "Remaining",
    "UserBudget",
    "format_reset",
    "ratelimit_headers",
]

WINDOW = 60  # seconds: the sliding minute
HOUR = 3600  # seconds: the state store's usage rows are per UTC hour
DAY = 24 * HOUR  # seconds: a UTC calendar day (UNIX time has no leap seconds)


@dataclass(frozen=True, slots=True)
class Limits:
    """A user's budgets; 0 = none."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0

    @classmethod
    def of(cls, user: UserConfig) -> Limits:
        return cls(
            requests_per_minute=user.max_requests_per_minute,
            tokens_per_minute=user.max_tokens_per_minute,
            tokens_per_day=user.max_tokens_per_day,
        )

    @property
    def any(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.tokens_per_day)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not admitted: the budget that frees last, and when."""

    budget: str  # the config key: "max_tokens_per_minute", ...
    limit: int
    used: int
    retry_after: float  # seconds until every budget has room again


@dataclass(frozen=True, slots=True)
class Remaining:
    """A user's budgets now: (limit, remaining, seconds until back to the full limit) for
    each that is set, None for each that is not."""

    requests_per_minute: tuple[int, int, float] | None
    tokens_per_minute: tuple[int, int, float] | None
    tokens_per_day: tuple[int, int, float] | None

    def as_dict(self) -> dict[str, int]:
        """What remains of each budget that is set: ``/admin/status``'s ``remaining``."""
        found = {
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "tokens_per_day": self.tokens_per_day,
        }
        return {name: each[1] for name, each in found.items() if each is not None}

    @property
    def tokens(self) -> tuple[int, int, float] | None:
        """The token budget a client should pace itself by: the one with less left. Both run
        out together on a tie, and then the later reset is the true one (a request needs room
        in both)."""
        minute, day = self.tokens_per_minute, self.tokens_per_day
        if minute is None or day is None:
            return minute or day
        if minute[1] != day[1]:
            return minute if minute[1] < day[1] else day
        return minute if minute[2] > day[2] else day


class _Second:
    """What happened in one second of the minute window."""

    __slots__ = ("requests", "second", "tokens")

    def __init__(self, second: int) -> None:
        self.second = second
        self.requests = 0
        self.tokens = 0


class UserBudget:
    """One user's windows and limits. Kept for every configured user, with budgets or not,
    so that a budget a reload gives a user applies to what that user has already spent (and
    for a while for names not configured now: ``Budgets``)."""

    __slots__ = (
        "_day",
        "_day_tokens",
        "_last_request",
        "_last_tokens",
        "_requests",
        "_seconds",
        "_tokens",
        "limits",
    )

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits if limits is not None else Limits()
        self._seconds: deque[_Second] = deque()
        self._requests = 0  # in the minute window: the sum over _seconds
        self._tokens = 0
        self._day = 0  # the UTC day (days since the epoch) _day_tokens counts
        self._day_tokens = 0
        # The newest second with a request, with tokens: when the window empties (``reset``).
        self._last_request = self._last_tokens = -WINDOW

    # -- counting ---------------------------------------------------------------------------------

    def admit(self, now: float) -> Refusal | None:
        """Count a request if the user is under every budget; else why not (nothing counted)."""
        bucket = self._advance(now)
        limits = self.limits
        if limits.any:
            refusal = self._refusal(now)
            if refusal is not None:
                return refusal
        bucket.requests += 1
        self._requests += 1
        self._last_request = bucket.second
        return None

    def spend(self, now: float, tokens: int) -> None:
        """Count the tokens of an answer that ended (prompt + completion)."""
        if tokens <= 0:
            return
        bucket = self._advance(now)
        bucket.tokens += tokens
        self._tokens += tokens
        self._last_tokens = bucket.second
        self._day_tokens += tokens

    def add_day_tokens(self, day: int, tokens: int) -> None:
        """Tokens spent earlier on ``day`` (UTC days since the epoch): the state store's total
        at start, so a restart does not give a user a new day."""
        self._roll_day(day)
        if day == self._day:
            self._day_tokens += tokens

    # -- reading ----------------------------------------------------------------------------------

    def empty(self, now: float) -> bool:
        """True when nothing is counted in either window: forgetting it loses nothing."""
        return self.used(now) == (0, 0, 0)

    def used(self, now: float) -> tuple[int, int, int]:
        """(requests in the minute window, tokens in it, tokens today)."""
        self._advance(now)
        return self._requests, self._tokens, self._day_tokens

    def remaining(self, now: float) -> Remaining:
        self._advance(now)
        limits = self.limits
        requests = tokens = day = None
        if limits.requests_per_minute:
            left = max(0, limits.requests_per_minute - self._requests)
            requests = (limits.requests_per_minute, left, _empties_in(now, self._last_request))
        if limits.tokens_per_minute:
            left = max(0, limits.tokens_per_minute - self._tokens)
            tokens = (limits.tokens_per_minute, left, _empties_in(now, self._last_tokens))
        if limits.tokens_per_day:
            left = max(0, limits.tokens_per_day - self._day_tokens)
            reset = _next_day(now) - now if self._day_tokens else 0.0
            day = (limits.tokens_per_day, left, reset)
        return Remaining(requests, tokens, day)

    # -- inside -----------------------------------------------------------------------------------

    def _advance(self, now: float) -> _Second:
        """The bucket of ``now``, the window's old seconds dropped and the day rolled over."""
        second = int(now)
        seconds = self._seconds
        horizon = second - WINDOW
        while seconds and seconds[0].second <= horizon:
            gone = seconds.popleft()
            self._requests -= gone.requests
            self._tokens -= gone.tokens
        self._roll_day(second // DAY)
        if seconds and seconds[-1].second >= second:
            return seconds[-1]  # this second, or the clock stepped back
        bucket = _Second(second)
        seconds.append(bucket)
        return bucket

    def _roll_day(self, day: int) -> None:
        if day > self._day:
            self._day = day
            self._day_tokens = 0

    def _refusal(self, now: float) -> Refusal | None:
        """The budget that is spent and frees last, or None when every one has room."""
        limits = self.limits
        refusals: list[Refusal] = []
        if limits.requests_per_minute and self._requests >= limits.requests_per_minute:
            wait = self._frees_in(now, limits.requests_per_minute, requests=True)
            refusals.append(
                Refusal("max_requests_per_minute", limits.requests_per_minute, self._requests, wait)
            )
        if limits.tokens_per_minute and self._tokens >= limits.tokens_per_minute:
            wait = self._frees_in(now, limits.tokens_per_minute, requests=False)
            refusals.append(
                Refusal("max_tokens_per_minute", limits.tokens_per_minute, self._tokens, wait)
            )
        if limits.tokens_per_day and self._day_tokens >= limits.tokens_per_day:
            wait = _next_day(now) - now
            refusals.append(
                Refusal("max_tokens_per_day", limits.tokens_per_day, self._day_tokens, wait)
            )
        if not refusals:
            return None
        return max(refusals, key=lambda refusal: refusal.retry_after)

    def _frees_in(self, now: float, limit: int, *, requests: bool) -> float:
        """Seconds until the window holds less than ``limit`` (requests or tokens): the oldest
        seconds leave it one by one."""
        held = self._requests if requests else self._tokens
        for bucket in self._seconds:
            held -= bucket.requests if requests else bucket.tokens
            if held < limit:
                return bucket.second + WINDOW - now
        return 0.0  # not reached: once every second has left, the window holds nothing


def _empties_in(now: float, last: int) -> float:
    """Seconds until a window whose newest count is in second ``last`` holds none (OpenAI's
    ``reset``: back to the full limit)."""
    return max(0.0, last + WINDOW - now)


def _next_day(now: float) -> float:
    """The next UTC midnight after ``now``."""
    return (math.floor(now / DAY) + 1) * DAY


class Budgets:
    """Every configured user's ``UserBudget``, by user name; and the windows of names not
    configured now, kept aside so that a user a reload adds (or removes and adds again) goes
    on from what that name spent today instead of starting a fresh day."""

    def __init__(self, users: Mapping[str, UserConfig] | Iterable[str] = ()) -> None:
        self._users: dict[str, UserBudget] = {}
        # Names not configured now: users a reload removed, and names the state store has
        # today's usage for (``add_day_tokens``). Bounded by the names ever configured or
        # stored today, and windows that hold nothing are dropped at each ``set_users`` given
        # the time: what is kept is only what a name could still be counted.
        self._aside: dict[str, UserBudget] = {}
        self.set_users(users)

    def set_users(
        self, users: Mapping[str, UserConfig] | Iterable[str], now: float | None = None
    ) -> None:
        """The configured users, at start and on reload: a changed budget applies from the
        next request, to the windows as they are; a removed user's windows are kept aside,
        and a user added takes back those its name has (no store read: they were loaded at
        start). ``now``: the time, to drop aside windows that hold nothing any more."""
        limits = (
            {name: Limits.of(user) for name, user in users.items()}
            if isinstance(users, Mapping)
            else dict.fromkeys(users, Limits())
        )
        known = self._aside | self._users
        self._users = {}
        for name, each in limits.items():
            budget = known.pop(name, None) or UserBudget()
            budget.limits = each
            self._users[name] = budget
        for budget in known.values():
            budget.limits = Limits()  # not configured: no budgets, only what it spent
        self._aside = (
            known
            if now is None
            else {name: budget for name, budget in known.items() if not budget.empty(now)}
        )

    def get(self, name: str) -> UserBudget | None:
        """The budget of a configured user; None for everyone else (no budgets)."""
        return self._users.get(name)

    def known(self, name: str) -> UserBudget | None:
        """The windows of ``name``, configured or kept aside."""
        return self._users.get(name) or self._aside.get(name)

    def spend(self, name: str, now: float, tokens: int) -> None:
        """Count an answer's tokens against ``name``: a configured user's, or one a reload
        removed while its request ran (kept aside, even if its windows were dropped since:
        a request can outlast the minute). ``name`` is one that was configured: bounded."""
        if tokens <= 0:
            return
        budget = self.known(name)
        if budget is None:
            budget = self._aside[name] = UserBudget()
        budget.spend(now, tokens)

    def add_day_tokens(self, day: int, tokens_by_user: Mapping[str, int]) -> None:
        """Today's totals from the state store, at start: for every name in it, configured
        or not (a reload may configure it later)."""
        for name, tokens in tokens_by_user.items():
            budget = self.known(name)
            if budget is None:
                budget = self._aside[name] = UserBudget()
            budget.add_day_tokens(day, tokens)

    def remaining(self, now: float) -> dict[str, dict[str, int]]:
        """``{name: {"tokens_per_minute": n, ...}}`` for each user with a budget."""
        return {
            name: budget.remaining(now).as_dict()
            for name, budget in self._users.items()
            if budget.limits.any
        }


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes its ``x-ratelimit-reset-*`` headers: ``"0s"``, ``"250ms"``,
    ``"1s"``, ``"6m0s"``, ``"1h2m3s"`` (Go's format; whole seconds, rounded up, from 1 s)."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ratelimit_headers(remaining: Remaining) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-*`` headers for the budgets that are set.

    ``requests`` are the requests per minute. ``tokens`` are the token budget with less left
    (``Remaining.tokens``): with both a minute and a day budget, a client that paces itself on
    these headers must stop at whichever runs out first, and the limit and reset shown are that
    same budget's, so the three agree. A kind without a budget has no headers: there is no
    limit to tell.
    """
    headers: list[tuple[bytes, bytes]] = []
    for kind, found in (
        (b"requests", remaining.requests_per_minute),
        (b"tokens", remaining.tokens),
    ):
        if found is None:
            continue
        limit, left, reset = found
        headers += [
            (b"x-ratelimit-limit-" + kind, str(limit).encode()),
            (b"x-ratelimit-remaining-" + kind, str(left).encode()),
            (b"x-ratelimit-reset-" + kind, format_reset(reset).encode()),
        ]
    return headers
