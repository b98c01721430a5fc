"""``trioproxy mock``: a stand-in for Ollama and vLLM, served straight from trio sockets.

Operators and the benchmark use it in place of a real model server, and it is the
upstream of every integration test, so it is exact on the wire (the sans-IO
modules ``mockhttp``, ``mockreply``, ``mockpayloads`` and ``mockwire`` build every
byte), fast (no HTTP framework: a hand-written parser, byte templates, one socket
write per event) and deterministic (fixed token text, counted faults, seeded fault
rates; see ``mockreply``'s and ``mockpayloads``' docstrings for the token and prompt
counts). The command line (``trioproxy mock``) is in ``mockcli``.

Faults (``FaultPlan`` for the run, ``x-mock-fault`` per request):

- ``status``: an error body in the route's format; ``Retry-After`` with 429 and 503.
- ``reset``: read the request, then close with ``SO_LINGER`` 0: the client sees a RST.
- ``hang``: read the request, answer nothing until the client goes away (a disconnect).
- ``cut``: headers and ``cut_after_tokens`` content tokens (a non-streamed answer: half
  its body), then close without ending the body.
- ``garbage``: bytes that are not HTTP, then close.
- ``slow``: a normal answer whose first token comes after ``slow_ttft_ms`` (instead of
  the run's or the request's ttft): a model that stalls on some requests.
- ``refuse`` (``MockSettings.refuse``): the port is bound but never listened on.

Task tree::

    serve_mock
    └─ clock nursery
       ├─ Pacer.run: writes every stream's due tokens (mockpace; one task for all)
       └─ connections nursery
          └─ _serve_connection × N                owns its socket; requests in order
             └─ response nursery (waiting answers only: streams, ttft > 0, cut)
                ├─ _wait_eof: EOF or reset → cancel the response, count a disconnect
                └─ [body] _emit: head and opening, then the tokens through the
                   Pacer (absolute deadlines: no drift), then the closing events
"""

from __future__ import annotations

import email.utils
import errno
import math
import random
import struct
import time
from collections import deque
from functools import partial
from typing import Literal

import attrs
import trio
from attrs import field, frozen
from attrs.validators import ge, in_, le

from .config import MockConfig, MockKind
from .mockhttp import CONTINUE, ParseError, Request, RequestParser, response_head
from .mockpace import Pacer, PacedStream
from .mockpayloads import error_format, error_reply
from .mockreply import Generation, GenerationRenderer, Static, Timings, rfc3339
from .mockwire import parse_overrides, plan_reply

FaultKind = Literal["status", "reset", "hang", "cut", "garbage", "slow"]
FAULT_KINDS: tuple[FaultKind, ...] = ("status", "reset", "hang", "cut", "garbage", "slow")

#: Requests kept for tests to inspect; bounded so a benchmark run cannot grow memory.
RECORDED_REQUESTS = 1000
#: Distinct paths counted in ``by_path``; more land in "<other>" (a scanner cannot grow memory).
MAX_PATHS = 256
#: One recv reads a typical request whole; large bodies arrive in few reads.
RECV_BYTES = 65536
#: Benchmarks open hundreds of connections at once.
BACKLOG = 1024
#: Pipelined bytes read ahead while a response is written; past it we stop reading (backpressure).
MAX_READ_AHEAD = 1024 * 1024
#: After a malformed request: time for the client to stop sending, so our close is not a RST.
ERROR_LINGER_S = 1.0
#: Not HTTP: a NUL first, so every HTTP client's parser rejects it at once.
GARBAGE = b"\x00\x17garbage\r\n\r\n"
#: accept() errors that mean "out of resources": wait and retry, as trio.serve_listeners does.
ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: How long to back off after such an error.
ACCEPT_RETRY_S = 0.1


def _finite_non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{attribute.name} must be a finite number >= 0, not {value!r}")


@frozen
class FaultPlan:
    """Which requests of a run get a fault, and which fault.

    ``every`` > 0: requests number ``every``, ``2*every``... (1-based, counted over
    every request this mock serves). ``rate`` > 0: each request with that probability,
    drawn from ``random.Random(seed)`` once per request in arrival order. Neither:
    every request. ``every`` and ``rate`` are exclusive.
    """

    kind: FaultKind = field(validator=in_(FAULT_KINDS))
    status: int = field(default=503, validator=[ge(400), le(599)])
    retry_after_s: int = field(default=1, validator=ge(0))
    every: int = field(default=0, validator=ge(0))
    rate: float = field(default=0.0, validator=[ge(0.0), le(1.0)])
    seed: int = 0
    cut_after_tokens: int = field(default=2, validator=ge(0))
    #: ``slow``: the first token's delay, in place of the run's or the request's ttft.
    slow_ttft_ms: float = field(default=2000.0, validator=_finite_non_negative)

    def __attrs_post_init__(self) -> None:
        if self.every and self.rate:
            raise ValueError("FaultPlan: give every or rate, not both")


@frozen
class MockSettings:
    """Everything a mock run needs; ``"*"`` in ``models`` accepts any model name."""

    kind: MockKind = field(default="both", validator=in_(("openai", "vllm", "ollama", "both")))
    models: tuple[str, ...] = ("mock-llama",)
    tokens: int = field(default=16, validator=ge(0))
    token_delay_ms: float = field(default=20.0, validator=_finite_non_negative)
    ttft_ms: float = field(default=50.0, validator=_finite_non_negative)
    fault: FaultPlan | None = None
    #: Bind the port but never listen(): connects are refused, the port stays ours.
    refuse: bool = False

    @classmethod
    def from_config(cls, cfg: MockConfig) -> MockSettings:
        """The settings of a mock declared in a profile (no faults)."""
        return cls(kind=cfg.kind, models=tuple(cfg.models), tokens=cfg.tokens,
                   token_delay_ms=cfg.token_delay_ms, ttft_ms=cfg.ttft_ms)


@frozen
class MockStatistics:
    """Counters since start.

    ``connections`` counts accepted connections; ``faults`` counts by fault kind;
    ``disconnects`` counts clients gone mid-response or during a hang;
    ``in_progress`` is the requests being answered now.
    """

    requests: int
    by_path: dict[str, int]
    connections: int
    faults: dict[str, int]
    disconnects: int
    in_progress: int


@frozen
class RecordedRequest:
    """A request as received; header names lower-cased, ``path`` without the query."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    query: str = ""


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    sent = await sock.send(data)
    while sent < len(data):  # rare: a full socket buffer
        sent += await sock.send(memoryview(data)[sent:])


async def _wait_eof(sock: trio.socket.SocketType, parser: RequestParser) -> None:
    """Return once the client closes (EOF or reset); what it pipelines meanwhile is kept."""
    try:
        while parser.buffered < MAX_READ_AHEAD:
            data = await sock.recv(RECV_BYTES)
            if not data:
                return
            parser.feed(data)
    except OSError:
        return
    await trio.sleep_forever()  # read-ahead full: the client is alive, just eager


class MockUpstream:
    """A running mock: its port, settings, counters and recent requests (see :func:`serve_mock`)."""

    def __init__(self, settings: MockSettings, port: int) -> None:
        self.settings = settings
        self.port = port
        self._requests = 0
        self._by_path: dict[str, int] = {}
        self._connections = 0
        self._faults: dict[str, int] = {}
        self._disconnects = 0
        self._in_progress = 0
        self._recorded: deque[RecordedRequest] = deque(maxlen=RECORDED_REQUESTS)
        self._disconnect_lot = trio.lowlevel.ParkingLot()
        self._rng = random.Random(settings.fault.seed if settings.fault else 0)
        self._date_second = -1
        self._date = b""
        # Graceful stop (drain): the accept loop's scope, and the scopes of connections idle between requests.
        self._draining = False
        self._accept_scope: trio.CancelScope | None = None
        self._idle_scopes: set[trio.CancelScope] = set()
        #: Writes every stream's timed tokens from one task (``serve_mock`` runs it).
        self._pacer = Pacer()

    def drain(self) -> None:
        """Stop gracefully, as a server being shut down does.

        New connections are refused from now on, idle keep-alive connections are
        closed, and responses in progress finish; then ``serve_mock`` returns and the
        port is free to be served again (a restart).
        """
        self._draining = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for scope in self._idle_scopes:
            scope.cancel()

    @property
    def requests(self) -> list[RecordedRequest]:
        """The last ``RECORDED_REQUESTS`` requests, oldest first."""
        return list(self._recorded)

    def statistics(self) -> MockStatistics:
        """A snapshot of the counters."""
        return MockStatistics(self._requests, dict(self._by_path), self._connections, dict(self._faults),
                              self._disconnects, self._in_progress)

    async def wait_disconnects(self, n: int) -> None:
        """Wait until ``statistics().disconnects >= n`` (woken by each disconnect, no polling)."""
        await trio.lowlevel.checkpoint()
        while self._disconnects < n:
            await self._disconnect_lot.park()

    def _count_disconnect(self) -> None:
        self._disconnects += 1
        self._disconnect_lot.unpark_all()

    def _http_date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second, self._date = now, email.utils.formatdate(now, usegmt=True).encode()
        return self._date

    def _record(self, request: Request) -> int:
        self._requests += 1
        path = request.path if request.path in self._by_path or len(self._by_path) < MAX_PATHS else "<other>"
        self._by_path[path] = self._by_path.get(path, 0) + 1
        self._recorded.append(RecordedRequest(request.method, request.path, request.headers, request.body,
                                              request.query))
        return self._requests

    def _pick_fault(self, number: int, override: tuple[str, int | None] | None) -> FaultPlan | None:
        plan = self.settings.fault
        hit = False
        if plan is not None:  # drawn for every request, so overrides do not shift the sequence
            if plan.every > 0:
                hit = number % plan.every == 0
            elif plan.rate > 0:
                hit = self._rng.random() < plan.rate
            else:
                hit = True
        if override is None:
            return plan if hit else None
        name, arg = override
        kind = next((k for k in FAULT_KINDS if k == name), None)
        if kind is None:  # "none"
            return None
        chosen = attrs.evolve(plan or FaultPlan(kind), kind=kind, every=0, rate=0.0)
        if arg is not None and kind == "status":
            return attrs.evolve(chosen, status=arg)
        if arg is not None:
            return attrs.evolve(chosen, cut_after_tokens=arg)
        return chosen

    async def _serve_connection(self, sock: trio.socket.SocketType) -> None:
        parser = RequestParser()
        with sock:
            try:
                while True:
                    try:
                        request = parser.next_request()
                    except ParseError as exc:
                        await self._reject(sock, exc)
                        return
                    if request is None:
                        if parser.take_continue():
                            await _send_all(sock, CONTINUE)
                        if self._draining and not parser.buffered:
                            return
                        with trio.CancelScope() as idle:
                            self._idle_scopes.add(idle)
                            try:
                                data = await sock.recv(RECV_BYTES)
                            finally:
                                self._idle_scopes.discard(idle)
                        if idle.cancelled_caught:  # drained while idle
                            return
                        if not data:
                            return
                        parser.feed(data)
                    elif not await self._serve_request(sock, parser, request) or self._draining:
                        return
            except OSError:
                pass  # gone between responses: nothing was in progress, nothing to count

    async def _reject(self, sock: trio.socket.SocketType, exc: ParseError) -> None:
        reply = error_reply("openai", exc.status, exc.message)
        await _send_all(sock, reply.render(date=self._http_date(), keep_alive=False, http10=False))
        sock.shutdown(trio.socket.SHUT_WR)
        with trio.move_on_after(ERROR_LINGER_S):
            while await sock.recv(RECV_BYTES):
                pass

    async def _serve_request(self, sock: trio.socket.SocketType, parser: RequestParser, request: Request) -> bool:
        """Answer one request. Returns whether the connection stays open."""
        start = trio.current_time()
        number = self._record(request)
        self._in_progress += 1
        try:
            return await self._answer(sock, parser, request, number, start)
        except OSError:  # EPIPE/ECONNRESET while writing: the client left mid-response
            self._count_disconnect()
            return False
        finally:
            self._in_progress -= 1

    async def _send_static(self, sock: trio.socket.SocketType, request: Request, reply: Static) -> bool:
        data = reply.render(date=self._http_date(), keep_alive=request.keep_alive, http10=request.http10,
                            head_only=request.method == "HEAD")
        await _send_all(sock, data)
        return request.keep_alive

    async def _answer(
        self, sock: trio.socket.SocketType, parser: RequestParser, request: Request, number: int, start: float
    ) -> bool:
        settings = self.settings
        overrides = parse_overrides(request)
        fault = self._pick_fault(number, None if isinstance(overrides, Static) else overrides.fault)
        if isinstance(overrides, Static):  # a malformed x-mock-* header: 400, no fault
            return await self._send_static(sock, request, overrides)
        if fault is not None:
            self._faults[fault.kind] = self._faults.get(fault.kind, 0) + 1
            if fault.kind not in ("cut", "slow"):
                return await self._fail(sock, parser, request, fault)
        slow = fault is not None and fault.kind == "slow"
        cut = fault.cut_after_tokens if fault is not None and fault.kind == "cut" else None
        tokens = settings.tokens if overrides.tokens is None else overrides.tokens
        reply = plan_reply(request, kind=settings.kind, models=settings.models, tokens=tokens)
        if isinstance(reply, Static):
            if cut is None:
                return await self._send_static(sock, request, reply)
            head = reply.render(date=self._http_date(), keep_alive=False, http10=request.http10, head_only=True)
            await _send_all(sock, head + reply.body[: len(reply.body) // 2])
            return False
        ttft = (settings.ttft_ms if overrides.ttft_ms is None else overrides.ttft_ms) / 1000
        if slow:
            assert fault is not None
            ttft = fault.slow_ttft_ms / 1000
        elif reply.finish_reason == "load":  # no prompt to evaluate: a warm model answers at once
            ttft = 0.0
        delay = (settings.token_delay_ms if overrides.token_delay_ms is None else overrides.token_delay_ms) / 1000
        render = GenerationRenderer(reply, number=number, created=int(time.time()), chunked=not request.http10)
        if not reply.stream and ttft == 0 and cut is None:  # the hot path: nothing to wait for, no watcher
            return await self._emit(sock, request, render, start=start, ttft=0.0, delay=0.0, cut=None)
        gone = False
        keep_alive = False
        async with trio.open_nursery() as response:

            async def watch() -> None:
                nonlocal gone
                await _wait_eof(sock, parser)
                gone = True
                response.cancel_scope.cancel(reason="client disconnected")

            response.start_soon(watch)
            try:
                keep_alive = await self._emit(sock, request, render, start=start, ttft=ttft, delay=delay, cut=cut)
            except OSError:
                gone = True
            response.cancel_scope.cancel(reason="response done")
        if gone:
            self._count_disconnect()
            return False
        return keep_alive

    async def _fail(self, sock: trio.socket.SocketType, parser: RequestParser, request: Request,
                    fault: FaultPlan) -> bool:
        """Answer with a fault that replaces the response (all but ``cut``)."""
        if fault.kind == "status":
            failure = error_reply(error_format(request.path), fault.status, f"mock fault: HTTP {fault.status}",
                                  retry_after_s=fault.retry_after_s)
            return await self._send_static(sock, request, failure)
        if fault.kind == "reset":  # linger 0: close() sends a RST and drops anything unsent
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        elif fault.kind == "garbage":
            await _send_all(sock, GARBAGE)
        else:  # hang: nothing goes out; the client giving up is the disconnect tests wait for
            await _wait_eof(sock, parser)
            self._count_disconnect()
        return False

    async def _emit(
        self, sock: trio.socket.SocketType, request: Request, render: GenerationRenderer, *,
        start: float, ttft: float, delay: float, cut: int | None,
    ) -> bool:
        """Write one generation on schedule; returns keep-alive (False after a cut)."""
        gen: Generation = render.gen
        ollama = gen.api.startswith("ollama")
        keep_alive = request.keep_alive and not (gen.stream and request.http10)
        if not gen.stream:
            if ttft:  # the hot path (ttft 0) skips a cancel scope and a scheduler round
                await trio.sleep_until(start + ttft)
            elapsed = int((trio.current_time() - start) * 1e9)
            body = render.whole(Timings(elapsed, elapsed, 0), created_at=rfc3339(time.time()) if ollama else "")
            head = response_head(200, gen.content_type, date=self._http_date(), content_length=len(body),
                                 keep_alive=keep_alive and cut is None, http10=request.http10)
            await _send_all(sock, head + (body if cut is None else body[: len(body) // 2]))
            return keep_alive and cut is None
        head = response_head(200, gen.content_type, date=self._http_date(), content_length=None,
                             keep_alive=keep_alive, http10=request.http10)
        await _send_all(sock, head + render.opening())
        due = start + ttft
        # n > 1: each event written is a step, every choice's token (chosen here: nothing more per token at n = 1)
        token = ((lambda i: render.token(i, created_at=rfc3339(time.time()))) if ollama
                 else render.token if gen.choices == 1 else render.step)
        paced = PacedStream(sock.fileno(), token, gen.tokens if cut is None else min(cut, gen.tokens), due, delay)
        await self._pacer.stream(paced, partial(_send_all, sock))
        if cut is not None:
            return False  # the caller closes: no finish event, no terminating chunk
        await trio.sleep_until(due)  # zero tokens: the prompt still "takes" ttft
        end = trio.current_time()
        first = end if paced.first_at is None else paced.first_at  # Ollama's prompt/eval split
        timings = Timings(int((end - start) * 1e9), int((first - start) * 1e9), int((end - first) * 1e9))
        for piece in render.closing(timings, created_at=rfc3339(time.time()) if ollama else ""):
            await _send_all(sock, piece)
        return keep_alive

    async def _accept(self, listener: trio.socket.SocketType, connections: trio.Nursery) -> None:
        with trio.CancelScope() as self._accept_scope:
            if self._draining:
                return
            await self._accept_loop(listener, connections)
        listener.close()  # drained: refuse new connections while the last responses finish

    async def _accept_loop(self, listener: trio.socket.SocketType, connections: trio.Nursery) -> None:
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_RETRY_ERRNOS and exc.errno != errno.ECONNABORTED:
                    raise
                await trio.sleep(ACCEPT_RETRY_S if exc.errno in ACCEPT_RETRY_ERRNOS else 0)
                continue
            try:  # a small event per write must leave at once (Nagle would hold it)
                sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            except OSError:
                pass  # already reset by the peer: the handler will notice
            self._connections += 1
            connections.start_soon(self._serve_connection, sock)


async def serve_mock(
    settings: MockSettings, *, host: str = "127.0.0.1", port: int = 0,
    task_status: trio.TaskStatus[MockUpstream] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a mock upstream until cancelled (or drained: ``MockUpstream.drain``).

    Binds first, then reports the running :class:`MockUpstream` (with the real port)
    through ``task_status``; every connection handler runs in a nursery owned here, so
    cancelling this task ends them all.

    Args:
      settings: what to serve and which faults to inject.
      host, port: where to bind; port 0 picks a free port.

    Raises:
      OSError: the address cannot be bound.
    """
    family, type_, proto, _, address = (await trio.socket.getaddrinfo(
        host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE))[0]
    with trio.socket.socket(family, type_, proto) as listener:
        if not settings.refuse:  # refuse: no SO_REUSEADDR, so no other socket can share the port
            listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await listener.bind(address)
        mock = MockUpstream(settings, listener.getsockname()[1])
        if settings.refuse:
            task_status.started(mock)
            await trio.sleep_forever()
        listener.listen(BACKLOG)
        async with trio.open_nursery() as clock:
            clock.start_soon(mock._pacer.run)
            async with trio.open_nursery() as connections:
                task_status.started(mock)
                await mock._accept(listener, connections)
            clock.cancel_scope.cancel()  # drained: no stream is left to pace
