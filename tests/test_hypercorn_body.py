"""``hypercorn_fast``'s short path for a chunked answer's body, against Hypercorn's own.

Hypercorn's real ``H11Protocol`` and ``HTTPStream`` (h11 parsing a real request), with
the connection's writes captured: every sequence of ASGI messages an app may send
(random bodies of every bytes-like kind, and a str, ``more_body`` set, unset or absent, trailers
asked for, a message after the last, HEAD, 204 and 304, a declared length, an HTTP/1.0
client) must put the same bytes on the wire, leave the same states, log the same access
and raise the same errors through ``hypercorn_fast._app_send`` as through Hypercorn's
``HTTPStream.app_send``. Only the number of writes may differ: the last chunk and the
chunked terminator go in one. Over a real plain-TCP connection, a body message with
``hypercorn_app.UNSCHEDULED`` returns without a schedule point, and one without it with one.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from types import SimpleNamespace
from typing import Any

import h11
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from hypercorn.config import Config as HyperConfig
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext

from trioproxy import hypercorn_fast
from trioproxy.hypercorn_app import UNSCHEDULED, WITH_FIRST_BODY

from .test_hypercorn_fast import serving
from trioproxy.server import hypercorn_config  # noqa: F401  (importing server.py applies the fast paths)

pytestmark = pytest.mark.skipif(not hypercorn_fast.applied(), reason="hypercorn_fast is not installed here")


class AccessLog:
    """Hypercorn's access logger, counting its calls (the response each was given)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    async def access(self, scope: Any, response: Any, elapsed: float) -> None:
        self.calls.append(None if response is None else response.get("status"))


class Stand:
    """One real H11Protocol with one request parsed, writing through a real ``TCPServer``'s send
    (``hypercorn_fast``'s, over one end of a socket pair: the short path's own write runs);
    the bytes read from the other end, the other events recorded; the app's send in ``app_send``.
    """

    def __init__(self, method: bytes, http_version: bytes) -> None:
        self.other_events: list[str] = []
        config = HyperConfig()
        config.include_date_header = False  # (the same bytes, whichever second each path runs in)
        self.log = AccessLog()
        config._log = self.log  # type: ignore[assignment]
        self.config = config
        self.app_send: Any = None
        self.ours, self.peer = socket.socketpair()
        self.ours.setblocking(False)
        self.peer.setblocking(False)
        server: Any = TCPServer.__new__(TCPServer)  # (not run: only its send, as the short path finds it)
        server._fast_socket = trio.socket.from_stdlib_socket(self.ours)
        server.stream = trio.SocketStream(server._fast_socket)
        server.send_lock = trio.Lock()
        server.idle_task = SimpleNamespace(restart=partial(self._record, "idle"), stop=partial(self._record, "busy"))
        server._task_group = server._idle_timeout = None
        server._close = partial(self._record, "close")
        server.protocol = self  # (a failed write tells it Closed)
        self.protocol = H11Protocol(
            None, config, WorkerContext(None), self, {}, False, ("127.0.0.1", 1), ("127.0.0.1", 2),  # type: ignore[arg-type]
            server.protocol_send,
        )
        self.request = b"%s / HTTP/%s\r\nHost: t\r\n\r\n" % (method, http_version)

    async def spawn_app(self, app: Any, config: Any, scope: Any, send: Any) -> Any:  # (the task group)
        self.app_send = send

        async def put(message: Any) -> None:
            pass

        return put

    async def handle(self, event: Any) -> None:  # (as the server's protocol)
        self.other_events.append("handle " + type(event).__name__)

    async def _record(self, name: str, *args: Any) -> None:
        self.other_events.append(name)

    async def start(self) -> None:
        await self.protocol.handle(RawData(self.request))
        assert self.app_send is not None

    def wire(self) -> bytes:
        received = b""
        while True:
            try:
                data = self.peer.recv(1 << 20)
            except BlockingIOError:
                return received
            received += data

    def state(self) -> tuple[Any, ...]:
        connection = self.protocol.connection
        stream = self.protocol.stream
        wire = self.wire()
        self.ours.close()
        self.peer.close()
        return (
            wire, self.other_events, self.log.calls,
            connection.our_state, connection.their_state,
            None if stream is None else (stream.state, stream.closed),
        )


def _kind(body: bytes, kind: str) -> Any:
    if kind == "memoryview of shorts":  # its len() counts items, not bytes
        return memoryview(body + bytes(len(body) % 2)).cast("H")
    if kind == "str":  # not bytes: an error, where a body is sent
        return body.decode("latin-1")
    return {"bytes": body, "bytearray": bytearray(body), "memoryview": memoryview(body)}[kind]


async def play(fast: bool, method: bytes, http_version: bytes, start: dict[str, Any],
               messages: list[dict[str, Any]]) -> tuple[tuple[Any, ...], list[str], int]:
    """Send ``messages`` after ``start`` through one path: (final state, errors raised, writes)."""
    writes = [0]
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        writes[0] += 1
        return real_write(fd, data)

    stand = Stand(method, http_version)
    await stand.start()
    stream = stand.protocol.stream
    send: Any = hypercorn_fast._app_send if fast else hypercorn_fast._stock_app_send
    errors = []
    saved = hypercorn_fast.os
    hypercorn_fast.os = SimpleNamespace(write=write)  # type: ignore[assignment]
    try:
        for message in [start, *messages]:
            try:
                with trio.CancelScope() as scope:
                    if message.get(CANCELLED):
                        scope.cancel()  # (the app's scope cancelled before this send)
                    await send(stream, {k: v for k, v in message.items() if k != CANCELLED})
                if scope.cancelled_caught:
                    errors.append("Cancelled")
                    break
            except Exception as exc:  # (compared between the two paths)
                errors.append(type(exc).__name__)
                break
        await send(stream, None)  # the app has ended (as Hypercorn's task calls it)
    finally:
        hypercorn_fast.os = saved
    return stand.state(), errors, writes[0]


#: A test-only key: send this message in a cancelled scope.
CANCELLED = "test.cancelled"

body_messages = st.lists(
    st.tuples(
        st.binary(max_size=40),
        st.sampled_from(["bytes", "bytearray", "memoryview", "memoryview of shorts", "str"]),
        st.sampled_from([True, False, None]),  # more_body; None: absent (ASGI: False)
        st.sampled_from([False] * 5 + [True]),  # cancelled (with a body: see the test of an empty one)
    ),
    max_size=6,
)


def check_both_paths(method: bytes, http_version: bytes, status: int, declare_length: bool, trailers: bool,
                     bodies: list[tuple[bytes, str, bool | None, bool]], then_more: bool, hold_head: bool) -> None:
    messages: list[dict[str, Any]] = []
    for body, kind, more, cancelled in bodies:
        message: dict[str, Any] = {"type": "http.response.body", "body": _kind(body, kind)}
        if more is not None:
            message["more_body"] = more
        if cancelled and body:
            message[CANCELLED] = True
        messages.append(message)
    if then_more:
        messages.append({"type": "http.response.body", "body": b"late"})
    headers = [(b"content-type", b"text/plain")]
    if declare_length:  # what the bodies up to the first last one add up to
        total = 0
        for body, _, more, _ in bodies:
            total += len(body)
            if not more:
                break
        headers.append((b"content-length", b"%d" % total))
    start = {"type": "http.response.start", "status": status, "headers": headers, "trailers": trailers}
    if hold_head:  # (Hypercorn's own path ignores the key: the same bytes, in fewer writes)
        start[WITH_FIRST_BODY] = True

    async def both() -> None:
        stock = await play(False, method, http_version, start, messages)
        fast = await play(True, method, http_version, start, messages)
        assert fast[:2] == stock[:2]
        assert fast[2] <= stock[2]  # never more writes

    trio.run(both)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"HEAD", b"head"]),
    http_version=st.sampled_from([b"1.1", b"1.0"]),
    status=st.sampled_from([200, 204, 304, 404]),
    declare_length=st.booleans(),
    trailers=st.booleans(),
    bodies=body_messages,
    then_more=st.booleans(),
    hold_head=st.booleans(),
)
def test_the_short_path_writes_and_leaves_what_hypercorns_own_does(
    method: bytes, http_version: bytes, status: int, declare_length: bool, trailers: bool,
    bodies: list[tuple[bytes, str, bool | None, bool]], then_more: bool, hold_head: bool,
) -> None:
    check_both_paths(method, http_version, status, declare_length, trailers, bodies, then_more, hold_head)


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from([b"POST", b"GET", b"head"]), trailers=st.booleans(), bodies=body_messages,
       then_more=st.booleans(), hold_head=st.booleans())
def test_the_short_path_on_chunked_answers_alone(
    method: bytes, trailers: bool, bodies: list[tuple[bytes, str, bool | None, bool]], then_more: bool,
    hold_head: bool,
) -> None:
    # The cases the short path takes, and the one it must not that looks like them: h11 chunks
    # a lower-case "head" answer, which Hypercorn sends without a body (its method upper-cased).
    check_both_paths(method, b"1.1", 200, False, trailers, bodies, then_more, hold_head)


async def test_a_streamed_answer_takes_one_write_per_message_and_ends_with_its_last() -> None:
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    events = [b"data: %d\n\n" % i for i in range(3)]
    messages = [{"type": "http.response.body", "body": e, "more_body": True} for e in events]
    messages.append({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    stock = await play(False, b"POST", b"1.1", start, messages)
    fast = await play(True, b"POST", b"1.1", start, messages)
    wire = stock[0][0]
    assert fast[0] == stock[0] and not fast[1] and not stock[1]
    assert wire.endswith(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    assert (stock[2], fast[2]) == (1 + 4 + 1, 1 + 4)  # head, four chunks, and the terminator on its own or not
    assert fast[0][3:] == (h11.IDLE, h11.IDLE, None)  # recycled for the next request, as stock


async def test_a_head_held_for_the_first_body_goes_out_with_it_in_one_write() -> None:
    events = [b"data: %d\n\n" % i for i in range(3)]
    messages: list[dict[str, Any]] = [{"type": "http.response.body", "body": e, "more_body": True} for e in events]
    messages.append({"type": "http.response.body", "body": b"", "more_body": False})
    for first in (b"data: 0\n\n", b""):  # (an empty first message sends the head alone)
        messages[0]["body"] = first
        start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
        stock = await play(False, b"POST", b"1.1", start, messages)
        held = await play(True, b"POST", b"1.1", {**start, WITH_FIRST_BODY: True}, messages)
        assert held[0] == stock[0] and not held[1]
        # the head with the first chunk, two chunks, the terminator; or the head alone first
        assert (stock[2], held[2]) == ((1 + 3 + 1, 3 + 1) if first else (1 + 2 + 1, 1 + 2 + 1))


async def test_a_chunk_is_framed_as_h11_frames_it() -> None:
    # The framing is written out in _app_send: h11's own writer is the reference.
    for size in (1, 9, 10, 15, 16, 255, 256, 4095, 65536):
        body = bytes(range(256)) * (size // 256) + bytes(size % 256)
        writer: list[bytes] = []
        h11._writers.ChunkedWriter().send_data(body, writer.append)
        start = {"type": "http.response.start", "status": 200, "headers": []}
        fast = await play(True, b"GET", b"1.1", start, [{"type": "http.response.body", "body": body, "more_body": True}])
        assert fast[0][0].endswith(b"".join(writer)) and fast[0][0].count(b"".join(writer)) == 1


class TaskSteps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.counted: trio.lowlevel.Task | None = None
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.counted:
            self.steps += 1


async def lifespan(receive: Any, send: Any) -> None:
    """An app's side of Hypercorn's lifespan protocol: started, then stopped."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def get_counted(app: Any, counter: TaskSteps, end: bytes) -> bytes:
    """``GET /`` from ``app`` served by a real Hypercorn over TCP, with ``counter`` on, up to ``end``."""
    trio.lowlevel.add_instrument(counter)
    try:
        with trio.fail_after(30):
            async with serving(app=app) as (port, _):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    received = b""
                    while not received.endswith(end):
                        received += await stream.receive_some()
    finally:
        trio.lowlevel.remove_instrument(counter)
    return received


@pytest.mark.parametrize("unscheduled", [False, True])
async def test_over_plain_tcp_a_body_message_may_skip_its_schedule_point(unscheduled: bool) -> None:
    # A real Hypercorn server and client socket: five writes, each with its schedule point or none.
    counter = TaskSteps()
    steps_during_writes: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        counter.counted, counter.steps = trio.lowlevel.current_task(), 0
        for i in range(5):
            message = {"type": "http.response.body", "body": b"piece %d;" % i, "more_body": True}
            if unscheduled:
                message[UNSCHEDULED] = True
            await send(message)
        steps_during_writes.append(counter.steps)
        await send({"type": "http.response.body", "body": b"end", "more_body": False})

    received = await get_counted(app, counter, b"\r\n0\r\n\r\n")
    body = received.partition(b"\r\n\r\n")[2]
    assert body == b"".join(b"8\r\npiece %d;\r\n" % i for i in range(5)) + b"3\r\nend\r\n0\r\n\r\n"
    assert steps_during_writes == [0 if unscheduled else 5]


async def test_a_stream_keeps_where_its_chunks_go_until_its_answer_ends() -> None:
    # After the first chunk takes the short path, the stream keeps its route (the chunks after it
    # skip the checks that cannot change within an answer); the bytes are h11's all the same, a
    # bytearray body is copied as Hypercorn copies it, an empty one writes nothing, and the last
    # message (through the full path) forgets the route. (An answer with trailers ends through
    # Hypercorn's own path and keeps it: its stream's state then refuses the short path.)
    routes: list[object] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await receive()
        stream = send.__self__  # (Hypercorn's HTTPStream: its app_send is hypercorn_fast._app_send)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        routes.append(stream._chunks_to)
        for body in (b"one;", bytearray(b"two;"), b"", b"three;"):
            await send({"type": "http.response.body", "body": body, "more_body": True})
            routes.append(stream._chunks_to)
        await send({"type": "http.response.body", "body": b"end", "more_body": False})
        routes.append(stream._chunks_to)

    received = await get_counted(app, TaskSteps(), b"\r\n0\r\n\r\n")
    assert received.partition(b"\r\n\r\n")[2] == b"4\r\none;\r\n4\r\ntwo;\r\n6\r\nthree;\r\n3\r\nend\r\n0\r\n\r\n"
    assert routes[0] is None and routes[-1] is None
    protocol, connection, server = routes[1]  # type: ignore[misc]
    assert type(protocol) is H11Protocol and connection is protocol.connection and type(server) is TCPServer
    assert all(route is routes[1] for route in routes[1:-1])  # the one kept, not one made per chunk


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "with-length"])
@pytest.mark.parametrize("unscheduled", [False, True])
async def test_over_plain_tcp_a_last_body_message_may_skip_its_schedule_points(declared: bool, unscheduled: bool) -> None:
    # The last message of a chunked answer (the short path) and of a whole one with its length
    # (Hypercorn's path: the body's write, then h11's empty end of it): none, or at least one.
    counter = TaskSteps()
    steps_during_last: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await receive()
        headers = [(b"content-type", b"text/plain"), *([(b"content-length", b"5")] if declared else [])]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        counter.counted, counter.steps = trio.lowlevel.current_task(), 0
        message = {"type": "http.response.body", "body": b"hello", "more_body": False}
        if unscheduled:
            message[UNSCHEDULED] = True
        await send(message)
        steps_during_last.append(counter.steps)

    end = b"\r\n\r\nhello" if declared else b"\r\n5\r\nhello\r\n0\r\n\r\n"
    received = await get_counted(app, counter, end)
    assert received.startswith(b"HTTP/1.1 200 ")
    if unscheduled:
        assert steps_during_last == [0]
    else:
        assert steps_during_last[0] >= 1

@pytest.mark.parametrize("lock_held", [False, True], ids=["cancelled-before", "cancelled-waiting-for-the-lock"])
@pytest.mark.parametrize("last", [b"", b"world"], ids=["empty-last", "last-with-a-body"])
async def test_a_cancelled_last_message_leaves_the_body_unended_and_the_connection_closes(
    lock_held: bool, last: bytes,
) -> None:
    # Whether the cancellation comes before the send or while another write holds the
    # connection, h11 must not end the body: else Hypercorn keeps the connection for a next
    # request while its client waits for the end of this one. (Hypercorn's own path ends it
    # before its write for an empty last message, and keeps the connection: not ours.)
    stand = Stand(b"POST", b"1.1")
    await stand.start()
    stream: Any = stand.protocol.stream
    server = stand.protocol.send.__self__  # type: ignore[attr-defined]
    await hypercorn_fast._app_send(stream, {"type": "http.response.start", "status": 200, "headers": []})
    await hypercorn_fast._app_send(stream, {"type": "http.response.body", "body": b"hello", "more_body": True})
    with trio.CancelScope() as scope:
        if lock_held:
            async with trio.open_nursery() as nursery:
                await server.send_lock.acquire()

                async def last_message() -> None:
                    await hypercorn_fast._app_send(stream, {"type": "http.response.body", "body": last})

                nursery.start_soon(last_message)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
            server.send_lock.release()
        else:
            scope.cancel()
            await hypercorn_fast._app_send(stream, {"type": "http.response.body", "body": last})
    assert scope.cancelled_caught
    await hypercorn_fast._app_send(stream, None)  # the app ends
    wire, events, _, our_state, _, _ = stand.state()
    assert wire.endswith(b"5\r\nhello\r\n")  # nothing of the last message, no terminator
    assert our_state is h11.SEND_BODY and events[-2:] == ["close", "handle Closed"]  # closed, not kept


@pytest.mark.parametrize(
    ("method", "http_version", "held"),
    [(b"POST", b"1.1", True), (b"POST", b"1.0", False), (b"HEAD", b"1.1", False)],
    ids=["chunked", "http-1.0", "head"],
)
async def test_a_head_is_held_only_for_a_chunked_body_and_goes_with_its_first_message(
    method: bytes, http_version: bytes, held: bool,
) -> None:
    # WITH_FIRST_BODY holds the head only where the first body message takes the chunked
    # path and carries it; an HTTP/1.0 or HEAD answer's head goes out at once, as Hypercorn's.
    stand = Stand(method, http_version)
    await stand.start()
    stream: Any = stand.protocol.stream
    start = {"type": "http.response.start", "status": 200, "headers": [], WITH_FIRST_BODY: True}
    await hypercorn_fast._app_send(stream, start)
    after_start = stand.wire()
    await hypercorn_fast._app_send(stream, {"type": "http.response.body", "body": b"", "more_body": True})
    after_first = stand.wire()
    assert (after_start == b"") == held
    assert (after_start + after_first).startswith(b"HTTP/1.1 200")  # out by the first body message, either way
    stand.state()  # (closes the sockets)


@pytest.mark.parametrize("last", [False, True], ids=["more-follows", "the-last-message"])
async def test_a_large_first_chunk_after_a_held_head(last: bool) -> None:
    # Past COALESCE_MAX the head goes in its own write, before the chunk, except for the
    # last message: once h11 has ended the body, its bytes go in the one write.
    big = bytes(range(256)) * 400  # 100 KiB
    messages: list[dict[str, Any]] = [{"type": "http.response.body", "body": big, "more_body": not last}]
    if not last:
        messages.append({"type": "http.response.body", "body": b""})
    start = {"type": "http.response.start", "status": 200, "headers": []}
    stock = await play(False, b"POST", b"1.1", start, messages)
    held = await play(True, b"POST", b"1.1", {**start, WITH_FIRST_BODY: True}, messages)
    assert held[0] == stock[0] and not held[1]
    assert held[2] == (1 if last else 3)  # (the socket pair takes 100 KiB in one write)
