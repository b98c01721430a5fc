"""Python opcodes per relayed event (or per small request) in the gateway process, by function.

``count_process.py`` counts machine instructions (valgrind): one number, exact, for a whole
request. This script says where the Python goes: it runs ``trioproxy serve`` (on
``loadtest/profiles/bench.toml``, health checks off, the mock upstream as in
``count_process.py``) with a tracer that counts every opcode it executes, per function,
only while the measured requests run (one at a time, after warm-up ones), and prints
them per relayed event (a 64-token stream is 65 events: 64 tokens and the finish) or per
small request, by module and by function. Opcodes are not time (a C call is one opcode),
but they are deterministic, and a path's count drops by what a change takes out of it.

    .venv/bin/python loadtest/count_opcodes.py              # 5 streams, 64 tokens 20 ms apart
    .venv/bin/python loadtest/count_opcodes.py --small -n 200
    .venv/bin/python loadtest/count_opcodes.py --top 60
    .venv/bin/python loadtest/count_opcodes.py --relay-floor   # the bench's relay-floor row instead

Background tasks that run by the clock (the usage log's writer, the watchdog) are counted
too, spread over the events: with tokens 20 ms apart, a few opcodes per event. Not a
test; ~15 s.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import count_process  # noqa: E402  (a sibling script: its mock, profile and request helpers)

#: Events per 64-token stream as the relay sees them: one per token, and the finish.
EVENTS_PER_STREAM = 65


def serve_traced(argv: list[str]) -> int:
    """``trioproxy serve argv`` with the opcode counter: SIGUSR1 turns it on and off, SIGUSR2 writes the counts."""
    counts: collections.Counter[tuple[str, int, str]] = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call":
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            return tracer
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
        return tracer

    state = {"on": False}

    def toggle(signum: int, frame: FrameType | None) -> None:
        state["on"] = not state["on"]
        if state["on"]:
            counts.clear()
        sys.settrace(tracer if state["on"] else None)

    def dump(signum: int, frame: FrameType | None) -> None:
        with open(os.environ["COUNT_OPCODES_OUT"], "w") as f:
            json.dump([[list(key), n] for key, n in counts.most_common()], f)

    signal.signal(signal.SIGUSR1, toggle)
    signal.signal(signal.SIGUSR2, dump)
    if argv[0] == "--relay-floor":  # loadtest/floor_app.py as a bare relay: PORT UPSTREAM_URL
        import trio
        floor_app = _floor_app()
        trio.run(floor_app.main, [str(count_process.BENCH_PROFILE)], int(argv[1]), argv[2])
        return 0
    from trioproxy.cli import main as trioproxy_main

    return trioproxy_main(["serve", *argv])


def _floor_app() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("floor_app", Path(__file__).resolve().parent / "floor_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_of(filename: str) -> str:
    for package in ("trio", "hypercorn", "h11", "outcome"):
        if f"/{package}/" in filename:
            return package
    if "/trioproxy/" in filename:
        return "trioproxy/" + filename.rsplit("/", 1)[-1]
    return "/".join(filename.rsplit("/", 2)[-2:])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-traced":
        return serve_traced(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=5, help="measured requests (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="requests before counting (default 3)")
    parser.add_argument("--small", action="store_true", help="small non-streamed answers instead of streams")
    parser.add_argument("--top", type=int, default=40, help="functions listed (default 40)")
    parser.add_argument("--relay-floor", action="store_true",
                        help="count loadtest/floor_app.py relaying to the mock (the bench's relay-floor row) instead")
    args = parser.parse_args()
    root = count_process.ROOT
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        mock_port, gateway_port = count_process.free_port(), count_process.free_port()
        (out / "override.toml").write_text(count_process.override(gateway_port, mock_port, out / "logs"))
        mock_cmd = [sys.executable, "-m", "trioproxy", "mock", "--port", str(mock_port), "--models", "*",
                    "--tokens", "64", "--token-delay-ms", "20", "--ttft-ms", "0"]
        if args.relay_floor:
            gateway_cmd = [sys.executable, __file__, "--serve-traced", "--relay-floor", str(gateway_port),
                           f"http://127.0.0.1:{mock_port}"]
        else:
            gateway_cmd = [sys.executable, __file__, "--serve-traced", "-p", str(count_process.BENCH_PROFILE),
                           "-p", str(out / "override.toml")]
        env = {**os.environ, "COUNT_OPCODES_OUT": str(out / "counts.json"), "PYTHONPATH": str(root)}
        children: list[subprocess.Popen[bytes]] = []
        try:
            with open(out / "mock.log", "wb") as mock_log:
                children.append(subprocess.Popen(mock_cmd, stdout=mock_log, stderr=subprocess.STDOUT))
            count_process.wait_until_serving("mock", f"http://127.0.0.1:{mock_port}/v1/models", children[0], out / "mock.log")
            with open(out / "gateway.log", "wb") as gateway_log:
                gateway = subprocess.Popen(gateway_cmd, cwd=root, env=env, stdout=gateway_log, stderr=subprocess.STDOUT)
            children.append(gateway)
            url = f"http://127.0.0.1:{gateway_port}"
            ready = url + ("/v1/models" if args.relay_floor else "/healthz")
            count_process.wait_until_serving("gateway", ready, gateway, out / "gateway.log")
            with httpx.Client(base_url=url, timeout=120.0) as client:
                count_process.send(client, args.warmup, stream=not args.small)
                gateway.send_signal(signal.SIGUSR1)
                time.sleep(0.2)  # (a signal's handler runs between two opcodes: no event to wait on)
                count_process.send(client, args.n, stream=not args.small)
                gateway.send_signal(signal.SIGUSR1)
                gateway.send_signal(signal.SIGUSR2)
                deadline = time.monotonic() + 30
                while not (out / "counts.json").exists() and time.monotonic() < deadline:  # bounded: 30 s
                    time.sleep(0.1)  # (the handler writes the file: polled, from another process)
            counts = json.loads((out / "counts.json").read_text())
        finally:
            count_process.stop(children)
    per = args.n if args.small else args.n * EVENTS_PER_STREAM
    what = "small request" if args.small else "relayed event"
    total = sum(n for _, n in counts)
    print(f"{total / per:,.0f} opcodes per {what} ({args.n} {'requests' if args.small else 'streams'} counted)\n")
    by_module: collections.Counter[str] = collections.Counter()
    for (filename, _, _), n in counts:
        by_module[module_of(filename)] += n
    print("by module:")
    for module, n in by_module.most_common(15):
        print(f"{n / per:10,.0f}  {module}")
    print("\nby function:")
    for (filename, line, name), n in counts[: args.top]:
        where = filename.split("site-packages/")[-1].replace(str(root) + "/", "")
        print(f"{n / per:10,.0f}  {where}:{line} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
