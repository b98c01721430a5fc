"""Circuit breaker, hedge budget, backoff and Retry-After: sync tests with explicit ``now``."""

from __future__ import annotations

import copy
import math
import random
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trioproxy.breaker import (
    HEDGE_WINDOW_SLICES,
    BreakerSnapshot,
    CircuitBreaker,
    HedgeBudget,
    HedgeBudgetStatistics,
    backoff_delay,
    parse_retry_after,
)


def opened(now: float = 0.0, **kwargs: float) -> CircuitBreaker:
    """A breaker opened at ``now`` by failure_threshold failures."""
    breaker = CircuitBreaker(**kwargs)  # type: ignore[arg-type]
    for _ in range(breaker.failure_threshold):
        assert breaker.try_acquire(now)
        breaker.record_failure(now)
    assert breaker.snapshot(now).state == "open"
    return breaker


# --- CircuitBreaker: closed ---------------------------------------------------------


def test_starts_closed_and_available() -> None:
    breaker = CircuitBreaker()
    assert breaker.available(0.0)
    assert breaker.snapshot(0.0) == BreakerSnapshot(
        state="closed", consecutive_failures=0, cooldown_s=1.0, open_until=None, cooled_until=None
    )


def test_opens_at_exactly_the_threshold() -> None:
    breaker = CircuitBreaker(failure_threshold=3, base_cooldown_s=2.0)
    for i in range(2):
        assert breaker.try_acquire(10.0 + i)
        breaker.record_failure(10.0 + i)
    assert breaker.snapshot(11.0).state == "closed"
    assert breaker.snapshot(11.0).consecutive_failures == 2
    assert breaker.try_acquire(12.0)
    breaker.record_failure(12.5)
    assert breaker.snapshot(12.5) == BreakerSnapshot(
        state="open", consecutive_failures=3, cooldown_s=2.0, open_until=14.5, cooled_until=None
    )


def test_success_resets_the_streak() -> None:
    breaker = CircuitBreaker(failure_threshold=3)
    for _ in range(2):
        breaker.try_acquire(0.0)
        breaker.record_failure(0.0)
    breaker.try_acquire(0.0)
    breaker.record_success(0.0)
    assert breaker.snapshot(0.0).consecutive_failures == 0
    for _ in range(2):
        breaker.try_acquire(0.0)
        breaker.record_failure(0.0)
    assert breaker.snapshot(0.0).state == "closed"  # 2 + 2 failures, never 3 in a row


def test_release_in_closed_is_no_verdict() -> None:
    breaker = CircuitBreaker(failure_threshold=2)
    breaker.try_acquire(0.0)
    breaker.record_failure(0.0)
    breaker.try_acquire(0.0)
    breaker.record_release(0.0)
    assert breaker.snapshot(0.0).consecutive_failures == 1
    assert breaker.in_flight == 0


# --- open and half-open -------------------------------------------------------------


def test_open_refuses_until_exactly_open_until() -> None:
    breaker = opened(now=5.0, base_cooldown_s=1.5)
    assert not breaker.available(6.4)
    assert not breaker.try_acquire(6.4)
    assert breaker.snapshot(6.4).state == "open"  # a refused try_acquire changes nothing
    assert breaker.available(6.5)


def test_half_open_grants_a_single_trial() -> None:
    breaker = opened(now=0.0)
    assert breaker.try_acquire(1.0)
    assert breaker.snapshot(1.0).state == "half_open"
    assert breaker.snapshot(1.0).open_until is None
    assert not breaker.available(1.0)
    assert not breaker.try_acquire(1.0)
    assert not breaker.try_acquire(500.0)  # no matter how long the trial takes
    assert breaker.in_flight == 1


def test_trial_success_closes_and_resets_cooldown() -> None:
    breaker = opened(now=0.0)
    breaker.try_acquire(1.0)
    breaker.record_failure(1.0)  # cooldown 2
    breaker.try_acquire(3.0)
    breaker.record_success(3.2)
    assert breaker.snapshot(3.2) == BreakerSnapshot(
        state="closed", consecutive_failures=0, cooldown_s=1.0, open_until=None, cooled_until=None
    )
    assert breaker.available(3.2)
    # The next opening starts from the base cooldown again.
    for _ in range(5):
        breaker.try_acquire(4.0)
        breaker.record_failure(4.0)
    assert breaker.snapshot(4.0).open_until == 5.0


def test_failed_trials_double_the_cooldown_up_to_the_cap() -> None:
    breaker = opened(now=0.0, base_cooldown_s=1.0, max_cooldown_s=60.0)
    now = 0.0
    seen = [breaker.snapshot(now).cooldown_s]
    for _ in range(8):
        now = breaker.snapshot(now).open_until or math.nan
        assert not breaker.available(now - 0.001)
        assert breaker.try_acquire(now)
        breaker.record_failure(now)
        snap = breaker.snapshot(now)
        assert snap.state == "open"
        assert snap.open_until == now + snap.cooldown_s
        seen.append(snap.cooldown_s)
    assert seen == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_release_frees_the_trial_slot() -> None:
    breaker = opened(now=0.0)
    assert breaker.try_acquire(1.0)
    breaker.record_release(1.5)  # the trial lost a hedge race: no verdict
    snap = breaker.snapshot(1.5)
    assert snap.state == "half_open"
    assert snap.cooldown_s == 1.0
    assert breaker.available(1.5)
    assert breaker.try_acquire(1.5)  # at once, no new cooldown
    assert not breaker.try_acquire(1.5)


def test_outcomes_of_stale_attempts_while_open_are_ignored() -> None:
    breaker = CircuitBreaker(failure_threshold=2)
    for _ in range(4):
        assert breaker.try_acquire(0.0)
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)  # opens, open_until 1.0
    breaker.record_failure(0.5)  # a third attempt of the same outage: not a second opening
    assert breaker.snapshot(0.5).open_until == 1.0
    assert breaker.snapshot(0.5).cooldown_s == 1.0
    breaker.record_success(0.6)  # started before the circuit opened: decides nothing
    assert breaker.snapshot(0.6).state == "open"
    assert breaker.in_flight == 0


def test_trial_waits_for_attempts_started_while_closed() -> None:
    breaker = CircuitBreaker(failure_threshold=1)
    assert breaker.try_acquire(0.0)
    assert breaker.try_acquire(0.0)  # still in flight (hanging) when the circuit opens
    breaker.record_failure(0.0)
    assert not breaker.available(1.0)
    assert not breaker.try_acquire(1.0)
    breaker.record_release(3.0)  # the hanging one is cut at last
    assert breaker.snapshot(3.0).state == "open"
    assert breaker.available(3.0)
    assert breaker.try_acquire(3.0)
    assert breaker.snapshot(3.0).state == "half_open"


# --- 429 cool-down ------------------------------------------------------------------


def test_cool_down_blocks_without_opening() -> None:
    breaker = CircuitBreaker(failure_threshold=2)
    breaker.try_acquire(10.0)
    breaker.record_failure(10.0)
    breaker.try_acquire(10.0)
    breaker.cool_down(10.0, 3.0)
    breaker.record_release(10.0)
    assert breaker.snapshot(10.0) == BreakerSnapshot(
        state="closed", consecutive_failures=1, cooldown_s=1.0, open_until=None, cooled_until=13.0
    )
    assert not breaker.available(12.999)
    assert not breaker.try_acquire(12.999)
    assert breaker.available(13.0)
    assert breaker.snapshot(13.0).cooled_until is None
    assert breaker.try_acquire(13.0)


def test_longest_cool_down_wins() -> None:
    breaker = CircuitBreaker()
    breaker.cool_down(0.0, 10.0)
    breaker.cool_down(1.0, 2.0)  # ends at 3: shorter, ignored
    assert breaker.snapshot(1.0).cooled_until == 10.0
    breaker.cool_down(5.0, 20.0)
    assert breaker.snapshot(5.0).cooled_until == 25.0
    assert not breaker.available(24.9)
    assert breaker.available(25.0)


def test_cool_down_holds_back_the_half_open_trial() -> None:
    breaker = opened(now=0.0)
    breaker.cool_down(0.5, 4.0)
    assert not breaker.available(1.0)
    assert not breaker.try_acquire(1.0)
    assert breaker.snapshot(1.0).state == "open"
    assert breaker.try_acquire(4.5)
    assert breaker.snapshot(4.5).state == "half_open"


@pytest.mark.parametrize("seconds", [math.inf, math.nan])
def test_cool_down_rejects_non_finite(seconds: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker().cool_down(0.0, seconds)


@pytest.mark.parametrize(
    "kwargs",
    [{"failure_threshold": 0}, {"base_cooldown_s": 0.0}, {"base_cooldown_s": 2.0, "max_cooldown_s": 1.0}],
)
def test_breaker_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]


# --- the breaker as a state machine, against a model of real attempts ---------------


class BreakerMachine(RuleBasedStateMachine):
    """Random calls and times; the caller keeps the contract (one outcome per granted attempt).

    Each granted attempt is remembered with whether it was a half-open trial (granted
    while the circuit was not closed). Whatever happens: at most one trial is ever in
    flight, and while it is, nothing else is; nothing is available while open before
    open_until or while cooling down.
    """

    def __init__(self) -> None:
        super().__init__()
        self.breaker = CircuitBreaker(failure_threshold=3, base_cooldown_s=1.0, max_cooldown_s=8.0)
        self.now = 0.0
        self.attempts: list[bool] = []  # True: a trial
        self.cooled_until = -math.inf

    @rule(dt=st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 2.0, 7.5]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule()
    def acquire(self) -> None:
        before = self.breaker.snapshot(self.now).state
        expected = self.breaker.available(self.now)
        granted = self.breaker.try_acquire(self.now)
        assert granted == expected, "available() must predict try_acquire()"
        if granted:
            self.attempts.append(before != "closed")

    @precondition(lambda self: self.attempts)
    @rule(data=st.data(), outcome=st.sampled_from(["success", "failure", "release"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        index = data.draw(st.integers(0, len(self.attempts) - 1))
        self.attempts.pop(index)
        getattr(self.breaker, f"record_{outcome}")(self.now)

    @rule(seconds=st.sampled_from([0.0, 0.5, 3.0]))
    def cool(self, seconds: float) -> None:
        self.breaker.cool_down(self.now, seconds)
        self.cooled_until = max(self.cooled_until, self.now + seconds)

    @invariant()
    def one_trial_alone(self) -> None:
        trials = sum(self.attempts)
        assert trials <= 1
        if trials:
            assert len(self.attempts) == 1
            assert self.breaker.snapshot(self.now).state == "half_open"

    @invariant()
    def nothing_available_while_open_or_cooled(self) -> None:
        snap = self.breaker.snapshot(self.now)
        probe = copy.deepcopy(self.breaker)
        if snap.state == "open" and snap.open_until is not None and self.now < snap.open_until:
            assert not self.breaker.available(self.now)
            assert not probe.try_acquire(self.now)
        if self.now < self.cooled_until:
            assert not self.breaker.available(self.now)
            assert snap.cooled_until == self.cooled_until

    @invariant()
    def bookkeeping(self) -> None:
        snap = self.breaker.snapshot(self.now)
        assert self.breaker.in_flight == len(self.attempts)
        assert 1.0 <= snap.cooldown_s <= 8.0
        assert (snap.open_until is not None) == (snap.state == "open")


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


# --- HedgeBudget ---------------------------------------------------------------------


def test_min_hedges_lets_a_quiet_gateway_hedge() -> None:
    budget = HedgeBudget(percent=10.0, min_hedges=1)
    budget.record_request(0.0)
    assert budget.try_hedge(0.0)  # 10% of 1 request is no hedge at all; the minimum allows one
    assert not budget.try_hedge(0.1)
    assert budget.statistics() == HedgeBudgetStatistics(requests=1, hedges=1, denied=1)


def test_zero_min_hedges_means_strictly_the_percentage() -> None:
    budget = HedgeBudget(percent=10.0, min_hedges=0)
    for _ in range(9):
        budget.record_request(0.0)
    assert not budget.try_hedge(0.0)
    budget.record_request(0.0)
    assert budget.try_hedge(0.0)  # 1 hedge for 10 requests = 10%
    assert not budget.try_hedge(0.0)


def test_budget_is_at_most_percent_never_rounded_up() -> None:
    budget = HedgeBudget(percent=10.0, min_hedges=0)
    for _ in range(15):
        budget.record_request(1.0)
    assert budget.try_hedge(1.0)
    assert not budget.try_hedge(1.0)  # a 2nd hedge would be 2/15 = 13% > 10%
    for _ in range(5):
        budget.record_request(1.0)
    assert budget.try_hedge(1.0)  # 2/20
    assert budget.statistics() == HedgeBudgetStatistics(requests=20, hedges=2, denied=1)


def test_window_counts_exactly_over_time() -> None:
    # window 10 s in 64 slices of 0.15625 s: 0, 1.25, 10 and 11.25 are slice boundaries,
    # so an event at one of them counts exactly while now < t + 10.
    budget = HedgeBudget(percent=50.0, window_s=10.0, min_hedges=0)
    for _ in range(4):
        budget.record_request(0.0)
    assert [budget.try_hedge(1.25) for _ in range(3)] == [True, True, False]
    assert not budget.try_hedge(9.999)
    # t=10: the 4 requests of t=0 have left; the 2 hedges of t=1.25 have not.
    for _ in range(4):
        budget.record_request(10.0)
    assert not budget.try_hedge(10.0)  # 3 hedges for 4 requests would be 75%
    assert not budget.try_hedge(11.249)
    # t=11.25: the hedges of t=1.25 have left too.
    assert [budget.try_hedge(11.25) for _ in range(3)] == [True, True, False]
    assert budget.statistics() == HedgeBudgetStatistics(requests=8, hedges=4, denied=5)


def test_an_event_leaves_the_window_at_most_one_slice_early() -> None:
    width = 10.0 / HEDGE_WINDOW_SLICES
    budget = HedgeBudget(percent=100.0, window_s=10.0, min_hedges=0)
    budget.record_request(width * 0.9)  # late in slice 0
    assert budget.try_hedge(10.0 - 0.001)  # still counted
    budget = HedgeBudget(percent=100.0, window_s=10.0, min_hedges=0)
    budget.record_request(width * 0.9)
    assert not budget.try_hedge(10.0)  # gone, width * 0.1 before its 10 s were up


def test_budget_memory_is_bounded_under_load() -> None:
    budget = HedgeBudget(percent=10.0, window_s=10.0)
    for i in range(200_000):  # 2000 requests/s for 100 s
        now = i / 2000
        budget.record_request(now)
        budget.try_hedge(now)
        assert len(budget._slices) <= HEDGE_WINDOW_SLICES  # white-box: the bound itself
    stats = budget.statistics()
    assert stats.requests == 200_000
    assert stats.hedges + stats.denied == 200_000
    # Over any window, hedges stay at 10% (plus the per-window minimum).
    assert stats.hedges <= 200_000 // 10 + 11


@given(
    events=st.lists(
        st.tuples(st.floats(0.0, 3.0, allow_nan=False), st.sampled_from(["request", "hedge"])), max_size=80
    ),
    percent=st.sampled_from([0.0, 10.0, 33.0, 50.0, 100.0]),
    min_hedges=st.integers(0, 2),
)
def test_budget_matches_a_brute_force_window(
    events: list[tuple[float, str]], percent: float, min_hedges: int
) -> None:
    window_s = 2.0
    budget = HedgeBudget(percent=percent, window_s=window_s, min_hedges=min_hedges)
    history: list[tuple[float, str]] = []
    now = 0.0

    def slice_of(t: float) -> int:
        return math.floor(t * HEDGE_WINDOW_SLICES / window_s)

    def in_window(t: float) -> bool:
        return slice_of(t) > slice_of(now) - HEDGE_WINDOW_SLICES

    for dt, kind in events:
        now += dt
        if kind == "request":
            budget.record_request(now)
            history.append((now, "request"))
            continue
        requests = sum(1 for t, k in history if k == "request" and in_window(t))
        hedges = sum(1 for t, k in history if k == "hedge" and in_window(t))
        expected = hedges < min_hedges or (hedges + 1) * 100 <= percent * requests
        assert budget.try_hedge(now) == expected
        if expected:
            history.append((now, "hedge"))
            assert hedges + 1 <= max(min_hedges, percent / 100 * requests)


@pytest.mark.parametrize(
    "kwargs", [{"percent": -1.0}, {"percent": 10.0, "window_s": 0.0}, {"percent": 1.0, "min_hedges": -1}]
)
def test_budget_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HedgeBudget(**kwargs)  # type: ignore[arg-type]


# --- backoff_delay -------------------------------------------------------------------


def test_backoff_is_full_jitter_under_the_exponential_ceiling() -> None:
    rng = random.Random(1234)
    for attempt in range(12):
        ceiling = min(2.0, 0.1 * 2**attempt)
        samples = [backoff_delay(attempt, base_s=0.1, cap_s=2.0, rng=rng) for _ in range(500)]
        assert all(0.0 <= s < ceiling for s in samples)
        assert max(samples) > 0.95 * ceiling  # spread over the whole range, not truncated
        assert min(samples) < 0.05 * ceiling


def test_backoff_draws_one_uniform_from_the_given_rng() -> None:
    assert backoff_delay(3, base_s=0.1, cap_s=2.0, rng=random.Random(7)) == random.Random(7).uniform(0.0, 0.8)
    assert backoff_delay(5, base_s=0.1, cap_s=2.0, rng=random.Random(7)) == random.Random(7).uniform(0.0, 2.0)


def test_backoff_survives_huge_attempt_numbers() -> None:
    delay = backoff_delay(100_000, base_s=0.1, cap_s=2.0, rng=random.Random(0))
    assert 0.0 <= delay < 2.0


def test_backoff_edges() -> None:
    rng = random.Random(0)
    assert backoff_delay(4, base_s=0.0, cap_s=2.0, rng=rng) == 0.0
    assert backoff_delay(4, base_s=0.1, cap_s=0.0, rng=rng) == 0.0


@pytest.mark.parametrize(("attempt", "base_s", "cap_s"), [(-1, 0.1, 1.0), (0, -0.1, 1.0), (0, 0.1, math.nan)])
def test_backoff_rejects_bad_arguments(attempt: int, base_s: float, cap_s: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(attempt, base_s=base_s, cap_s=cap_s, rng=random.Random(0))


# --- parse_retry_after ---------------------------------------------------------------

NOW_WALL = datetime(2015, 10, 21, 7, 27, 0, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (b"120", 120.0),
        ("  5 ", 5.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        (b"Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wednesday, 21-Oct-15 07:28:30 GMT", 90.0),  # RFC 850, obsolete but allowed
        ("Wed Oct 21 07:27:10 2015", 10.0),  # asctime, no zone: GMT
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # in the past: now, never negative
    ],
)
def test_retry_after_forms(value: bytes | str, seconds: float) -> None:
    assert parse_retry_after(value, now_wall=NOW_WALL) == seconds


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "-5", "+5", "5s", "1e3", "inf", "nan", "0x10", "1.", ".5", b"\xff\xfe", "9" * 400,
     "Wed, 99 Oct 2015 07:28:00 GMT", "tomorrow", "1 Jan 1 0:0:0 +9999"],
)
def test_retry_after_garbage_is_none(value: bytes | str | None) -> None:
    assert parse_retry_after(value, now_wall=NOW_WALL) is None


@given(value=st.one_of(st.text(max_size=80), st.binary(max_size=80)), now_wall=st.floats(0, 4e9))
def test_retry_after_never_raises_nor_goes_negative(value: str | bytes, now_wall: float) -> None:
    seconds = parse_retry_after(value, now_wall=now_wall)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0.0)
