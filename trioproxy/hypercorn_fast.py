"""Faster plain-TCP I/O for Hypercorn's Trio server: fewer trips through the scheduler.

Hypercorn (0.17 and 0.18) serves each Trio connection with a ``TCPServer`` whose
plumbing costs more than the HTTP work it carries, on every request and every
relayed event (docs/benchmarks.md, "Where the time goes"):

- **each write** takes a ``trio.Lock`` (a schedule point), opens a shielded cancel
  scope, and goes through ``SocketStream.send_all`` and the trio socket's ``send``,
  which wraps the syscall in an async context manager and a second schedule point;
- **each read** opens a cancel scope for ``read_timeout`` (unset here: a deadline of
  infinity) around ``receive_some``, through the same async context manager;
- **each request** stops the connection's keep-alive timer task (a lock and a
  cancellation) and, when its answer is done, starts a new one with
  ``nursery.start`` (a new task and a hand-off) under the lock again.

On the 2-core guest that was 850 µs of Hypercorn's CPU per small request, one at
a time, and 14.4 ms per 64-event stream, in the floor app; with this module 550 µs
and 10.5 ms (docs/benchmarks-history.md, 2026-12-07). What it installs (the first
two and the timer for plain TCP connections only: TLS keeps Hypercorn's own I/O):

- **write**: when no other write holds the lock, check for cancellation, ``os.write``
  the bytes, and make one schedule point after (what trio's own socket send does);
  whatever the socket did not take is sent under the lock, shielded, as before. A
  cancellation can only arrive before the first byte, as with the lock before.
- **read**: the same: one ``os.readv`` into a shared buffer, waiting for readiness
  only when it would block, with a cancel scope only if ``read_timeout`` is set.
- **a whole answer's head** (h11, any transport): when the app's ``http.response.start``
  declares a Content-Length, its head is written with the body's first bytes (up to
  ``COALESCE_MAX``), in one ``write`` (and one TCP segment) instead of two, each with its
  schedule point. Any other event of the stream, and the connection's close, write the
  head first, as it would have been. The head waits for the app's next message: trioproxy
  sends every answer with a declared length in one message right after its start (the
  gateway's streamed relays drop the upstream's Content-Length), but an app that sent a
  length and then waited would see its head wait too. A streamed answer's head (no
  length) is written at once, unless the start message carries
  ``hypercorn_app.WITH_FIRST_BODY``: then, for a chunked answer, it is kept the same way
  and written with the first body message's chunk (an HTTP/1.0 or HEAD answer's head is
  written at once all the same: its body messages do not take the chunked path).
- **a streamed answer's body** (h11, chunked): each ``http.response.body`` message is
  framed as one chunk and handed to the write at once, without Hypercorn's per-message
  ``Body`` event, h11's ``Data`` event and its state machine (which does nothing for data
  in the middle of a body); on plain TCP, the last message's chunk and the chunked
  terminator go out in one write instead of two. Hypercorn's checks and what follows the last message
  (the access log, the stream's close) are kept; anything else (HTTP/2, a Content-Length
  body, an HTTP/1.0 client, HEAD, 204 and 304 answers, trailers) takes Hypercorn's path.
  On plain TCP, a message with ``hypercorn_app.UNSCHEDULED`` set returns after its write
  without a schedule point: the relay's next await is a wait for its upstream, so the
  yield after each relayed piece was a second trip through the scheduler per piece. A
  last message with it (a streamed or a whole answer's, which Hypercorn's own path
  writes as the body and h11's empty end of it) makes none either: the app ends. Nor is
  such a message a cancellation point: its bytes are written whatever the cancellation
  state (the sender's next await is where a cancellation lands), and a last one is not
  cut short even while it waits for another write to finish, so an answer whose last
  bytes are in hand always goes out whole (``hypercorn_app.ATOMIC_END`` tells the app,
  which then needs no shield of its own: a shielded cancel scope costs ~10 µs).
- **keep-alive timer**: a deadline per connection, set at each request's end, and one
  task per server that closes the idle connections whose deadline has passed, as
  Hypercorn's timer does (``hypercorn_keepalive``: see there).
- **each app call** (any transport): ``hypercorn_app``'s lighter message inbox in place of
  a trio memory channel, and a disconnect notice in each HTTP request's scope (see there).
- **h11's parsed headers** iterate over their own list: h11's ``Headers`` is a
  ``Sequence`` whose inherited ``__iter__`` calls ``__getitem__`` once per header, and
  each request's headers are walked four times (h11's check for a Host header,
  Hypercorn's protocol check, its scan for an upgrade and its copy into the scope):
  the same pairs in the same order, 1.3 % fewer instructions per small answer through
  the whole process (``loadtest/count_process.py --small``).

The HTTP handling (h11, the ASGI bridge, the protocol's events) is Hypercorn's; only
when a head is written changes. ``apply`` installs this for Hypercorn 0.17 and 0.18 (the versions whose
``TCPServer`` it was written against and tested with); for any other version, or
with ``TRIOPROXY_STOCK_HYPERCORN=1`` in the environment, it leaves Hypercorn as it is.
``server.py`` calls it on import, so the gateway, each worker and the bench's floor
app get it. ``tests/test_hypercorn_fast.py`` checks it against the real Hypercorn.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import partial
from importlib import metadata
from typing import Any

import h11
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Body, EndBody, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio.tcp_server import TCPServer

from . import hypercorn_app
from .hypercorn_app import UNSCHEDULED, WITH_FIRST_BODY
from .hypercorn_keepalive import IdleTimer, timer_for

__all__ = ["STOCK_ENV", "SUPPORTED_VERSIONS", "apply", "applied", "wanted"]

#: Hypercorn releases whose Trio ``TCPServer`` this module replaces parts of (major.minor).
SUPPORTED_VERSIONS = ("0.17", "0.18")
#: Set to 1 to serve with Hypercorn's own I/O (measurements, or if this module is suspected).
STOCK_ENV = "TRIOPROXY_STOCK_HYPERCORN"

MAX_RECV = 2**16  # Hypercorn's own read size
#: A kept head is joined to at most this much of the body (a copy); a larger first write goes after it.
COALESCE_MAX = 2**16
# Reads land here and are copied out at their size: a read of Hypercorn's own allocates
# 64 KiB and shrinks it, per read. Safe to share: nothing awaits between read and copy,
# and a process serves from one thread, as connection.py's receive buffer assumes too (two
# Trio loops serving Hypercorn in two threads of one process would need one each).
_READ_BUFFER = bytearray(MAX_RECV)
_READ_VIEW = memoryview(_READ_BUFFER)

_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
_current_task = trio.lowlevel.current_task
_wait_readable = trio.lowlevel.wait_readable

_stock_init = TCPServer.__init__
_stock_protocol_send = TCPServer.protocol_send
_stock_read_data = TCPServer._read_data
_stock_stream_send = H11Protocol.stream_send
_stock_send_h11_event = H11Protocol._send_h11_event
_stock_app_send = HTTPStream.app_send
_RESPONSE = ASGIHTTPState.RESPONSE
_SEND_BODY = h11.SEND_BODY
_CLOSED = ASGIHTTPState.CLOSED


def _h11_chunked_writer() -> Any:
    """h11's writer of a chunked body (private: if it moves, every body takes Hypercorn's path)."""
    try:
        from h11._writers import ChunkedWriter
    except ImportError:  # pragma: no cover (h11 0.14-0.16 have it)
        return None
    return ChunkedWriter


_ChunkedWriter = _h11_chunked_writer()


def _h11_headers_class() -> Any:
    """h11's ``Headers`` if it keeps its ``_full_items`` (private: if that moves, Sequence's own iteration stays)."""
    try:
        from h11._headers import Headers
    except ImportError:  # pragma: no cover (h11 0.14-0.16 have it)
        return None
    return Headers if "_full_items" in getattr(Headers, "__slots__", ()) else None
#: ``H11Protocol.handle`` as :func:`apply` found it (with ``hypercorn_fix``'s wrapper, if applied first).
_inner_handle: Callable[[Any, Event], Any] = H11Protocol.handle


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    _stock_init(self, *args, **kwargs)
    #: The trio socket of a plain TCP connection (None for TLS: Hypercorn's own I/O).
    self._fast_socket = self.stream.socket if type(self.stream) is trio.SocketStream else None
    if self._fast_socket is not None:
        self.idle_task = timer_for(self)


async def _protocol_send(self: Any, event: Event) -> None:
    if type(event) is Closed:  # h11 closes (a bad request, say) with a head kept: write it first
        h11_protocol = getattr(getattr(self, "protocol", None), "protocol", None)  # (H11 or H2, or not yet)
        if getattr(h11_protocol, "_pending_head", None) is not None:
            await _flush_head(h11_protocol)
    if self._fast_socket is None or type(event) is not RawData:
        await _stock_protocol_send(self, event)
        return
    # (No schedule point for the writes of a last body message marked UNSCHEDULED: _app_send.)
    unscheduled_end = self._unscheduled_task is _current_task()  # (set for an UNSCHEDULED last message only)
    await _write(self, event.data, not unscheduled_end, atomic=unscheduled_end)


async def _write(self: Any, data: bytes, schedule: bool, *, atomic: bool = False) -> None:
    """Write ``data`` to a plain TCP connection (``self``: its ``TCPServer``).

    A cancellation point (before any byte, as the lock's acquire) and a schedule point after
    the write, unless ``schedule`` is False (``UNSCHEDULED``): then neither. Its sender's
    next await is where a cancellation lands (the relay's wait for its upstream). ``atomic``
    (an UNSCHEDULED last message, all in hand): not cut short by a cancellation even while
    it waits for another write to finish (``hypercorn_app.ATOMIC_END``); any other write may
    be cancelled while it waits (a client write timeout). When the socket does not take
    every byte, the rest goes as Hypercorn sends it (shielded).
    """
    if self.send_lock.locked():  # another write is finishing under the lock: after it, as Hypercorn
        with trio.CancelScope(shield=atomic):  # (rare: the lock's wait is a cancellation point)
            await _stock_protocol_send(self, RawData(data=data))
        return
    if schedule:
        await _checkpoint_if_cancelled()
    sock = self._fast_socket
    if not data:  # h11's end of a Content-Length body: no syscall (trio's send_all does none either)
        if sock.fileno() == -1:
            await self.protocol.handle(Closed())
        elif schedule:
            await _cancel_shielded_checkpoint()
        return
    try:
        sent = os.write(sock.fileno(), data)
    except BlockingIOError:
        sent = 0
    except OSError:  # reset, or closed meanwhile (fileno -1): as Hypercorn on a broken stream
        await self.protocol.handle(Closed())
        return
    if sent < len(data):  # the socket's buffer is full: the rest as Hypercorn sends, shielded
        self.send_lock.acquire_nowait()  # (free: checked above, and nothing awaited since)
        try:
            with trio.CancelScope(shield=True):
                await self.stream.send_all(memoryview(data)[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.protocol.handle(Closed())
        finally:
            self.send_lock.release()
        return
    if schedule:
        await _cancel_shielded_checkpoint()  # the one schedule point of a write


async def _read_data(self: Any) -> None:
    sock = self._fast_socket
    if sock is None:
        await _stock_read_data(self)
        return
    timeout = self.config.read_timeout or math.inf
    #: While waiting for bytes: when read_timeout runs out (kept across a spurious wake-up).
    wait_until: float | None = None
    try:
        while True:  # bounded by the connection: each pass reads bytes, or ends at EOF or an error
            await _checkpoint_if_cancelled()
            try:
                size = os.readv(sock.fileno(), [_READ_BUFFER])
            except BlockingIOError:
                size = -1
            except OSError:  # reset, or closed by the server meanwhile (fileno -1)
                break
            if size >= 0:
                data = bytes(_READ_VIEW[:size])  # (copied before the yield: the buffer is shared)
                await _cancel_shielded_checkpoint()  # read at once: one schedule point, as trio's recv
            else:
                if wait_until is None:
                    wait_until = trio.current_time() + timeout if timeout < math.inf else math.inf
                if not await _wait_for_data(sock, wait_until):
                    break  # closed by the server meanwhile, or read_timeout passed
                try:
                    data = bytes(_READ_VIEW[: os.readv(sock.fileno(), [_READ_BUFFER])])
                except BlockingIOError:
                    continue  # (a spurious wake-up)
                except OSError:
                    break
            wait_until = None
            await self.protocol.handle(RawData(data))
            if not data:
                break
        await self.protocol.handle(Closed())
    finally:
        if isinstance(self.idle_task, IdleTimer):
            self.idle_task.close()


async def _wait_for_data(sock: trio.socket.SocketType, deadline: float) -> bool:
    """Wait until ``sock`` is readable: False if it was closed meanwhile or ``deadline`` passed."""
    try:
        if deadline == math.inf:
            await _wait_readable(sock)
            return True
        with trio.move_on_at(deadline):
            await _wait_readable(sock)
            return True
        return False
    except trio.ClosedResourceError:
        return False


def _declares_length(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, _ in headers:  # (names as the app gave them; ASGI asks for lowercase)
        if name.lower() == b"content-length":
            return True
    return False


async def _h11_handle(self: Any, event: Event) -> None:
    if type(event) is Closed and self._pending_head is not None:
        await _flush_head(self)  # the client closed its side (or we are closing): the head first, as stock
    await _inner_handle(self, event)


async def _h11_stream_send(self: Any, event: StreamEvent) -> None:
    if type(event) is Response and event.status_code >= 200 and (self._hold_head or _declares_length(event.headers)):
        # A head whose body has a declared length (a whole answer, an error), or whose app
        # asked (``WITH_FIRST_BODY``): framed as Hypercorn frames it, but kept, and written
        # with the body's first bytes in one write.
        self._defer_head = True
        try:
            await _stock_stream_send(self, event)
        finally:
            self._defer_head = False
        return
    if self._pending_head is not None and type(event) is not Body and type(event) is not EndBody:
        await _flush_head(self)  # anything else (the stream closed without a body...) goes after the head
    await _stock_stream_send(self, event)


async def _h11_send_h11_event(self: Any, event: Any) -> None:
    if type(event) is h11.InformationalResponse and event.status_code == 100:
        # Hypercorn answers Expect: 100-continue as soon as it has the head, before the app has
        # looked at it: a body over the limit, or a request refused (401, 404...), was uploaded
        # for nothing. The 100 goes out when the app first waits for the body (``_continue``).
        return
    if self._defer_head:
        try:
            self._pending_head = self.connection.send(event)
        except h11.LocalProtocolError:  # (as Hypercorn's own _send_h11_event)
            if self.connection.their_state != h11.ERROR:
                raise
        return
    if self._pending_head is None:
        await _stock_send_h11_event(self, event)
        return
    try:
        data = self.connection.send(event)
    except h11.LocalProtocolError:
        await _flush_head(self)
        if self.connection.their_state != h11.ERROR:
            raise
        return
    if len(data) > COALESCE_MAX:  # (no copy of a large body: two writes, as stock)
        await _flush_head(self)
        await self.send(RawData(data=data))
        return
    await _write_after_head(self, None, data, True)


async def _app_send(self: Any, message: Any) -> None:
    """``HTTPStream.app_send``, with a short path for the body of an HTTP/1.1 chunked answer.

    When h11's writer is chunked, the answer has a body to send (h11 frames HEAD, 204
    and 304 answers with a length of 0) and h11 is in the middle of it: a chunk of data
    changes no state, so the chunk is framed here, as h11's ``ChunkedWriter`` frames it
    (tested byte for byte against it), and written. The last message's chunk goes with
    h11's end of message (through h11: its state moves on) in one write, on plain TCP (else
    Hypercorn's path); then what Hypercorn's ``_send_closed`` does after its end of body.
    A cancelled last message ends nothing: the connection then closes when the app ends,
    where Hypercorn's own path, for an empty last message, had h11 end the body before its
    cancelled write and kept the connection open. On plain TCP the bytes go straight to
    :func:`_write`, without a schedule point for a message that asks for none
    (``UNSCHEDULED``; a last message through Hypercorn's path too, marked for
    ``_protocol_send`` by its task). A start message with ``WITH_FIRST_BODY`` has
    its head kept for the first body message's chunk (written at once if the answer is
    not chunked). Once a chunk has taken the short path on plain TCP, the stream keeps where
    its chunks go (``_chunks_to``: the h11 protocol, connection and server, which do not
    change within an answer), and the chunks after it skip the checks of the writer, the
    method and the socket; its state, h11's and a kept head are checked each time (with
    the watchdog's clock, 2.7 % fewer instructions per 64-token stream; docs/benchmarks.md).
    """
    if message is None:
        await _stock_app_send(self, message)
        return
    route = self._chunks_to
    if (route is not None and message.get("more_body", False) and self.state is _RESPONSE
            and message["type"] == "http.response.body"):
        h11_protocol, h11_connection, tcp_server = route
        if h11_connection.our_state is _SEND_BODY and h11_protocol._pending_head is None:
            body = message.get("body", b"")
            if type(body) is not bytes:
                body = bytes(body)
            if body:
                await _write(tcp_server, b"%x\r\n%b\r\n" % (len(body), body), not message.get(UNSCHEDULED, False))
            return
    if message["type"] == "http.response.start" and message.get(WITH_FIRST_BODY):
        protocol: Any = getattr(self.send, "__self__", None)
        if type(protocol) is H11Protocol:
            protocol._hold_head = True  # type: ignore[attr-defined]  # (for _h11_stream_send, in this call)
            try:
                await _stock_app_send(self, message)
            finally:
                protocol._hold_head = False  # type: ignore[attr-defined]
            if protocol._pending_head is not None and not _declares_length(message.get("headers", ())):  # type: ignore[attr-defined]
                connection = protocol.connection  # (h11 has framed the answer by now)
                if type(getattr(connection, "_writer", None)) is not _ChunkedWriter or self.scope["method"] == "HEAD":
                    await _flush_head(protocol)  # no chunked body to carry it (HTTP/1.0, HEAD, 204, 304)
            return
    if self.state is _RESPONSE and message["type"] == "http.response.body":
        protocol = getattr(self.send, "__self__", None)
        if type(protocol) is H11Protocol:
            connection = protocol.connection
            if (connection.our_state is h11.SEND_BODY and type(getattr(connection, "_writer", None)) is _ChunkedWriter
                    and self.scope["method"] != "HEAD"):  # (a lower-case "head" is chunked by h11, bodiless here)
                more = message.get("more_body", False)
                server: Any = getattr(protocol.send, "__self__", None)
                fast = type(server) is TCPServer and server._fast_socket is not None  # type: ignore[attr-defined]
                if more or (fast and not self.response.get("trailers", False)):
                    body = message.get("body", b"")
                    if type(body) is not bytes:
                        body = bytes(body)  # (as Hypercorn: a bytearray or memoryview is copied; a str raises)
                    data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
                    schedule = not message.get(UNSCHEDULED, False)
                    if not more:
                        # h11's end of message comes before the write: a cancellation between the
                        # two would leave h11 done and the body unended, and Hypercorn would keep
                        # the connection for a next request while its client waits. So any wait
                        # (another write finishing) and the cancellation check come first, and
                        # nothing awaits from there to the write. An UNSCHEDULED last message
                        # is not cut short at all (``_write``).
                        lock = server.send_lock
                        if lock.locked():
                            with trio.CancelScope(shield=not schedule):
                                while lock.locked():  # (bounded: ends once no other write on this connection waits)
                                    await lock.acquire()
                                    lock.release()
                        if schedule:
                            await _checkpoint_if_cancelled()
                        data += _end_of_message(connection)
                    if more and fast:
                        self._chunks_to = (protocol, connection, server)
                    if protocol._pending_head is not None:  # type: ignore[attr-defined]  # (a head kept for this body)
                        await _write_after_head(protocol, server if fast else None, data, schedule, split=more,
                                                atomic=not (more or schedule))
                    elif data:
                        if fast:
                            await _write(server, data, schedule, atomic=not (more or schedule))
                        else:
                            await protocol.send(RawData(data=data))
                    if not more:  # Hypercorn's _send_closed, after its end of body
                        self.state = _CLOSED
                        self._chunks_to = None
                        await self.config.log.access(self.scope, self.response, time.time() - self.start_time)
                        await self.send(StreamClosed(stream_id=self.stream_id))
                    return
            if message.get(UNSCHEDULED) and not message.get("more_body", False):
                # A last body message through Hypercorn's own path (a whole answer's, with its
                # length): its writes, the body's and h11's empty end of it, make no schedule point.
                server = getattr(protocol.send, "__self__", None)
                if type(server) is TCPServer and server._fast_socket is not None:  # type: ignore[attr-defined]
                    server._unscheduled_task = _current_task()  # type: ignore[attr-defined]
                    try:
                        await _stock_app_send(self, message)
                    finally:
                        server._unscheduled_task = None  # type: ignore[attr-defined]
                    return
    await _stock_app_send(self, message)


def _chunk_sender(app_send: Any) -> Callable[[bytes], Awaitable[None]] | None:
    """``hypercorn_app.chunk_sender``: once a chunk of the answer has taken ``_app_send``'s short path."""
    stream = getattr(app_send, "__self__", None)
    if type(stream) is not HTTPStream or stream._chunks_to is None:  # type: ignore[attr-defined]
        return None
    return partial(_send_chunk, stream)


async def _send_chunk(self: Any, body: bytes) -> None:
    """``_app_send`` of ``{"type": "http.response.body", "body": body, "more_body": True, UNSCHEDULED: True}``
    (``body`` non-empty bytes), its short path without the message: ~50 opcodes fewer per relayed piece."""
    route = self._chunks_to
    if route is not None and self.state is _RESPONSE:
        h11_protocol, h11_connection, tcp_server = route
        if h11_connection.our_state is _SEND_BODY and h11_protocol._pending_head is None:
            await _write(tcp_server, b"%x\r\n%b\r\n" % (len(body), body), False)
            return
    await _app_send(self, {"type": "http.response.body", "body": body, "more_body": True, UNSCHEDULED: True})


class _NowaitChunks:
    """``hypercorn_app.chunk_nowait``: ``_send_chunk``'s short path, written in the caller's step."""

    __slots__ = ("stream",)

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def try_send(self, body: bytes) -> bytes | None:
        # (A rest it leaves is not under the send lock until ``finish``: safe because nothing
        # else writes to an HTTP/1.1 answer in the middle of its body, and the app's task
        # finishes it before anything else of the answer.)
        stream = self.stream
        route = stream._chunks_to
        if route is None or stream.state is not _RESPONSE:
            return b""
        h11_protocol, h11_connection, tcp_server = route
        if h11_connection.our_state is not _SEND_BODY or h11_protocol._pending_head is not None or tcp_server.send_lock.locked():
            return b""
        data = b"%x\r\n%b\r\n" % (len(body), body)
        try:
            sent = os.write(tcp_server._fast_socket.fileno(), data)
        except BlockingIOError:
            sent = 0
        except OSError:  # (nothing written: the usual way tells Hypercorn the connection broke)
            return b""
        return None if sent == len(data) else data[sent:]

    async def finish(self, rest: bytes) -> None:
        route = self.stream._chunks_to
        assert route is not None  # (nothing was sent since try_send found it)
        await _write(route[2], rest, False)


def _chunk_nowait(app_send: Any) -> _NowaitChunks | None:
    """``hypercorn_app.chunk_nowait``: as ``_chunk_sender``, once the answer's chunks have their route."""
    stream = getattr(app_send, "__self__", None)
    if type(stream) is not HTTPStream or stream._chunks_to is None:  # type: ignore[attr-defined]
        return None
    return _NowaitChunks(stream)


async def _write_after_head(
    protocol: Any, server: Any, data: bytes, schedule: bool, *, split: bool = True, atomic: bool = False
) -> None:
    """Write the head ``protocol`` kept, then ``data``, in one write (``server``: a plain TCP one, or None).

    On plain TCP, with no other write holding the connection, the cancellation check comes
    before the head is taken: once taken, it is written. Otherwise, if the write raises
    without returning, the head is kept again, to go out before whatever comes next, as
    Hypercorn's own path would have written it already (if the write had begun, the
    connection is broken and a second copy reaches no one). A large ``data`` goes after
    the head, not copied onto it (``COALESCE_MAX``), unless ``split`` is False: a body's
    last bytes, after h11 has ended it, must not wait behind a write of their own.
    """
    if split and len(data) > COALESCE_MAX:
        await _flush_head(protocol)
        if server is not None:
            await _write(server, data, schedule, atomic=atomic)
        else:
            await protocol.send(RawData(data=data))
        return
    if server is not None and not server.send_lock.locked():
        if schedule:  # (then nothing awaits before _write's own, which cannot fire)
            await _checkpoint_if_cancelled()
        head = protocol._pending_head
        protocol._pending_head = None
        await _write(server, head + data, schedule, atomic=atomic)
        return
    head = protocol._pending_head
    protocol._pending_head = None
    written = False
    try:
        if server is not None:
            await _write(server, head + data, schedule, atomic=atomic)
        else:
            await protocol.send(RawData(data=head + data))
        written = True
    finally:
        if not written and protocol._pending_head is None:
            protocol._pending_head = head


def _h11_headers_iter(self: Any) -> Iterator[tuple[bytes, bytes]]:
    """``h11._headers.Headers.__iter__``: each (lower-case name, value), as ``__getitem__`` gives them."""
    for _, name, value in self._full_items:
        yield name, value


def _end_of_message(connection: h11.Connection) -> bytes:
    try:
        return connection.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:  # (as Hypercorn's _send_h11_event: nothing is written then)
        if connection.their_state is not h11.ERROR:
            raise
        return b""


async def _flush_head(self: Any) -> None:
    pending, self._pending_head = self._pending_head, None
    await self.send(RawData(data=pending))


def _continue_hook(app_send: Any) -> Callable[[], Awaitable[None]] | None:
    """For a request whose client waits for ``100 Continue``: what sends it (``AppInbox.on_wait``)."""
    protocol = getattr(getattr(getattr(app_send, "__self__", None), "send", None), "__self__", None)
    if type(protocol) is not H11Protocol or not protocol.connection.they_are_waiting_for_100_continue:
        return None
    return partial(_continue, protocol)


async def _continue(protocol: Any) -> None:
    """The app waits for the body: tell a client that still waits for it to send it."""
    if protocol.connection.they_are_waiting_for_100_continue:
        event = h11.InformationalResponse(status_code=100, headers=protocol.config.response_headers("h11"))
        await _stock_send_h11_event(protocol, event)


def _atomic_end(app_send: Any) -> bool:
    """Whether an app's UNSCHEDULED last message is written whatever the cancellation state: h11 on plain TCP."""
    protocol = getattr(getattr(getattr(app_send, "__self__", None), "send", None), "__self__", None)
    if type(protocol) is not H11Protocol:
        return False
    server = getattr(protocol.send, "__self__", None)
    return type(server) is TCPServer and server._fast_socket is not None  # type: ignore[attr-defined]


def wanted(environ: Mapping[str, str], version: str) -> bool:
    """Whether to install the fast paths: a supported Hypercorn, and not opted out."""
    if environ.get(STOCK_ENV, "") not in ("", "0"):
        return False
    return ".".join(version.split(".")[:2]) in SUPPORTED_VERSIONS


def applied() -> bool:
    """True once :func:`apply` has installed the fast paths."""
    return TCPServer.protocol_send is _protocol_send


def apply() -> bool:
    """Install the fast paths on Hypercorn's Trio ``TCPServer`` if :func:`wanted` (idempotent).

    Returns whether they are installed.
    """
    if not applied() and wanted(os.environ, metadata.version("hypercorn")):
        TCPServer.__init__ = _init  # type: ignore[method-assign]
        TCPServer.protocol_send = _protocol_send  # type: ignore[method-assign]
        TCPServer._read_data = _read_data  # type: ignore[method-assign]
        TCPServer._unscheduled_task = None  # type: ignore[attr-defined]
        global _inner_handle
        _inner_handle = H11Protocol.handle
        H11Protocol.handle = _h11_handle  # type: ignore[method-assign]
        H11Protocol._pending_head = None  # type: ignore[attr-defined]
        H11Protocol._defer_head = False  # type: ignore[attr-defined]
        H11Protocol._hold_head = False  # type: ignore[attr-defined]
        H11Protocol.stream_send = _h11_stream_send  # type: ignore[method-assign]
        H11Protocol._send_h11_event = _h11_send_h11_event  # type: ignore[method-assign]
        HTTPStream.app_send = _app_send  # type: ignore[method-assign]
        HTTPStream._chunks_to = None  # type: ignore[attr-defined]
        hypercorn_app.install(_atomic_end, _continue_hook, _chunk_sender, _chunk_nowait)
        headers_class = _h11_headers_class()
        if headers_class is not None:
            headers_class.__iter__ = _h11_headers_iter
    return applied()
