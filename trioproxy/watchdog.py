"""``Watchdog``: one task that times out many waits, instead of a cancel scope or a task per wait.

What it watches are long-lived waits of relayed streams, thousands of times per second:

- a client write (``relay._ClientWriter``): Hypercorn shields its socket writes, so a
  send to a client that stopped reading cannot be cancelled; the watchdog gives up on
  the client and releases the upstream (closing its connection makes vLLM or Ollama
  stop generating);
- an upstream read between two chunks (``pool.UpstreamResponse``): the idle timeout.
  The watchdog closes the connection, which wakes the parked read; the read then
  raises ``UpstreamTimeout``.

A watched wait costs two assignments (``since = now`` before it, ``None`` after) and a
set insertion and removal for the life of its stream: no task, nursery or cancel scope
of its own. One ``trio.move_on_at`` per chunk was most of what a relayed chunk cost the
gateway beyond Hypercorn's own send (docs/benchmarks.md).

Two more are one-shot, a deadline per request rather than waits that come and go
(``watch_once``): the wait for an upstream's response head (the first-byte timeout), and
the moment a request has run long enough to be watched for a client that hangs up
(``server.disconnect_watch_after_ms``).

``run`` (in ``server.main``'s service nursery) sleeps until the earliest moment a wait
can be due: the oldest wait in progress plus its timeout, or, for an entry between
waits, now plus its timeout (a wait that starts later expires later still). ``watch``
and ``watch_once`` bring that moment forward when an entry due sooner arrives. Expiry
is exact, not polled. The waits that come and go are scanned only when one of them may
be due (their timeouts are long), and the one-shot entries are kept per timeout in the
order they began, so a wake-up for one of those looks at the oldest of each and stops,
however many streams are open (with 512 streams, a request starting every 2.5 ms woke a
scan of every entry, about 1,400: 2-3 % of the gateway's samples; docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import trio
from loguru import logger

__all__ = ["Watchdog", "Watched"]


class Watched(Protocol):
    #: When the wait in progress started (trio clock), or None between waits.
    since: float | None
    #: Seconds a wait may last.
    timeout: float

    def expire(self) -> None:
        """The wait in progress lasted ``timeout``: end it (sync; the watchdog forgets the entry first)."""


class Watchdog:
    def __init__(self) -> None:
        #: Entries whose waits come and go (``since`` set per wait): scanned whole when one may be due.
        self._entries: set[Watched] = set()
        #: No entry of ``_entries`` can expire before this (from the last scan, or an entry watched since).
        self._entries_due = math.inf
        #: One-shot entries (``watch_once``), by timeout, each in order of ``since``: only the oldest
        #: of each can be due first, so a check looks at the ones it expires and one more.
        self._once: dict[float, dict[Watched, None]] = {}
        self._wakeup: trio.CancelScope | None = None
        #: The run's clock, read as ``trio.current_time`` reads it (for the watched, who stamp
        #: ``since`` with it): the clock's own method once ``run`` has started, three frames fewer.
        self.now: Callable[[], float] = trio.current_time

    def __len__(self) -> int:
        return len(self._entries) + sum(map(len, self._once.values()))

    def watch(self, entry: Watched) -> None:
        """Watch ``entry`` until :meth:`forget` (or its expiry). Sync; needs a running trio loop."""
        self._entries.add(entry)
        since = entry.since
        due = (self.now() if since is None else since) + entry.timeout
        if due < self._entries_due:
            self._entries_due = due
            self._bring_forward(due)

    def watch_once(self, entry: Watched) -> None:
        """Watch a wait that began at ``entry.since`` and ends only by expiring or by :meth:`forget`
        (its ``since`` does not change): a request's deadline rather than a stream's waits.

        Kept in order of ``since`` among the entries of its timeout (``since`` read from
        :attr:`now` when it is watched keeps that order): a check then looks only at the
        oldest. An entry older than the last one of its timeout is watched as :meth:`watch`
        watches, exactly all the same.
        """
        since = entry.since
        assert since is not None
        queue = self._once.get(entry.timeout)
        if queue is None:
            queue = self._once[entry.timeout] = {}
        elif queue and since < next(reversed(queue)).since:  # type: ignore[operator]
            self.watch(entry)  # (out of order: never from the gateway's own callers)
            return
        queue[entry] = None
        self._bring_forward(since + entry.timeout)

    def forget(self, entry: Watched) -> None:
        self._entries.discard(entry)
        queue = self._once.get(entry.timeout)
        if queue:
            queue.pop(entry, None)

    def _bring_forward(self, due: float) -> None:
        wakeup = self._wakeup
        if wakeup is not None and due < wakeup.deadline:
            wakeup.deadline = due

    def check(self, now: float) -> float:
        """Expire every wait that lasted its timeout; return when the next check is due (``inf``: nothing watched)."""
        expired: list[Watched] = []
        if now >= self._entries_due:
            due = math.inf
            for entry in self._entries:  # bounded: the streams open now
                since = entry.since
                if since is None:
                    due = min(due, now + entry.timeout)
                elif since + entry.timeout <= now:  # (the sum it returns as due: the two agree to the last bit)
                    expired.append(entry)
                else:
                    due = min(due, since + entry.timeout)
            self._entries_due = due
            self._entries.difference_update(expired)
        emptied = []
        for timeout, queue in self._once.items():
            gone = 0
            for entry in queue:  # bounded: stops at the first entry not yet due
                if entry.since + timeout > now:  # type: ignore[operator]
                    break
                expired.append(entry)
                gone += 1
            for entry in expired[len(expired) - gone:]:
                del queue[entry]
            if not queue:
                emptied.append(timeout)
        for timeout in emptied:  # (a timeout a reload left behind is not walked for ever)
            del self._once[timeout]
        # Expired last: an expiry may forget or watch entries (a released response forgets its wait).
        for entry in expired:
            try:
                entry.expire()
            except Exception:  # one stream's cleanup must not stop the gateway's watchdog
                logger.exception("watchdog: expiring a wait failed")
        due = self._entries_due
        for timeout, queue in self._once.items():
            if queue:
                due = min(due, next(iter(queue)).since + timeout)  # type: ignore[operator]
        return due

    async def run(self) -> None:
        """Check at every due moment, until cancelled."""
        self.now = trio.lowlevel.current_clock().current_time
        try:
            while True:
                with trio.CancelScope(deadline=self.check(self.now())) as wakeup:
                    self._wakeup = wakeup
                    await trio.sleep_forever()
        finally:
            self.now = trio.current_time  # (this run's clock means nothing to another run)
            self._wakeup = None  # (a scope no one waits on: watch() must not move its deadline)
