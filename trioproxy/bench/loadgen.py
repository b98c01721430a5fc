"""The load generator: keep-alive clients on raw trio sockets, closed or open loop.

Cheap enough not to be what is measured: every connection is opened before the
round starts, a request is one pre-built ``bytes`` object sent with one
``send``, the answer is parsed by ``trioproxy.http1``'s response parser, and a
streamed body is watched by :class:`StreamWatcher` with a handful of C-level
scans per received piece (no JSON decoding, no per-request client object).

One round::

    run_load
    ├─ connect × connections (all before the clock starts; a failure is an error)
    └─ round nursery (hard deadline: window end + request timeout + grace)
       ├─ on_window(window_start, window_end)   the caller's probes: /proc samples, a kill
       ├─ client_cpu                              this process's CPU over the window
       └─ reading nursery (cancelled once the workers are done)
          ├─ StreamReader.run                     streams only: reads every streamed body
          └─ workers nursery
             └─ run_worker × connections          request, answer, repeat until the window ends

A streamed body is read by one ``StreamReader`` task for all connections: it waits on
its own epoll set and takes each ready connection's bytes where they land, so an event
costs one ``recv`` and a parse, not a task switch and an ``epoll_ctl`` as well (at 512
streams the load generator would otherwise be the bottleneck of its core). The worker
sends the request, reads the head, hands the body over and waits for its end.

Closed loop, a connection sends its next request as soon as its last answer is in. Open
loop (``rate``), requests are due on a fixed schedule spread over the connections, and a
request's times count from when it was due: if its connection is still busy then, the
wait is part of its latency, as it would be for a user (wrk2's correction for
coordinated omission; the load generator's own timer lateness is left out). ``late_ms``
records how long each was held up that way.

A request counts if it *started* (open loop: was due) inside the measured window ``[start + warmup,
start + warmup + duration)``; requests started during the warm-up or the drain
are sent and answered like the others, but only counted in ``sent_total``.
Every loop is bounded: by the window's end (no request starts after it), by
``max_requests``, and by a per-request timeout under the round's hard deadline.
"""

from __future__ import annotations

import errno
import math
import random
import select
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import trio
from attrs import define, field, frozen

from ..http1 import IncompleteMessage, ProtocolError, ResponseParser
from .scenarios import Load
from .wire import Address, StreamWatcher

__all__ = ["LoadPlan", "Recorder", "RoundResult", "run_load"]

#: One recv reads many SSE events or a whole small answer (trio's default receive size).
RECV_SIZE = 65536
#: After a failed connect, wait this long before the next try (bounded retry loop, no busy spin).
CONNECT_BACKOFF_S = 0.05
#: Connecting every client connection before the round must not take longer than this.
CONNECT_ALL_TIMEOUT_S = 20.0
#: Margin past the last request's timeout before the round is cut off regardless.
HARD_DEADLINE_GRACE_S = 2.0
#: Seed of the retry jitter after a failed request: runs are repeatable.
RETRY_JITTER_SEED = 5

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_now = trio.current_time


@frozen
class LoadPlan:
    """How one round runs (from a scenario's ``[load]`` and ``[run]``)."""

    connections: int
    stream: bool
    duration_s: float
    warmup_s: float = 0.0
    ramp_s: float = 0.0
    request_timeout_s: float = 30.0
    max_requests: int = 0
    #: Open loop: requests due per second over all connections (0: closed loop).
    rate: float = 0.0

    @classmethod
    def from_scenario(cls, load: Load, *, duration_s: float, warmup_s: float) -> LoadPlan:
        return cls(
            connections=load.connections,
            stream=load.stream,
            duration_s=duration_s,
            warmup_s=warmup_s,
            ramp_s=load.ramp_s,
            request_timeout_s=load.request_timeout_s,
            max_requests=load.max_requests,
            rate=load.rate,
        )


@define
class Recorder:
    """Per-request facts of the requests started inside the window (parallel lists).

    Times are milliseconds, except ``starts``/``ends``: seconds since the window opened.
    ``ttft_ms`` is NaN for a request with no content event (every non-streamed one).
    """

    starts: list[float] = field(factory=list)
    ends: list[float] = field(factory=list)
    headers_ms: list[float] = field(factory=list)
    ttft_ms: list[float] = field(factory=list)
    total_ms: list[float] = field(factory=list)
    errors: list[str | None] = field(factory=list)
    #: Gaps between consecutive content events of a stream; 0 for events that came in one read.
    gaps_ms: list[float] = field(factory=list)
    #: Open loop only: how long each request was held up past when it was due by its
    #: connection's previous answer (counted in its latency).
    late_ms: list[float] = field(factory=list)
    statuses: Counter[int] = field(factory=Counter)

    def add(
        self,
        start: float,
        end: float,
        headers_ms: float,
        ttft_ms: float,
        total_ms: float,
        error: str | None,
        status: int,
        late_ms: float | None = None,
    ) -> None:
        """One request; ``late_ms`` (open loop only) how long it was held up past when it was due."""
        if late_ms is not None:
            self.late_ms.append(late_ms)
        self.starts.append(start)
        self.ends.append(end)
        self.headers_ms.append(headers_ms)
        self.ttft_ms.append(ttft_ms)
        self.total_ms.append(total_ms)
        self.errors.append(error)
        if status:
            self.statuses[status] += 1

    @property
    def count(self) -> int:
        return len(self.starts)

    def error_counts(self) -> dict[str, int]:
        """Errors by kind (``timeout``, ``reset``, ``http_503``, ``stream_error_event``...)."""
        return dict(Counter(e for e in self.errors if e is not None))


@define
class RoundResult:
    """One round against one target."""

    recorder: Recorder
    #: Seconds the window really lasted (shorter when ``max_requests`` stopped it).
    window_s: float
    #: Every request sent, warm-up and drain included (compare with the usage log).
    sent_total: int
    #: CPU seconds the load generator itself used during the window.
    client_cpu_s: float
    #: trio clock times of the window, for probes that ran beside it.
    window_start: float
    window_end: float


async def _connect(address: Address) -> socket.socket:
    """A connected non-blocking TCP socket with TCP_NODELAY. Raises OSError."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    ok = False
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(address.sockaddr)
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            await _wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await trio.lowlevel.checkpoint()
        if err:
            raise OSError(err, f"connect to {address.url}: {errno.errorcode.get(err, err)}")
        ok = True
        return sock
    finally:
        if not ok:
            sock.close()


async def _send_all(sock: socket.socket, data: bytes) -> None:
    try:
        sent = sock.send(data)  # a request is small: this one call is all, almost always
    except BlockingIOError:
        sent = 0
    view = memoryview(data)
    while sent < len(data):  # bounded by the request's timeout scope
        await _wait_writable(sock)
        try:
            sent += sock.send(view[sent:])
        except BlockingIOError:
            pass


async def _receive(sock: socket.socket) -> bytes:
    """The next bytes (b"" at EOF), waiting for readiness *first*.

    Called only when the parser needs more, and then the bytes are almost never
    there yet (the answer is being computed, the next token is milliseconds away):
    trying ``recv`` first would cost a failed syscall and an exception per event.
    """
    while True:  # bounded by the request's timeout scope
        await _wait_readable(sock)
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            pass  # a spurious wake-up: wait again


def _close(sock: socket.socket | None) -> None:
    if sock is not None and sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
        sock.close()


class _Body:
    """One streamed body being read: its parser, its watcher and what it has shown so far."""

    __slots__ = ("done", "error", "gaps", "last_token", "parser", "sock", "t0", "t_end", "ttft", "watcher")

    def __init__(self, sock: socket.socket, parser: ResponseParser, watcher: StreamWatcher, t0: float) -> None:
        self.sock = sock
        self.parser = parser
        self.watcher = watcher
        self.t0 = t0
        self.ttft = math.nan
        self.last_token = math.nan
        self.gaps: list[float] = []
        #: Set once the body has ended, cleanly or not (``error`` says which), at ``t_end``.
        self.done = trio.Event()
        self.error: Exception | None = None
        self.t_end = math.nan

    def consume(self) -> bool:
        """Take every complete body piece the parser holds; True once the body has ended.

        Raises:
          IncompleteMessage, ProtocolError: from the parser.
        """
        parser, watcher = self.parser, self.watcher
        while True:  # bounded by the bytes fed
            piece = parser.next_body_piece()
            if piece is None:
                return False
            if not piece:
                self.t_end = _now()  # when the end was parsed, not when the worker next runs
                return True
            if n := watcher.feed(piece):
                t = _now()
                if self.ttft != self.ttft:  # NaN: this is the first content
                    self.ttft = (t - self.t0) * 1000
                else:
                    self.gaps.append((t - self.last_token) * 1000)
                if n > 1:  # arrived in one read: the client sees them at the same instant
                    self.gaps.extend([0.0] * (n - 1))
                self.last_token = t

    def take(self, data: bytes) -> bool:
        """Feed what one ``recv`` gave (b"": EOF); True once the body has ended (or failed)."""
        try:
            if data:
                self.parser.feed(data)
            else:
                self.parser.feed_eof()
            return self.consume()
        except (IncompleteMessage, ProtocolError) as exc:
            self.error, self.t_end = exc, _now()
            return True


class StreamReader:
    """Reads every streamed body of a round from one task (``run``), on its own epoll set."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._bodies: dict[int, _Body] = {}

    async def follow(self, body: _Body) -> None:
        """Read ``body`` until it ends; raises what reading it raised (OSError, parser errors)."""
        fd = body.sock.fileno()
        try:
            self._epoll.register(fd, select.EPOLLIN)
            self._bodies[fd] = body
            await body.done.wait()
        finally:
            self._forget(fd)
        if body.error is not None:
            raise body.error

    def close(self) -> None:
        """Close the epoll set (``run_load``, once no worker is left)."""
        self._bodies.clear()
        self._epoll.close()

    def _forget(self, fd: int) -> None:
        if self._bodies.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed

    async def run(self) -> None:
        """Until cancelled (once the workers are done): read each readable connection once per pass."""
        epoll, bodies = self._epoll, self._bodies
        while True:  # bounded by cancellation
            await _wait_readable(epoll.fileno())
            for fd, _ in epoll.poll(0):
                body = bodies.get(fd)
                if body is None:  # (cannot happen: both are updated together) never spin on it
                    try:
                        epoll.unregister(fd)
                    except (OSError, ValueError):
                        pass
                    continue
                try:
                    data = body.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    body.error, body.t_end = exc, _now()
                    ended = True
                else:
                    ended = body.take(data)
                if ended:
                    self._forget(fd)
                    body.done.set()


class _Round:
    """The shared state of one round: the window, the counters, the recorder."""

    def __init__(self, address: Address, request: bytes, plan: LoadPlan, start: float) -> None:
        self.address = address
        self.request = request
        self.plan = plan
        self.start = start
        self.window_start = start + plan.warmup_s
        self.window_end = self.window_start + plan.duration_s
        self.stopped_at: float | None = None  # max_requests reached
        self.recorder = Recorder()
        self.sent_total = 0
        self.in_window = 0
        self.rng = random.Random(RETRY_JITTER_SEED)
        #: Reads the streamed bodies (None: non-streamed answers, read by each worker).
        self.reader = StreamReader() if plan.stream else None

    async def run_worker(self, index: int, sock: socket.socket | None) -> None:
        plan = self.plan
        # Open loop: this connection's k-th request is due at first_due + k * every.
        every = plan.connections / plan.rate if plan.rate else 0.0
        due = self.start + index / plan.rate if plan.rate else 0.0
        free_at = -math.inf  # open loop: when this connection's last answer ended
        late: float | None = None  # open loop: ms the request was held up (None: closed loop)
        try:
            if plan.ramp_s:
                await trio.sleep_until(self.start + plan.ramp_s * index / plan.connections)
            while True:  # bounded: no request starts after the window's end or past max_requests
                if every:
                    if due >= self.window_end or self.stopped_at is not None:
                        return
                    if _now() < due:
                        await trio.sleep_until(due)
                        if self.stopped_at is not None:  # max_requests reached while this one slept
                            return
                    # The latency counts from when it was due, less the load generator's own
                    # lateness (its timer wakes up to ~1 ms late): what the target's last
                    # answer on this connection held it up by stays in.
                    now = _now()
                    held = max(0.0, min(free_at, now) - due)
                    t0, window_time, due, late = now - held, due, due + every, held * 1000
                else:
                    t0 = window_time = _now()
                    if t0 >= self.window_end or self.stopped_at is not None:
                        return
                counted = window_time >= self.window_start
                if counted:
                    self.in_window += 1
                    if plan.max_requests and self.in_window >= plan.max_requests:
                        self.stopped_at = window_time
                if every and _now() >= t0 + plan.request_timeout_s:
                    # Held up past its whole timeout before it could be sent: a timeout, not
                    # sent (so the backlog of a target that cannot keep up stays bounded).
                    if counted:
                        ws = self.window_start
                        self.recorder.add(t0 - ws, _now() - ws, math.nan, math.nan, (_now() - t0) * 1000,
                                          "timeout", 0, late)
                    await trio.lowlevel.checkpoint()  # a run of these must not hold the other tasks up
                    continue
                if sock is None:
                    try:
                        sock = await _connect(self.address)
                    except OSError:
                        self.sent_total += 1
                        if counted:
                            self.recorder.add(t0 - self.window_start, _now() - self.window_start,
                                              math.nan, math.nan, math.nan, "connect", 0, late)
                        if every:  # paced by the schedule: the next try is the next due request
                            free_at = _now()
                        else:
                            await trio.sleep(CONNECT_BACKOFF_S)
                        continue
                reusable, failed, free_at = await self._exchange(sock, t0, counted, late)
                if not reusable:
                    _close(sock)
                    sock = None
                if failed and plan.ramp_s:
                    # Clients that failed together would otherwise all retry in the same
                    # millisecond, forever in phase: retry after a random part of the ramp.
                    await trio.sleep(self.rng.random() * plan.ramp_s)
        finally:
            _close(sock)

    async def _exchange(
        self, sock: socket.socket, t0: float, counted: bool, late_ms: float | None = None
    ) -> tuple[bool, bool, float]:
        """One request and its whole answer; records it.

        Returns (connection reusable, request failed, when its answer ended).
        """
        self.sent_total += 1
        stream = self.plan.stream
        watcher = StreamWatcher() if stream else None
        parser = ResponseParser()
        t_head = ttft = t_body_end = math.nan
        gaps: list[float] = []
        status = 0
        error: str | None = None
        # From t0: open loop, a request held up has that much less of its timeout left.
        with trio.move_on_at(t0 + self.plan.request_timeout_s) as scope:
            try:
                await _send_all(sock, self.request)
                while True:  # _receive waits first: at least one real checkpoint per request
                    data = await _receive(sock)
                    if data:
                        parser.feed(data)
                    else:
                        parser.feed_eof()
                    head = parser.next_head()
                    if head is not None:
                        break
                t_head = _now()
                status = head.status
                if watcher is not None:
                    body = _Body(sock, parser, watcher, t0)
                    try:
                        if not body.consume():  # what came with the head, then the reader's task
                            assert self.reader is not None
                            await self.reader.follow(body)
                    finally:
                        ttft, gaps, t_body_end = body.ttft, body.gaps, body.t_end
                else:  # a whole answer: read here
                    while (piece := parser.next_body_piece()) != b"":  # bounded by the request's timeout scope
                        if piece is None:
                            data = await _receive(sock)
                            if data:
                                parser.feed(data)
                            else:
                                parser.feed_eof()
            except IncompleteMessage:
                error = "incomplete" if status else "eof_before_response"
            except ProtocolError:
                error = "protocol"
            except OSError as exc:
                error = "reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE) else f"os_{exc.errno}"
        # A streamed body's end as the reader parsed it; else (a whole answer, a failure before
        # the body, a timeout) now.
        t_end = t_body_end if t_body_end == t_body_end and not scope.cancelled_caught else _now()
        if scope.cancelled_caught:
            error = "timeout"
        elif error is None:
            if not 200 <= status < 300:
                error = f"http_{status}"
            elif watcher is not None and watcher.error:
                error = "stream_error_event"
            elif watcher is not None and not watcher.done:
                error = "stream_incomplete"
        if counted:
            ws = self.window_start
            self.recorder.add(t0 - ws, t_end - ws, (t_head - t0) * 1000, ttft, (t_end - t0) * 1000, error, status,
                              late_ms)
            if gaps:
                self.recorder.gaps_ms.extend(gaps)
        # An error status or a stream that ended badly still ended cleanly at the HTTP level.
        reusable = parser.reusable and (error is None or error.startswith(("http_", "stream_")))
        return reusable, error is not None, t_end

    async def client_cpu(self, out: list[float]) -> None:
        await trio.sleep_until(self.window_start)
        before = time.process_time()
        await trio.sleep_until(self.window_end)
        out.append(time.process_time() - before)


async def _connect_all(address: Address, n: int) -> list[socket.socket | None]:
    """Open ``n`` connections at once; a slot whose connect failed is None (its worker retries)."""
    socks: list[socket.socket | None] = [None] * n

    async def one(i: int) -> None:
        try:
            socks[i] = await _connect(address)
        except OSError:
            pass

    try:
        with trio.move_on_after(CONNECT_ALL_TIMEOUT_S):
            async with trio.open_nursery() as connecting:
                for i in range(n):
                    connecting.start_soon(one, i)
    except BaseException:
        for s in socks:
            _close(s)
        raise
    return socks


async def run_load(
    address: Address,
    request: bytes,
    plan: LoadPlan,
    *,
    on_window: Callable[[float, float], Awaitable[None]] | None = None,
) -> RoundResult:
    """Run one round of closed-loop load against ``address`` and return what was measured.

    Args:
      address: the target (see :func:`parse_target`).
      request: the bytes of the request every connection sends, again and again.
      plan: connections, window, warm-up, ramp, timeouts.
      on_window: started beside the workers with the window's (start, end) trio
        times; it must return by itself soon after the end (probes, a failover kill).

    Returns:
      The recorder of the requests started in the window, and the round's counters.
    """
    socks = await _connect_all(address, plan.connections)
    rnd = _Round(address, request, plan, _now())
    cpu: list[float] = []
    hard_deadline = rnd.window_end + plan.request_timeout_s + HARD_DEADLINE_GRACE_S
    try:
        with trio.move_on_at(hard_deadline):
            async with trio.open_nursery() as round_:
                round_.start_soon(rnd.client_cpu, cpu)
                if on_window is not None:
                    round_.start_soon(on_window, rnd.window_start, rnd.window_end)
                async with trio.open_nursery() as reading:
                    if rnd.reader is not None:
                        reading.start_soon(rnd.reader.run)
                    async with trio.open_nursery() as workers:
                        for i, sock in enumerate(socks):
                            socks[i] = None  # the worker owns (and closes) it from here on
                            workers.start_soon(rnd.run_worker, i, sock)
                    reading.cancel_scope.cancel()  # every body has been read
                if rnd.stopped_at is not None:
                    # max_requests ended the window early: the probes waiting for its
                    # planned end have nothing left to measure.
                    round_.cancel_scope.cancel(reason="max_requests reached")
    finally:
        for s in socks:
            _close(s)
        if rnd.reader is not None:
            rnd.reader.close()
    end = rnd.stopped_at if rnd.stopped_at is not None else rnd.window_end
    return RoundResult(
        recorder=rnd.recorder,
        window_s=max(end - rnd.window_start, 1e-9),
        sent_total=rnd.sent_total,
        client_cpu_s=cpu[0] if cpu else math.nan,
        window_start=rnd.window_start,
        window_end=rnd.window_end,
    )
