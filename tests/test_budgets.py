"""Budgets as pure logic (``trioserve.sharing.budgets``), on made-up times: the sliding minute,
the UTC day, what remains, when a refused request may retry, OpenAI's headers; and what a
cut-short stream counts as (``trioserve.gateway.usage``)."""

from __future__ import annotations

import pytest

from trioserve.config import parse_config
from trioserve.gateway.usage import StreamUsage
from trioserve.sharing.budgets import (
    DAY,
    Budgets,
    Limits,
    Remaining,
    UserBudget,
    format_reset,
    ratelimit_headers,
)

# Noon, UTC, some day: a minute either way stays in that day.
NOON = 20_000 * DAY + 12 * 3600.0


def budget(**limits: int) -> UserBudget:
    return UserBudget(Limits(**limits))


# -- the sliding minute --------------------------------------------------------------------------


def test_requests_per_minute_refuse_the_next_until_the_oldest_leaves_the_window() -> None:
    user = budget(requests_per_minute=3)
    for offset in (0.2, 10.5, 20.9):
        assert user.admit(NOON + offset) is None
    refusal = user.admit(NOON + 30.0)
    assert refusal is not None
    assert refusal.budget == "max_requests_per_minute"
    assert (refusal.limit, refusal.used) == (3, 3)
    # The first request was counted in second NOON+0, which leaves at NOON+60.
    assert refusal.retry_after == pytest.approx(30.0)
    assert user.admit(NOON + 59.99) is not None
    assert user.admit(NOON + 60.0) is None
    # Refused requests were not counted: only the one just admitted joined the two left.
    assert user.used(NOON + 60.0)[0] == 3


def test_tokens_per_minute_are_counted_when_an_answer_ends_and_free_oldest_first() -> None:
    user = budget(tokens_per_minute=1000)
    assert user.admit(NOON) is None
    user.spend(NOON + 1.5, 600)
    assert user.admit(NOON + 2) is None  # 600 < 1000: admitted
    user.spend(NOON + 5.2, 500)
    refusal = user.admit(NOON + 10)
    assert refusal is not None
    assert (refusal.budget, refusal.limit, refusal.used) == ("max_tokens_per_minute", 1000, 1100)
    # Below 1000 once the 600 of second NOON+1 have left: at NOON+61.
    assert refusal.retry_after == pytest.approx(51.0)
    assert user.admit(NOON + 60.9) is not None
    assert user.admit(NOON + 61.0) is None


def test_a_window_holds_about_sixty_seconds_however_many_seconds_it_spans() -> None:
    user = budget(tokens_per_minute=10_000)
    for second in range(200):
        user.spend(NOON + second + 0.5, 10)
    # The last 60 seconds (140..199) are in the window, nothing before.
    assert user.used(NOON + 199.5)[1] == 600
    assert user.used(NOON + 1000)[1] == 0


def test_a_clock_that_steps_back_counts_in_the_newest_second_kept() -> None:
    user = budget(requests_per_minute=2)
    assert user.admit(NOON + 30) is None
    assert user.admit(NOON + 5) is None  # stepped back 25 s
    assert user.used(NOON + 30)[0] == 2
    refusal = user.admit(NOON + 31)
    assert refusal is not None and refusal.retry_after == pytest.approx(59.0)


# -- the UTC day ---------------------------------------------------------------------------------


def test_tokens_per_day_refuse_until_the_next_utc_midnight() -> None:
    user = budget(tokens_per_day=5000)
    late = NOON + 11 * 3600  # 23:00 UTC
    user.spend(NOON, 3000)
    user.spend(late, 2500)
    refusal = user.admit(late + 10)
    assert refusal is not None
    assert (refusal.budget, refusal.used) == ("max_tokens_per_day", 5500)
    assert refusal.retry_after == pytest.approx(3600 - 10)
    midnight = (NOON // DAY + 1) * DAY
    assert user.admit(midnight - 0.001) is not None
    assert user.admit(midnight) is None
    assert user.used(midnight)[2] == 0


def test_the_day_total_from_the_store_counts_for_today_only() -> None:
    budgets = Budgets(parse_config({"users": {"alice": {"max_tokens_per_day": 100}}}).users)
    today = int(NOON // DAY)
    budgets.add_day_tokens(today - 1, {"alice": 1000})  # yesterday's: no weight today
    alice = budgets.get("alice")
    assert alice is not None
    assert alice.admit(NOON) is None
    budgets.add_day_tokens(today, {"alice": 100, "ghost": 5})
    refusal = alice.admit(NOON + 1)
    assert refusal is not None and refusal.used == 100


def test_retry_after_is_the_budget_that_frees_last() -> None:
    user = budget(requests_per_minute=1, tokens_per_day=10)
    assert user.admit(NOON) is None
    user.spend(NOON, 50)
    refusal = user.admit(NOON + 1)
    assert refusal is not None
    assert refusal.budget == "max_tokens_per_day"
    assert refusal.retry_after == pytest.approx(12 * 3600 - 1)


# -- reload --------------------------------------------------------------------------------------


def test_a_budget_set_by_a_reload_applies_to_what_was_already_spent() -> None:
    budgets = Budgets(parse_config({"users": {"alice": {}, "bob": {}}}).users)
    alice = budgets.get("alice")
    assert alice is not None
    for _ in range(5):
        assert alice.admit(NOON) is None
    alice.spend(NOON, 700)
    budgets.set_users(
        parse_config({"users": {"alice": {"max_tokens_per_minute": 500}, "bob": {}}}).users
    )
    assert budgets.get("alice") is alice
    refusal = alice.admit(NOON + 1)
    assert refusal is not None and refusal.used == 700
    # Raised again: the next request is in.
    budgets.set_users(parse_config({"users": {"alice": {"max_tokens_per_minute": 800}}}).users)
    assert alice.admit(NOON + 2) is None
    assert budgets.get("bob") is None  # removed: no budget any more
    assert budgets.get("anonymous") is None


def test_a_user_removed_and_added_again_goes_on_from_what_it_spent() -> None:
    users = parse_config({"users": {"alice": {"max_tokens_per_day": 1000}, "bob": {}}}).users
    budgets = Budgets(users)
    alice = budgets.get("alice")
    assert alice is not None and alice.admit(NOON) is None
    alice.spend(NOON, 600)
    budgets.set_users(parse_config({"users": {"bob": {}}}).users, NOON + 1)
    assert budgets.get("alice") is None
    # A request admitted before the reload ends after it: still counted against the name.
    known = budgets.known("alice")
    assert known is alice and not known.limits.any
    alice.spend(NOON + 2, 300)
    budgets.set_users(users, NOON + 3600)  # the minute has passed, the day has not
    again = budgets.get("alice")
    assert again is alice
    assert again.used(NOON + 3600) == (0, 0, 900)
    assert again.remaining(NOON + 3600).as_dict() == {"tokens_per_day": 100}


def test_the_stores_names_not_configured_are_kept_for_a_reload_that_adds_them() -> None:
    budgets = Budgets(parse_config({"users": {"alice": {}}}).users)
    today = int(NOON // DAY)
    budgets.add_day_tokens(today, {"alice": 10, "carol": 700})
    assert budgets.get("carol") is None  # not configured: no budget
    assert budgets.remaining(NOON) == {}
    users = parse_config({"users": {"alice": {}, "carol": {"max_tokens_per_day": 1000}}}).users
    budgets.set_users(users, NOON)
    carol = budgets.get("carol")
    assert carol is not None
    assert carol.remaining(NOON).as_dict() == {"tokens_per_day": 300}


def test_windows_kept_aside_go_once_they_hold_nothing() -> None:
    budgets = Budgets(parse_config({"users": {"alice": {}, "bob": {}}}).users)
    alice = budgets.get("alice")
    assert alice is not None and alice.admit(NOON) is None
    alice.spend(NOON, 5)
    budgets.add_day_tokens(int(NOON // DAY), {"ghost": 7})
    only_bob = parse_config({"users": {"bob": {}}}).users
    budgets.set_users(only_bob, NOON + 1)
    assert budgets.known("alice") is alice and budgets.known("ghost") is not None
    # A day later both windows are empty: nothing to remember, nothing kept.
    budgets.set_users(only_bob, NOON + DAY)
    assert budgets.known("alice") is None and budgets.known("ghost") is None
    # Without the time, nothing is dropped (nothing could be told empty).
    budgets.add_day_tokens(int(NOON // DAY) + 1, {"ghost": 7})
    budgets.set_users(only_bob)
    assert budgets.known("ghost") is not None


def test_status_shows_what_remains_of_each_budget_that_is_set() -> None:
    users = parse_config(
        {
            "users": {
                "alice": {"max_tokens_per_minute": 1000, "max_requests_per_minute": 10},
                "bob": {"max_tokens_per_day": 50},
                "carol": {},
            }
        }
    ).users
    budgets = Budgets(users)
    alice = budgets.get("alice")
    assert alice is not None and alice.admit(NOON) is None
    alice.spend(NOON, 1200)
    assert budgets.remaining(NOON + 1) == {
        "alice": {"requests_per_minute": 9, "tokens_per_minute": 0},
        "bob": {"tokens_per_day": 50},
    }


# -- headers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-3, "0s"),
        (0.25, "250ms"),
        (0.0004, "1ms"),
        (1, "1s"),
        (1.2, "2s"),
        (59.5, "1m0s"),
        (360, "6m0s"),
        (3723, "1h2m3s"),
        (86400, "24h0m0s"),
    ],
)
def test_resets_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_headers_give_requests_and_the_token_budget_with_less_left() -> None:
    user = budget(requests_per_minute=60, tokens_per_minute=1000, tokens_per_day=100_000)
    assert user.admit(NOON + 0.5) is None
    user.spend(NOON + 0.5, 300)
    headers = dict(ratelimit_headers(user.remaining(NOON + 20.5)))
    assert headers == {
        b"x-ratelimit-limit-requests": b"60",
        b"x-ratelimit-remaining-requests": b"59",
        b"x-ratelimit-reset-requests": b"40s",
        # The minute has 700 left, the day 99,700: the minute is what the client must respect.
        b"x-ratelimit-limit-tokens": b"1000",
        b"x-ratelimit-remaining-tokens": b"700",
        b"x-ratelimit-reset-tokens": b"40s",
    }
    # With the day nearly spent, the day's budget is the one shown.
    user = budget(tokens_per_minute=1000, tokens_per_day=1200)
    user.spend(NOON, 900)
    headers = dict(ratelimit_headers(user.remaining(NOON + 120)))
    assert headers == {
        b"x-ratelimit-limit-tokens": b"1200",
        b"x-ratelimit-remaining-tokens": b"300",
        b"x-ratelimit-reset-tokens": b"11h58m0s",
    }


def test_on_a_tie_the_later_reset_is_shown() -> None:
    remaining = Remaining(None, (1000, 0, 30.0), (5000, 0, 3600.0))
    assert remaining.tokens == (5000, 0, 3600.0)


def test_a_kind_without_a_budget_has_no_headers() -> None:
    user = budget(tokens_per_day=10)
    headers = dict(ratelimit_headers(user.remaining(NOON)))
    assert set(headers) == {
        b"x-ratelimit-limit-tokens",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens",
    }
    assert headers[b"x-ratelimit-reset-tokens"] == b"0s"  # nothing spent: nothing to reset
    assert ratelimit_headers(budget(requests_per_minute=5).remaining(NOON))[0] == (
        b"x-ratelimit-limit-requests",
        b"5",
    )


# -- what a cut-short stream counts as -----------------------------------------------------------


def test_a_stream_cut_before_its_usage_counts_its_events_as_completion_tokens() -> None:
    finder = StreamUsage()
    for word in range(7):
        finder.feed(b'data: {"choices":[{"index":0,"delta":{"content":"w%d"}}]}\n\n' % word)
    assert finder.usage() is None
    assert finder.counted() == (0, 7)


@pytest.mark.parametrize(
    "done",
    [b"data: [DONE]\n\n", b"data:[DONE]\r\n\r\n", b"data: [DONE]"],
    ids=["lf", "crlf", "unterminated"],
)
def test_a_stream_that_got_its_done_was_whole_and_counts_only_its_usage(done: bytes) -> None:
    # No usage in it (vLLM and OpenAI without stream_options.include_usage): a complete
    # answer, cut after its end (the client gone before the upstream closed), counts none;
    # its role event, finish event and [DONE] are no tokens.
    finder = StreamUsage()
    finder.feed(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')
    finder.feed(b'data: {"choices":[{"index":0,"delta":{"content":"w"}}]}\n\n' * 3)
    assert not finder.whole
    finder.feed(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n' + done)
    assert finder.whole
    assert finder.counted() is None
    # [DONE] alone in the last read, after a read that ended in "data: ".
    split = StreamUsage()
    split.feed(b'data: {"choices":[{"index":0,"delta":{"content":"w"}}]}\n\ndata: ')
    split.feed(b"[DONE]\n\n")
    assert split.whole and split.counted() is None


def test_a_token_that_reads_done_is_no_end_of_stream() -> None:
    finder = StreamUsage()
    finder.feed(b'data: {"choices":[{"index":0,"delta":{"content":"[DONE]"}}]}\n\n')
    finder.feed(b'data: {"choices":[{"index":0,"delta":{"content":"[DONE]')  # cut mid-event
    assert not finder.whole
    assert finder.counted() == (0, 2)


def test_a_stream_with_its_usage_counts_the_usage() -> None:
    finder = StreamUsage()
    finder.feed(b'data: {"choices":[{"index":0,"delta":{"content":"w"}}]}\n\n' * 3)
    finder.feed(b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3}}\n\n')
    assert finder.counted() == (4, 3)
    assert StreamUsage().counted() is None
