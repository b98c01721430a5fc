"""Benchmark the telemetry path: the request-side hand-off and the writer's throughput.

A script, not a test (numbers depend on the machine). Run from the repository root::

    .venv/bin/python loadtest/bench_telemetry.py [--records 200000]

(a) hand-off: µs per ``sink.submit(rec)`` with a reader draining the channel, measured
    with the Record built beforehand (excluded) and built in the loop (included).
    Target ≤ 5 µs/record, construction excluded.
(b) writer: records/s from a full channel to a real file in a temporary directory, through
    ``run_writer`` with its real worker threads. Target ≥ 50,000 records/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import trio

from trioproxy.config import Telemetry
from trioproxy.telemetry import AttemptRecord, Record, encode_record, open_telemetry
from trioproxy.usagelog import run_writer

#: Submits between checkpoints: the reader drains meanwhile, so the channel never fills.
CHUNK = 1_000
ATTEMPT = (AttemptRecord("ollama-a", "llama3:8b", "ok", 200, 12.345),)


def make_record(i: int) -> Record:
    """A typical record: a streamed chat completion that went well."""
    return Record(
        request_id=f"{i:032x}",
        ts=time.time(),
        route="/v1/chat/completions",
        method="POST",
        model_requested="llama3",
        model_served="llama3:8b",
        upstream="ollama-a",
        attempts=ATTEMPT,
        status=200,
        stream=True,
        ttft_ms=120.5,
        total_ms=1520.25,
        bytes_in=512,
        bytes_out=20_480,
        prompt_tokens=12,
        completion_tokens=345,
        token_source="upstream",
        finish_reason="stop",
        worker=os.getpid(),
    )


async def bench_handoff(n: int, *, build: bool) -> float:
    """µs per submit (plus Record construction when ``build``), reader draining concurrently."""
    sink, records_recv = open_telemetry(Telemetry(queue_capacity=16_384))
    prebuilt = [] if build else [make_record(i) for i in range(n)]
    spent = 0.0

    async def drain() -> None:  # like the writer: one await, then whatever is queued
        try:
            while True:
                await records_recv.receive()
                while True:
                    try:
                        records_recv.receive_nowait()
                    except trio.WouldBlock:
                        break
        except trio.EndOfChannel:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            t0 = time.perf_counter()
            if build:
                for i in range(start, stop):
                    sink.submit(make_record(i))
            else:
                for rec in prebuilt[start:stop]:
                    sink.submit(rec)
            spent += time.perf_counter() - t0
            await trio.sleep(0)  # let the reader drain (not timed)
        sink.close()
    stats = sink.statistics()
    assert stats.dropped == 0, f"the channel filled: {stats}"
    return spent / n * 1e6


def bench_encode(n: int) -> float:
    records = [make_record(i) for i in range(n)]
    t0 = time.perf_counter()
    for rec in records:
        encode_record(rec)
    return (time.perf_counter() - t0) / n * 1e6


async def bench_writer(n: int, directory: Path, *, batch_max: int) -> tuple[float, int, int]:
    """Records/s from a full channel of ``n`` records to disk; returns (rate, batches, bytes)."""
    cfg = Telemetry(dir=str(directory), queue_capacity=n, batch_max=batch_max, flush_ms=200)
    sink, records_recv = open_telemetry(cfg)
    for i in range(n):
        sink.submit(make_record(i))
    sink.close()  # the writer drains everything, then returns
    t0 = time.perf_counter()
    await run_writer(records_recv, sink, cfg)
    elapsed = time.perf_counter() - t0
    stats = sink.statistics()
    assert stats.written == n, stats
    size = sum(p.stat().st_size for p in directory.iterdir())
    return n / elapsed, stats.batches, size


async def main(n: int) -> None:
    print(f"machine: nproc={os.cpu_count()} {platform.machine()} {platform.system()} {platform.release()}")
    print(f"python {platform.python_version()} ({sys.implementation.name}), trio {trio.__version__}")
    print(f"records: {n:,}")
    excluded = await bench_handoff(n, build=False)
    included = await bench_handoff(n, build=True)
    print(f"(a) hand-off  submit() only, Record prebuilt : {excluded:6.2f} µs/record   (target ≤ 5)")
    print(f"    hand-off  Record(...) + submit()         : {included:6.2f} µs/record")
    print(f"    encode_record() (runs in the writer)     : {bench_encode(min(n, 100_000)):6.2f} µs/record")
    for batch_max in (Telemetry().batch_max, 256):
        with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
            rate, batches, size = await bench_writer(n, Path(tmp), batch_max=batch_max)
        print(
            f"(b) writer    batch_max={batch_max:<5}: {rate:10,.0f} records/s  "
            f"({batches} batches, {size / n:.0f} B/record)   (target ≥ 50,000)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    trio.run(main, parser.parse_args().records)
