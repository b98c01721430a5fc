"""``hypercorn_keepalive.Reaper``'s deadline heap, against the plain rule it stands for.

Over random programs of arming (at increasing times, re-arming included), disarming,
closing and wake-ups, the reaper's next wake-up must be the earliest deadline of the armed,
open timers, and a wake-up must hand over exactly the armed, open timers that are due, as a
scan of every timer would. The heap is lazy (stale entries are dropped when they surface),
so this checks that no stale entry is ever taken for a live one, nor a live one lost, and
that the heap holds one entry per connection at most, however many requests it answers.
The socket-level behaviour is tested in ``test_hypercorn_fast.py``.
"""

from __future__ import annotations

import math
import weakref

from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.hypercorn_keepalive import IdleTimer, Reaper

KEEP_ALIVE = 5.0

operations = st.lists(
    st.tuples(st.sampled_from(["arm", "disarm", "close", "wake", "tick"]), st.integers(0, 7), st.integers(0, 3)),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
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
            timer.armed, timer.deadline = True, now + KEEP_ALIVE
            reaper.arm(timer)
        elif op == "disarm":  # a request starts
            timer.armed = False
        elif op == "close":  # the connection's reading ended
            timer.close()
        elif op == "wake":  # the reaper wakes at `now`, and closes what it is handed
            expected = {t for t in timers if t.armed and not t.closed and t.deadline <= now}
            taken = reaper._take_due(now)
            assert len(taken) == len(set(taken)) and set(taken) == expected
            for t in taken:
                t.close()
        live = [t.deadline for t in timers if t.armed and not t.closed]
        assert reaper._next_due() == min(live, default=math.inf)
        assert len(reaper._due) <= len(timers)  # one entry per connection at most, however many requests


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
