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

``run`` (in ``server.main``'s service nursery) sleeps until the earliest moment a wait
can be due: the oldest wait in progress plus its timeout, or, for an entry between
waits, now plus its timeout (a wait that starts later expires later still). ``watch``
brings that moment forward when an entry with a shorter timeout arrives. Expiry is
exact, not polled.
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
        self._entries: set[Watched] = set()
        self._wakeup: trio.CancelScope | None = None
        #: The run's clock, read as ``trio.current_time`` reads it (for the watched, who stamp
        #: ``since`` with it): the clock's own method once ``run`` has started, three frames fewer.
        self.now: Callable[[], float] = trio.current_time

    def __len__(self) -> int:
        return len(self._entries)

    def watch(self, entry: Watched) -> None:
        """Watch ``entry`` until :meth:`forget` (or its expiry). Sync; needs a running trio loop."""
        self._entries.add(entry)
        wakeup = self._wakeup
        if wakeup is not None:
            due = self.now() + entry.timeout
            if due < wakeup.deadline:
                wakeup.deadline = due

    def forget(self, entry: Watched) -> None:
        self._entries.discard(entry)

    def check(self, now: float) -> float:
        """Expire every wait that lasted its timeout; return when the next check is due (``inf``: nothing watched)."""
        due = math.inf
        for entry in list(self._entries):  # bounded: the streams open now
            since = entry.since
            if since is None:
                due = min(due, now + entry.timeout)
            elif now - since >= entry.timeout:
                self._entries.discard(entry)
                try:
                    entry.expire()
                except Exception:  # one stream's cleanup must not stop the gateway's watchdog
                    logger.exception("watchdog: expiring a wait failed")
            else:
                due = min(due, since + entry.timeout)
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
