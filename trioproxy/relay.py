"""Relaying an upstream response to the ASGI client.

Streamed bodies (chunked or close-delimited upstream responses to a streaming
request) are relayed by one task that reads the upstream and writes to the
client in turn, so a slow client slows the upstream read instead of piling bytes
up in memory::

    pump: [prefetched chunks] + upstream.receive_some() → scanner.feed() → [usage filter] → ASGI send
          (TTFT is stamped when the chunk with the first content has been sent)

A zero-buffer channel between a reader task and a writer task did the same with
one more task switch per chunk; relaying in the reader task measured cheaper
(docs/benchmarks.md). No other task per stream: the gateway's one ``Watchdog``
watches every stream's client writes (a client that takes no data for
``server.client_write_timeout_s`` is given up on, its upstream released), and once a
stream's pieces are steady and its first token is out, the gateway's one ``RelayHub``
(``relayhub``, ``server.relay_hub``) reads and relays them in its own task and hands the
stream back to its task with anything else (``_HubRelay``): a wake-up of the hub per batch
of events instead of one of every stream's task per event.

(the attempt that won already read up to the first content: that is how a hedge
race is decided, see ``upstream.py``; those chunks go first). Bodies read whole by
the attempt (non-streamed answers, error answers) are sent in one ASGI message
with their length (no chunking, no task switch per piece).

Policy on a mid-stream upstream failure (cut, reset, idle timeout, a stream that
ends before its ``finish_reason``/``done``): the status line is long gone, so the
stream ends with one error event in the stream's own format (an SSE ``data:
{"error": ...}`` event, or an NDJSON ``{"error": ...}`` line) and then ends
cleanly. The record says ``upstream_error`` and how many bytes were delivered.
The client's last line before that error is a whole one: an SSE or NDJSON stream
is relayed a whole line at a time (what a read gave after its last newline waits
for the rest of its line, microseconds at most), and a broken line is dropped.
A stream that did finish (it carried its ``finish_reason``) and whose body then
ended cleanly without ``[DONE]`` is complete: it ends without an error. One whose
upstream keeps the connection open after its ``finish_reason`` is waited on (up
to ``idle_ms``: a usage event and ``[DONE]`` may follow), and one whose framing is
cut after it (a chunked body without its last chunk) ends with the error event.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from . import jsonread
from .errors import UpstreamError
from .headers import client_response_headers, header_value
from .hypercorn_app import UNSCHEDULED, WITH_FIRST_BODY, NowaitChunks, chunk_nowait, chunk_sender
from .pool import UpstreamResponse
from .relayhub import RelayHub
from .upstream import Winner
from .usage import DEFAULT_MAX_LINE_BYTES, NDJSONScanner, SSEScanner
from .usagefilter import NULL_USAGE_MEMBER, UsageEventFilter
from .watchdog import Watchdog

Send = Callable[[dict[str, Any]], Awaitable[None]]

#: With telemetry.log_payloads on, at most this much of an answer is kept for its record.
CAPTURE_LIMIT = 64 * 1024


class Exchange(Protocol):
    """The per-request facts the relay fills in (``app.Exchange``)."""

    request_id: bytes
    arrival: float
    status: int
    outcome: str
    error: str | None
    response_started: bool
    atomic_end: bool
    finished: bool
    ended: bool
    client_gone: bool
    captured: bytearray | None
    ttft_ms: float | None
    bytes_out: int
    first_content_index: int | None


def sse_error_event(message: str) -> bytes:
    error = {"error": {"message": message, "type": "upstream_error", "param": None, "code": None}}
    return b"data: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n"


def ndjson_error_line(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode() + b"\n"


async def relay_stream(
    ex: Exchange,
    winner: Winner,
    send: Send,
    *,
    usage_filter: UsageEventFilter | None,
    error_line: Callable[[str], bytes],
    max_bytes: int,
    write_timeout: float,
    watchdog: Watchdog | None,
    hub: RelayHub | None = None,
) -> None:
    """Send the head, then relay the body as it comes; end the body in every case but a lost client.

    ``hub``: relays the stream's steady pieces once its first token is out (``_HubRelay``)."""
    response = winner.response
    headers = client_response_headers(
        response.headers, request_id=ex.request_id, upstream_id=winner.target.upstream.encode(), streamed=True
    )
    # Framed in events or lines, unless it says JSON (a server that ignored "stream": relayed as it comes).
    framed = not (header_value(response.headers, b"content-type") or b"").lower().startswith(b"application/json")
    response.forget_headers()
    # The first body message follows at once (``pump``): the head may go out with it, in one write.
    # (Started before the send: once Hypercorn has framed the head, no other answer may follow it.)
    ex.status, ex.response_started = response.status, True
    await send({"type": "http.response.start", "status": response.status, "headers": headers, WITH_FIRST_BODY: True})
    writer = _ClientWriter(ex, send, winner, write_timeout, watchdog.now if watchdog is not None else trio.current_time)
    if watchdog is not None:
        watchdog.watch(writer)
    try:
        await pump(ex, winner, writer, usage_filter, error_line, max_bytes, framed=framed, hub=hub)
    finally:
        if watchdog is not None:
            watchdog.forget(writer)
    if not ex.client_gone:
        await finish(ex, send)


class _ClientWriter:
    """Hands relayed chunks to the client: counts them, stamps TTFT, and shows the watchdog a stuck send.

    The pump calls it directly, in the task that reads the upstream: a stalled
    client stalls the upstream read (back-pressure, nothing piles up), and no
    channel or task switch sits between the two (measured in docs/benchmarks.md).
    """

    __slots__ = ("ex", "send", "winner", "timeout", "index", "since", "now", "chunk", "ask")

    def __init__(self, ex: Exchange, send: Send, winner: Winner, timeout: float,
                 now: Callable[[], float] = trio.current_time) -> None:
        self.ex, self.send, self.winner, self.timeout, self.index, self.now = ex, send, winner, timeout, 0, now
        #: When the send in progress started (None between sends).
        self.since: float | None = None
        #: The server's chunk sender (``hypercorn_app.chunk_sender``), asked for once a piece has gone
        #: unscheduled as a message (``ask``: not yet asked); None: pieces go as messages.
        self.chunk: Callable[[bytes], Awaitable[None]] | None = None
        self.ask = True

    async def write(self, data: bytes, *, unscheduled: bool = False, count: bool = True) -> None:
        """Send ``data`` on; ``unscheduled``: the server may skip the write's schedule point,
        and the caller's next await is one (``hypercorn_app.UNSCHEDULED``); ``count=False``:
        not a relayed piece (the empty message that sends a held head)."""
        ex = self.ex
        if ex.client_gone:
            return
        self.since = self.now()
        try:
            if not unscheduled:
                await self.send({"type": "http.response.body", "body": data, "more_body": True})
            elif (chunk := self.chunk) is not None:
                await chunk(data)  # (what the message below does, without the message)
            else:
                await self.send({"type": "http.response.body", "body": data, "more_body": True, UNSCHEDULED: True})
                if self.ask:
                    self.ask = False
                    self.chunk = chunk_sender(self.send)
        except trio.BusyResourceError:  # the client hung up while Hypercorn wrote (see ``finish``)
            ex.client_gone = True
            if ex.outcome == "ok":
                ex.outcome = "client_disconnect"
            return
        finally:
            self.since = None
        if not count:
            return
        ex.bytes_out += len(data)
        if self.index == ex.first_content_index:
            ex.ttft_ms = (self.now() - ex.arrival) * 1000
        self.index += 1
        if ex.captured is not None and len(ex.captured) < CAPTURE_LIMIT:
            ex.captured += data

    async def finish_rest(self, chunks: NowaitChunks, rest: bytes) -> None:
        """Write what the hub's write of a piece (already counted) left: a send the watchdog watches."""
        ex = self.ex
        if ex.client_gone:
            return
        self.since = self.now()
        try:
            await chunks.finish(rest)
        except trio.BusyResourceError:  # (as in ``write``)
            ex.client_gone = True
            if ex.outcome == "ok":
                ex.outcome = "client_disconnect"
        finally:
            self.since = None

    def expire(self) -> None:
        """(``Watchdog``) The client took no data for ``timeout`` seconds: give up on it, release the upstream."""
        ex = self.ex
        ex.client_gone = True
        ex.outcome, ex.error = "client_disconnect", f"the client took no data for {self.timeout:g} s"
        self.winner.release()  # the pump's next read fails; the upstream sees its connection closed


async def pump(
    ex: Exchange,
    winner: Winner,
    writer: _ClientWriter,
    usage_filter: UsageEventFilter | None,
    error_line: Callable[[str], bytes],
    max_bytes: int,
    *,
    framed: bool = True,
    hub: RelayHub | None = None,
) -> None:
    """Relay what the attempt already read, then the rest of the upstream body, to the client.

    ``framed``: the body is the route's events (SSE) or lines (NDJSON), not JSON. ``hub``: once
    a piece is steady and the first token is out, the stream's reads go to the hub, which
    relays steady pieces in its own task and hands the stream back with anything else
    (``_HubRelay``); the steps below then go on from where it stopped.
    """
    response, scanner = winner.response, winner.scanner
    write = writer.write
    sent = 0
    # The whole answer came with the first content: the last of these chunks ends it (see below).
    done_at = len(winner.prefetched) - 1 if scanner is not None and scanner.done else -1
    # An event stream (SSE) is relayed a whole event at a time, NDJSON a whole line at a time:
    # what a read gave after the last boundary waits for the rest (``_Held``). Were the stream
    # cut, the client would otherwise get a broken event or line before the error, and its
    # parser would fail on it (JSONDecodeError in the SDKs) instead of reading the error. (After
    # the usage filter, which holds lines back, not events.)
    held = _Held(sse=isinstance(scanner, SSEScanner)) if scanner is not None and framed else None
    tail = b""
    # Only the end of what was last relayed matters (``_closing``); nothing relayed is kept while
    # the stream waits for its next piece: with hundreds of slow streams open, that is memory.
    last = b"\n\n"
    for index, data in enumerate(winner.prefetched):
        if index == winner.first_content_index:
            ex.first_content_index = sent
        if index == done_at:
            ex.finished = True
        if usage_filter is not None:
            data = usage_filter.feed(data)
        if held is not None and data:
            data = held.take(data)
        if not data:
            continue
        await write(data)
        if ex.client_gone:
            return
        last = data[-2:]
        sent += 1
    if sent == 0:  # nothing relayed yet: a first body message before any wait, for the head (WITH_FIRST_BODY)
        await writer.write(b"", count=False)
        if ex.client_gone:
            return
    received = sum(len(d) for d in winner.prefetched)
    winner.prefetched.clear()
    data = b""
    steady = False
    #: The stream's side of the hub, made at its first steady piece once the first token is out.
    hubbed: _HubRelay | None = None
    may_hub = hub is not None and isinstance(scanner, SSEScanner) and framed and ex.captured is None
    try:
        while True:
            kind = _READ
            if steady and may_hub and ex.ttft_ms is not None:
                if hubbed is None:
                    chunks = chunk_nowait(writer.send) if writer.chunk is not None else None
                    if chunks is None:  # (no short path for chunks on this server: every piece here)
                        may_hub = False
                    else:
                        assert hub is not None and isinstance(scanner, SSEScanner)  # (may_hub)
                        hubbed = _HubRelay(hub, ex, response, scanner, usage_filter, writer, chunks, max_bytes)
                if hubbed is not None and hubbed.hub.open and (sock := response.hub_socket()) is not None:
                    hubbed.received = received
                    result = await hubbed.park(sock)
                    received = hubbed.received
                    if hubbed.relayed:
                        sent += hubbed.relayed
                        last = b"\n\n"  # (a steady piece is a whole event)
                    if ex.client_gone:
                        return
                    if isinstance(result, BaseException):
                        raise result  # (what the read raised: as from ``receive_some`` below)
                    if result is not None:
                        kind, data = result  # type: ignore[misc]
                        if kind == _REST:  # the hub's write of a piece left bytes: they go first
                            await writer.finish_rest(hubbed.chunks, data)
                            if ex.client_gone:
                                return
                            continue
            if kind == _READ:
                # Every pass makes one schedule point, here (a wait for the upstream, most often),
                # and none in the write below: one trip through the scheduler per relayed piece.
                # (A read that raises, say on bad framing already buffered, does so before its
                # schedule point: the error event then follows the last piece at once, and its
                # own write makes one. At most those two writes, and the stream ends.)
                data = await response.receive_some(schedule=True)
                if not data:
                    break
                kind = _COUNT
            if kind == _COUNT:
                received += len(data)
                if received > max_bytes:  # an endless stream: cut it, say so
                    ex.outcome = "upstream_error"
                    ex.error = f"upstream {winner.target.upstream!r} sent more than max_response_bytes ({max_bytes})"
                    await write(_closing(last, error_line(f"{ex.error}; the answer is incomplete")))
                    return
                steady = False
                if scanner is not None:
                    if scanner.feed(data) and ex.first_content_index is None:
                        ex.first_content_index = sent
                    # One whole event of the last one's shape, its text plain (``steady_piece``): nothing
                    # held anywhere (it ends an event, as the piece before it did), no terminator in it.
                    steady = scanner.steady_piece
            else:  # (from the hub: _SCANNED, counted and scanned, not steady; _FILTERED, steady and filtered)
                steady = kind == _FILTERED
            if scanner is not None and not steady and scanner.done:
                # This chunk carries the terminating event ([DONE], done: true): the answer is
                # complete for the client once it has it, and it may hang up before the last
                # empty chunk, even during this write (its disconnect notice fires in it, or the
                # watcher task runs at its schedule point, where the server makes one); that is
                # not a disconnect. Set first, as ``finish`` does.
                ex.finished = True
            if usage_filter is not None and kind != _FILTERED:
                # A steady piece is one data line with nothing held: the filter's whole work on it is
                # to take out the compact null members, unless another "usage" is left (then its own).
                if not steady or b'"usage"' in (out := data.replace(NULL_USAGE_MEMBER, b"")):
                    out = usage_filter.feed(data)
                    if not out:
                        continue
                data = out
            if held is not None and not steady and (held.tail or not data.endswith(held.end)):
                data = held.take(data)  # (the common piece ends where it should: one test)
                if not data:
                    continue
            await write(data, unscheduled=True)
            if ex.client_gone:  # (the write found the client gone: nothing more to relay)
                return
            last, data = data[-2:], b""
            sent += 1
    except UpstreamError as exc:
        # What waited for the rest of its event or line (here, or in the usage filter) is not
        # sent if it would break the client's parse: its last event or line is whole, and the
        # error follows it.
        if scanner is not None and scanner.done and scanner.error is None and (held is None or not held.tail):
            # It broke after its terminator ([DONE], Ollama's done line) went out whole (a chunked
            # body cut before its last chunk, say): the client has the whole answer, usage
            # included; an error event after it would make it a failure. (Not after a mere
            # finish_reason: another choice, or the usage event, may still be missing.)
            return
        ex.outcome, ex.error = "upstream_error", exc.message
        if held is not None and held.tail and held.harmless(held.tail):
            await write(held.tail)
            last = held.tail[-2:]
        await write(_closing(last, error_line(f"{exc.message}; the answer is incomplete")))
        return
    except trio.ClosedResourceError:
        return  # released by the Watchdog: the client is gone, the outcome is already said
    if usage_filter is not None:
        tail = usage_filter.flush()
    if held is not None:
        tail = held.tail + tail  # (what the filter gave at its end comes after what was held)
    if scanner is not None:
        scanner.end_of_body()
        if scanner.error is None and not scanner.done and scanner.finish_reason is None:
            # It ended before it finished: what waited for its end is sent if it is not framed
            # in events, or would not break the client's parse (see ``_Held.harmless``).
            if tail and (held is None or held.harmless(tail)):
                await write(tail)
                last = tail[-2:]
            say_how_it_ended(ex, winner, scanner)
            await write(_closing(last, error_line(f"{ex.error}; the answer is incomplete")))
            return
        say_how_it_ended(ex, winner, scanner)
    if tail:  # a finished body's last line without its newline: relayed as it came
        await write(tail)


#: What ``pump`` does with a piece: read one (``receive_some``); count and scan what the hub
#: handed back unread by it (a piece past ``max_bytes``); go on from after the scan (_SCANNED: a
#: piece that is not steady) or from the write (_FILTERED: a steady piece the hub could not
#: write now); write the rest of a piece the hub wrote in part (_REST).
_READ, _COUNT, _SCANNED, _FILTERED, _REST = range(5)


class _HubRelay:
    """A stream's steady pieces relayed by the hub (``relayhub.RelayHub``), in the hub's task.

    For each read that gives a whole piece, what ``pump`` does with a steady one, in one step:
    count it (``max_bytes``), scan it, take out the injected null member, write it
    (``hypercorn_app.chunk_nowait``: the server's short path for a chunk, without waiting) and
    count it as relayed. Anything else goes back to the stream's task with how far it got: a
    piece that is not steady (_SCANNED), one past ``max_bytes`` (_COUNT), one the server could
    not take now, or one that kept another ``"usage"`` after the filter's own work (_FILTERED;
    None if the filter kept nothing of it), what the socket did not take of a written one
    (_REST), an error the read raised (the exception), the body's end or a client gone (None:
    the task reads, and ends, as it would). The watchdog's expiry of the
    wait hands it back too (``UpstreamResponse.on_expire``), before it closes the socket.
    """

    __slots__ = ("hub", "ex", "response", "scanner", "usage_filter", "writer", "chunks", "max_bytes", "fd",
                 "received", "relayed")

    def __init__(self, hub: RelayHub, ex: Exchange, response: UpstreamResponse, scanner: SSEScanner,
                 usage_filter: UsageEventFilter | None, writer: _ClientWriter, chunks: NowaitChunks,
                 max_bytes: int) -> None:
        self.hub, self.ex, self.response, self.scanner = hub, ex, response, scanner
        self.usage_filter, self.writer, self.chunks, self.max_bytes = usage_filter, writer, chunks, max_bytes
        self.fd = -1
        #: Body bytes received (``pump``'s count, handed over and back).
        self.received = 0
        #: Pieces the hub wrote while it had the stream.
        self.relayed = 0

    async def park(self, sock: Any) -> object:
        """Hand the stream's reads to the hub until it hands them back; what it handed back with."""
        self.fd, self.relayed = sock.fileno(), 0
        self.response.on_expire = self._expired
        try:
            return await self.hub.park(self)
        finally:
            self.response.end_hub_wait()

    def _expired(self) -> None:
        self.hub.hand_back(self, self.response.idle_timeout_error())  # (the watchdog closes the socket next)

    def readable(self) -> None:
        hub = self.hub
        try:
            piece = self.response.read_ready()
        except (UpstreamError, trio.ClosedResourceError) as exc:
            hub.hand_back(self, exc)
            return
        if piece is None:
            return
        if not piece:
            hub.hand_back(self, None)
            return
        if self.received + len(piece) > self.max_bytes:
            hub.hand_back(self, (_COUNT, piece))
            return
        self.received += len(piece)
        scanner = self.scanner
        scanner.feed(piece)  # (the first token is out: this says False)
        if not scanner.steady_piece:
            hub.hand_back(self, (_SCANNED, piece))
            return
        out = piece
        if self.usage_filter is not None:
            out = piece.replace(NULL_USAGE_MEMBER, b"")
            if b'"usage"' in out:  # (as ``pump``: the filter's own work, and a steady piece goes on)
                out = self.usage_filter.feed(piece)
                hub.hand_back(self, (_FILTERED, out) if out else None)
                return
        rest = self.chunks.try_send(out)
        if rest == b"":
            hub.hand_back(self, (_FILTERED, out))
            return
        self.ex.bytes_out += len(out)
        self.writer.index += 1
        self.relayed += 1
        if rest is not None:
            hub.hand_back(self, (_REST, rest))
        elif self.ex.client_gone or self.response.complete:
            hub.hand_back(self, None)


def say_how_it_ended(ex: Exchange, winner: Winner, scanner: SSEScanner | NDJSONScanner) -> None:
    """A stream's end, as the scanner saw it, in the record: an error event in it, or an end
    before it finished (no ``[DONE]``/``done`` and no finish reason) is ``upstream_error``."""
    if scanner.error is not None:
        ex.outcome, ex.error = "upstream_error", f"upstream reported: {winner.runtime.redact(scanner.error)}"
    elif not scanner.done and scanner.finish_reason is None:
        ex.outcome, ex.error = "upstream_error", f"upstream {winner.target.upstream!r} ended the stream before it finished"


class _Held:
    """What a read of an event stream (SSE) or an NDJSON stream gave after its last whole event
    (a blank line) or line, kept until the rest comes [sans-IO].

    Bounded: past ``DEFAULT_MAX_LINE_BYTES`` (an event that long is not a token), what is held
    goes on as it came, as the usage filter does with a line that long.
    """

    __slots__ = ("sse", "end", "tail")

    def __init__(self, *, sse: bool) -> None:
        self.sse = sse
        #: How the common piece ends (one test per piece in the relay's loop).
        self.end = b"\n\n" if sse else b"\n"
        self.tail = b""

    def harmless(self, tail: bytes) -> bool:
        """Whether ``tail``, an unfinished event or line, can go to the client before an error:
        an NDJSON line that is whole JSON; SSE bytes without a data field (a comment, text),
        which a client ignores, where a broken ``data:`` line would be parsed as broken JSON."""
        return b"data" not in tail if self.sse else _whole_json(tail)

    def take(self, data: bytes) -> bytes:
        """What of ``data`` (after what was held) can go to the client now; the rest is held."""
        cut = _boundary(data, self.sse)
        if cut == len(data):
            data, self.tail = self.tail + data if self.tail else data, b""
            return data
        if cut:
            out, self.tail = self.tail + data[:cut] if self.tail else data[:cut], data[cut:]
            return out
        joined = self.tail + data
        cut = _boundary(joined, self.sse)  # (a boundary split across two reads: "\n" | "\n")
        if cut:
            out, self.tail = joined[:cut], joined[cut:]
            return out
        if len(joined) > DEFAULT_MAX_LINE_BYTES:
            self.tail = b""
            return joined
        self.tail = joined
        return b""


def _boundary(data: bytes, sse: bool) -> int:
    """Where the last whole event (SSE: its blank line) or line (NDJSON) in ``data`` ends; 0 if none."""
    if not sse:
        return data.rfind(b"\n") + 1
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def _whole_json(line: bytes) -> bool:
    try:
        jsonread.loads(line)
    except ValueError:
        return False
    return True


def _closing(last: bytes, error: bytes) -> bytes:
    """The error event, preceded by what ends the event the upstream left half-sent, if it did.

    SSE events end with a blank line and NDJSON lines with a newline: without this,
    a cut mid-event would glue the error onto a broken line no client can parse.
    """
    if error.startswith(b"data:"):
        return (b"" if last.endswith(b"\n\n") else b"\n" if last.endswith(b"\n") else b"\n\n") + error
    return (b"" if last.endswith(b"\n") else b"\n") + error


async def relay_whole(ex: Exchange, winner: Winner, send: Send, body: bytes) -> None:
    """Send a body that was read whole, in one message, with its length."""
    response = winner.response
    headers = client_response_headers(
        response.headers, request_id=ex.request_id, upstream_id=winner.target.upstream.encode(), streamed=False
    )
    if response.status >= 400:  # (an error's words may quote the operator's key: not for the client)
        body = winner.runtime.redact_body(body)
    headers.append((b"content-length", str(len(body)).encode()))
    await send_whole(ex, send, response.status, headers, body)


async def send_whole(ex: Exchange, send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Send a whole answer, its head and its body with their length, all in hand.

    Shielded from cancellation (a deadline, the shutdown's end of grace): a cancellation
    between the head and the body would leave a head with its length and no body, or no
    answer at all after a head Hypercorn has framed. A write that the client does not take
    is shielded by Hypercorn already, and ends when the connection closes.
    """
    ex.status, ex.response_started = status, True  # (before the head: no other answer may follow it)
    if ex.atomic_end:  # (the head waits for the body, which cannot be cut short: no shield, ~10 µs fewer)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await finish(ex, send, body)
        return
    with trio.CancelScope(shield=True):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await finish(ex, send, body)


async def finish(ex: Exchange, send: Send, body: bytes = b"") -> None:
    """Send the last body message.

    Hypercorn reacts to it by queueing ``http.disconnect`` for the app at once,
    while this very ``send`` is still running (the ASGI spec: ``receive`` gives
    ``http.disconnect`` once the response is sent); ``ex.finished`` is set first so
    the disconnect watcher knows that one means "done", not "client gone", and
    ``ex.ended`` after, so the app knows the watcher is about to return by itself.
    """
    ex.finished = True
    ex.bytes_out += len(body)
    if ex.captured is not None:
        ex.captured += body[:CAPTURE_LIMIT]
    try:
        # (No schedule point needed: the request ends soon after its last message.) Not cut short
        # by a cancellation, which would leave the answer incomplete while its record says whole:
        # the server's write is not a cancellation point (ATOMIC_END), or it is shielded here.
        message = {"type": "http.response.body", "body": body, "more_body": False, UNSCHEDULED: True}
        if ex.atomic_end:
            await send(message)
        else:
            with trio.CancelScope(shield=True):
                await send(message)
    except trio.BusyResourceError:
        # Hypercorn's race, not ours: a client that hangs up as soon as it has read the body
        # makes Hypercorn send EOF (outside its send lock) while it writes this message's
        # (empty) end. Everything was sent; the connection is going away. (Not ``ended``: the
        # disconnect watcher is cancelled as for any unfinished exchange.)
        return
    ex.ended = True


def facts_from_body(body: bytes) -> tuple[int | None, int | None, str | None]:
    """(prompt tokens, completion tokens, finish reason) of a non-streamed JSON answer.

    OpenAI shape: ``usage`` and ``choices[0].finish_reason``; Ollama shape:
    ``prompt_eval_count``, ``eval_count`` and ``done_reason``. One decode per
    request, never per chunk; anything unexpected gives ``None``s.
    """
    if not body.startswith(b"{") or (b'"usage"' not in body and b"eval_count" not in body):
        return None, None, None
    try:
        doc = jsonread.loads(body)
    except ValueError:
        return None, None, None
    if not isinstance(doc, dict):
        return None, None, None
    usage = doc.get("usage")
    if isinstance(usage, dict):
        finish = None
        choices = doc.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            finish = choices[0].get("finish_reason")
        return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")), _str(finish)
    return _int(doc.get("prompt_eval_count")), _int(doc.get("eval_count")), _str(doc.get("done_reason"))


def error_in_body(body: bytes) -> str | None:
    """The message of a JSON error object answered with a success status (some servers do), else None."""
    if not body.startswith(b'{"error"') and b'"error"' not in body[:64]:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "error")[:200]
    return error[:200] if isinstance(error, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
