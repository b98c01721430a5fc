"""Fixes to Hypercorn's Trio server (0.17, 0.18), whatever the I/O (``hypercorn_fast`` or stock).

The first: close a keep-alive connection as soon as its client closes it between requests.
Hypercorn (0.17 and 0.18 on Trio) does not. When the client's EOF arrives while no
request is in flight, its h11 protocol sees ``ConnectionClosed`` and does nothing more:
the connection's task then waits in its task group for the idle timer, which closes the
socket only ``keep_alive_timeout`` later (75 s by default here). Meanwhile the socket
stays in CLOSE-WAIT and the connection's objects stay in memory. Every client that
opens a connection per request and closes it once it is idle (curl, a new SDK client
per call) leaves one behind: 50 of 50 in a test, and 8 MB per 512 connections
(docs/benchmarks-history.md, 2026-12-07). Under a steady stream of such clients the
process would run out of file descriptors.

The fix: when the protocol is told the connection closed and it has no request in
flight, it also says the connection is no longer idle, which stops the idle timer.
The task group then ends, and the connection task closes the socket as it always does
at its end. Any other path is untouched. Not covered: a connection upgraded to HTTP/2
(``Upgrade: h2c`` or prior knowledge), whose ``H2Protocol`` behaves as before; the clients
here speak HTTP/1.1.

A second fix, for every connection: once a connection's task is done, its ``TCPServer``
drops its protocol and its keep-alive timer. Both close reference cycles through it, so
each closed connection's objects (~6 KB) used to wait for the cyclic GC's oldest
generation; they are now freed at once.

A third, for HTTP/2 (``H2Protocol``): data that arrives for a stream already closed
(answered before its whole body came: a 404, a 413, or any answer that does not read
the body, once the body is larger than the first flow-control window, 64 KB) is
acknowledged and dropped. Hypercorn looks the stream up and raises ``KeyError``, which
under Trio left the connection's task and ended the server: every connection cut, the
port closed (pgjones/hypercorn#329; the fixes proposed, #312 and #334, are not in 0.17 or 0.18). Its own code already drops
an end of stream for a closed stream the same way.

And whatever error of Hypercorn's own ends a connection's task ends that connection
only, logged with its traceback, and not the server with it, as it would under Trio.

And a request h11 cannot read (a malformed request line, header or chunked body; a head
over ``max_header_bytes`` while still incomplete; an unknown Transfer-Encoding) is
answered with an error body in the API's own format (Ollama's for a request to ``/api/*``
whose head was read, else OpenAI's: a head h11 cannot read has no path to go by), where
Hypercorn sent the status with an empty body. If its app had started
(the head was read, the body was not), the scope's ``extensions`` say so
(``hypercorn_app.REFUSED``), so its usage record names the answer the client got rather
than a client gone; unless the client closed its side (a body cut short by a client that
left: that stays a client gone).

:func:`apply` installs the fixes once; ``server.py``
calls it before serving, so the gateway and the bench's floor app (Hypercorn with the
gateway's set-up) both get it. ``tests/test_keepalive_close.py`` checks it against the
real Hypercorn.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import h11
import h2.events
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio.tcp_server import TCPServer
from loguru import logger

from .errors import RequestError, error_body
from .hypercorn_app import REFUSED

__all__ = ["apply"]

_original_handle = H11Protocol.handle
_original_run = TCPServer.run
_original_h2_handle_events = H2Protocol._handle_events

#: What a client is told, by the status h11 gives (``error_status_hint``) for a request it cannot read.
_REFUSALS = {
    400: "The request is not valid HTTP/1.1 and could not be read.",
    431: "The request's head (request line and headers) is too large.",
    501: "The request's Transfer-Encoding is not supported (only chunked is).",
}


async def _handle(self: Any, event: Event) -> None:
    await _original_handle(self, event)
    if isinstance(event, Closed) and self.stream is None:
        # No request in flight: the connection is over. Stop its idle timer, whose task
        # would otherwise keep the connection (and its socket) for keep_alive_timeout.
        await self.send(Updated(idle=False))


async def _run(self: Any) -> None:
    try:
        await _original_run(self)
    except Exception:  # (not a cancellation: a group holding one is a BaseExceptionGroup, and goes on up)
        # An error of Hypercorn's own on this connection (the app's errors are caught inside
        # it): under Trio it would leave this handler and end ``serve_listeners``, every other
        # connection with it. It ends this connection only; its requests were cancelled with
        # its task group, each with its record.
        logger.opt(exception=True).error("a connection ended on an internal error; serving on")
    finally:
        # The connection is over: every task of its task group has ended and its socket is
        # closed. Drop the two references that close cycles through it (its protocol holds
        # ``self.protocol_send``; a keep-alive timer may hold ``self``), so its objects are
        # freed now by reference counting, not left to a full pass of the cyclic GC: ~6 KB
        # and 23 objects a connection, which waited in the oldest generation after living
        # through a stream (docs/benchmarks-history.md, 2026-12-07).
        self.__dict__.pop("protocol", None)
        self.__dict__.pop("idle_task", None)


async def _h2_handle_events(self: Any, events: list[h2.events.Event]) -> None:
    # Hypercorn's loop pulls each event when the one before it is handled (its awaits
    # done), so whether a data event's stream is still open is checked then, and nothing
    # awaits between the check and Hypercorn's lookup.
    await _original_h2_handle_events(self, _open_stream_events(self, events))  # type: ignore[arg-type]


def _open_stream_events(protocol: Any, events: Iterable[h2.events.Event]) -> Iterator[h2.events.Event]:
    for event in events:
        if type(event) is h2.events.DataReceived and event.stream_id not in protocol.streams:
            # Nobody reads it: give its bytes back to the connection's window, as for any data.
            protocol.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            continue
        yield event


async def _h11_send_error_response(self: Any, status_code: int) -> None:
    scope = getattr(self.stream, "scope", None)  # (an HTTPStream's, once its request was read: its app runs)
    path = scope.get("path", "") if isinstance(scope, dict) else ""
    message = _REFUSALS.get(status_code, f"The request could not be read (HTTP {status_code}).")
    if isinstance(scope, dict) and not self.connection.trailing_data[1]:  # (closed: the client left mid-body)
        scope.setdefault("extensions", {})[REFUSED] = (status_code, message)
    body = error_body(RequestError(message, status_hint=status_code), ollama=path.startswith("/api/"))
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), (b"connection", b"close")]
    # Framed at once and written in one send: an app that answers meanwhile (a 404 that did not
    # read the body) must find h11 done, not slip its head between this head and its body.
    connection = self.connection
    try:
        data = b"".join((
            connection.send(h11.Response(status_code=status_code, headers=headers + self.config.response_headers("h11"))),
            connection.send(h11.Data(data=body)),
            connection.send(h11.EndOfMessage()),
        ))
    except h11.LocalProtocolError:  # (as Hypercorn's _send_h11_event, which would have framed these)
        if connection.their_state != h11.ERROR:
            raise
        return
    await self.send(RawData(data=data))


_applied = False


def apply() -> None:
    """Install the fixes on Hypercorn's h11 and h2 protocols and Trio ``TCPServer`` (idempotent, also once ``hypercorn_fast`` wraps them)."""
    global _applied
    if not _applied:
        _applied = True
        H11Protocol.handle = _handle  # type: ignore[method-assign]
        TCPServer.run = _run  # type: ignore[method-assign]
        H2Protocol._handle_events = _h2_handle_events  # type: ignore[method-assign]
        H11Protocol._send_error_response = _h11_send_error_response  # type: ignore[method-assign]
