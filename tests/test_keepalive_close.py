"""A keep-alive connection the client closes between requests is closed at once.

Hypercorn (0.17, 0.18) on Trio leaves it open until ``keep_alive_timeout`` (75 s by
default here): its h11 protocol ignores the client's EOF while no request is in flight,
and the idle timer keeps the connection's task alive. The socket sat in CLOSE-WAIT, with
its objects, for that long. Clients that open a connection per request (curl, a new SDK
client each time) filled the process with them: 50 of 50 such connections, and 8 MB per
512 connections, in the 2026-12-07 measurements. ``trioproxy.hypercorn_fix`` stops the idle
timer on that EOF.

Real sockets, the real Hypercorn, in virtual time (``mock_clock``): the clock stands still
unless every task stays blocked ``HANG_GUARD_S`` real seconds, so a connection closed by
its idle timer would show as time passed; closed on the EOF, none does. (The gateway's
upstream watcher wakes every 0.25 s of virtual time, so the clock moves in steps that
small: without the fix, the first test fails once its 5 s keep-alive has passed, after
about 20 x HANG_GUARD_S real seconds.)
"""

from __future__ import annotations

import socket

import trio
import trio.testing

from trioproxy.server import RunningServer

from .conftest import StartGateway, StartMock, read_records, stop, upstream_toml

NO_PROBES = "[upstreams.health]\nenabled = false\n"
HOUR = "[server]\nkeep_alive_timeout_s = 3600.0\n"
FIVE_S = "[server]\nkeep_alive_timeout_s = 5.0\n"
#: Real seconds every task must stay blocked before the virtual clock moves on to the next
#: deadline (never while a loopback answer is still on its way).
HANG_GUARD_S = 2.0
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


async def _one_answer(stream: trio.SocketStream) -> None:
    """Send REQUEST and read its whole answer (Content-Length)."""
    await stream.send_all(REQUEST)
    received = b""
    while b"\r\n\r\n" not in received:
        received += await stream.receive_some()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += await stream.receive_some()


async def _until_eof(stream: trio.SocketStream) -> bytes:
    rest = b""
    while data := await stream.receive_some():
        rest += data
    return rest


async def _gateway(
    start_mock: StartMock, start_gateway: StartGateway, clock: trio.testing.MockClock, server: str
) -> tuple[RunningServer, int]:
    """A gateway with the ``[server]`` table given, before the mock upstream, in virtual time."""
    clock.autojump_threshold = HANG_GUARD_S
    mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
    gw = await start_gateway(server + upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
    return gw, int(gw.url.rsplit(":", 1)[1])


async def test_a_connection_its_client_closed_between_requests_is_closed_at_once(
    start_mock: StartMock, start_gateway: StartGateway, mock_clock: trio.testing.MockClock
) -> None:
    gw, port = await _gateway(start_mock, start_gateway, mock_clock, FIVE_S)
    with trio.fail_after(60):
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await _one_answer(stream)
                await trio.testing.wait_all_tasks_blocked()  # the gateway is done: the connection idles
                now = trio.current_time()
                stream.socket.shutdown(socket.SHUT_WR)  # the client is finished with it
                assert await _until_eof(stream) == b""  # the gateway closes its side...
                assert trio.current_time() == now  # ...on the EOF, not when its idle timer ran out (5 s)
    await stop(gw)
    assert len(read_records(gw)) == 3


async def test_a_kept_connection_still_serves_its_next_request_after_idling(
    start_mock: StartMock, start_gateway: StartGateway, mock_clock: trio.testing.MockClock
) -> None:
    # The fix acts on the client's EOF only: an idle connection kept open is reused as before.
    gw, port = await _gateway(start_mock, start_gateway, mock_clock, HOUR)
    with trio.fail_after(600):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for _ in range(3):
                await _one_answer(stream)
                await trio.testing.wait_all_tasks_blocked()
                mock_clock.jump(60)  # idle a minute, well within the keep-alive timeout
    await stop(gw)
    assert len(read_records(gw)) == 3
