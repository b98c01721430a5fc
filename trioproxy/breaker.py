"""Passive health and retry pacing: circuit breaker, hedge budget, backoff [sans-IO].

Nothing here awaits or reads a clock: every call takes ``now`` (``trio.current_time()``
in the caller), so the state machines are tested with plain numbers.

``CircuitBreaker`` transitions, per upstream::

    closed    ── failure_threshold consecutive failures ──▶ open for cooldown_s
    open      ── try_acquire() once now >= open_until ────▶ half_open, that attempt its one trial
    half_open ── trial succeeded ─────────────────────────▶ closed, cooldown back to base_cooldown_s
    half_open ── trial failed ────────────────────────────▶ open, cooldown × 2 (up to max_cooldown_s)
    half_open ── trial released (cancelled: no verdict) ──▶ half_open, the trial slot free again

A 429 ``Retry-After`` is not a failure: ``cool_down`` makes the upstream unavailable
for that long, in any state, without touching the circuit.
"""

from __future__ import annotations

import math
import random
import re
from collections import deque
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Literal

from attrs import define, field, frozen, setters, validators

BreakerStateName = Literal["closed", "open", "half_open"]

#: Time resolution of the hedge budget's sliding window: it is kept as this many
#: per-slice counts, so memory is bounded (at most this + 1 slices) whatever the
#: load, at the price of an event leaving the window up to window_s / this early.
HEDGE_WINDOW_SLICES = 64

#: A Retry-After longer than this is garbage (a header is a few dozen bytes); it also
#: keeps float() away from a thousand-digit "number" that would come out as inf.
MAX_RETRY_AFTER_CHARS = 64

#: delay-seconds (RFC 9110 §10.2.3) is 1*DIGIT; a fraction is accepted too, as some
#: servers send one and "wait 1.5 s" is what they mean.
_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


@frozen
class BreakerSnapshot:
    state: BreakerStateName
    consecutive_failures: int
    #: Length of the current (or next) open period.
    cooldown_s: float
    #: While open: when the trial slot opens. None in the other states.
    open_until: float | None
    #: While a 429 cool-down is running: when it ends. None otherwise.
    cooled_until: float | None


# Validated at construction; the hot counters are set without attrs' per-assignment hook.
@define(on_setattr=setters.NO_OP)
class CircuitBreaker:
    """Passive health of one upstream, from the outcomes of real requests.

    Contract with the caller: every ``try_acquire`` that returned True is followed by
    exactly one of ``record_success`` / ``record_failure`` / ``record_release`` for that
    attempt. The breaker counts attempts in flight from that, because the record calls
    carry no attempt identity.

    Policy decisions:

    - Only the half-open trial decides. Outcomes that arrive while the circuit is open
      belong to attempts started before it opened; they are ignored (a burst of
      failures from one outage opens the circuit once, not once per attempt).
    - The trial slot is granted only when no attempt is in flight, so stale attempts
      started while closed cannot be mistaken for the trial (nor free its slot by
      being cancelled). They end within the request timeout, so this only delays
      the trial.
    - ``cool_down`` (429) blocks new attempts in every state, and never opens the
      circuit nor counts as a failure; pair it with ``record_release`` for the attempt
      that got the 429.
    """

    failure_threshold: int = field(default=5, validator=validators.ge(1))
    base_cooldown_s: float = field(default=1.0, validator=validators.gt(0.0))
    max_cooldown_s: float = field(default=60.0)

    _state: BreakerStateName = field(default="closed", init=False)
    _failures: int = field(default=0, init=False)
    _cooldown_s: float = field(init=False)
    _open_until: float = field(default=0.0, init=False)
    _cooled_until: float = field(default=-math.inf, init=False)
    _trial_taken: bool = field(default=False, init=False)
    _in_flight: int = field(default=0, init=False)

    @max_cooldown_s.validator
    def _check_max(self, _attribute: object, value: float) -> None:
        if not value >= self.base_cooldown_s:
            raise ValueError(f"max_cooldown_s ({value}) must be >= base_cooldown_s ({self.base_cooldown_s})")

    @_cooldown_s.default
    def _first_cooldown(self) -> float:
        return self.base_cooldown_s

    @property
    def in_flight(self) -> int:
        """Attempts granted by ``try_acquire`` and not yet recorded."""
        return self._in_flight

    def available(self, now: float) -> bool:
        """Would ``try_acquire(now)`` grant an attempt? No side effect (routing's view)."""
        if now < self._cooled_until:
            return False
        if self._state == "closed":
            return True
        # open past its cooldown, or half_open with the trial slot free: a trial may start
        # (the open → half_open move itself happens in try_acquire).
        if self._state == "open" and now < self._open_until:
            return False
        return not self._trial_taken and self._in_flight == 0

    def try_acquire(self, now: float) -> bool:
        """An attempt is about to start: grant it (True) or refuse it (False).

        Closed: granted unless cooling down. Open with the cooldown over: the circuit
        becomes half-open and this attempt is its single trial. Half-open: granted only
        if the trial slot is free (a previous trial was released).
        """
        if not self.available(now):
            return False
        if self._state != "closed":
            self._state = "half_open"
            self._trial_taken = True
        self._in_flight += 1
        return True

    def record_success(self, now: float) -> None:
        """The attempt got a good response: resets the failure streak, closes a half-open circuit."""
        self._end_attempt()
        if self._state == "half_open":
            self._state = "closed"
            self._cooldown_s = self.base_cooldown_s
            self._trial_taken = False
        if self._state == "closed":
            self._failures = 0

    def record_failure(self, now: float) -> None:
        """The attempt failed (connect error, retryable status, timeout before the first byte).

        Closed: one more in the streak; the ``failure_threshold``-th opens the circuit for
        the current cooldown. Half-open: the trial failed, so the circuit opens again
        with the cooldown doubled (up to ``max_cooldown_s``).
        """
        self._end_attempt()
        if self._state == "closed":
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open(now)
        elif self._state == "half_open":
            self._failures += 1
            self._cooldown_s = min(self.max_cooldown_s, self._cooldown_s * 2)
            self._open(now)

    def record_release(self, now: float) -> None:
        """The attempt ended without a verdict (lost a hedge race, client left): frees the trial slot."""
        self._end_attempt()
        if self._state == "half_open":
            self._trial_taken = False

    def cool_down(self, now: float, seconds: float) -> None:
        """A 429 with ``Retry-After``: unavailable until ``now + seconds``; the longest cool-down wins.

        Raises:
            ValueError: ``seconds`` is not a finite number (a cool-down of ``inf`` would
                take the upstream away for good).
        """
        if not math.isfinite(seconds):
            raise ValueError(f"cool-down must be finite, got {seconds!r}")
        self._cooled_until = max(self._cooled_until, now + seconds)

    def snapshot(self, now: float) -> BreakerSnapshot:
        return BreakerSnapshot(
            state=self._state,
            consecutive_failures=self._failures,
            cooldown_s=self._cooldown_s,
            open_until=self._open_until if self._state == "open" else None,
            cooled_until=self._cooled_until if now < self._cooled_until else None,
        )

    def _open(self, now: float) -> None:
        self._state = "open"
        self._open_until = now + self._cooldown_s
        self._trial_taken = False

    def _end_attempt(self) -> None:
        # Clamped: a caller that records an outcome it never acquired must not drive
        # the count negative (and so grant a trial while a real one is in flight).
        self._in_flight = max(0, self._in_flight - 1)


@frozen
class HedgeBudgetStatistics:
    #: Lifetime totals (not the window's): record_request calls, granted and denied hedges.
    requests: int
    hedges: int
    denied: int


# Validated at construction; the hot counters are set without attrs' per-assignment hook.
@define(on_setattr=setters.NO_OP)
class HedgeBudget:
    """Hedges add at most ``percent`` extra upstream requests over a sliding window.

    Call ``record_request`` once per client request sent upstream (not for hedges), and
    ``try_hedge`` before starting a hedge. A hedge is granted when, counting it, the
    window's hedges stay within ``percent``% of its requests. ``min_hedges`` per window
    are always allowed: a quiet gateway (a handful of requests, so a 10% budget under
    one hedge) can still hedge its rare slow request.

    The window is kept as ``HEDGE_WINDOW_SLICES`` slices of counts: O(1) amortised per
    call and bounded memory at any request rate. An event at time t stays counted while
    ``now`` is in the same or one of the next ``HEDGE_WINDOW_SLICES - 1`` slices, i.e.
    for between ``window_s`` minus one slice and ``window_s`` (exactly ``window_s`` for
    an event at a slice boundary).
    """

    percent: float = field(validator=validators.ge(0.0))
    window_s: float = field(default=10.0, validator=validators.gt(0.0))
    min_hedges: int = field(default=1, validator=validators.ge(0))

    # (slice index, requests, hedges), oldest first; slice k covers [k, k+1) × window_s / slices.
    _slices: deque[list[int]] = field(factory=deque, init=False)
    _window_requests: int = field(default=0, init=False)
    _window_hedges: int = field(default=0, init=False)
    _requests: int = field(default=0, init=False)
    _hedges: int = field(default=0, init=False)
    _denied: int = field(default=0, init=False)

    def record_request(self, now: float) -> None:
        self._current_slice(now)[1] += 1
        self._window_requests += 1
        self._requests += 1

    def try_hedge(self, now: float) -> bool:
        """Grant (True, and count) a hedge if the window's budget allows it; else count a denial."""
        current = self._current_slice(now)
        # hedges + 1 <= percent/100 × requests, multiplied out to stay in exact arithmetic
        # for the usual whole percentages.
        within = (self._window_hedges + 1) * 100 <= self.percent * self._window_requests
        if self._window_hedges < self.min_hedges or within:
            current[2] += 1
            self._window_hedges += 1
            self._hedges += 1
            return True
        self._denied += 1
        return False

    def statistics(self) -> HedgeBudgetStatistics:
        return HedgeBudgetStatistics(requests=self._requests, hedges=self._hedges, denied=self._denied)

    def _current_slice(self, now: float) -> list[int]:
        index = math.floor(now * HEDGE_WINDOW_SLICES / self.window_s)
        oldest_kept = index - HEDGE_WINDOW_SLICES + 1
        slices = self._slices
        while slices and slices[0][0] < oldest_kept:
            _, requests, hedges = slices.popleft()
            self._window_requests -= requests
            self._window_hedges -= hedges
        # A clock never runs backwards; should ``now`` do so anyway, the event joins the
        # newest slice rather than break the ordering.
        if not slices or slices[-1][0] < index:
            slices.append([index, 0, 0])
        return slices[-1]


def backoff_delay(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    "Full jitter" exponential backoff: uniform over [0, min(cap_s, base_s × 2**attempt)),
    so clients that failed together do not retry together.

    Raises:
        ValueError: a negative ``attempt``, ``base_s`` or ``cap_s``.
    """
    if attempt < 0 or not base_s >= 0 or not cap_s >= 0:
        raise ValueError(f"backoff_delay({attempt}, base_s={base_s}, cap_s={cap_s}): expected values >= 0")
    if base_s == 0 or cap_s == 0:
        return 0.0
    # Compare exponents rather than compute 2**attempt, which overflows a float for a
    # large attempt number long after the cap has been reached.
    if attempt >= math.log2(cap_s / base_s):
        ceiling = cap_s
    else:
        ceiling = base_s * 2.0**attempt
    return rng.uniform(0.0, ceiling)


def parse_retry_after(value: bytes | str | None, *, now_wall: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value, or None if absent or invalid.

    Both forms of RFC 9110: delay-seconds (``"120"``; a fraction is accepted) and an
    HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``), which is measured from ``now_wall``
    (``time.time()``: the date is wall-clock, unlike the rest of this module). A date in
    the past gives 0.0; the result is never negative.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    text = value.strip()
    if not text or len(text) > MAX_RETRY_AFTER_CHARS:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": HTTP-dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    try:
        delta = when.timestamp() - now_wall
    except (OverflowError, ValueError):
        return None
    return max(0.0, delta)
