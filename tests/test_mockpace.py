"""The mock's token clock (``mockpace.Pacer``) on real socket pairs, in virtual time.

Each event's bytes say when they were rendered (the virtual clock), so the tests read
the schedule from the socket itself: what the client would see.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from functools import partial

import pytest
import trio
import trio.testing

from trioproxy.mockpace import PacedStream, Pacer


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    with a, b:
        yield a, b


def _read(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


#: Virtual seconds after which a test that waits forever fails (autojump reaches it at once).
HANG_GUARD_S = 1000


def _stamp(name: str, i: int) -> bytes:
    return f"{name}{i}@{trio.current_time():.3f};".encode()


def _events(raw: bytes) -> list[str]:
    return [e for e in raw.decode().split(";") if e]


async def _writer(sock: socket.socket, data: bytes) -> None:
    """The stream task's own write (what a full socket did not take)."""
    view = memoryview(data)
    while view:
        await trio.lowlevel.wait_writable(sock)
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            pass


async def test_events_leave_at_absolute_due_times(pair: tuple[socket.socket, socket.socket], autojump_clock: trio.testing.MockClock) -> None:
    a, b = pair
    pacer = Pacer()
    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pacer.run)
            start = trio.current_time()
            paced = PacedStream(a.fileno(), partial(_stamp, "s"), 4, start + 0.5, 0.25)
            await pacer.stream(paced, partial(_writer, a))
            assert trio.current_time() == pytest.approx(start + 1.25)
            nursery.cancel_scope.cancel()
    assert _events(_read(b)) == [f"s{i}@{start + 0.5 + i * 0.25:.3f}" for i in range(4)]
    assert paced.first_at == pytest.approx(start + 0.5)
    assert pacer.written == 4


async def test_streams_interleave_by_due_time_and_an_earlier_one_wakes_the_clock(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []

    def render(name: str, i: int) -> bytes:
        log.append(f"{name}{i}@{trio.current_time():.3f}")
        return b"x"

    pacer = Pacer()
    (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
    with a1, b1, a2, b2, trio.fail_after(HANG_GUARD_S):
        for s in (a1, b1, a2, b2):
            s.setblocking(False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pacer.run)
            t0 = trio.current_time()
            # The slow stream goes first: the pacer sleeps until t0 + 10 ...
            slow = PacedStream(a1.fileno(), partial(render, "slow"), 2, t0 + 10, 10)
            nursery.start_soon(pacer.stream, slow, partial(_writer, a1))
            await trio.sleep(1)
            # ... and a stream due at t0 + 2 must not wait for it.
            await pacer.stream(PacedStream(a2.fileno(), partial(render, "fast"), 3, t0 + 2, 1), partial(_writer, a2))
            assert trio.current_time() == pytest.approx(t0 + 4)
            await trio.sleep(20)
            nursery.cancel_scope.cancel()
    assert log == [
        f"fast0@{t0 + 2:.3f}", f"fast1@{t0 + 3:.3f}", f"fast2@{t0 + 4:.3f}",
        f"slow0@{t0 + 10:.3f}", f"slow1@{t0 + 20:.3f}",
    ]


async def test_no_events_returns_at_once(pair: tuple[socket.socket, socket.socket], autojump_clock: trio.testing.MockClock) -> None:
    a, b = pair
    pacer = Pacer()  # not even running: nothing is queued
    start = trio.current_time()
    with trio.fail_after(HANG_GUARD_S):
        await pacer.stream(PacedStream(a.fileno(), partial(_stamp, "s"), 0, start + 5, 1), partial(_writer, a))
    assert trio.current_time() == start
    assert _read(b) == b""


async def test_a_full_socket_is_finished_by_the_stream_task_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = 64 * 1024  # each event is larger than the socket buffer: every write is partial

    def render(i: int) -> bytes:
        return bytes([65 + i]) * big

    received = bytearray()
    all_read = trio.Event()

    async def client() -> None:
        while len(received) < 5 * big:
            await trio.lowlevel.wait_readable(b)
            received.extend(_read(b))
        all_read.set()

    pacer = Pacer()
    with trio.fail_after(10):  # real time (real I/O): a generous bound, only against a hang
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pacer.run)
            nursery.start_soon(client)
            paced = PacedStream(a.fileno(), render, 5, trio.current_time(), 0.0)
            await pacer.stream(paced, partial(_writer, a))
            await all_read.wait()
            nursery.cancel_scope.cancel()
    assert paced.sent == 5
    assert bytes(received) == b"".join(render(i) for i in range(5))


async def test_a_write_error_is_raised_in_the_stream_task(autojump_clock: trio.testing.MockClock) -> None:
    a, b = socket.socketpair()
    b.close()  # the client is gone: the first write fails (EPIPE)
    pacer = Pacer()
    with a, trio.fail_after(HANG_GUARD_S):
        a.setblocking(False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pacer.run)
            paced = PacedStream(a.fileno(), partial(_stamp, "s"), 3, trio.current_time() + 1, 1)
            with pytest.raises(OSError):
                await pacer.stream(paced, partial(_writer, a))
            nursery.cancel_scope.cancel()
    assert paced.sent == 0
    assert pacer.written == 0


async def test_a_cancelled_stream_gets_no_more_writes(pair: tuple[socket.socket, socket.socket], autojump_clock: trio.testing.MockClock) -> None:
    a, b = pair
    pacer = Pacer()
    with trio.fail_after(HANG_GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pacer.run)
            paced = PacedStream(a.fileno(), partial(_stamp, "s"), 10, trio.current_time() + 1, 1)
            with trio.move_on_after(3.5):  # the client hangs up between token 2 and token 3
                await pacer.stream(paced, partial(_writer, a))
            await trio.sleep(20)  # the pacer's queue still held the stream: it must drop it unwritten
            nursery.cancel_scope.cancel()
    assert [e.split("@")[0] for e in _events(_read(b))] == ["s0", "s1", "s2"]
    assert paced.cancelled
    assert pacer.written == 3


async def test_a_stream_with_no_delay_yields_between_its_events(pair: tuple[socket.socket, socket.socket]) -> None:
    # Embedded mocks share the gateway's event loop: 200 events due at once must not be
    # written in one burst that starves every other task.
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    pacer = Pacer()
    during: list[int] = []
    done = False

    async def other_task() -> None:  # runs once per scheduler round; notes how far the stream got
        while not done:
            during.append(pacer.written)
            await trio.lowlevel.checkpoint()

    with trio.fail_after(10):  # real time, only against a hang
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pacer.run)
            nursery.start_soon(other_task)
            await pacer.stream(PacedStream(a.fileno(), partial(_stamp, "s"), 200, trio.current_time(), 0.0), partial(_writer, a))
            done = True
            nursery.cancel_scope.cancel()
    assert len(_events(_read(b))) == 200
    steps = [later - earlier for earlier, later in zip(during, during[1:])]
    # One event per scheduler round; trio may run the two tasks in either order within a
    # round, so up to two events can fall between two looks of the other task.
    assert max(steps) <= 2, "the stream was written in a burst while another task waited"
    assert len(during) >= 100
