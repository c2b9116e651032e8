"""Placement's rules, on figures alone (``supervision/placement.py`` is pure): what fits, who
stops first, time slices, pinned models, and the reason a start waits."""

from __future__ import annotations

from trioserve.supervision.placement import BACK_TO_BACK, Holder, decide, shortfall

GIB = 2**30
BUDGET = {"cuda:0": 10 * GIB}


def holder(
    name: str,
    gib: float,
    *,
    device: str = "cuda:0",
    pinned: bool = False,
    stopping: bool = False,
    starting: bool = False,
    in_use: bool = False,
    last_used: float = 0.0,
    held_since: float = 0.0,
) -> Holder:
    return Holder(
        name=name,
        need={device: int(gib * GIB)},
        pinned=pinned,
        stopping=stopping,
        starting=starting,
        in_use=in_use,
        last_used=last_used,
        held_since=held_since,
    )


NOW = 100.0


def test_a_model_fits_within_the_budget_beside_others() -> None:
    decision = decide({"cuda:0": 4 * GIB}, BUDGET, [holder("a", 6)], now=NOW, swap_after=10)
    assert decision.fits and decision.reason is None


def test_devices_without_a_budget_never_limit() -> None:
    need = {"cuda:1": 100 * GIB, "cpu": 100 * GIB}
    assert decide(need, BUDGET, [holder("a", 9)], now=NOW, swap_after=10).fits


def test_shortfall_counts_only_the_devices_short() -> None:
    need = {"cuda:0": 5 * GIB, "cpu": GIB}
    budgets = {"cuda:0": 10 * GIB, "cpu": 4 * GIB}
    assert shortfall(need, budgets, [holder("a", 6)]) == {"cuda:0": GIB}


def test_idle_models_stop_least_recently_used_first_and_only_as_many_as_needed() -> None:
    holders = [
        holder("recent", 3, last_used=90),
        holder("oldest", 3, last_used=10),
        holder("older", 3, last_used=50),
    ]
    # 9 GiB held, 5 needed: 4 missing, two of the three must go.
    decision = decide({"cuda:0": 5 * GIB}, BUDGET, holders, now=NOW, swap_after=10)
    assert not decision.fits
    assert decision.evict == ("oldest", "older")
    assert decision.yield_ == ()


def test_an_idle_model_on_another_device_is_not_stopped() -> None:
    holders = [holder("gpu1", 8, device="cuda:1", last_used=0), holder("a", 8, last_used=50)]
    decision = decide({"cuda:0": 4 * GIB}, BUDGET, holders, now=NOW, swap_after=10)
    assert decision.evict == ("a",)


def test_a_busy_model_keeps_its_memory_until_its_slice_is_over() -> None:
    busy = holder("a", 8, in_use=True, held_since=95)
    decision = decide({"cuda:0": 4 * GIB}, BUDGET, [busy], now=NOW, swap_after=10)
    assert decision.evict == () and decision.yield_ == ()
    assert decision.wake_at == 105  # when its slice ends


def test_a_busy_model_yields_once_its_slice_is_over() -> None:
    busy = holder("a", 8, in_use=True, held_since=90)
    decision = decide({"cuda:0": 4 * GIB}, BUDGET, [busy], now=NOW, swap_after=10)
    assert decision.yield_ == ("a",) and decision.evict == ()


def test_swap_after_zero_yields_at_once() -> None:
    busy = holder("a", 8, in_use=True, held_since=NOW)
    decision = decide({"cuda:0": 4 * GIB}, BUDGET, [busy], now=NOW, swap_after=0)
    assert decision.yield_ == ("a",)


def test_a_model_used_back_to_back_counts_as_busy_within_its_slice() -> None:
    # Between two requests of a conversation the model holds no request for a moment.
    between = holder("a", 8, last_used=NOW - BACK_TO_BACK / 2, held_since=95)
    decision = decide({"cuda:0": 4 * GIB}, BUDGET, [between], now=NOW, swap_after=10)
    assert decision.evict == () and decision.yield_ == ()
    # It is decided again when it would count as idle.
    assert decision.wake_at == NOW + BACK_TO_BACK / 2
    later = NOW + BACK_TO_BACK
    assert decide({"cuda:0": 4 * GIB}, BUDGET, [between], now=later, swap_after=10).evict == ("a",)


def test_idle_models_go_before_busy_ones_whose_slice_is_over() -> None:
    holders = [
        holder("busy", 4, in_use=True, held_since=0),
        holder("idle", 4, last_used=50),
    ]
    decision = decide({"cuda:0": 5 * GIB}, BUDGET, holders, now=NOW, swap_after=10)
    assert decision.evict == ("idle",) and decision.yield_ == ()


def test_among_busy_models_the_one_holding_longest_yields_first() -> None:
    holders = [
        holder("newer", 4, in_use=True, held_since=60),
        holder("older", 4, in_use=True, held_since=20),
    ]
    decision = decide({"cuda:0": 5 * GIB}, BUDGET, holders, now=NOW, swap_after=10)
    assert decision.yield_ == ("older",)


def test_pinned_models_never_stop() -> None:
    holders = [holder("pinned", 8, pinned=True, last_used=0)]
    decision = decide({"cuda:0": 4 * GIB}, BUDGET, holders, now=NOW, swap_after=0)
    assert decision.evict == () and decision.yield_ == () and decision.wake_at is None
    assert decision.reason == "needs 4.0 GiB on cuda:0, 2.0 GiB free, held by pinned (pinned)"


def test_nothing_stops_when_stopping_everything_possible_would_not_make_it_fit() -> None:
    holders = [holder("pinned", 7, pinned=True), holder("idle", 2, last_used=0)]
    decision = decide({"cuda:0": 4 * GIB}, BUDGET, holders, now=NOW, swap_after=10)
    assert decision.evict == () and decision.yield_ == ()


def test_memory_already_on_its_way_back_stops_nothing_more() -> None:
    holders = [holder("going", 6, stopping=True), holder("idle", 3, last_used=0)]
    decision = decide({"cuda:0": 4 * GIB}, BUDGET, holders, now=NOW, swap_after=10)
    assert decision.evict == () and not decision.fits


def test_a_starting_model_counts_as_busy() -> None:
    starting = holder("s", 8, starting=True, held_since=98)
    decision = decide({"cuda:0": 4 * GIB}, BUDGET, [starting], now=NOW, swap_after=10)
    assert decision.evict == () and decision.yield_ == ()


def test_the_reason_names_the_need_the_free_memory_and_the_holders() -> None:
    holders = [holder("qwen", 7.9, in_use=True, held_since=99), holder("old", 0, last_used=0)]
    decision = decide({"cuda:0": 6 * GIB}, BUDGET, holders, now=NOW, swap_after=10)
    assert decision.reason == "needs 6.0 GiB on cuda:0, 2.1 GiB free, held by qwen (busy)"


def test_a_model_still_starting_never_yields_even_with_no_slice() -> None:
    starting = holder("s", 8, starting=True, held_since=0)
    decision = decide({"cuda:0": 4 * GIB}, BUDGET, [starting], now=NOW, swap_after=0)
    assert decision.yield_ == () and decision.evict == ()
    assert decision.wake_at is None  # its start's end wakes the supervisor, not the clock
