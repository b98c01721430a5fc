"""What the bench's load generator costs per streamed event, against the mock alone.

    .venv/bin/python loadtest/bench_loadgen.py            # 512 streams of 64 tokens 20 ms apart
    .venv/bin/python loadtest/bench_loadgen.py --streams 64 --token-delay-ms 5

The mock runs in a child process on core 1, the load generator (``run_load``, as
``trioproxy bench`` runs it) here on core 0, so the CPU printed is the load generator's
own. Not a test; compare runs on one machine only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import trio

from trioproxy.bench.loadgen import LoadPlan, run_load
from trioproxy.bench.scenarios import Load
from trioproxy.bench.wire import build_request, parse_target


async def main(args: argparse.Namespace) -> None:
    mock = subprocess.Popen(
        [sys.executable, "-m", "trioproxy", "mock", "--port", "0", "--kind", "openai", "--models", "*"],
        stderr=subprocess.PIPE,
    )
    try:
        assert mock.stderr is not None
        port = int(mock.stderr.readline().decode().rsplit(":", 1)[1])  # "... listening on http://127.0.0.1:PORT"
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(mock.pid, {1})
            os.sched_setaffinity(0, {0})
        load = Load(connections=args.streams, stream=True, tokens=args.tokens, token_delay_ms=args.token_delay_ms)
        address = parse_target(f"http://127.0.0.1:{port}")
        plan = LoadPlan.from_scenario(load, duration_s=args.duration, warmup_s=1.5)
        result = await run_load(address, build_request(load, address.host_header), plan)
        events = result.recorder.count * (args.tokens + 1)  # content events and the role chunk, about
        print(f"{args.streams} streams: {result.recorder.count} started in the window, errors {result.recorder.error_counts()}; "
              f"load generator CPU {result.client_cpu_s / result.window_s * 100:.0f} % of a core, "
              f"~{result.client_cpu_s / max(events, 1) * 1e6:.1f} µs per event")
    finally:
        mock.terminate()
        mock.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--token-delay-ms", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=5.0)
    trio.run(main, parser.parse_args())
