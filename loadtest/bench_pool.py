"""Micro-benchmark of the relay's upstream client (not a test: it prints numbers).

A minimal upstream runs in a child process (raw non-blocking sockets on trio,
canned answers), so client and server do not share a CPU. The client sends N
requests one after another, then N spread over M concurrent tasks, through
``trioproxy.pool.ConnectionPool`` and, for comparison, through h11 on
``trio.SocketStream`` (what the relay would do without the pool).

    .venv/bin/python loadtest/bench_pool.py                  # small JSON answers
    .venv/bin/python loadtest/bench_pool.py --answer stream  # 20 chunked SSE events per answer
    .venv/bin/python loadtest/bench_pool.py --variants       # also the pool's checkpoint variants

Numbers vary by machine and load; compare rows of the same run only.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import h11
import trio

from trioproxy import connection
from trioproxy import pool as pool_module
from trioproxy.pool import ConnectionPool

# A chat-completions request of realistic size: the body is what a small prompt weighs.
BODY = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * 200 + b'"}],"stream":true}'
HEADERS = [(b"content-type", b"application/json"), (b"accept", b"*/*"), (b"user-agent", b"bench")]
SMALL_JSON = b'{"id":"cmpl-1","object":"chat.completion","choices":[{"message":{"content":"hi"}}]}' * 2
EVENT = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"delta":{"content":"tok"}}]}\n\n'
ANSWERS = {
    "small": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(SMALL_JSON), SMALL_JSON),
    "stream": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + (b"%x\r\n%s\r\n" % (len(EVENT), EVENT)) * 20
    + b"0\r\n\r\n",
}

Client = tuple[Callable[[], Awaitable[int]], Callable[[], Awaitable[None]]]  # (one request, close)
Make = Callable[[int], Awaitable[Client]]
Timings = tuple[float, float, float, float]  # wall and client CPU seconds: sequential, concurrent


# --- the upstream (child process) -------------------------------------------------------------------


async def serve(answer: bytes) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.setblocking(False)
    print(listener.getsockname()[1], flush=True)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(handle, conn, answer)


async def handle(conn: socket.socket, answer: bytes) -> None:
    buf = b""
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                head = buf[:end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(buf) < end + 4 + length:
                    break
                buf = buf[end + 4 + length :]
                view = memoryview(answer)
                while view:
                    try:
                        view = view[conn.send(view) :]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(conn)


# --- clients -------------------------------------------------------------------------------------------


async def pool_client(port: int) -> Client:
    pool = ConnectionPool(f"http://127.0.0.1:{port}", upstream_id="bench")

    async def one() -> int:
        response = await pool.open_response(
            b"POST", b"/v1/chat/completions", HEADERS, BODY, first_byte_timeout=10, idle_timeout=10
        )
        try:
            size = 0
            while piece := await response.receive_some():  # as the relay reads
                size += len(piece)
            return size
        finally:
            response.release()

    return one, pool.aclose


async def h11_client(port: int) -> Client:
    idle: list[tuple[trio.SocketStream, h11.Connection]] = []

    async def one() -> int:
        if idle:
            stream, conn = idle.pop()
        else:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            conn = h11.Connection(h11.CLIENT)
        headers = [(b"host", b"127.0.0.1"), *HEADERS, (b"content-length", b"%d" % len(BODY))]
        await stream.send_all(
            conn.send(h11.Request(method=b"POST", target=b"/v1/chat/completions", headers=headers))
            + conn.send(h11.Data(data=BODY))
            + conn.send(h11.EndOfMessage())
        )
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif not isinstance(event, h11.Response):
                raise RuntimeError(f"unexpected {event!r}")
        conn.start_next_cycle()
        idle.append((stream, conn))
        return size

    async def close() -> None:
        for stream, _ in idle:
            await stream.aclose()

    return one, close


# --- variants of the pool's checkpoints (to justify the choice) ---------------------------------------------

ORIGINAL = (pool_module._checkpoint_if_cancelled, pool_module._yield_after_send, connection.RawConnection.receive)


def use_as_built() -> None:
    pool_module._checkpoint_if_cancelled, pool_module._yield_after_send, _ = ORIGINAL
    connection._checkpoint_if_cancelled = ORIGINAL[0]
    connection.RawConnection.receive = ORIGINAL[2]  # type: ignore[method-assign]


def use_no_yield_after_send() -> None:
    """Only cancel points on the fast paths: never yield unless a syscall would block."""
    pool_module._yield_after_send = trio.lowlevel.checkpoint_if_cancelled


def use_full_checkpoints() -> None:
    """trio's own convention: a full checkpoint even when the syscall needed no wait."""
    pool_module._checkpoint_if_cancelled = connection._checkpoint_if_cancelled = trio.lowlevel.checkpoint


def use_wait_first() -> None:
    """Always park in wait_readable before recv (no fast path at all)."""

    async def receive(self: connection.RawConnection, deadline: float) -> bytes | None:
        while True:
            with trio.move_on_at(deadline) as scope:
                await trio.lowlevel.wait_readable(self.sock)
            if scope.cancelled_caught:
                return None
            try:
                return self.sock.recv(connection.RECV_SIZE)
            except BlockingIOError:
                pass

    connection.RawConnection.receive = receive  # type: ignore[method-assign]


# --- driver -----------------------------------------------------------------------------------------------




async def measure(make: Make, port: int, n: int, m: int) -> Timings:
    one, close = await make(port)
    for _ in range(min(n, 200)):  # warm up: connections open, code paths hot
        await one()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        await one()
    sequential, sequential_cpu = time.perf_counter() - start, time.process_time() - cpu

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    async with trio.open_nursery() as nursery:  # warm up the M connections
        for _ in range(m):
            nursery.start_soon(worker, 2)
    start, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(m):
            nursery.start_soon(worker, n // m)
    concurrent, concurrent_cpu = time.perf_counter() - start, time.process_time() - cpu
    await close()
    return sequential, sequential_cpu, concurrent, concurrent_cpu


def report(name: str, n: int, m: int, rounds: list[Timings]) -> None:
    sequential, sequential_cpu, concurrent, concurrent_cpu = (statistics.median(col) for col in zip(*rounds))
    done = (n // m) * m
    print(
        f"{name:24s} sequential {n / sequential:6.0f} req/s {sequential / n * 1e6:5.1f} µs/req"
        f" (client CPU {sequential_cpu / n * 1e6:5.1f} µs)"
        f" | {m} concurrent {done / concurrent:6.0f} req/s {concurrent / done * 1e6:5.1f} µs/req"
        f" (client CPU {concurrent_cpu / done * 1e6:5.1f} µs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", "-n", type=int, default=5000)
    parser.add_argument("--concurrency", "-m", type=int, default=64)
    parser.add_argument("--answer", choices=sorted(ANSWERS), default="small")
    parser.add_argument("--variants", action="store_true", help="also run the pool's checkpoint variants")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; clients are interleaved, medians shown")
    parser.add_argument("--pin", action="store_true", help="client on CPU 0, upstream on CPU 1 (Linux)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {1 if args.serve else 0})
    if args.serve:
        trio.run(serve, ANSWERS[args.answer])
        return

    clients: list[tuple[str, Callable[[], None], Make]] = [
        ("pool (as built)", use_as_built, pool_client),
        ("h11 on trio.SocketStream", use_as_built, h11_client),
    ]
    if args.variants:
        clients += [
            ("pool, no yield after send", use_no_yield_after_send, pool_client),
            ("pool, full checkpoints", use_full_checkpoints, pool_client),
            ("pool, wait before recv", use_wait_first, pool_client),
        ]
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--answer", args.answer, *(["--pin"] if args.pin else [])],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        n, m = args.requests, args.concurrency
        print(f"{args.answer} answers, {n} requests, median of {args.rounds} interleaved rounds")
        results: dict[str, list[Timings]] = {name: [] for name, _, _ in clients}
        for _ in range(args.rounds):  # interleaved, so a noisy neighbour hits every client alike
            for name, patch, make in clients:
                use_as_built()
                patch()
                results[name].append(trio.run(measure, make, port, n, m))
        for name, _, _ in clients:
            report(name, n, m, results[name])
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
