"""Micro-benchmark of the gateway's own code: ``ProxyApp`` driven without Hypercorn.

``trioproxy bench`` measures the gateway as users run it, Hypercorn included, and
the Hypercorn floor beside it; the difference is the gateway's own cost. This
script measures that difference directly: it runs the real gateway (``server.main``
on ``loadtest/profiles/bench.toml``: routing, health checks, failover, the usage log
to a real file, metrics) and calls its ASGI app with in-memory ``receive``/``send``,
so no client socket and no Hypercorn code runs per request. The mock upstream is a
child process on the other core.

    .venv/bin/python loadtest/bench_app.py                       # sequential, then 64 concurrent
    .venv/bin/python loadtest/bench_app.py --stream              # 64-token streams
    .venv/bin/python loadtest/bench_app.py --profile 30          # cProfile: the top 30 by own time
    .venv/bin/python loadtest/bench_app.py -n 300 --instructions # instructions per request (valgrind)
    .venv/bin/python loadtest/bench_app.py -n 300 --instructions --config my.toml  # a profile over bench.toml

It prints µs of gateway CPU (user+sys, every thread) per request. Not a test; compare
rows of the same run only.

``--instructions`` runs the script again under ``valgrind --tool=callgrind`` with its
instrumentation off, and switches it on only while requests are measured: it prints
the instructions the gateway's process executed per request (every thread; not the
kernel's work in syscalls, not cache misses). On the shared 2-core guest, where CPU
time of one build moves by up to 40 % within minutes, three runs of the same build
gave the same count within 0.3 %: it is the A/B measure for the gateway's own code.
Under valgrind everything runs about 30 times slower (``CALLGRIND_SLOWDOWN``: what runs by
the clock is spaced out as much); a few hundred requests suffice. The mock upstream does
not run under valgrind, so it answers 30 times faster relative to the gateway than it
does natively: code that branches on whether the upstream's bytes have arrived yet (the
pool's yield after sending, say) takes its "already there" branch more often. Compare
changes to such timing natively; count instructions for changes to what the code computes.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import trio

from trioproxy.app import ProxyApp
from trioproxy.config import load_profiles
from trioproxy.server import main as serve_main

ROOT = Path(__file__).resolve().parent.parent
#: Set in the copy of this script that ``--instructions`` runs under valgrind: the directory of its counts.
CALLGRIND_ENV = "BENCH_APP_CALLGRIND_DIR"
#: How much slower the gateway runs under callgrind (its CPU per request, with and without).
#: Work paced by the clock (health probes, the usage log's flushes) is spaced this much
#: further apart there, so that it costs as much per request as without valgrind.
CALLGRIND_SLOWDOWN = 30
HEADERS = [
    (b"host", b"127.0.0.1:8080"),
    (b"user-agent", b"bench-app"),
    (b"accept", b"*/*"),
    (b"content-type", b"application/json"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu})


class Callgrind:
    """Counts instructions between :meth:`start` and :meth:`stop` (this process under callgrind)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.dumps = 0

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)

    def start(self) -> None:
        self._control("--zero")
        self._control("--instr=on")

    def stop(self) -> int:
        """Instructions since :meth:`start` (the dump is written before callgrind_control returns)."""
        self._control("--instr=off")
        self._control("--dump")
        self.dumps += 1
        part = self.directory / f"callgrind.out.{os.getpid()}.{self.dumps}"
        for line in part.read_text().splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1])
        raise RuntimeError(f"no totals in {part}")


def run_under_callgrind(argv: list[str]) -> int:
    """``--instructions``: this script again, under callgrind, with its instrumentation off until measured."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as out:
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/callgrind.out.%p",
                   sys.executable, *argv]
        child = subprocess.run(command, env={**os.environ, CALLGRIND_ENV: out},
                               stderr=subprocess.PIPE, text=True)
        if child.returncode:
            sys.stderr.write(child.stderr)
        return child.returncode


COUNTER: Callgrind | None = Callgrind(os.environ[CALLGRIND_ENV]) if os.environ.get(CALLGRIND_ENV) else None


class Driver:
    """Calls the app the way Hypercorn would, with the cheapest receive/send possible."""

    def __init__(self, app: ProxyApp, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.app = app
        self.body = body
        self.scope_headers = [*headers, (b"content-length", str(len(body)).encode())]
        self.errors = 0
        self.bytes = 0
        #: Responses started and not yet ended (the streams open now).
        self.open = 0
        self.peak_open = 0
        self.all_open = trio.Event()
        self.want_open = 0
        #: Wall time per request of the last measurement (concurrency 1: the latency).
        self.wall_us = 0.0
        #: Instructions per request of the last counted measurement (under callgrind).
        self.instructions = 0.0

    async def one(self) -> None:
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"spec_version": "2.3", "version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": self.scope_headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8080),
        }
        given = False
        done = trio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            await done.wait()  # as Hypercorn (and the ASGI spec): disconnect once the response is sent
            return {"type": "http.disconnect"}

        status = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.open += 1
                self.peak_open = max(self.peak_open, self.open)
                if self.want_open and self.open >= self.want_open:
                    self.all_open.set()
            else:
                self.bytes += len(message.get("body", b""))
                if not message.get("more_body", False):
                    self.open -= 1
                    done.set()

        await self.app(scope, receive, send)
        if status != 200:
            self.errors += 1
            if self.errors == 1:
                print(f"first error: status {status}", file=sys.stderr)


async def settle_usage(driver: Driver) -> None:
    """Every usage record submitted so far taken by the writer (handed to the metrics, encoded).

    Called at both ends of a measurement, so that it holds the writing of its own records,
    no more, no less: otherwise a batch lands in a window or not by the ``flush_ms`` clock.
    """
    sink = driver.app.services.sink
    taken = sink.counters.submitted - sink.counters.dropped
    sink.flush()
    await sink.wait_observed(taken)


async def measure(driver: Driver, n: int, concurrency: int, *, count: bool = False) -> float:
    """Gateway CPU µs per request over ``n`` requests from ``concurrency`` tasks.

    ``count``: under callgrind, also count instructions (``driver.instructions``).
    """
    per_task = max(1, n // concurrency)  # at least one request per task (-n below the concurrency)

    async def worker() -> None:
        for _ in range(per_task):
            await driver.one()

    counter = COUNTER if count else None
    await settle_usage(driver)
    if counter is not None:
        counter.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    await settle_usage(driver)
    done = per_task * concurrency
    if counter is not None:
        driver.instructions = counter.stop() / done
    driver.wall_us = (time.perf_counter() - wall0) / done * 1e6
    return (time.process_time() - cpu0) / done * 1e6


def print_shares(stats: pstats.Stats) -> None:
    """Own time (the main thread's) by package or by trioproxy module, largest first."""
    shares: Counter[str] = Counter()
    for (path, _, name), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "/trioproxy/" in path:
            group = "trioproxy/" + path.split("/trioproxy/")[-1]
        elif "site-packages/" in path:
            group = path.split("site-packages/")[-1].split("/")[0]
        elif path == "~":
            group = "C: " + name
        else:
            group = "stdlib: " + Path(path).name
        shares[group] += own
    total = sum(shares.values()) or 1.0
    for group, own in shares.most_common(25):
        print(f"{own / total * 100:5.1f}%  {group}")


def _task_census() -> Counter[str]:
    """Every live Trio task, by the function it runs."""
    census: Counter[str] = Counter()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        census[task.coro.cr_code.co_qualname if hasattr(task.coro, "cr_code") else type(task.coro).__name__] += 1
        todo.extend(t for nursery in task.child_nurseries for t in nursery.child_tasks)
    return census


#: Content events of a stream while memory is measured: long enough (at the run's token spacing)
#: that the first stream is still open when the last one starts, however slow the machine is
#: with tracemalloc on. The streams are cut once the snapshot is taken.
MEMORY_STREAM_TOKENS = 5_000
#: --memory gives up (with a message) if the streams are not all open after this long.
MEMORY_OPEN_TIMEOUT_S = 120.0


async def measure_memory(driver: Driver, streams: int, top: int) -> None:
    """Python memory held per open stream: a tracemalloc snapshot while ``streams`` are open at once."""
    long = Driver(driver.app, driver.body, [*HEADERS, (b"x-mock-tokens", b"%d" % MEMORY_STREAM_TOKENS)])
    long.want_open = streams
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(long.one)
        with trio.move_on_after(MEMORY_OPEN_TIMEOUT_S):
            await long.all_open.wait()
        if long.all_open.is_set():
            during = tracemalloc.take_snapshot()
            tasks = _task_census()
        nursery.cancel_scope.cancel()  # the client goes away: every stream ends now
    tracemalloc.stop()
    if not long.all_open.is_set():
        sys.exit(f"--memory: at most {long.peak_open} of {streams} streams were open at once after "
                 f"{MEMORY_OPEN_TIMEOUT_S:g} s (did streams end before the last opened? a longer --token-delay-ms)")
    diff = during.compare_to(before, "lineno")
    held = sum(d.size_diff for d in diff)
    print(f"--- {streams} streams open at once: {held / streams / 1024:.1f} KiB of Python memory per stream ---")
    print("tasks alive, per stream: " + ", ".join(f"{n / streams:.2f} {name}" for name, n in tasks.most_common() if n >= streams // 2))
    for d in sorted(diff, key=lambda d: -d.size_diff)[:top]:
        frame = d.traceback[0]
        print(f"{d.size_diff / streams:8.0f} B/stream  {d.count_diff / streams:6.1f} blocks  "
              f"{frame.filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{frame.lineno}")


async def measure_garbage(driver: Driver, n: int, concurrency: int, top: int) -> None:
    """Reference cycles left per request: what only the cyclic GC frees, by type."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await measure(driver, n, concurrency)
        found = gc.collect()
        kinds = Counter(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    print(f"--- concurrency {concurrency}: {found / n:.1f} objects in reference cycles per request ---")
    for kind, count in kinds.most_common(top):
        print(f"{count / n:8.2f}  {kind}")


def _first_exit(exc: BaseException) -> SystemExit | None:
    """The first ``SystemExit`` inside (possibly nested) exception groups."""
    if isinstance(exc, SystemExit):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _first_exit(inner)) is not None:
                return found
    return None


async def run(args: argparse.Namespace) -> None:
    port = _free_port()
    tokens = 64 if args.stream else 16
    mock = subprocess.Popen(
        [sys.executable, "-m", "trioproxy", "mock", "--port", str(port), "--kind", "openai", "--models", "*",
         "--tokens", str(tokens), "--ttft-ms", "0", "--token-delay-ms", "0" if not args.stream else f"{args.token_delay_ms:g}"],
        stderr=subprocess.PIPE,
    )
    try:
        assert mock.stderr is not None
        mock.stderr.readline()  # "listening on ..."
        if os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
            os.sched_setaffinity(mock.pid, {1})
        _pin(0)
        with tempfile.TemporaryDirectory() as tmp:
            config = load_profiles([str(ROOT / "loadtest/profiles/bench.toml"), *args.config])
            upstreams = tuple(attrs.evolve(u, base_url=f"http://127.0.0.1:{port}") for u in config.upstreams)
            telemetry = attrs.evolve(config.telemetry, dir=tmp, enabled=config.telemetry.enabled and not args.telemetry_off)
            server = attrs.evolve(config.server, port=0)
            if COUNTER is not None:  # what runs by the clock runs as often per request as without valgrind
                upstreams = tuple(
                    attrs.evolve(u, health=attrs.evolve(u.health, interval_ms=u.health.interval_ms * CALLGRIND_SLOWDOWN))
                    for u in upstreams
                )
                telemetry = attrs.evolve(telemetry, flush_ms=telemetry.flush_ms * CALLGRIND_SLOWDOWN)
            config = attrs.evolve(config, upstreams=upstreams, telemetry=telemetry, server=server)
            async with trio.open_nursery() as nursery:
                running = await nursery.start(serve_main, config)
                app = ProxyApp(running.services)
                body = json.dumps(
                    {"model": "mock-llama", "messages": [{"role": "user", "content": "Say hello."}],
                     "stream": args.stream}, separators=(",", ":")
                ).encode()
                driver = Driver(app, body, HEADERS)
                await measure(driver, min(args.n, 2000 if not args.stream else 64), 1 if not args.stream else 64)  # warm-up
                if not args.stream:  # the upstream alone, through the same pool: the latency floor
                    pool = running.services.runtimes["primary"].pool
                    n = min(args.n, 5000)
                    if COUNTER is not None:
                        COUNTER.start()
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    for _ in range(n):
                        with await pool.open_response(b"POST", b"/v1/chat/completions", HEADERS[1:], body,
                                                      first_byte_timeout=10, idle_timeout=10) as response:
                            await response.read_all(max_bytes=1 << 20)
                    cpu_us, wall_us = (time.process_time() - cpu0) / n * 1e6, (time.perf_counter() - wall0) / n * 1e6
                    counted = f", {COUNTER.stop() / n:,.0f} instructions" if COUNTER is not None else ""
                    print(f"pool alone: {cpu_us:7.1f} µs gateway CPU per request, {wall_us:7.1f} µs wall per request{counted}")
                if args.garbage:
                    for concurrency in args.concurrency:
                        await measure_garbage(driver, args.garbage, concurrency, args.top)
                if args.memory:
                    await measure_memory(driver, args.memory, args.top)
                for concurrency in args.concurrency:
                    if args.profile:
                        profiler = cProfile.Profile()
                        profiler.enable()
                    us = await measure(driver, args.n, concurrency, count=True)
                    if args.profile:
                        profiler.disable()
                        print(f"--- concurrency {concurrency}: cProfile (inflates every call) ---")
                        stats = pstats.Stats(profiler)
                        stats.sort_stats("tottime").print_stats(args.profile)
                        if os.environ.get("BENCH_CALLERS"):
                            stats.print_callers(os.environ["BENCH_CALLERS"])
                        print_shares(stats)
                    counted = f", {driver.instructions:,.0f} instructions" if COUNTER is not None else ""
                    print(f"concurrency {concurrency:4d}: {us:7.1f} µs gateway CPU per request, "
                          f"{driver.wall_us:7.1f} µs wall per request{counted} ({args.n} requests, {driver.errors} errors)",
                          flush=True)
                running.shutdown.set()
            await running.stopped.wait()
            records = sum(sum(1 for _ in open(p, "rb")) for p in Path(tmp).glob("usage-*.jsonl"))
            print(f"usage records written: {records}")
    finally:
        mock.terminate()
        mock.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, action="append", help="concurrent tasks (repeatable; default 1 and 64)")
    parser.add_argument("--stream", action="store_true", help="streamed answers (64 tokens)")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="mock token spacing with --stream")
    parser.add_argument("--memory", type=int, default=0, metavar="N", help="first: memory per stream with N streams open")
    parser.add_argument("--garbage", type=int, default=0, metavar="N",
                        help="first: over N requests, the objects only the cyclic GC frees, by type")
    parser.add_argument("--top", type=int, default=30, help="rows of --memory's breakdown")
    parser.add_argument("--config", action="append", default=[], metavar="PROFILE",
                        help="a profile merged over loadtest/profiles/bench.toml (repeatable; "
                             "the upstreams' base_url is the mock's all the same)")
    parser.add_argument("--telemetry-off", action="store_true", help="the usage log disabled (records still feed the metrics)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile each run; print the top N")
    parser.add_argument("--instructions", action="store_true",
                        help="run under valgrind's callgrind and count instructions per request (deterministic, ~30x slower)")
    args = parser.parse_args()
    if args.memory and (not args.stream or args.token_delay_ms <= 0):
        # Unpaced, a 5,000-token stream ends before the last of N has opened: it would wait forever.
        parser.error("--memory needs paced streams that stay open, e.g. --stream --token-delay-ms 20")
    if args.instructions and COUNTER is None:
        sys.exit(run_under_callgrind(sys.argv))
    args.concurrency = args.concurrency or [1, 64]
    try:
        trio.run(run, args)
    except BaseExceptionGroup as group:  # a sys.exit() with a message, from inside the gateway's nursery
        if (exit_ := _first_exit(group)) is None:
            raise
        raise exit_ from None
