"""What Trio's primitives cost on this machine: the unit prices behind docs/benchmarks.md.

    taskset -c 1 .venv/bin/python loadtest/bench_trio.py

Prints µs of CPU (user+sys of this process) for:

- one schedule point (``cancel_shielded_checkpoint``) with one task runnable: what each
  of Hypercorn's writes pays twice (its send lock, then trio's socket send);
- an uncontended ``trio.Lock`` acquire and release;
- one timed event written to a socket: by a sleep and a write in each stream's task (the
  mock before ``mockpace``, and the floor app today), and by one ``Pacer`` task for all.

Not a test; compare rows of one run only.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from trioproxy.mockpace import PacedStream, Pacer

SCHEDULE_POINTS = 200_000
STREAMS, TOKENS, DELAY_S = 64, 300, 0.002
EVENT = b"x" * 250


def _cpu_us(started: float, n: int) -> float:
    return (time.process_time() - started) / n * 1e6


async def schedule_point() -> float:
    started = time.process_time()
    for _ in range(SCHEDULE_POINTS):
        await trio.lowlevel.cancel_shielded_checkpoint()
    return _cpu_us(started, SCHEDULE_POINTS)


async def lock() -> float:
    lock = trio.Lock()
    started = time.process_time()
    for _ in range(SCHEDULE_POINTS):
        async with lock:
            pass
    return _cpu_us(started, SCHEDULE_POINTS)


def _pairs() -> list[tuple[socket.socket, socket.socket]]:
    pairs = []
    for _ in range(STREAMS):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        pairs.append((a, b))
    return pairs


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 16):
            pass
    except BlockingIOError:
        pass


async def _drainer(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    """The readers: empty every socket each 50 ms (cheap, and the same for both ways)."""
    while True:
        await trio.sleep(0.05)
        for _, b in pairs:
            _drain(b)


async def per_task_sleep(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    async def one(k: int, sock: socket.socket) -> None:
        stream = trio.socket.from_stdlib_socket(sock)
        start = trio.current_time() + DELAY_S * k / STREAMS  # staggered, as streams that started apart
        for i in range(TOKENS):
            await trio.sleep_until(start + i * DELAY_S)
            await stream.send(EVENT)

    async with trio.open_nursery() as nursery:
        for k, (a, _) in enumerate(pairs):
            nursery.start_soon(one, k, a)


async def one_pacer(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    pacer = Pacer()

    async def send_all(sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await trio.lowlevel.wait_writable(sock)
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                pass

    async with trio.open_nursery() as clock:
        clock.start_soon(pacer.run)
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            for k, (a, _) in enumerate(pairs):  # staggered, as streams that started apart
                paced = PacedStream(a.fileno(), lambda i: EVENT, TOKENS, start + DELAY_S * k / STREAMS, DELAY_S)
                nursery.start_soon(pacer.stream, paced, partial(send_all, a))
        clock.cancel_scope.cancel()


Pairs = list[tuple[socket.socket, socket.socket]]


async def timed_events(way: Callable[[Pairs], Awaitable[None]]) -> float:
    pairs = _pairs()
    try:
        started = time.process_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drainer, pairs)
            await way(pairs)
            nursery.cancel_scope.cancel()
        return _cpu_us(started, STREAMS * TOKENS)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def main() -> None:
    print(f"one schedule point, one task runnable:      {await schedule_point():6.2f} µs CPU")
    print(f"trio.Lock acquire + release, uncontended:   {await lock():6.2f} µs CPU")
    print(f"timed event, sleep + send in each task:     {await timed_events(per_task_sleep):6.2f} µs CPU "
          f"({STREAMS} streams x {TOKENS} events {DELAY_S * 1000:g} ms apart)")
    print(f"timed event, one Pacer task for all:        {await timed_events(one_pacer):6.2f} µs CPU")


if __name__ == "__main__":
    trio.run(main)
