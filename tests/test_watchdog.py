"""``watchdog.Watchdog`` with the relay's client writers (MockClock, no sockets); the pool's waits: test_pool.py."""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import example, given
from hypothesis import strategies as st

from trioproxy.relay import _ClientWriter
from trioproxy.watchdog import Watchdog


class FakeWinner:
    def __init__(self) -> None:
        self.released_at: float | None = None
        self.released = trio.Event()

    def release(self) -> None:
        self.released_at = trio.current_time()
        self.released.set()


class FakeExchange:
    client_gone = False
    outcome = "ok"
    error: str | None = None


def writer(timeout: float) -> tuple[_ClientWriter, FakeExchange, FakeWinner]:
    ex, winner = FakeExchange(), FakeWinner()

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("not sent in these tests")

    return _ClientWriter(ex, send, winner, timeout), ex, winner  # type: ignore[arg-type]


async def test_check_stalls_only_a_send_older_than_its_timeout() -> None:
    watch = Watchdog()
    watch.now = lambda: 100.0  # the clock the watched stamp their waits with
    busy, busy_ex, busy_winner = writer(5.0)
    idle, idle_ex, _ = writer(5.0)
    fresh, fresh_ex, _ = writer(5.0)
    for w in (busy, idle, fresh):
        watch.watch(w)
    busy.since, fresh.since = 100.0, 103.0
    # Not yet: the next check is due when the older send reaches its timeout.
    assert watch.check(104.0) == 105.0
    assert not busy_ex.client_gone
    # At 105 the older send has waited 5 s: given up on, and no longer watched.
    assert watch.check(105.0) == 108.0  # the fresh send's expiry comes before the idle writer's 110
    assert busy_ex.client_gone and busy_ex.outcome == "client_disconnect"
    assert busy_ex.error is not None and "took no data for 5 s" in busy_ex.error
    assert busy_winner.released_at is not None
    assert len(watch) == 2
    assert not idle_ex.client_gone and not fresh_ex.client_gone


def test_nothing_watched_means_no_wakeup() -> None:
    assert Watchdog().check(0.0) == float("inf")


async def test_a_stuck_send_is_given_up_on_at_its_timeout(autojump_clock: trio.testing.MockClock) -> None:
    watch = Watchdog()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        await trio.testing.wait_all_tasks_blocked()
        w, ex, winner = writer(2.0)
        watch.watch(w)
        start = trio.current_time()
        w.since = start  # a send starts and never returns
        await winner.released.wait()
        assert winner.released_at == pytest.approx(start + 2.0)
        assert ex.client_gone and len(watch) == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("once", [False, True], ids=["a wait", "a one-shot entry"])
async def test_an_entry_due_sooner_brings_the_next_check_forward(autojump_clock: trio.testing.MockClock, once: bool) -> None:
    watch = Watchdog()
    expired = trio.Event()

    class Quick(Entry):
        def expire(self) -> None:
            super().expire()
            expired.set()

    with trio.fail_after(120):  # (virtual time: a watchdog that never wakes fails here, not hangs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            await trio.testing.wait_all_tasks_blocked()
            slow, _, _ = writer(60.0)
            watch.watch(slow)  # the watchdog now sleeps up to 60 s
            await trio.testing.wait_all_tasks_blocked()
            quick = Quick(1.0)
            if once:  # (stamped, then watched)
                quick.since = start = watch.now()
                watch.watch_once(quick)
            else:  # (watched, then a wait starts)
                watch.watch(quick)
                quick.since = start = watch.now()
            await expired.wait()
            assert trio.current_time() == pytest.approx(start + 1.0)
            nursery.cancel_scope.cancel()


async def test_a_writer_that_keeps_sending_is_never_stalled(autojump_clock: trio.testing.MockClock) -> None:
    watch = Watchdog()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        w, ex, winner = writer(1.0)
        watch.watch(w)
        for _ in range(20):  # each send takes 0.9 s: slow, but under the timeout
            w.since = trio.current_time()
            await trio.sleep(0.9)
            w.since = None
            await trio.sleep(0.5)
        watch.forget(w)
        assert winner.released_at is None and not ex.client_gone
        nursery.cancel_scope.cancel()


async def test_an_expiry_that_fails_does_not_stop_the_others() -> None:
    class Broken:
        since: float | None = 0.0
        timeout = 1.0

        def expire(self) -> None:
            raise RuntimeError("release() without a matching acquire")

    watch = Watchdog()
    good, ex, winner = writer(1.0)
    good.since = 0.0
    watch.watch(Broken())
    watch.watch(good)
    assert watch.check(5.0) == float("inf")
    assert ex.client_gone and winner.released_at is not None and len(watch) == 0


async def test_while_it_runs_it_reads_the_runs_own_clock() -> None:
    # The watched stamp their waits with ``now``: trio's clock read without trio.current_time's
    # frames while ``run`` runs, and trio.current_time itself before and after (a run's clock
    # means nothing to another run).
    watch = Watchdog()
    assert watch.now is trio.current_time
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        await trio.testing.wait_all_tasks_blocked()
        assert getattr(watch.now, "__self__", None) is trio.lowlevel.current_clock()
        before = trio.current_time()
        assert before <= watch.now() <= trio.current_time()
        nursery.cancel_scope.cancel()
    assert watch.now is trio.current_time
    # Stopped, it holds no wake-up scope whose deadline a later watch() would move for no one.
    assert watch._wakeup is None


def test_an_entry_is_due_exactly_when_the_check_says() -> None:
    # since + timeout can round below the moment where now - since >= timeout holds
    # (0.7 + 0.1 = 0.7999999999999999): the check and the due it returns agree, or the
    # run loop would wake at that due and find nothing to expire, for ever.
    for once in (False, True):
        watch = Watchdog()
        watch.now = lambda: 0.7
        entry = Entry(0.1)
        entry.since = 0.7
        (watch.watch_once if once else watch.watch)(entry)
        due = watch.check(0.75)
        assert due == 0.7 + 0.1 and entry.expired == 0
        assert watch.check(due) == math.inf and entry.expired == 1


class Entry:
    """A watched wait whose expiries are counted."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.since: float | None = None
        self.expired = 0

    def expire(self) -> None:
        self.expired += 1


# A one-shot wait stamped earlier than the one before it (same timeout): due first, though queued last.
@example([("once", 6, 0.0), ("check", 0, 0.25), ("once-late", 8, 0.3), ("check", 0, 0.22)])
@given(st.lists(st.tuples(st.sampled_from(["watch", "once", "once-late", "forget", "start", "end", "check"]),
                          st.integers(0, 9), st.floats(0.0, 2.0)), max_size=80))
def test_it_expires_exactly_the_waits_that_lasted_their_timeout(ops: list[tuple[str, int, float]]) -> None:
    """Against the plain rule: at each check, every entry whose wait has lasted its timeout expires,
    and no other; the next check is due no later than the first moment one can expire. Entries
    0-5 are waits that come and go (``watch``), 6-9 one-shot ones (``watch_once``), stamped
    now or, to take the out-of-order path, earlier than now ("once-late")."""
    watch = Watchdog()
    clock = [0.0]
    watch.now = lambda: clock[0]
    entries = [Entry(timeout) for timeout in (0.5, 1.0, 3.0, 0.5, 1.0, 3.0, 0.5, 1.0, 0.5, 1.0)]
    watched: set[int] = set()
    for op, i, step in ops:
        entry = entries[i]
        once = i >= 6
        if op == "watch" and not once:
            watch.watch(entry)
            watched.add(i)
        elif op in ("once", "once-late") and once and i not in watched:
            entry.since = clock[0] - (step if op == "once-late" else 0.0)
            watch.watch_once(entry)
            watched.add(i)
        elif op == "forget":
            watch.forget(entry)
            watched.discard(i)
        elif op == "start" and not once:
            entry.since = clock[0]
        elif op == "end" and not once:
            entry.since = None
        elif op == "check":
            clock[0] += step
            now = clock[0]
            before = {j: entries[j].expired for j in range(len(entries))}
            expect = {j for j in watched if entries[j].since is not None and entries[j].since + entries[j].timeout <= now}
            due = watch.check(now)
            assert {j for j in range(len(entries)) if entries[j].expired > before[j]} == expect
            watched -= expect
            assert len(watch) == len(watched)
            soonest = min(((entries[j].since if entries[j].since is not None else now) + entries[j].timeout
                           for j in watched), default=math.inf)
            assert now < due <= soonest
