"""Hypercorn alone, answering itself: the "floor" row of ``trioproxy bench``.

The gateway is an ASGI app served by Hypercorn on Trio; whatever Hypercorn and
Trio cost to serve a client is a cost no gateway built on them can go below. This
app measures that floor in the same run: the same Hypercorn settings as the
gateway (``trioproxy.server.hypercorn_config`` over the same profiles) and the
same GC settings (``settle_gc``), no upstream, no routing, no telemetry: it reads
the request body and answers from memory.

- Non-streamed (``"stream": true`` absent): one fixed JSON body the size of the
  mock's small answer, with its Content-Length, in one ASGI message.
- Streamed: the same SSE events the mock sends (a role chunk with the head, then
  ``x-mock-tokens`` content events ``x-mock-token-delay-ms`` apart, then the
  finish event and ``[DONE]``): one ASGI send per event, as the gateway relays them.
  One ``_Clock`` task wakes each stream when its next event is due (a park and a
  wake-up per event), as the gateway wakes once per upstream read; a ``trio.sleep_until``
  per event would add a cancel scope and a deadline in the run loop (about 19 µs per
  event on the 2-core guest) that are not Hypercorn's cost.

    python loadtest/floor_app.py --config loadtest/profiles/bench.toml --port 0

With ``--upstream URL`` it is the **relay floor** instead (``trioproxy bench
--relay-floor``): the least a relay on this stack does, on the gateway's own I/O parts.
Each request goes to ``URL`` (plain HTTP) on an idle upstream socket from a list
(``trioproxy.connection.RawConnection``: a wait for readability, then one ``recv``),
with its method, path, headers and body; the answer is parsed with the gateway's HTTP/1.1
parser (``trioproxy.http1``) and relayed: a body with its length in one ASGI message,
a stream one message per upstream read (what the read gave, de-chunked), written
without a schedule point of its own (``UNSCHEDULED``: the next await is the upstream
read), the head with the first body piece (``WITH_FIRST_BODY``), the request body taken
from Hypercorn's inbox as it came. No routing, health checks, failover, usage scanning,
watchdog or usage log: what is left of the gateway's cost above this row is its features.

    python loadtest/floor_app.py --config loadtest/profiles/bench.toml --port 0 --upstream http://127.0.0.1:PORT

``TRIOPROXY_RELAY_FLOOR_SPIN_US=N`` makes the relay burn N µs of CPU per relayed piece:
with the gateway's CPU per stream, does a bare relay have the gateway's latency?

``TRIOPROXY_RELAY_FLOOR_HUB=1`` makes one task, the gateway's hub (``trioproxy.relayhub.RelayHub``),
relay every stream's reads after its first piece: each stream's task parks, its upstream socket is registered once in the hub's
own epoll (level-triggered; the hub waits for that epoll's descriptor in trio), and when a
socket has bytes the hub reads them, parses a whole chunk and writes it to the client in the
same step; anything else (the body's end, a write the socket did not take whole, an error,
a client gone) goes back to the stream's task, which goes on as without the hub. What a
relay saves without a task wake-up, an ``epoll_ctl`` and a trip through trio's run queue
per event (docs/benchmarks.md, stream-512).

It prints ``floor listening on http://127.0.0.1:PORT`` once it listens and stops on
SIGINT/SIGTERM. ``trioproxy bench`` starts it pinned to the gateway's core.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import os
import signal
import socket
import sys
import time
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import attrs
import h11
import trio
from hypercorn.trio import serve

from trioproxy import hypercorn_fast
from trioproxy.config import load_profiles
from trioproxy.connection import RawConnection, connect_socket, literal_addresses, recv_now, resolve
from trioproxy.http1 import IncompleteMessage, ResponseParser, serialize_request
from trioproxy.hypercorn_app import DISCONNECT_NOTICE, INBOX, UNSCHEDULED, WITH_FIRST_BODY, chunk_sender
from trioproxy.relayhub import RelayHub
from trioproxy.server import hypercorn_config, settle_gc

# The shape and size of the mock's 16-token chat completion (~290 bytes).
BODY = (
    b'{"id":"chatcmpl-floor-1","object":"chat.completion","created":1730000000,"model":"mock-llama",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the mock upstream. '
    b'The quick brown fox jumps over the lazy dog."},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":16,"total_tokens":21}}'
)
_PREFIX = b'data: {"id":"chatcmpl-floor-1","object":"chat.completion.chunk","created":1730000000,"model":"mock-llama","choices":'
ROLE_EVENT = _PREFIX + b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
TOKEN_EVENT = _PREFIX + b'[{"index":0,"delta":{"content":" tok"},"logprobs":null,"finish_reason":null}]}\n\n'
CLOSING = (
    _PREFIX + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n' + b"data: [DONE]\n\n"
)
JSON_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
#: Upper bound of x-mock-tokens here, as in the mock: a typo must not stream for hours.
MAX_TOKENS = 100_000


class _Clock:
    """Wakes each waiting stream at its due time, from one task (``run``)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list[trio.lowlevel.Task | None]]] = []
        self._order = itertools.count()
        self._sleep: trio.CancelScope | None = None

    async def wait_until(self, due: float) -> None:
        holder: list[trio.lowlevel.Task | None] = [trio.lowlevel.current_task()]
        heapq.heappush(self._heap, (due, next(self._order), holder))
        if self._sleep is not None and due < self._sleep.deadline:
            self._sleep.deadline = due

        def abort(_: object) -> trio.lowlevel.Abort:
            holder[0] = None  # cancelled (the client left): the clock skips it
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self) -> None:
        heap = self._heap
        while True:  # until cancelled: each pass sleeps until the earliest due time
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                task = heapq.heappop(heap)[2][0]
                if task is not None:
                    trio.lowlevel.reschedule(task)


CLOCK = _Clock()


def _number(headers: list[tuple[bytes, bytes]], name: bytes, default: float) -> float:
    for key, value in headers:
        if key == name:
            try:
                number = float(value)
            except ValueError:
                return default
            return number if 0 <= number < 1e9 else default
    return default


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    parts = []
    while True:  # bounded by the client's body; Hypercorn caps it
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(parts)
    if b'"stream":true' not in body:
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": BODY, "more_body": False})
        return
    headers = scope["headers"]
    tokens = int(min(_number(headers, b"x-mock-tokens", 16), MAX_TOKENS))
    ttft = _number(headers, b"x-mock-ttft-ms", 0) / 1000
    delay = _number(headers, b"x-mock-token-delay-ms", 0) / 1000
    due = trio.current_time() + ttft
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    await send({"type": "http.response.body", "body": ROLE_EVENT, "more_body": True})
    for i in range(tokens):
        await CLOCK.wait_until(due + i * delay)
        await send({"type": "http.response.body", "body": TOKEN_EVENT, "more_body": True})
    await send({"type": "http.response.body", "body": CLOSING, "more_body": False})


#: The environment variable that makes the relay burn CPU per relayed piece (µs), an
#: experiment's knob: what the added TTFT does as a relay's CPU per event grows (the bench
#: passes its environment on, and its report says so).
SPIN_ENV = "TRIOPROXY_RELAY_FLOOR_SPIN_US"


def _spin_seconds() -> float:
    text = os.environ.get(SPIN_ENV, "0")
    try:
        us = float(text)
    except ValueError:
        raise SystemExit(f"{SPIN_ENV}: expected microseconds, got {text!r}") from None
    if not 0 <= us < 1e6:
        raise SystemExit(f"{SPIN_ENV}: expected 0 to 999999 microseconds, got {text!r}")
    return us / 1e6


def _spin(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:  # bounded: under a second, by _spin_seconds
        pass


#: The environment variable that makes the relay floor hand a stream's steady reads to the
#: gateway's hub (``trioproxy.relayhub.RelayHub``): what a relay saves without a task wake-up per event.
HUB_ENV = "TRIOPROXY_RELAY_FLOOR_HUB"


class _Rest(bytes):
    """What a client write did not take (handed back to be written the server's way)."""


class _HubStream:
    """One adopted stream: what the hub needs to relay its next whole chunk, and to hand it back."""

    __slots__ = ("hub", "fd", "sock", "parser", "route", "notice", "spin")

    def __init__(self, hub: RelayHub, sock: socket.socket, parser: ResponseParser, route: Any, notice: Any,
                 spin: float) -> None:
        self.hub, self.sock, self.fd, self.parser, self.route, self.notice, self.spin = (
            hub, sock, sock.fileno(), parser, route, notice, spin)

    def back(self, result: object) -> None:
        self.hub.hand_back(self, result)

    def readable(self) -> None:
        try:
            data = recv_now(self.sock)
        except OSError as exc:
            self.back(exc)
            return
        if data is None:
            return
        if not data:  # EOF: the task reads it again, and ends as it would
            self.back(None)
            return
        try:
            piece = self.parser.feed_body(data)
        except Exception as exc:
            self.back(exc)
            return
        if piece is None:
            return  # (a chunk not yet whole: the parser holds it)
        if not piece:
            self.back(piece)
            return
        if self.spin:
            _spin(self.spin)
        h11_protocol, h11_connection, tcp_server = self.route
        if not (h11_connection.our_state is h11.SEND_BODY and h11_protocol._pending_head is None
                and not tcp_server.send_lock.locked()):
            self.back(piece)
            return
        framed = b"%x\r\n%b\r\n" % (len(piece), piece)
        try:
            sent = os.write(tcp_server._fast_socket.fileno(), framed)
        except OSError:  # (nothing written: the task sends it the server's way, which handles this)
            self.back(piece)
            return
        if sent < len(framed):
            self.back(_Rest(framed[sent:]))
        elif self.notice is not None and self.notice.closed:
            self.back(_GONE)
        elif self.parser.complete or not self.parser.wants_bytes():  # (the body's end came with it, or more is parsed)
            self.back(None)


_GONE = object()
HUB: RelayHub | None = None


#: Not passed on either way (RFC 9110 §7.6.1), nor the framing the parser has undone.
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade"))
#: Seconds a write to the upstream may stall (the mock takes a request at once).
_SEND_STALL_S = 30.0
_wait_readable = trio.lowlevel.wait_readable


def _end_to_end(headers: list[tuple[bytes, bytes]], *, also: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """``headers`` without the hop-by-hop ones, those the Connection header names, and ``also``."""
    named = {t.strip().lower() for n, v in headers if n == b"connection" for t in v.split(b",")}
    return [(n, v) for n, v in headers if n not in _HOP_BY_HOP and n not in named and n not in also]


class _Stale(Exception):
    """A reused upstream socket turned out closed before any byte of the answer: try a new one."""


class Relay:
    """The relay floor's app: every request to one plain-HTTP upstream, relayed as it comes."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise SystemExit(f"--upstream: expected http://HOST:PORT, got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.family: int = socket.AF_INET
        self.sockaddr: tuple[Any, ...] = ("", 0)  # (``resolve`` sets both before any request)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if parts.port is None else f"{host}:{parts.port}").encode()
        self.spin = _spin_seconds()
        #: Upstream sockets after a whole answer, newest last (one task at a time: no lock on Trio).
        self.idle: list[RawConnection] = []

    async def resolve(self) -> None:
        """Look the upstream's host up once, before serving (the first address is used)."""
        addresses = literal_addresses(self.host, self.port) or await resolve(self.host, self.port)
        self.family, self.sockaddr = addresses[0]

    async def _connection(self, *, reuse: bool) -> tuple[RawConnection, bool]:
        """An idle socket still open (reused: True), if ``reuse``, else a new one."""
        while reuse and self.idle:  # bounded by the list
            conn = self.idle.pop()
            if conn.is_alive():
                return conn, True
            conn.close()
        return RawConnection(await connect_socket(self.family, self.sockaddr)), False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)  # lifespan
            return
        body = await _read_body(scope, receive)
        if body is None:
            return
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        request = serialize_request(scope["method"].encode(), target, self.host_header,
                                    _end_to_end(scope["headers"]), body)
        for attempt in range(2):  # bounded: a reused socket found closed is retried once, on a new one
            conn, reused = await self._connection(reuse=attempt == 0)
            try:
                await self._exchange(conn, request, scope, send, reused)
                return
            except _Stale:
                conn.close()
            except BaseException:
                conn.close()
                raise

    async def _exchange(self, conn: RawConnection, request: bytes, scope: dict[str, Any], send: Any,
                        reused: bool) -> None:
        """Relay one answer. Raises _Stale if a reused socket was closed before any byte of it."""
        parser = ResponseParser(head_request=scope["method"] == "HEAD")
        head = None
        received = False
        try:
            if not await conn.send_all(request, _SEND_STALL_S):
                raise OSError("the upstream took no request bytes")
            while head is None:  # bounded by the head's size (the parser caps it) or EOF
                data = await conn.receive(math.inf, wait_first=True)
                if data:
                    received = True
                    parser.feed(data)
                else:
                    parser.feed_eof()  # the head's parse raises IncompleteMessage
                head = parser.next_head()
        except (IncompleteMessage, ConnectionResetError, BrokenPipeError):
            if reused and not received:
                raise _Stale() from None
            raise
        notice = scope.get("extensions", {}).get(DISCONNECT_NOTICE)
        if head.content_length is not None or parser.complete:  # whole: one message with its length
            parts = []
            while (piece := await self._next_piece(conn, parser)) != b"":  # bounded by the body
                parts.append(piece)
            headers = _end_to_end(head.headers, also=_NOT_RELAYED)
            await send({"type": "http.response.start", "status": head.status, "headers": headers})
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": False, UNSCHEDULED: True})
        else:  # a stream, chunked or to EOF: Hypercorn re-chunks it; one message per upstream read
            headers = _end_to_end(head.headers, also=_NOT_RELAYED_STREAMED)
            await send({"type": "http.response.start", "status": head.status, "headers": headers,
                        WITH_FIRST_BODY: True})
            # Each body message is marked unscheduled: the next await after it is the upstream
            # read, which waits first (a schedule point). The first is the head's promised one.
            # As the gateway's relay: its read waits on the socket and reads it inline (no coroutine
            # per piece), a whole chunk is taken as it comes (``feed_body``), and the pieces after
            # the first go through the server's chunk sender (no message each).
            first = True
            sender = None
            sock = conn.sock
            while True:  # bounded by the upstream's body (its end, or EOF)
                piece = parser.next_body_piece()
                if piece is None and sender is not None and HUB is not None and HUB.open:
                    route = send.__self__._chunks_to
                    if route is not None:
                        result = await HUB.park(_HubStream(HUB, sock, parser, route, notice, self.spin))
                        if result is _GONE:
                            conn.close()
                            return
                        if isinstance(result, BaseException):
                            raise result
                        if isinstance(result, _Rest):
                            await hypercorn_fast._write(route[2], bytes(result), False)
                            if notice is not None and notice.closed:  # the client left meanwhile
                                conn.close()
                                return
                            continue
                        piece = result if isinstance(result, bytes) else parser.next_body_piece()
                while piece is None:  # bounded: each pass reads bytes or EOF (or woke for nothing)
                    if first:  # nothing came with the head: an empty message sends it
                        await send({"type": "http.response.body", "body": b"", "more_body": True, UNSCHEDULED: True})
                        first = False
                    await _wait_readable(sock)
                    data = recv_now(sock)
                    if data:
                        piece = parser.feed_body(data)
                    elif data is not None:
                        parser.feed_eof()  # close-delimited: the end; cut short: IncompleteMessage
                        piece = parser.next_body_piece()
                if not piece:  # the body's end
                    break
                first = False
                if self.spin:
                    _spin(self.spin)
                if sender is not None:
                    await sender(piece)
                else:
                    await send({"type": "http.response.body", "body": piece, "more_body": True, UNSCHEDULED: True})
                    sender = chunk_sender(send)
                if notice is not None and notice.closed:  # the client left: stop reading for it
                    conn.close()
                    return
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False, UNSCHEDULED: True})
            except trio.BusyResourceError:  # the client hung up while Hypercorn wrote (as relay.finish)
                pass
        if parser.reusable:
            self.idle.append(conn)
        else:
            conn.close()

    @staticmethod
    async def _next_piece(conn: RawConnection, parser: ResponseParser) -> bytes:
        """The next de-chunked body bytes, b"" at the body's end (waiting for the upstream if needed)."""
        while (piece := parser.next_body_piece()) is None:  # bounded: each pass feeds bytes or EOF
            data = await conn.receive(math.inf, wait_first=True)
            if data:
                parser.feed(data)
            else:
                parser.feed_eof()  # close-delimited: the end; cut short: IncompleteMessage
        return piece


#: Upstream response headers not passed back: what Hypercorn writes itself.
_NOT_RELAYED = frozenset((b"date",))
#: ... and for a stream, whose length Hypercorn frames (an upstream's chunked and sized head).
_NOT_RELAYED_STREAMED = _NOT_RELAYED | {b"content-length"}


async def _read_body(scope: dict[str, Any], receive: Any) -> bytes | None:
    """The request's body (None if the client left): what came with the head without a wait."""
    inbox = scope.get("extensions", {}).get(INBOX)
    parts = []
    while True:  # bounded by the client's body; Hypercorn caps it
        message = inbox.receive_nowait() if inbox is not None else None
        if message is None:
            message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def main(profiles: list[str], port: int, upstream: str | None = None) -> None:
    config = load_profiles(profiles)
    config = attrs.evolve(config, server=attrs.evolve(config.server, port=port))
    shutdown = trio.Event()
    relay = Relay(upstream) if upstream else None
    if relay is not None:
        await relay.resolve()
    async with trio.open_nursery() as clock:
        clock.start_soon(CLOCK.run)
        global HUB
        if relay is not None and os.environ.get(HUB_ENV, "") not in ("", "0"):
            HUB = RelayHub()
            clock.start_soon(HUB.run)
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        shutdown.set()
                        return

            nursery.start_soon(watch_signals)
            # (Hypercorn types the app with its own ASGI TypedDicts; ours takes plain dicts, as server.py's.)
            binds = await nursery.start(
                partial(serve, relay or app, hypercorn_config(config),  # type: ignore[arg-type]
                        shutdown_trigger=shutdown.wait)
            )
            settle_gc()  # the gateway's GC settings too, so the floor stays the floor
            print(f"floor listening on {binds[0]}", file=sys.stderr, flush=True)
            await shutdown.wait()
            # serve returns once shutdown is set; the signal watcher has already returned.
        clock.cancel_scope.cancel()  # every stream has ended: nothing is left to wake


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", action="append", metavar="PATH", help="profile(s) whose [server] settings to use")
    parser.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    parser.add_argument("--upstream", metavar="URL", help="relay every request to this http:// upstream (the relay floor)")
    args = parser.parse_args()
    trio.run(main, args.config or ["loadtest/profiles/bench.toml"], args.port, args.upstream)
