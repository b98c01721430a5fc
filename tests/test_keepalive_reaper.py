"""``hypercorn_keepalive.Reaper``'s deadline heap, against the plain rule it stands for.

Over random programs of arming (at increasing times, re-arming included, with a shorter
keep-alive or an infinite one at times), disarming, closing, new connections and wake-ups, the reaper's next wake-up must be the earliest deadline of the armed,
open timers, and a wake-up must hand over exactly the armed, open timers that are due, as a
scan of every timer would. The heap is lazy (stale entries are dropped when they surface),
so this checks that no stale entry is ever taken for a live one, nor a live one lost; and
that closed connections' entries do not pile up, however many connections come and go.
The socket-level behaviour is tested in ``test_hypercorn_fast.py``.
"""

from __future__ import annotations

import math
import weakref

from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.hypercorn_keepalive import IdleTimer, Reaper

#: Keep-alive timeouts an arming may use: a shorter one moves a deadline earlier; inf never comes due.
KEEP_ALIVES = (5.0, 5.0, 1.0, math.inf)

operations = st.lists(
    st.tuples(st.sampled_from(["arm", "disarm", "close", "new", "wake", "tick"]), st.integers(0, 7), st.integers(0, 3)),
    max_size=80,
)


@settings(max_examples=500, deadline=None)
@given(program=operations)
def test_the_heap_wakes_and_hands_over_what_a_scan_of_every_timer_would(program: list[tuple[str, int, int]]) -> None:
    reaper = Reaper(terminated=None)
    timers = [IdleTimer(None, reaper) for _ in range(8)]
    now = 0.0
    for op, i, step in program:
        timer = timers[i]
        if op == "tick":  # time passes
            now += step * 1.5
        elif op == "arm" and not timer.closed:  # a request's end: idle from now
            timer.armed, timer.deadline = True, now + KEEP_ALIVES[step]
            reaper.arm(timer)
        elif op == "disarm":  # a request starts
            timer.armed = False
        elif op == "close":  # the connection's reading ended
            timer.close()
        elif op == "new" and timer.closed:  # a new connection in its place
            timers[i] = IdleTimer(None, reaper)
        elif op == "wake":  # the reaper wakes at `now`, and closes what it is handed
            expected = {t for t in timers if t.armed and not t.closed and t.deadline <= now}
            taken = reaper._take_due(now)
            assert len(taken) == len(set(taken)) and set(taken) == expected
            for t in taken:
                t.close()
        live = [t.deadline for t in timers if t.armed and not t.closed]
        assert reaper._next_due() == min(live, default=math.inf)


def test_closed_connections_do_not_pile_up_in_the_heap() -> None:
    # Many short connections beside one kept open, each armed once and closed long before
    # its deadline: their entries are dropped by rebuilding the heap, not kept until due.
    reaper = Reaper(terminated=None)
    kept = IdleTimer(None, reaper)
    kept.armed, kept.deadline = True, 1000.0
    reaper.arm(kept)
    for n in range(10_000):
        timer = IdleTimer(None, reaper)
        timer.armed, timer.deadline = True, 2000.0 + n
        reaper.arm(timer)
        timer.close()
        assert len(reaper._due) <= 2 * Reaper.COMPACT_AFTER + 2
    assert reaper._next_due() == 1000.0 and reaper._take_due(1000.0) == [kept]
    assert reaper._next_due() == math.inf


def test_an_infinite_keep_alive_puts_nothing_in_the_heap() -> None:
    reaper = Reaper(terminated=None)
    for _ in range(100):
        timer = IdleTimer(None, reaper)
        timer.armed, timer.deadline = True, math.inf
        reaper.arm(timer)
        timer.close()
    assert reaper._due == [] and reaper._next_due() == math.inf


def test_a_closed_timer_is_freed_though_its_entry_waits_in_the_heap() -> None:
    reaper = Reaper(terminated=None)
    timer = IdleTimer(None, reaper)
    timer.armed, timer.deadline = True, 10.0
    reaper.arm(timer)
    gone = weakref.ref(timer)
    timer.close()
    del timer  # (freed by its reference count: no GC pass)
    assert gone() is None
    assert len(reaper._due) == 1 and reaper._next_due() == math.inf and not reaper._due  # dropped when it surfaced


def test_a_connection_answering_request_after_request_keeps_one_entry() -> None:
    reaper = Reaper(terminated=None)
    timer = IdleTimer(None, reaper)
    for n in range(1_000):  # each answer moves its deadline later
        timer.armed, timer.deadline = True, 5.0 + n
        reaper.arm(timer)
    assert len(reaper._due) == 1
    assert reaper._take_due(500.0) == [] and reaper._take_due(1004.0) == [timer]  # moved up to date, then due


def test_a_deadline_moved_earlier_then_later_is_handed_over_once_on_time() -> None:
    # A shorter keep-alive gives a new entry; the old one, superseded, must never stand for
    # the timer again, even once the deadline has moved past it.
    reaper = Reaper(terminated=None)
    timer = IdleTimer(None, reaper)
    for deadline in (5.0, 2.0, 8.0):  # armed at 0 (5 s), at 1 (1 s), at 3 (5 s)
        timer.armed, timer.deadline = True, deadline
        reaper.arm(timer)
    assert reaper._next_due() == 8.0
    assert reaper._take_due(7.9) == [] and reaper._take_due(8.0) == [timer]
    assert reaper._next_due() == math.inf
