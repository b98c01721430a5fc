"""Keep-alive timers for Hypercorn's Trio connections: one task for all, not one per connection.

Hypercorn (0.17, 0.18) times each idle connection with a task of its own, respawned at
each request's end (``TrioSingleTask``). ``hypercorn_fast`` first made that one task per
connection, re-armed per request; this module makes it one task per server
(:class:`Reaper`), and each connection's timer (:class:`IdleTimer`) a small object with a
deadline: a task, its cancel scope and its wait held ~3 KB per open connection, and moving
the scope's deadline at each request put an entry on trio's deadline heap.

The behaviour is Hypercorn's: an idle connection (no request in flight) is closed once
``keep_alive_timeout`` has passed since its last answer, or at once when the server shuts
down; a connection with a request in flight is never closed by its timer, and is closed at
once after its answer when the server is shutting down. A connection's timer ends when its
reading ends (a client's EOF included: the leak ``hypercorn_fix`` fixes for the stock timer).

The reaper runs in the nursery Hypercorn starts its connections' tasks in (the task that
constructs a connection's ``TCPServer`` is one of them), beside the connections it times:
a nursery trioproxy does not own, as the connections' own tasks are not (STYLE.md §2 has
request code own its tasks; this is Hypercorn's side). It is started by the first
connection of a server, and ends when the server is shutting down, once it has closed the
idle connections (or when Hypercorn cancels that nursery). It sleeps until the earliest deadline of the idle connections, kept
in a heap; a request's end only sets its connection's deadline (and wakes the reaper only if
none was idle).
"""

from __future__ import annotations

import heapq
import math
import weakref
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["IdleTimer", "Reaper", "timer_for"]


class IdleTimer:
    """A connection's keep-alive timer (``TCPServer.idle_task``, Hypercorn's ``restart``/``stop`` calls).

    Armed (``restart``: the connection is idle), its :class:`Reaper` closes the connection
    at ``deadline``, or at once if the server is shutting down; disarmed (``stop``: a request
    in flight), it does nothing. :meth:`close` ends it (the connection's reading is over).
    """

    __slots__ = ("__weakref__", "_reaper", "_server", "armed", "closed", "deadline", "queued_at")

    def __init__(self, server: Any, reaper: Reaper) -> None:
        self._server = server
        self._reaper = reaper
        self.armed = False
        #: When to close the connection if still idle (``inf`` with an infinite keep-alive).
        self.deadline = math.inf
        #: The deadline of its current entry in its ``Reaper``'s heap (None: it has none).
        self.queued_at: float | None = None
        self.closed = False

    async def restart(self, task_group: Any, action: Callable[[], Any] | None = None) -> None:
        """Arm: the connection is idle from now.

        ``action`` is Hypercorn's timer body (``TCPServer._idle_timeout``); it is not called:
        the reaper does what it does (close once the timeout passes, or on shutdown).
        """
        if self.closed:
            return
        if self._server.context.terminated.is_set():  # shutting down: an idle connection closes now
            self.closed = True
            self._reaper.forget(self)
            task_group.spawn(self.close_connection)
            return
        self.armed = True
        self.deadline = trio.current_time() + self._server.config.keep_alive_timeout
        self._reaper.arm(self)

    async def stop(self) -> None:
        """Disarm: a request is in flight."""
        self.armed = False

    def close(self) -> None:
        """The connection's reading is over: forget it (idempotent)."""
        self.closed = True
        self._reaper.forget(self)

    async def close_connection(self) -> None:
        """Close the connection as Hypercorn's timer does (shielded: a close is never half done)."""
        with trio.CancelScope(shield=True):
            await self._server._initiate_server_close()


class Reaper:
    """Closes the idle connections of one Hypercorn server once their keep-alive has passed.

    The deadlines wait in a heap with at most one current entry per connection
    (``IdleTimer.queued_at``), holding its timer weakly (a closed connection is freed at
    once). A request's end moves its timer's deadline later, and its entry is brought up to
    date only when it comes to the top (dropped there if the timer has been disarmed or
    closed since); a deadline that moves earlier (a shorter keep-alive) gets a new entry,
    and the old one is dropped when it surfaces. A connection that closes leaves its entry
    behind until then; once such entries outnumber the rest, the heap is rebuilt without
    them. So a request costs a comparison, a connection coming due O(log n), and with
    thousands of idle connections coming due at staggered times a wake-up does not scan
    them all. An infinite keep-alive puts nothing in the heap (shutdown closes from
    ``_timers``).
    """

    #: Rebuild the heap once this many entries, and more than the live ones, are closed connections'.
    COMPACT_AFTER = 64

    def __init__(self, terminated: Any) -> None:
        #: The server's ``WorkerContext.terminated`` (Hypercorn's event wrapper).
        self._terminated = terminated
        #: Every open connection's timer that has been armed once (armed or not now): for shutdown.
        self._timers: set[IdleTimer] = set()
        #: (deadline, push number, the timer, weakly); an entry is current if its deadline is its timer's ``queued_at``.
        self._due: list[tuple[float, int, weakref.ref[IdleTimer]]] = []
        self._pushes = 0
        #: Entries left behind by closed connections (approximately: see ``_settle``).
        self._closed_entries = 0
        #: The running reaper's sleep (None while it is closing connections, or not running).
        self._wakeup: trio.CancelScope | None = None
        self.done = False

    def arm(self, timer: IdleTimer) -> None:
        """``timer`` has just been armed (its deadline set): watch it, and wake sooner if it is due first."""
        self._timers.add(timer)
        deadline = timer.deadline
        queued_at = timer.queued_at
        if deadline < math.inf and (queued_at is None or deadline < queued_at):
            # (a later deadline keeps its entry, brought up to date when it surfaces)
            timer.queued_at = deadline
            self._push(deadline, weakref.ref(timer))
        wakeup = self._wakeup
        if wakeup is not None and deadline < wakeup.deadline:
            wakeup.deadline = deadline  # (only when none was idle: a later arming never comes due sooner)

    def forget(self, timer: IdleTimer) -> None:
        """``timer``'s connection is over (``closed`` set): stop watching it."""
        self._timers.discard(timer)
        if timer.queued_at is not None:  # its entry stays until it surfaces, or the heap is rebuilt
            timer.queued_at = None
            self._closed_entries += 1
            if self._closed_entries > self.COMPACT_AFTER and 2 * self._closed_entries > len(self._due):
                self._compact()

    def _compact(self) -> None:
        """Rebuild the heap without the closed connections' entries (amortized O(1) per close)."""
        self._due = [entry for entry in self._due if _current(entry)]
        heapq.heapify(self._due)
        self._closed_entries = 0

    def _push(self, deadline: float, ref: weakref.ref[IdleTimer]) -> None:
        self._pushes += 1  # (ties broken by order: timers themselves do not compare)
        heapq.heappush(self._due, (deadline, self._pushes, ref))

    def _settle(self) -> None:
        """Bring the heap's top up to date: its entry is an armed, open timer's at its deadline, or none is left."""
        due = self._due
        while due:  # bounded: each pass drops an entry, or moves one to its timer's later deadline
            deadline, _, ref = due[0]
            timer = ref()
            if timer is None or timer.closed:  # a closed connection's
                heapq.heappop(due)
                self._closed_entries = max(0, self._closed_entries - 1)
            elif timer.queued_at != deadline:  # superseded by an earlier one (a shorter keep-alive)
                heapq.heappop(due)
            elif not timer.armed:  # a request in flight: its next arming queues it again
                heapq.heappop(due)
                timer.queued_at = None
            elif timer.deadline != deadline:  # answered again since: due later
                timer.queued_at = timer.deadline
                self._pushes += 1
                heapq.heapreplace(due, (timer.deadline, self._pushes, ref))
            else:
                return

    def _next_due(self) -> float:
        """The earliest deadline of an armed, open timer (``inf`` if none)."""
        self._settle()
        return self._due[0][0] if self._due else math.inf

    def _take_due(self, now: float) -> list[IdleTimer]:
        """Take out and return the armed, open timers whose deadline is ``now`` or before."""
        due = self._due
        taken: list[IdleTimer] = []
        while True:  # bounded: each pass takes one entry out of the heap
            self._settle()
            if not due or due[0][0] > now:
                return taken
            timer = heapq.heappop(due)[2]()
            assert timer is not None  # (settled: current, so alive)
            timer.queued_at = None
            taken.append(timer)

    async def run(self) -> None:
        """Close idle connections as their deadlines pass, and all idle ones on shutdown; then end."""
        try:
            while True:  # bounded by the server: each pass closes what came due; ends on shutdown
                with trio.CancelScope(deadline=self._next_due()) as wakeup:
                    self._wakeup = wakeup
                    await self._terminated.wait()
                self._wakeup = None
                shutting_down = self._terminated.is_set()
                await self._close_due(shutting_down)
                if shutting_down:
                    return
        finally:
            self.done = True
            self._wakeup = None
            self._due.clear()

    async def _close_due(self, shutting_down: bool) -> None:
        # (A method of its own: nothing of a closed connection stays in ``run``'s frame.)
        if shutting_down:
            timers = [t for t in self._timers if t.armed]
        else:
            timers = self._take_due(trio.current_time())
        for timer in timers:
            # Checked again: while an earlier one closed, this connection may have taken a
            # request (disarmed) or answered one (a later deadline, a newer heap entry).
            if timer.armed and not timer.closed and (shutting_down or timer.deadline <= trio.current_time()):
                timer.close()
                await timer.close_connection()


def _current(entry: tuple[float, int, weakref.ref[IdleTimer]]) -> bool:
    """Whether a heap entry is its timer's current one: the timer alive, open, and queued at its deadline."""
    timer = entry[2]()
    return timer is not None and not timer.closed and timer.queued_at == entry[0]


def timer_for(server: Any) -> IdleTimer:
    """A keep-alive timer for ``server`` (a new ``TCPServer``, constructed in its connection's task).

    The first connection of a server (of its ``WorkerContext``) starts the server's reaper
    in the nursery of its own task, which is Hypercorn's connection nursery.
    """
    context = server.context
    reaper: Reaper | None = getattr(context, "_trioproxy_reaper", None)
    if reaper is None or reaper.done:
        reaper = Reaper(context.terminated)
        context._trioproxy_reaper = reaper
        nursery = trio.lowlevel.current_task().parent_nursery
        if nursery is None:  # (a connection's task is never trio's root task)
            raise RuntimeError("a Hypercorn connection constructed outside a connection task")
        nursery.start_soon(reaper.run, name="keep-alive reaper")
    return IdleTimer(server, reaper)
