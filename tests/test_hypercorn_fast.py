"""``trioproxy.hypercorn_fast``: Hypercorn's plain-TCP I/O with fewer trips through the scheduler.

Against the real Hypercorn (``hypercorn.trio.serve``) with a small echo app, over real
sockets: bytes arrive intact in both directions under concurrency (the read buffer is
shared by every connection; a write the socket cannot take at once is finished under the
lock), and the keep-alive timers (a deadline per connection, one reaper task per server:
``hypercorn_keepalive``) close an idle connection exactly when Hypercorn's own timer would, never one with a request in
flight, and at once on a graceful shutdown; each HTTP request's disconnect notice fires
at once when its client hangs up, and at the end of its answer. A finished connection is
freed without the cyclic GC (``hypercorn_fix``). Timing runs in virtual time
(``mock_clock``, with a hang guard so the clock never jumps while loopback bytes are on
their way). With ``TRIOPROXY_STOCK_HYPERCORN=1`` the behaviour tests pass too; the ones
that check this module's own paths (installed, both write paths counted in the byte
integrity test, one write per answer, the notice, the one reaper) fail there by design.
"""

from __future__ import annotations

import gc
import math
import os
import random
import socket
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from importlib import metadata
from typing import Any

import h11
import h11._headers
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from hypercorn.config import Config as HyperConfig
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from trioproxy import hypercorn_app, hypercorn_fast, hypercorn_fix
from trioproxy.server import hypercorn_config  # noqa: F401  (importing server.py applies the fast paths)

#: Real seconds every task must stay blocked before the virtual clock jumps.
HANG_GUARD_S = 0.5


#: What ``/notice`` received after its notice fired, one per request.
NOTICED: list[str] = []


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echo the request body; ``/sleep/S`` first waits S seconds; ``x-repeat: N`` sends it N times.

    ``/stream/S``: a head without a length, then the body S seconds later (chunked);
    ``/no-body``: a head declaring 5 bytes, then nothing (the app ends);
    ``/head-first``: a head declaring 2 bytes before the body is read, then waits for the
    disconnect; ``/notice``: a streamed head, then waits for the request's disconnect notice.
    """
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/notice":  # streams a head, then waits for its notice: see NOTICED
        told = trio.Event()
        await receive()  # (the empty body)
        scope["extensions"][hypercorn_app.DISCONNECT_NOTICE].subscribe(told.set)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await told.wait()
        NOTICED.append((await receive())["type"])
        return
    if scope["path"] == "/head-first":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        while (await receive())["type"] != "http.disconnect":
            pass
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"].startswith("/sleep/"):
        await trio.sleep(float(scope["path"].rsplit("/", 1)[1]))
    if scope["path"].startswith("/stream/"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await trio.sleep(float(scope["path"].rsplit("/", 1)[1]))
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return
    if scope["path"] == "/no-body":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        return
    repeat = int(dict(scope["headers"]).get(b"x-repeat", b"1"))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % (len(body) * repeat))]})
    for i in range(repeat):
        await send({"type": "http.response.body", "body": body, "more_body": i < repeat - 1})


@asynccontextmanager
async def serving(
    keep_alive_s: float = 5.0, read_timeout_s: float | None = None, app: Any = None,
) -> AsyncIterator[tuple[int, trio.Event]]:
    """Hypercorn serving ``app`` (``echo_app`` by default) on an ephemeral port: (port, shutdown trigger)."""
    config = HyperConfig()
    config.bind = ["127.0.0.1:0"]
    config.keep_alive_timeout = keep_alive_s
    config.read_timeout = read_timeout_s
    config.graceful_timeout = 30
    config.accesslog = None
    config.errorlog = None
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app or echo_app, config, shutdown_trigger=shutdown.wait,
                                                              task_status=task_status))
        yield int(binds[0].rsplit(":", 1)[1]), shutdown
        shutdown.set()


def request(body: bytes, path: str = "/", repeat: int = 1) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nx-repeat: %d\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), repeat, len(body))) + body


async def read_answer(stream: trio.SocketStream, rest: bytes = b"") -> tuple[bytes, bytes]:
    """One answer's body (Content-Length), and what came after it."""
    received = rest
    while b"\r\n\r\n" not in received:
        data = await stream.receive_some()
        assert data, f"closed before the head: {received!r}"
        received += data
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        data = await stream.receive_some()
        assert data, "closed mid-body"
        body += data
    return body[:length], body[length:]


async def until_eof(stream: trio.SocketStream) -> bytes:
    rest = b""
    while data := await stream.receive_some():
        rest += data
    return rest


def test_installed_for_the_supported_hypercorn() -> None:
    version = metadata.version("hypercorn")
    assert hypercorn_fast.wanted({}, version), f"Hypercorn {version}: add it to SUPPORTED_VERSIONS once checked"
    assert hypercorn_fast.applied()
    assert hypercorn_fast.apply()  # idempotent
    hypercorn_fix.apply()  # (idempotent too: it keeps hypercorn_fast's wrapper of the same method)
    assert H11Protocol.handle is hypercorn_fast._h11_handle


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~", min_size=1, max_size=12)
_VALUE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ABC/=;,.:0123456789", max_size=20).map(str.strip)


@given(st.lists(st.tuples(_TOKEN, _VALUE), max_size=12))
def test_h11_headers_iterate_as_their_items(fields: list[tuple[str, str]]) -> None:
    """A parsed request's headers: the same (lower-case name, value) pairs as indexing gives."""
    assert h11._headers.Headers.__iter__ is hypercorn_fast._h11_headers_iter
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in fields)
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(head + b"\r\n")
    request = connection.next_event()
    assert isinstance(request, h11.Request)
    headers = request.headers
    by_index = [headers[i] for i in range(len(headers))]
    assert list(headers) == by_index
    assert by_index == [(b"host", b"x"), *((n.lower().encode(), v.encode()) for n, v in fields)]
    assert [(name, value) for name, value in headers] == by_index  # (a second pass: nothing consumed)
    assert (b"host", b"x") in headers


async def test_only_h11_on_plain_tcp_promises_an_atomic_last_message() -> None:
    """``hypercorn_app.ATOMIC_END`` is in an HTTP/1.1 request's scope on plain TCP (its UNSCHEDULED
    last message is written whatever the cancellation state), not in an HTTP/2 one's."""
    import httpx

    seen: list[object] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await echo_app(scope, receive, send)
        seen.append(scope["extensions"].get(hypercorn_app.ATOMIC_END))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok", hypercorn_app.UNSCHEDULED: True})

    with trio.fail_after(30):
        async with serving(app=app) as (port, _):
            for http2 in (False, True):
                async with httpx.AsyncClient(http1=not http2, http2=http2) as client:
                    assert (await client.get(f"http://127.0.0.1:{port}/")).content == b"ok"
    assert seen == [True, None]


@pytest.mark.parametrize(
    ("environ", "version", "expected"),
    [
        ({}, "0.17.3", True),
        ({}, "0.18.0", True),
        ({"TRIOPROXY_STOCK_HYPERCORN": "0"}, "0.18.0", True),
        ({"TRIOPROXY_STOCK_HYPERCORN": "1"}, "0.18.0", False),
        ({}, "0.19.0", False),
        ({}, "0.16.0", False),
        ({}, "1.0", False),
    ],
)
def test_wanted(environ: dict[str, str], version: str, expected: bool) -> None:
    assert hypercorn_fast.wanted(environ, version) is expected


async def test_bytes_arrive_intact_both_ways_over_many_connections_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # 32 connections at once, 3 requests each: bodies of 1 B to 150 KB sent in random pieces,
    # echoed up to 3 times (answers up to 450 KB: more than the socket takes at once, so the
    # write's rest goes out under the lock), to clients with a small receive buffer.
    rng = random.Random(5)
    checked = 0
    writes = count_writes(monkeypatch)
    with trio.fail_after(60):
        async with serving() as (port, _):

            async def client(seed: int) -> None:
                nonlocal checked
                local = random.Random(seed)
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
                async with stream:
                    rest = b""
                    for _ in range(3):
                        body = local.randbytes(local.choice([1, 100, 5000, 70_000, 150_000]))
                        repeat = local.randint(1, 3)
                        wire = request(body, repeat=repeat)
                        sent = 0
                        while sent < len(wire):
                            piece = local.randint(1, 90_000)
                            await stream.send_all(wire[sent:sent + piece])
                            sent += piece
                            await trio.sleep(0)
                        answer, rest = await read_answer(stream, rest)
                        assert answer == body * repeat
                        checked += 1

            async with trio.open_nursery() as nursery:
                for _ in range(32):
                    nursery.start_soon(client, rng.randrange(2**32))
    assert checked == 32 * 3
    assert writes["whole"] > 0 and writes["partial"] > 0, writes  # both write paths ran


def count_writes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the module's ``os.write`` calls: whole, or partial (the socket took less)."""
    writes = {"whole": 0, "partial": 0}

    def write(fd: int, data: bytes) -> int:
        sent = os.write(fd, data)
        writes["whole" if sent == len(data) else "partial"] += 1
        return sent

    monkeypatch.setattr(hypercorn_fast, "os", SimpleNamespace(write=write, readv=os.readv))
    return writes


async def test_a_whole_answer_is_one_write_and_a_streamed_head_goes_out_at_once(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    mock_clock.autojump_threshold = HANG_GUARD_S
    writes = count_writes(monkeypatch)
    with trio.fail_after(120):
        async with serving() as (port, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                for n in range(3):  # head and body of a Content-Length answer: one write each time
                    await stream.send_all(request(b"whole"))
                    assert (await read_answer(stream))[0] == b"whole"
                    assert writes == {"whole": n + 1, "partial": 0}
                await stream.send_all(request(b"later", path="/stream/5"))
                started = trio.current_time()
                received = b""
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some()
                assert received.startswith(b"HTTP/1.1 200") and trio.current_time() == started  # the head at once
                while not received.endswith(b"0\r\n\r\n"):
                    received += await stream.receive_some()
                assert b"later" in received and trio.current_time() - started == pytest.approx(5.0, abs=0.01)


async def test_a_head_whose_body_never_comes_is_still_written_before_the_close() -> None:
    # The app declares 5 bytes and ends: as with stock Hypercorn, the client gets the head, then EOF.
    with trio.fail_after(30):
        async with serving() as (port, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request(b"", path="/no-body"))
                received = await until_eof(stream)
                assert received.startswith(b"HTTP/1.1 200") and b"content-length: 5" in received.lower()
                assert received.endswith(b"\r\n\r\n")  # the head, and nothing of a body


@pytest.mark.parametrize(
    "wire",
    [
        # the client shuts its side once its request is sent: Hypercorn closes the stream
        request(b"", path="/head-first"),
        # a malformed chunk after the head was kept: h11 gives up on the connection and closes it
        b"POST /head-first HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["client-eof", "bad-chunk"],
)
async def test_a_kept_head_is_written_before_the_connection_closes(wire: bytes) -> None:
    # As with stock Hypercorn: the head, then the end of the connection.
    with trio.fail_after(30):
        async with serving() as (port, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(wire)
                await trio.testing.wait_all_tasks_blocked()  # the app has sent its start: the head is kept
                if b"chunked" in wire:
                    await stream.send_all(b"zz\r\n")
                else:
                    stream.socket.shutdown(socket.SHUT_WR)
                received = await until_eof(stream)
                assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"\r\n\r\n"), received


@pytest.mark.parametrize(
    ("keep_alive_s", "read_timeout_s", "closed_after_s"),
    [(5.0, None, 5.0), (60.0, 3.0, 3.0)],
    ids=["keep-alive", "read-timeout"],
)
async def test_an_idle_connection_closes_when_its_keep_alive_or_read_timeout_runs_out(
    mock_clock: trio.testing.MockClock, keep_alive_s: float, read_timeout_s: float | None, closed_after_s: float,
) -> None:
    mock_clock.autojump_threshold = HANG_GUARD_S
    with trio.fail_after(120):
        async with serving(keep_alive_s=keep_alive_s, read_timeout_s=read_timeout_s) as (port, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request(b"hi"))
                assert (await read_answer(stream))[0] == b"hi"
                done = trio.current_time()
                assert await until_eof(stream) == b""
                assert trio.current_time() - done == pytest.approx(closed_after_s, abs=0.01)


async def test_the_timer_restarts_at_each_answer_and_never_cuts_a_request(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = HANG_GUARD_S
    with trio.fail_after(120):
        async with serving(keep_alive_s=5.0) as (port, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                for _ in range(3):  # idle 4 s between answers: never 5 in a row
                    await stream.send_all(request(b"again"))
                    assert (await read_answer(stream))[0] == b"again"
                    await trio.sleep(4)
                started = trio.current_time()
                await stream.send_all(request(b"slow", path="/sleep/12"))  # in flight for 12 s > 5
                assert (await read_answer(stream))[0] == b"slow"
                done = trio.current_time()
                assert done - started == pytest.approx(12.0, abs=0.01)
                assert await until_eof(stream) == b""
                assert trio.current_time() - done == pytest.approx(5.0, abs=0.01)  # 5 s idle from the answer


def _tasks_named(name: str) -> list[trio.lowlevel.Task]:
    found, todo = [], [trio.lowlevel.current_root_task()]
    while todo:  # bounded: the run's task tree
        task = todo.pop()
        if task is None:
            continue
        found += [task] if task.name == name else []
        todo += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return found


async def test_one_reaper_closes_many_idle_connections_each_at_its_own_deadline(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = HANG_GUARD_S
    closed: dict[int, float] = {}
    with trio.fail_after(120):
        async with serving(keep_alive_s=5.0) as (port, _):
            async with trio.open_nursery() as nursery:
                answered: dict[int, float] = {}

                async def client(i: int) -> None:
                    await trio.sleep(i)  # answers 1 s apart: six different deadlines
                    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                        await stream.send_all(request(b"%d" % i))
                        assert (await read_answer(stream))[0] == b"%d" % i
                        answered[i] = trio.current_time()
                        assert await until_eof(stream) == b""
                        closed[i] = trio.current_time() - answered[i]

                for i in range(6):
                    nursery.start_soon(client, i)
                await trio.sleep(6)  # every connection answered, the last ones still idle
                assert len(answered) == 6 and len(closed) < 6
                assert len(_tasks_named("keep-alive reaper")) == 1  # one task for all of them
    assert closed == {i: pytest.approx(5.0, abs=0.01) for i in range(6)}


async def test_a_graceful_shutdown_closes_idle_connections_at_once_and_busy_ones_after_their_answer(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = HANG_GUARD_S
    with trio.fail_after(120):
        async with serving(keep_alive_s=60.0) as (port, shutdown):
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            busy = await trio.open_tcp_stream("127.0.0.1", port)
            async with idle, busy:
                await idle.send_all(request(b"one"))
                assert (await read_answer(idle))[0] == b"one"
                await busy.send_all(request(b"two", path="/sleep/3"))
                await trio.testing.wait_all_tasks_blocked()
                started = trio.current_time()
                shutdown.set()
                assert await until_eof(idle) == b""
                assert trio.current_time() == started  # idle: closed at once
                body, rest = await read_answer(busy)
                assert body == b"two"  # busy: answered in full first...
                assert rest + await until_eof(busy) == b""  # ...then closed
                assert trio.current_time() - started == pytest.approx(3.0, abs=0.01)


async def test_with_no_keep_alive_limit_an_idle_connection_still_closes_at_once_on_shutdown(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = HANG_GUARD_S
    with trio.fail_after(7200):  # (virtual: the hour idle below counts)
        async with serving(keep_alive_s=math.inf) as (port, shutdown):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request(b"kept"))
                assert (await read_answer(stream))[0] == b"kept"
                mock_clock.jump(3600)  # idle an hour: kept
                await stream.send_all(request(b"still"))
                assert (await read_answer(stream))[0] == b"still"
                await trio.testing.wait_all_tasks_blocked()
                started = trio.current_time()
                shutdown.set()
                assert await until_eof(stream) == b""
                assert trio.current_time() == started  # not after the 30 s grace


async def test_a_client_eof_ends_the_connection_and_its_timer_at_once(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = HANG_GUARD_S
    with trio.fail_after(120):
        async with serving(keep_alive_s=60.0) as (port, _):
            for _ in range(3):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(request(b"bye"))
                    assert (await read_answer(stream))[0] == b"bye"
                    await trio.testing.wait_all_tasks_blocked()
                    now = trio.current_time()
                    stream.socket.shutdown(socket.SHUT_WR)
                    assert await until_eof(stream) == b""
                    assert trio.current_time() == now  # not when a timer ran out: its task ended with the reading


@pytest.mark.parametrize("how", ["client EOF", "keep-alive timeout", "mid-answer"])
async def test_a_closed_connection_is_freed_at_once_not_left_to_the_cyclic_gc(
    how: str, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    """hypercorn_fix drops the references that close cycles through a finished connection."""
    mock_clock.autojump_threshold = HANG_GUARD_S
    servers: list[weakref.ref[TCPServer]] = []
    stock_init = TCPServer.__init__

    def init(self: TCPServer, *args: Any, **kwargs: Any) -> None:
        stock_init(self, *args, **kwargs)
        servers.append(weakref.ref(self))

    monkeypatch.setattr(TCPServer, "__init__", init)
    gc.collect()
    gc.disable()
    try:
        with trio.fail_after(120):
            async with serving(keep_alive_s=5.0) as (port, _):
                for _ in range(4):
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    async with stream:
                        if how == "mid-answer":
                            await stream.send_all(request(b"x", "/stream/3"))
                            await stream.receive_some()  # the head: the app now waits 3 s
                            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                        else:
                            await stream.send_all(request(b"hi"))
                            assert (await read_answer(stream))[0] == b"hi"
                            if how == "client EOF":
                                stream.socket.shutdown(socket.SHUT_WR)
                            assert await until_eof(stream) == b""  # (the timeout: 5 s of virtual time)
                    if how == "mid-answer":
                        # Reset by the client: the connection ends once the app's next send
                        # finds it gone (Hypercorn's own I/O waits out the keep-alive first).
                        await trio.sleep(10)
                    await trio.testing.wait_all_tasks_blocked()
                    assert servers and servers[-1]() is None, "the connection's objects outlived it"
                assert len(servers) == 4
    finally:
        gc.enable()


async def test_a_request_is_told_by_its_disconnect_notice_when_its_client_hangs_up(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The notice fires at once when the client goes, while the app is busy; http.disconnect still follows."""
    mock_clock.autojump_threshold = HANG_GUARD_S
    NOTICED.clear()
    with trio.fail_after(120):
        async with serving(keep_alive_s=60.0) as (port, _):
            for hang_up in ("eof", "reset"):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(request(b"", "/notice"))
                    assert (await stream.receive_some()).startswith(b"HTTP/1.1 200")
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(NOTICED) == (0 if hang_up == "eof" else 1)  # (this request still waits)
                    now = trio.current_time()
                    if hang_up == "reset":
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    else:
                        stream.socket.shutdown(socket.SHUT_WR)
                await trio.testing.wait_all_tasks_blocked()
                assert trio.current_time() == now  # told at once, not by a timer
                assert NOTICED[-1] == "http.disconnect"
    assert NOTICED == ["http.disconnect", "http.disconnect"]


async def test_a_disconnect_notice_fires_at_the_end_of_a_complete_answer_and_only_for_http() -> None:
    seen: list[tuple[str, bool | None]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        notice = scope.get("extensions", {}).get(hypercorn_app.DISCONNECT_NOTICE)
        seen.append((scope["type"], None if notice is None else notice.closed))
        if scope["type"] == "lifespan":
            await echo_app(scope, receive, send)
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        seen.append(("after", notice.closed))

    with trio.fail_after(30):
        async with serving(app=app) as (port, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                for _ in range(2):
                    await stream.send_all(request(b""))
                    assert (await read_answer(stream))[0] == b"ok"
    assert seen == [("lifespan", None), ("http", False), ("after", True), ("http", False), ("after", True)]


def _chunks_app(use_sender: bool, seen: list[object]) -> Any:
    """A streamed answer of six pieces: the first as a message, the rest by ``chunk_sender`` or as messages."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await echo_app(scope, receive, send)  # (the lifespan)
            return
        await receive()
        seen.append(hypercorn_app.chunk_sender(send))  # (before any body: none yet)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True, hypercorn_app.UNSCHEDULED: True})
        sender = hypercorn_app.chunk_sender(send)
        seen.append(sender)
        for i in range(1, 6):
            piece = b"data: %d\n\n" % i * i  # (sizes 8 to 45: hex lengths of one and two digits)
            if use_sender and sender is not None:
                await sender(piece)
            else:
                await send({"type": "http.response.body", "body": piece, "more_body": True, hypercorn_app.UNSCHEDULED: True})
            await trio.lowlevel.checkpoint()  # (the UNSCHEDULED promise: the next await is one)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        seen.append(hypercorn_app.chunk_sender(send))  # (after the end: none)

    return app


async def test_a_chunk_sender_writes_what_the_message_would_and_only_mid_answer() -> None:
    """``hypercorn_app.chunk_sender``: the relay's pieces without an ASGI message each. The wire bytes
    are those of the same pieces sent as messages; there is none before the answer's first chunk,
    after its end, or for HEAD (no chunked body)."""
    wires = {}
    with trio.fail_after(30):
        for use_sender in (True, False):
            seen: list[object] = []
            async with serving(app=_chunks_app(use_sender, seen)) as (port, _):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    received = b""
                    while not received.endswith(b"0\r\n\r\n"):
                        data = await stream.receive_some()
                        assert data, received
                        received += data
                    await stream.send_all(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        head += await stream.receive_some()
            assert seen[0] is None and seen[1] is not None and seen[2] is None, seen
            assert seen[3] is None and seen[4] is None and seen[5] is None, seen  # the HEAD request's: never any
            wires[use_sender] = b"\r\n".join(line for line in received.split(b"\r\n") if not line.startswith(b"date:"))
    assert wires[True] == wires[False]
    assert wires[True].endswith(b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (b"data: %d\n\n" % i * i for i in range(1, 6))) + b"0\r\n\r\n")
