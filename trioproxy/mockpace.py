"""The mock's token clock: one task writes every stream's timed events.

A mock stream used to sleep in its own task before each token (``trio.sleep_until``:
a cancel scope, a deadline in the run loop's heap, a task switch) and then write with
trio's ``send`` (one more scheduler round). At the benchmark's rates (64 streams × 200
tokens/s, 512 × 50) that was ~50 µs of CPU per event, enough to saturate the core the
mock shares with the load generator, so the ``direct`` rows measured a busy mock
instead of a model server.

``Pacer`` keeps one heap of streams by their next due time. Its one task sleeps until
the earliest, then renders and writes every due event with one non-blocking
``os.write`` each; a stream's own task sleeps once for the whole stream and is woken
only when it is done, when its socket is full (it finishes that write itself, waiting
for the socket, then hands the rest back) or when the write failed. Due times are
absolute (``first_due + i * delay``), so a late tick does not shift later tokens.

Cancellation is lazy: a stream whose task is cancelled (its client hung up) marks
itself ``cancelled`` in a ``finally`` before its socket is closed, and the pacer drops
it when it comes up. (Between the cancellation and that ``finally`` the pacer may still
write one event: the socket is still open then.)

Each pass writes at most one event per stream, then yields: with a token delay of 0 a
stream is written one event per scheduler round, as when each stream slept in its own task.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
from collections.abc import Awaitable, Callable

import trio
from attrs import define, field


@define(eq=False)
class PacedStream:
    """One stream's timed events: ``count`` of them, ``render(i)`` is event ``i``'s bytes."""

    fd: int
    render: Callable[[int], bytes]
    count: int
    first_due: float
    delay: float
    #: Events written so far (the next one to write is ``sent``).
    sent: int = 0
    #: When the first event was written (trio time): Ollama's prompt/eval split.
    first_at: float | None = None
    #: Bytes of event ``sent - 1`` the socket did not take: the stream's task writes them.
    pending: bytes = b""
    error: OSError | None = None
    cancelled: bool = False
    #: Set by the pacer when the stream's task has work: done, a full socket, an error.
    handed_back: trio.Event = field(factory=trio.Event)

    def due(self) -> float:
        return self.first_due + self.sent * self.delay


@define
class Pacer:
    """Writes timed events for many streams from one task (``run``)."""

    _heap: list[tuple[float, int, PacedStream]] = field(factory=list)
    _order: itertools.count[int] = field(factory=itertools.count)
    #: The scope ``run`` sleeps in; its deadline is the earliest due time.
    _sleep: trio.CancelScope | None = None
    #: Events written by the pacer (statistics, tests).
    written: int = 0

    async def stream(self, paced: PacedStream, send_all: Callable[[bytes], Awaitable[None]]) -> None:
        """Write ``paced``'s events on schedule; returns when all are out.

        ``send_all`` is the stream's own async write, used for what a full socket did
        not take. Raises the ``OSError`` a write raised (the client is gone).
        """
        try:
            while paced.sent < paced.count:
                paced.handed_back = trio.Event()
                self._push(paced)
                await paced.handed_back.wait()
                if paced.error is not None:
                    raise paced.error
                if paced.pending:
                    rest, paced.pending = paced.pending, b""
                    await send_all(rest)
        finally:
            paced.cancelled = True  # if still queued (cancelled), the pacer drops it unwritten

    def _push(self, paced: PacedStream) -> None:
        due = paced.due()
        heapq.heappush(self._heap, (due, next(self._order), paced))
        if self._sleep is not None and due < self._sleep.deadline:
            self._sleep.deadline = due

    async def run(self) -> None:
        """Write due events until cancelled (owned by the mock's nursery)."""
        heap = self._heap
        while True:  # bounded by cancellation: each pass sleeps until the next due time
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            # One event per stream per pass: a stream still due after it (token delay 0, or
            # behind schedule) waits for the next pass, after the other tasks have run. The
            # embedded mocks share the gateway's event loop; an unbounded burst would stall it.
            due: list[PacedStream] = []
            while heap and heap[0][0] <= now:  # bounded: each pass pops one entry
                due.append(heapq.heappop(heap)[2])
            for paced in due:
                if not paced.cancelled:
                    self._write(paced, now)

    def _write(self, paced: PacedStream, now: float) -> None:
        data = paced.render(paced.sent)
        try:
            written = os.write(paced.fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            paced.error = exc
            paced.handed_back.set()
            return
        self.written += 1
        if paced.first_at is None:
            paced.first_at = now
        paced.sent += 1
        if written < len(data):
            paced.pending = data[written:]
            paced.handed_back.set()
        elif paced.sent >= paced.count:
            paced.handed_back.set()
        else:
            due = paced.due()
            heapq.heappush(self._heap, (due, next(self._order), paced))
