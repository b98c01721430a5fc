"""Per-upstream concurrency limit with a bounded FIFO wait queue.

The counting and the admission decisions live in ``SlotLedger`` [sans-IO]; the trio
part, ``ConcurrencyGate``, only parks and unparks tasks on a ``trio.lowlevel.ParkingLot``
(FIFO), the way ``trio.Semaphore`` does.

Why a ParkingLot rather than an Event per waiter: when a parked task is cancelled,
trio removes it from the lot inside the cancel itself, synchronously; when it is
unparked, it is rescheduled with a value that no later cancel can take back. So
"cancelled" and "handed a slot" are mutually exclusive, decided at one instant, and a
slot can never be handed to a waiter that is already leaving: no leak, no recovery code.
A waiter handed its slot in the same tick as its cancel returns from ``acquire`` with
the slot, and its next checkpoint raises ``Cancelled``, so the caller's
``try: ... finally: gate.release()`` gives the slot back.
"""

from __future__ import annotations

import trio
from attrs import define, field, frozen, setters, validators


class Saturated(Exception):
    """No slot became free in time (or the wait queue is full)."""


@frozen
class GateStatistics:
    in_flight: int
    waiting: int
    max_concurrent: int
    max_queue: int
    #: Lifetime counts: turned away because the queue was full / gave up after queue_timeout_s.
    rejected: int
    timed_out: int


# Validated at construction; the hot counters are set without attrs' per-assignment hook.
@define(on_setattr=setters.NO_OP)
class SlotLedger:
    """Slots of one gate: who holds one, who may wait, who is turned away [sans-IO].

    ``waiting`` is passed in by the caller (the ParkingLot's length is the truth). A
    slot freed while someone waits is not put back but handed over: ``in_flight`` does
    not change, so ``in_flight == max_concurrent`` whenever anyone waits and no
    newcomer can take a slot in front of the queue.
    """

    max_concurrent: int = field(validator=validators.ge(0))  # 0: unlimited
    max_queue: int = field(default=0, validator=validators.ge(0))
    in_flight: int = field(default=0, init=False)
    rejected: int = field(default=0, init=False)
    timed_out: int = field(default=0, init=False)

    def take_nowait(self, *, waiting: int) -> bool:
        """Take a free slot if there is one and nobody is queued for it."""
        unlimited = self.max_concurrent == 0
        if unlimited or (waiting == 0 and self.in_flight < self.max_concurrent):
            self.in_flight += 1
            return True
        return False

    def may_queue(self, *, waiting: int) -> bool:
        """Is there room in the queue? Counts a rejection if not."""
        if waiting < self.max_queue:
            return True
        self.rejected += 1
        return False

    def give_back(self, *, waiting: int) -> bool:
        """A holder is done: True if its slot goes to the first waiter, False if it is freed.

        Raises:
            RuntimeError: nothing is held (a release without its acquire).
        """
        if self.in_flight <= 0:
            raise RuntimeError("release() without a matching acquire")
        if waiting > 0:
            return True
        self.in_flight -= 1
        return False


class ConcurrencyGate:
    """At most max_concurrent requests in flight to one upstream; up to max_queue more
    wait (FIFO) for queue_timeout_s; beyond that, Saturated at once.

    Args:
        max_concurrent: slots; 0 means unlimited (``acquire`` never waits, ``in_flight``
            still counts, for least-outstanding routing).
        max_queue: how many may wait for a slot; 0: over the limit is Saturated at once.
        queue_timeout_s: how long a waiter waits before Saturated. 0 means a waiter
            gives up at once unless a slot is handed to it in that same instant;
            ``math.inf`` waits as long as the caller's own deadline allows.
    """

    def __init__(self, *, max_concurrent: int, max_queue: int = 0, queue_timeout_s: float = 0.0) -> None:
        if not queue_timeout_s >= 0:
            raise ValueError(f"queue_timeout_s must be 0 or more, got {queue_timeout_s!r}")
        self._ledger = SlotLedger(max_concurrent=max_concurrent, max_queue=max_queue)
        self._queue_timeout_s = queue_timeout_s
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def in_flight(self) -> int:
        """Slots held, counting those handed to a waiter that has not run yet."""
        return self._ledger.in_flight

    @property
    def waiting(self) -> int:
        return len(self._lot)

    def try_acquire_nowait(self) -> bool:
        """Take a slot now, or return False; never waits, never jumps the queue."""
        return self._ledger.take_nowait(waiting=len(self._lot))

    async def acquire(self) -> float:
        """Take a slot, waiting in FIFO order if needed; return the seconds waited.

        Follow it at once with ``try: ... finally: gate.release()``, with no checkpoint
        in between.

        Returns:
            Seconds spent in the queue (trio clock); 0.0 when a slot was free.

        Raises:
            Saturated: the queue was full (at once), or no slot came within
                ``queue_timeout_s``.
            trio.Cancelled: the caller's scope was cancelled before a slot was handed
                over; the waiter has left the queue and holds nothing.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waiting = len(self._lot)
        if self._ledger.take_nowait(waiting=waiting):
            # Schedule point only: a cancel here would lose the slot we just took.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return 0.0
        if not self._ledger.may_queue(waiting=waiting):
            await trio.lowlevel.cancel_shielded_checkpoint()
            raise Saturated(f"{self.in_flight} in flight and {waiting} waiting: the queue is full")
        started = trio.current_time()
        with trio.move_on_after(self._queue_timeout_s) as patience:
            # Returns only when release() handed us its slot (in_flight already counts it).
            await self._lot.park()
        if patience.cancelled_caught:
            # Aborted by the timeout: trio took us out of the lot, so we hold nothing.
            self._ledger.timed_out += 1
            raise Saturated(f"no slot within {self._queue_timeout_s:g} s")
        return trio.current_time() - started

    def release(self) -> None:
        """Give a slot back: to the first waiter if any (FIFO), else to the free pool.

        Synchronous and not a checkpoint, so it works in a ``finally`` of a cancelled scope.

        Raises:
            RuntimeError: called more often than ``acquire`` succeeded.
        """
        if self._ledger.give_back(waiting=len(self._lot)):
            self._lot.unpark(count=1)

    def statistics(self) -> GateStatistics:
        ledger = self._ledger
        return GateStatistics(
            in_flight=ledger.in_flight,
            waiting=len(self._lot),
            max_concurrent=ledger.max_concurrent,
            max_queue=ledger.max_queue,
            rejected=ledger.rejected,
            timed_out=ledger.timed_out,
        )
