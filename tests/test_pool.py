"""The relay's connection pool against small scripted upstreams on 127.0.0.1:0.

Real-socket tests run on the real clock and never assert on time: a timeout is
short and only its error is checked. Exact timing is asserted with the autojump
clock, and only where the other end is a fake that never sends anything.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trustme

from trioproxy import pool as pool_module
from trioproxy.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from trioproxy.pool import ConnectionPool, PoolStatistics, UpstreamResponse
from trioproxy.watchdog import Watchdog

LIMIT = 10  # seconds: a deadlock fails the test instead of hanging it
SHORT = 0.2  # a timeout that real-socket tests expect to fire


@attrs.frozen
class Request:
    conn: int  # which accepted connection (1-based)
    n: int  # which request on that connection (0-based)
    head: bytes
    body: bytes

    @property
    def target(self) -> bytes:
        return self.head.split(b" ", 2)[1]


Stream = trio.abc.Stream
Script = Callable[[Stream, Request], Awaitable[bool]]  # returns whether to keep the connection


@attrs.define
class Upstream:
    script: Script
    port: int = 0
    accepts: int = 0
    requests: list[Request] = attrs.Factory(list)
    closed: trio.Event = attrs.Factory(trio.Event)

    async def handle(self, stream: Stream) -> None:
        self.accepts += 1
        conn = self.accepts
        buf = bytearray()
        try:
            for n in range(1000):
                got = await read_request(stream, buf)
                if got is None:
                    return
                request = Request(conn, n, *got)
                self.requests.append(request)
                if not await self.script(stream, request):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self.closed.set()


async def read_request(stream: Stream, buf: bytearray) -> tuple[bytes, bytes] | None:
    for _ in range(10_000):
        if b"\r\n\r\n" in buf:
            break
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    body = bytearray(rest)
    for _ in range(100_000):
        if len(body) >= length:
            break
        data = await stream.receive_some(65536)
        if not data:
            return None
        body += data
    buf[:] = body[length:]
    return head, bytes(body[:length])


async def start_upstream(nursery: trio.Nursery, script: Script) -> Upstream:
    upstream = Upstream(script)
    listeners = await nursery.start(partial(trio.serve_tcp, upstream.handle, 0, host="127.0.0.1"))
    upstream.port = listeners[0].socket.getsockname()[1]
    return upstream


def answer(body: bytes, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body


def echo_target(*headers: bytes) -> Script:
    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(answer(request.target + b" " + request.body, *headers))
        return True

    return script


def reset(stream: Stream) -> None:
    """Make the coming close an RST instead of a FIN."""
    assert isinstance(stream, trio.SocketStream)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def make_pool(upstream: Upstream | int, **kwargs: object) -> ConnectionPool:
    port = upstream if isinstance(upstream, int) else upstream.port
    return ConnectionPool(f"http://127.0.0.1:{port}", upstream_id="u1", **kwargs)  # type: ignore[arg-type]


async def get(
    pool: ConnectionPool, target: bytes = b"/t", *, method: bytes = b"GET", body: bytes = b"", timeout: float = 5
) -> UpstreamResponse:
    headers = [(b"accept", b"*/*")]
    return await pool.open_response(method, target, headers, body, first_byte_timeout=timeout, idle_timeout=timeout)


async def fetch(pool: ConnectionPool, target: bytes = b"/t", **kwargs: object) -> bytes:
    with await get(pool, target, **kwargs) as response:  # type: ignore[arg-type]
        return await response.read_all(max_bytes=1 << 24)


# --- bodies -----------------------------------------------------------------------------


async def test_content_length_response_and_request_shape(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, echo_target(b"X-Up: yes"))
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with await get(pool, b"/v1/models?x=1", method=b"POST", body=b'{"a":1}') as response:
                assert (response.status, response.reason) == (200, b"OK")
                assert response.headers == [(b"content-length", b"22"), (b"x-up", b"yes")]
                assert response.content_length == 22 and not response.chunked and not response.complete
                assert await response.read_all(max_bytes=100) == b'/v1/models?x=1 {"a":1}'
                assert response.complete
                assert await response.receive_some() == b""
    head = upstream.requests[0].head
    assert head.startswith(b"POST /v1/models?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % upstream.port)
    assert b"\r\naccept: */*\r\nContent-Length: 7" in head


async def test_base_url_prefix_is_prepended(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, echo_target())
    with trio.fail_after(LIMIT):
        async with ConnectionPool(f"http://127.0.0.1:{upstream.port}/api/", upstream_id="u1") as pool:
            assert await fetch(pool, b"/v1/chat") == b"/api/v1/chat "


async def test_chunked_body_streams_as_it_arrives(nursery: trio.Nursery) -> None:
    steps = [trio.Event(), trio.Event()]

    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nfirst\r\n")
        await steps[0].wait()
        await stream.send_all(b"6\r\nsec")
        await stream.send_all(b"ond\r\n")
        await steps[1].wait()
        await stream.send_all(b"0\r\nX-T: 1\r\n\r\n")
        return True

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            response = await get(pool)
            assert response.chunked and response.content_length is None
            assert await read_exactly(response, 5) == b"first"  # before the server sent more
            steps[0].set()
            assert await read_exactly(response, 6) == b"second"
            assert not response.complete
            steps[1].set()
            assert await response.receive_some() == b""
            assert response.complete
            assert pool.statistics().idle == 1  # handed back at the end, without release()
            response.release()
            assert pool.statistics().idle == 1


async def read_exactly(response: UpstreamResponse, n: int) -> bytes:
    data = b""
    for _ in range(n):
        data += await response.receive_some()
        if len(data) >= n:
            break
    return data


async def test_close_delimited_body(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\nall of this")
        await stream.send_all(b" until EOF")
        return False

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            assert await fetch(pool) == b"all of this until EOF"
            assert pool.statistics() == PoolStatistics(idle=0, connects=1, reuses=0, retries_stale=0, discarded=1)


async def test_large_bodies_both_ways(nursery: trio.Nursery) -> None:
    big = bytes(range(256)) * 16384  # 4 MiB: more than the socket buffers hold

    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(answer(request.body[::-1]))
        return True

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            assert await fetch(pool, method=b"POST", body=big) == big[::-1]


async def test_head_and_204_have_no_body_and_are_reused(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        if request.head.startswith(b"HEAD"):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        else:
            await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        return True

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            response = await get(pool, method=b"HEAD")
            assert response.content_length == 1000 and response.complete
            assert pool.statistics().idle == 1  # released already: nothing left to read
            assert await response.receive_some() == b""
            response = await get(pool)
            assert response.status == 204 and response.complete
            assert await response.read_all(max_bytes=0) == b""
            assert upstream.accepts == 1


# --- keep-alive ----------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, echo_target())
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            for i in range(20):
                assert await fetch(pool, b"/%d" % i) == b"/%d " % i
            assert upstream.accepts == 1
            assert pool.statistics() == PoolStatistics(idle=1, connects=1, reuses=19, retries_stale=0, discarded=0)


async def test_concurrent_requests_and_max_idle(nursery: trio.Nursery) -> None:
    everyone_in = trio.Event()

    async def script(stream: Stream, request: Request) -> bool:
        if len(upstream.requests) == 5:
            everyone_in.set()
        await everyone_in.wait()
        await stream.send_all(answer(b"ok"))
        return True

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream, max_idle=2) as pool:
            async with trio.open_nursery() as clients:
                for _ in range(5):
                    clients.start_soon(fetch, pool)
            assert upstream.accepts == 5
            assert pool.statistics() == PoolStatistics(idle=2, connects=5, reuses=0, retries_stale=0, discarded=3)


async def test_no_reuse_after_partial_read(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        if request.conn == 1:
            await trio.sleep_forever()
        await stream.send_all(b"0\r\n\r\n")
        return True

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with await get(pool) as response:
                assert await response.receive_some() == b"abc"
            with pytest.raises(trio.ClosedResourceError):
                await response.receive_some()
            assert pool.statistics().idle == 0
            assert await fetch(pool) == b"abc"
            assert upstream.accepts == 2


async def test_no_reuse_after_connection_close(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, echo_target(b"Connection: close"))
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            for _ in range(3):
                assert await fetch(pool) == b"/t "
            assert upstream.accepts == 3
            assert pool.statistics() == PoolStatistics(idle=0, connects=3, reuses=0, retries_stale=0, discarded=3)


async def test_no_reuse_after_cancellation_mid_body(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        if request.conn == 1:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await trio.sleep_forever()
        await stream.send_all(answer(b"fresh"))
        return True

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            response = await get(pool)
            async with trio.open_nursery() as inner:
                inner.start_soon(partial(response.read_all, max_bytes=100))  # blocks after "abc"
                await trio.testing.wait_all_tasks_blocked()
                inner.cancel_scope.cancel()
            assert not response.complete
            response.release()
            assert pool.statistics().idle == 0
            assert await fetch(pool) == b"fresh"
            assert upstream.accepts == 2


async def test_a_read_asked_to_schedule_is_one_checkpoint_whether_bytes_are_at_hand_or_not(nursery: trio.Nursery) -> None:
    # The relay's reads: a cancellation point and a schedule point each time (the wait, or the
    # checkpoint with bytes at hand); cancelled, they raise instead of returning a piece.
    sent = trio.Event()

    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await sent.wait()
        await stream.send_all(b"3\r\ndef\r\n3\r\nghi\r\n0\r\n\r\n")
        return True

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            for cancelled in (False, True):
                with await get(pool) as response:
                    with trio.CancelScope() as scope:
                        if cancelled:
                            scope.cancel()
                        with trio.testing.assert_checkpoints():  # (the head came with "abc": at hand)
                            assert await response.receive_some(schedule=True) == b"abc"
                    assert scope.cancelled_caught == cancelled
                    with trio.CancelScope() as scope:
                        scope.cancel()
                        await response.receive_some(schedule=True)  # nothing at hand: the wait raises
                        raise AssertionError("not cancelled")
                    assert scope.cancelled_caught
                    if cancelled:
                        continue
                    sent.set()
                    with trio.testing.assert_checkpoints():
                        assert await response.receive_some(schedule=True) == b"defghi"
                    with trio.testing.assert_checkpoints():
                        assert await response.receive_some(schedule=True) == b""


async def test_no_reuse_after_cancellation_before_the_head(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        if request.conn == 1:
            await trio.sleep_forever()
        await stream.send_all(answer(b"fresh"))
        return True

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with trio.CancelScope() as scope:
                nursery.start_soon(cancel_when_blocked, scope)
                await get(pool)
            assert scope.cancelled_caught
            assert pool.statistics() == PoolStatistics(idle=0, connects=1, reuses=0, retries_stale=0, discarded=1)
            assert await fetch(pool) == b"fresh"


async def cancel_when_blocked(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


# --- stale connections ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["eof", "reset"])
async def test_reused_connection_dead_before_answer_is_retried_once(nursery: trio.Nursery, how: str) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        if request.conn == 1 and request.n == 1:  # the server gave up on it just as we sent
            if how == "reset":
                reset(stream)
            return False
        await stream.send_all(answer(b"conn %d" % request.conn))
        return True

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            assert await fetch(pool) == b"conn 1"
            assert await fetch(pool) == b"conn 2"
            assert pool.statistics() == PoolStatistics(idle=1, connects=2, reuses=1, retries_stale=1, discarded=1)
            assert [r.conn for r in upstream.requests] == [1, 1, 2]


async def test_idle_connection_closed_by_server_is_skipped(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, close_after_answer)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            assert await fetch(pool) == b"ok"
            assert pool.statistics().idle == 1
            await upstream.closed.wait()  # closed: on loopback its FIN is already queued for us
            assert await fetch(pool) == b"ok"
            assert pool.statistics() == PoolStatistics(idle=1, connects=2, reuses=0, retries_stale=0, discarded=1)


async def close_after_answer(stream: Stream, request: Request) -> bool:
    await stream.send_all(answer(b"ok"))
    await stream.aclose()  # no Connection: close: the client learns only from the FIN
    return False


async def test_fresh_connection_is_not_retried(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        return False

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with pytest.raises(UpstreamConnectError, match="closed before response headers"):
                await get(pool)
            assert upstream.accepts == 1


# --- failures ---------------------------------------------------------------------------------


async def test_refused_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(LIMIT):
        async with make_pool(port) as pool:
            with pytest.raises(UpstreamConnectError, match="connect failed") as info:
                await get(pool)
    assert info.value.upstream == "u1"


async def test_reset_before_headers(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        reset(stream)
        return False

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with pytest.raises(UpstreamConnectError, match="reset before response headers"):
                await get(pool)


async def test_closed_inside_the_head(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Le")
        return False

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with pytest.raises(UpstreamConnectError, match="closed before response headers"):
                await get(pool)


async def test_server_that_never_answers(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        await trio.sleep_forever()
        return False

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with pytest.raises(UpstreamTimeout, match="no response headers"):
                await get(pool, timeout=SHORT)
            assert pool.statistics().discarded == 1


@pytest.mark.parametrize(
    "framing", [b"Content-Length: 10\r\n\r\nabc", b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"]
)
async def test_idle_gap_mid_body(nursery: trio.Nursery, framing: bytes) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\n" + framing)
        await trio.sleep_forever()
        return False

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with await get(pool, timeout=SHORT) as response:
                assert await response.receive_some() == b"abc"
                with pytest.raises(UpstreamTimeout, match="no body data"):
                    await response.receive_some()
            assert pool.statistics().idle == 0


@pytest.mark.parametrize("framing", [b"Content-Length: 10\r\n\r\nabc", b"Transfer-Encoding: chunked\r\n\r\n5\r\nabc"])
@pytest.mark.parametrize("how", ["eof", "reset"])
async def test_cut_mid_body(nursery: trio.Nursery, framing: bytes, how: str) -> None:
    sent = trio.Event()

    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\n" + framing)
        await sent.wait()
        if how == "reset":
            reset(stream)
        return False

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with await get(pool) as response:
                assert await response.receive_some() == b"abc"
                sent.set()
                with pytest.raises(UpstreamProtocolError, match="connection closed mid-body"):
                    await response.receive_some()
            assert pool.statistics().idle == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello's start
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    ],
)
async def test_garbage_is_a_protocol_error(nursery: trio.Nursery, garbage: bytes) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(garbage)
        return False

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with pytest.raises(UpstreamProtocolError):
                await get(pool)
            assert pool.statistics().idle == 0


async def test_messages_never_carry_header_values(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: sekrit\r\nX-Key: sekrit\r\n\r\n")
        return False

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with pytest.raises(UpstreamProtocolError) as info:
                headers = [(b"authorization", b"Bearer sekrit")]
                await pool.open_response(b"GET", b"/", headers, b"", first_byte_timeout=5, idle_timeout=5)
    assert "sekrit" not in str(info.value)
    assert str(info.value) == "upstream 'u1': invalid Content-Length"


async def test_upstream_that_never_reads_the_request(nursery: trio.Nursery) -> None:
    async def never_read(stream: Stream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, never_read, 0, host="127.0.0.1"))
    with trio.fail_after(LIMIT):
        async with make_pool(listeners[0].socket.getsockname()[1]) as pool:
            with pytest.raises(UpstreamTimeout, match="request not accepted"):
                await get(pool, method=b"POST", body=b"x" * (64 << 20), timeout=SHORT)  # more than socket buffers hold
            assert pool.statistics().idle == 0


async def test_bad_chunk_framing_mid_body(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await stream.send_all(b"zz\r\n")
        await trio.sleep_forever()
        return False

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            with await get(pool) as response:
                with pytest.raises(UpstreamProtocolError, match="invalid chunk size"):
                    await response.read_all(max_bytes=100)
            assert pool.statistics().idle == 0


async def test_read_all_over_max_bytes(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        if request.n == 0:
            await stream.send_all(answer(b"x" * 100))
        else:
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            await stream.send_all(head + b"64\r\n" + b"x" * 100 + b"\r\n0\r\n\r\n")
        return True

    upstream = await start_upstream(nursery, script)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream) as pool:
            for _ in range(2):  # declared, then discovered while reading
                with await get(pool) as response:
                    with pytest.raises(UpstreamProtocolError, match="larger than 99 bytes"):
                        await response.read_all(max_bytes=99)
            assert upstream.accepts == 2 and pool.statistics().idle == 0


async def test_name_resolution_and_its_failure() -> None:
    class Resolver(trio.abc.HostnameResolver):
        async def getaddrinfo(
            self,
            host: bytes | None,
            port: bytes | str | int | None,
            family: int = 0,
            type: int = 0,
            proto: int = 0,
            flags: int = 0,
        ) -> list[Any]:  # trio's exact tuple type adds nothing here
            if host == b"up.test":
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port or 0)))]
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        async def getnameinfo(
            self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
        ) -> tuple[str, str]:
            raise NotImplementedError

    trio.socket.set_custom_hostname_resolver(Resolver())
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            upstream = await start_upstream(nursery, echo_target())
            async with ConnectionPool(f"http://up.test:{upstream.port}", upstream_id="u1") as pool:
                assert await fetch(pool) == b"/t "
            async with ConnectionPool("http://down.test", upstream_id="u1") as pool:
                with pytest.raises(UpstreamConnectError, match="cannot resolve host"):
                    await get(pool)
            nursery.cancel_scope.cancel()


# --- exact timing, against fakes that never send (autojump clock) ----------------------------------


async def test_connect_timeout(autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    async def never_connects(family: int, sockaddr: object) -> socket.socket:
        await trio.sleep_forever()

    monkeypatch.setattr(pool_module, "connect_socket", never_connects)
    with trio.fail_after(60):
        async with make_pool(9, connect_timeout=2.5) as pool:
            with pytest.raises(UpstreamTimeout, match="connect timed out after 2.5s"):
                await get(pool)
    assert trio.current_time() == pytest.approx(2.5)


def socketpair_connects(monkeypatch: pytest.MonkeyPatch) -> list[socket.socket]:
    """Make the pool "connect" to one end of a socketpair; the returned list gets the other ends.

    No real listener: under MockClock only the pool's own deadlines move time.
    """
    peers: list[socket.socket] = []

    async def socketpair_end(family: int, sockaddr: object) -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        peers.append(theirs)
        return ours

    monkeypatch.setattr(pool_module, "connect_socket", socketpair_end)
    return peers


async def test_first_byte_and_idle_timeouts_are_exact(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    peers = socketpair_connects(monkeypatch)
    with trio.fail_after(60):
        async with make_pool(9) as pool:
            with pytest.raises(UpstreamTimeout):
                await pool.open_response(b"GET", b"/", [], b"", first_byte_timeout=3, idle_timeout=100)
            assert trio.current_time() == pytest.approx(3)
            start = trio.current_time()
            pending = trio.Event()

            async def head_soon() -> None:
                await trio.sleep(1)
                peers[-1].send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
                pending.set()

            async with trio.open_nursery() as inner:
                inner.start_soon(head_soon)
                response = await pool.open_response(b"GET", b"/", [], b"", first_byte_timeout=3, idle_timeout=7)
            assert trio.current_time() - start == pytest.approx(1)
            assert await response.receive_some() == b"ab"
            with pytest.raises(UpstreamTimeout, match="no body data for 7s"):
                await response.receive_some()
            assert trio.current_time() - start == pytest.approx(8)
            response.release()
    for peer in peers:
        peer.close()


# --- TLS --------------------------------------------------------------------------------------------


async def test_https_with_reuse(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    upstream = Upstream(echo_target())
    serve = partial(trio.serve_ssl_over_tcp, upstream.handle, 0, server_ctx, host="127.0.0.1", https_compatible=True)
    listeners = await nursery.start(serve)
    port = listeners[0].transport_listener.socket.getsockname()[1]
    with trio.fail_after(LIMIT):
        async with ConnectionPool(f"https://localhost:{port}/p", upstream_id="tls", ssl_context=client_ctx) as pool:
            for i in range(3):
                assert await fetch(pool, b"/%d" % i) == b"/p/%d " % i
            assert upstream.accepts == 1
            assert pool.statistics().reuses == 2
        assert upstream.requests[0].head.split(b"\r\n")[1] == b"Host: localhost:%d" % port
        async with ConnectionPool(f"https://localhost:{port}", upstream_id="tls") as untrusting:
            with pytest.raises(UpstreamConnectError, match="TLS handshake failed"):
                await get(untrusting)


# --- lifecycle --------------------------------------------------------------------------------------


async def test_aclose_closes_idle_and_later_releases(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, echo_target())
    with trio.fail_after(LIMIT):
        pool = make_pool(upstream)
        assert await fetch(pool) == b"/t "
        response = await get(pool)
        await pool.aclose()
        assert pool.statistics().idle == 0
        assert await response.read_all(max_bytes=10) == b"/t "  # an open response still works
        assert pool.statistics().idle == 0  # ...but its socket is closed, not kept
        with pytest.raises(trio.ClosedResourceError):
            await get(pool)
        response.release()
        response.release()  # idempotent


def test_base_url_validation() -> None:
    with pytest.raises(ValueError):
        ConnectionPool("ftp://x", upstream_id="u")
    with pytest.raises(ValueError):
        ConnectionPool("http://", upstream_id="u")
    assert ConnectionPool("http://[::1]:80/", upstream_id="u")._host_header == b"[::1]"
    assert ConnectionPool("https://h.example:8443", upstream_id="u")._host_header == b"h.example:8443"


# --- the watchdog (server.main gives every pool one) ------------------------------------------


@asynccontextmanager
async def watched_pool(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery,
) -> AsyncIterator[tuple[ConnectionPool, Watchdog, list[socket.socket]]]:
    """A pool whose watchdog runs in ``nursery`` and whose connections are socket pairs (the far ends: the list)."""
    peers = socketpair_connects(monkeypatch)
    watchdog = Watchdog()
    nursery.start_soon(watchdog.run)
    try:
        async with make_pool(9, watchdog=watchdog) as pool:
            yield pool, watchdog, peers
    finally:
        for peer in peers:
            peer.close()


def count_move_on_at(monkeypatch: pytest.MonkeyPatch, scopes: list[float]) -> None:
    """From now on, every ``trio.move_on_at`` appends its deadline to ``scopes``."""
    real_move_on_at = trio.move_on_at

    def counting_move_on_at(deadline: float, **kwargs: Any) -> trio.CancelScope:
        scopes.append(deadline)
        return real_move_on_at(deadline, **kwargs)

    monkeypatch.setattr(trio, "move_on_at", counting_move_on_at)


@pytest.mark.parametrize("schedule", [False, True], ids=["read", "relay-read"])
async def test_a_watched_idle_timeout_is_exact_and_keeps_no_scope_per_wait(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, schedule: bool
) -> None:
    """(``schedule=True``, a relay's read: ``receive_some`` waits on the socket itself.)"""
    scopes: list[float] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with watched_pool(monkeypatch, nursery) as (pool, watchdog, peers):

                async def trickle() -> None:
                    peers[-1].send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for _ in range(5):  # a chunk every 6 s: under the 7 s idle timeout every time
                        await trio.sleep(6)
                        peers[-1].send(b"2\r\nab\r\n")

                nursery.start_soon(trickle)
                response = await pool.open_response(b"GET", b"/", [], b"", first_byte_timeout=3, idle_timeout=7)
                count_move_on_at(monkeypatch, scopes)
                calls = itertools.count()
                if schedule:  # every other wake-up finds nothing to read (spurious): the read waits again
                    monkeypatch.setattr(pool_module, "recv_now",
                                        lambda sock, real=pool_module.recv_now: None if next(calls) % 2 == 0 else real(sock))
                start = trio.current_time()
                for _ in range(5):
                    assert await response.receive_some(schedule=schedule) == b"ab"
                assert next(calls) == (10 if schedule else 0)  # (the relay's read is pool.py's own: both wake-ups each)
                assert scopes == []  # the five waits were timed by the watchdog
                assert len(watchdog) == 1
                with pytest.raises(UpstreamTimeout, match="no body data for 7s") as caught:
                    await response.receive_some(schedule=schedule)
                assert caught.value.phase == "idle"
                assert trio.current_time() - start == pytest.approx(30 + 7)
                response.release()
                assert len(watchdog) == 0 and pool.statistics().idle == 0
            nursery.cancel_scope.cancel()


async def test_a_watched_first_byte_timeout_is_exact_and_keeps_no_scope(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    scopes: list[float] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with watched_pool(monkeypatch, nursery) as (pool, watchdog, peers):
                count_move_on_at(monkeypatch, scopes)
                start = trio.current_time()
                with pytest.raises(UpstreamTimeout, match="no response headers within 3s") as caught:
                    await pool.open_response(b"GET", b"/", [], b"", first_byte_timeout=3, idle_timeout=100)
                assert caught.value.phase == "first_byte"
                assert trio.current_time() - start == pytest.approx(3)
                assert len(watchdog) == 0 and pool.statistics().idle == 0  # forgotten, its socket closed

                async def head_in_time() -> None:
                    await trio.sleep(2)
                    peers[-1].send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

                nursery.start_soon(head_in_time)
                start = trio.current_time()
                response = await pool.open_response(b"GET", b"/", [], b"", first_byte_timeout=3, idle_timeout=100)
                assert trio.current_time() - start == pytest.approx(2)
                assert len(watchdog) == 0  # the head's wait is forgotten once the head is in
                assert await response.read_all(max_bytes=10) == b"ok"
                assert scopes == []  # both waits were timed by the watchdog
                await trio.sleep(10)  # the watchdog's wake-up for the first wait passes harmlessly
                assert pool.statistics().idle == 1  # the answered connection was kept
            nursery.cancel_scope.cancel()


async def test_a_watched_response_read_to_its_end_is_forgotten_and_reused(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()  # the body comes once the reader waits for it
        await stream.send_all(b"3\r\nabc\r\n0\r\n\r\n")
        return True

    upstream = await start_upstream(nursery, script)
    watchdog = Watchdog()
    nursery.start_soon(watchdog.run)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream, watchdog=watchdog) as pool:
            for _ in range(3):
                assert await fetch(pool) == b"abc"
                assert len(watchdog) == 0
            assert pool.statistics().connects == 1


async def test_a_watched_read_released_by_another_task_is_not_a_timeout(nursery: trio.Nursery) -> None:
    async def script(stream: Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await trio.sleep_forever()
        return False

    upstream = await start_upstream(nursery, script)
    watchdog = Watchdog()
    nursery.start_soon(watchdog.run)
    with trio.fail_after(LIMIT):
        async with make_pool(upstream, watchdog=watchdog) as pool:
            response = await get(pool, timeout=60)
            assert await response.receive_some() == b"abc"
            async with trio.open_nursery() as inner:

                async def reader() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await response.receive_some()

                inner.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                response.release()  # what the relay's client-write watchdog does to a stalled stream
            assert len(watchdog) == 0
