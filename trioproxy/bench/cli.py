"""``trioproxy bench``: the command line (``add_arguments`` / ``run_from_args``).

::

    trioproxy bench                                   # every scenario, the bench's own mock and gateway
    trioproxy bench -s stream-64 -s throughput --rounds 3 --duration 5
    trioproxy bench -s stream-64 --target-upstream http://127.0.0.1:11434 --upstream-kind ollama --model llama3.2:1b
    trioproxy bench -s throughput --target-gateway http://127.0.0.1:8080 --gateway-pid 1234
    trioproxy bench -s sequential -s throughput --baseline HEAD~1   # did the last commit make it faster?
    trioproxy bench -s stream-64 --baseline-python /opt/py311-pgo/bin/python  # what would another interpreter do?

The load generator pins itself to ``--client-cpu`` (core 1), the mock upstream
joins it there, and the gateway and the floor get ``--gateway-cpu`` (core 0): the
numbers then say what the gateway costs, not how it competes with the client.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from ..errors import ConfigError
from . import baseline as baseline_source
from . import hop
from .baseline import Baseline
from .processes import BenchError, open_fleet
from .report import analyze, machine_info, markdown, timestamp, write_outputs
from .runner import BenchOptions, run_scenario
from .scenarios import Scenario, known_scenarios, load_scenario, with_rate

__all__ = ["DESCRIPTION", "add_arguments", "run_from_args"]

DESCRIPTION = "Measure what the gateway costs: the same load direct to the upstream and through the gateway."
#: The order `trioproxy bench` runs every scenario in when none is named: cheapest first.
DEFAULT_ORDER = ("sequential", "open-loop-200", "throughput", "stream-64", "stream-512", "failover", "telemetry-on-off",
                 "telemetry-on-off-sequential", "stream-512-telemetry",
                 "throughput-workers", "stream-64-workers",
                 "failover-refused", "failover-refused-16", "hedge-slow-primary")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``trioproxy bench`` options to ``parser``."""
    add = parser.add_argument
    add("--scenario", "-s", action="append", metavar="NAME|PATH",
        help="a scenario in loadtest/scenarios/ or a .toml path; repeat for several (default: all)")
    add("--list", action="store_true", help="list the known scenarios and exit")
    add("--rounds", type=int, metavar="N", help="rounds per target (default: the scenario's)")
    add("--duration", type=float, metavar="S", help="measured seconds per round (default: the scenario's)")
    add("--warmup", type=float, metavar="S", help="unmeasured seconds before each round's window")
    add("--rate", type=float, metavar="R",
        help="run open loop: R requests/s due over the scenario's connections (latency at a load you choose)")
    add("--target-gateway", metavar="URL", help="measure this gateway instead of starting trioproxy's")
    add("--gateway-pid", type=int, metavar="PID", help="with --target-gateway: its pid, to read its CPU and RSS")
    add("--target-upstream", metavar="URL",
        help="use this upstream (a real Ollama, vLLM...) instead of the mock, directly and behind the gateway")
    add("--upstream-kind", choices=("ollama", "vllm", "openai", "llamacpp"),
        help="with --target-upstream: its kind, for the gateway's health checks (default: the profile's, vllm)")
    add("--model", help="model name to request (default: the scenario's, mock-llama)")
    add("--out", type=Path, default=Path("loadtest/results"), metavar="DIR",
        help="where to write <timestamp>-<scenario>.json/.md/.png (default loadtest/results)")
    add("--gateway-cpu", type=int, default=0, metavar="N", help="core for the gateway and the floor (default 0)")
    add("--client-cpu", type=int, default=1, metavar="N", help="core for the load generator and mock (default 1)")
    add("--no-pin", action="store_true", help="do not pin processes to cores")
    add("--profile-dir", type=Path, metavar="DIR",
        help="also run one unmeasured round per gateway under py-spy; collapsed stacks go here")
    add("--keep-logs", action="store_true", help="keep the processes' logs and usage logs (printed path)")
    add("--stock-floor", action="store_true",
        help="also measure Hypercorn alone with its own I/O (TRIOPROXY_STOCK_HYPERCORN=1), beside the floor")
    add("--relay-floor", action="store_true",
        help="also measure a bare relay to the upstream on the gateway's I/O parts, with no gateway features, "
             "beside the floor (loadtest/floor_app.py --upstream)")
    add("--baseline", metavar="REV",
        help="also measure the gateway as committed at git revision REV, in the same interleaved rounds "
             "(needs a git checkout)")
    add("--baseline-python", metavar="PATH",
        help="also measure the gateway under the interpreter PATH (with its own environment: a venv with "
             "trioproxy's dependencies), in the same interleaved rounds; with --baseline, REV's gateway under it")


def _options(args: argparse.Namespace, pin: bool, baseline: Baseline | None = None) -> BenchOptions:
    return BenchOptions(
        rounds=args.rounds,
        duration_s=args.duration,
        warmup_s=args.warmup,
        target_gateway=args.target_gateway,
        gateway_pid=args.gateway_pid,
        target_upstream=args.target_upstream,
        upstream_kind=args.upstream_kind,
        model=args.model,
        pin=pin,
        gateway_cpu=args.gateway_cpu,
        client_cpu=args.client_cpu,
        profile_dir=args.profile_dir,
        baseline=baseline,
        stock_floor=args.stock_floor,
        relay_floor=args.relay_floor,
    )


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


async def _watch_termination(scope: trio.CancelScope, received: list[int]) -> None:
    """SIGTERM/SIGHUP: stop measuring and fall through to the cleanup, like Ctrl-C."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            received.append(signum)
            scope.cancel()
            return


async def _main(scenarios: list[Scenario], options: BenchOptions, out: Path, run_dir: Path,
                received: list[int]) -> list[dict[str, Any]]:
    machine = machine_info()
    if options.pin:  # what crossing between the two cores costs here, before any load
        machine["loopback_us"] = await trio.to_thread.run_sync(hop.loopback, options.client_cpu, options.gateway_cpu)
    stamp = timestamp()
    results: list[dict[str, Any]] = []
    async with trio.open_nursery() as root:
        root.start_soon(_watch_termination, root.cancel_scope, received)
        for scenario in scenarios:
            scenario_dir = run_dir / scenario.name
            scenario_dir.mkdir(parents=True, exist_ok=True)
            async with open_fleet(scenario_dir, pin=options.pin) as fleet:
                run = await run_scenario(scenario, options, fleet, scenario_dir, progress=_progress)
            result = analyze(run, machine=machine)
            paths = write_outputs(result, out, stamp)
            print(markdown(result))
            _progress("wrote " + ", ".join(str(p) for p in paths.values()))
            if "png" not in paths:
                _progress("chart skipped: matplotlib is not installed (pip install 'trioproxy[bench]')")
            results.append(result)
        root.cancel_scope.cancel()
    if len(results) > 1:
        summary = out / f"{stamp}-summary.md"
        summary.write_text("\n".join(markdown(r) for r in results), encoding="utf-8")
        _progress(f"wrote {summary}")
    return results


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed options describe; returns the exit code.

    0: done (whatever the numbers); 1: a process would not start or a target was
    unusable; 2: a bad scenario or option; 130/143: interrupted (processes stopped).
    """
    if args.list:
        for name in known_scenarios():
            print(name)
        return 0
    try:
        names = args.scenario or [n for n in DEFAULT_ORDER if n in known_scenarios()]
        scenarios = [load_scenario(n) for n in names]
        if args.rate is not None:
            scenarios = [with_rate(s, args.rate) for s in scenarios]
    except ConfigError as exc:
        print(f"trioproxy bench: {exc}", file=sys.stderr)
        return 2
    if args.rounds is not None and args.rounds < 1 or args.duration is not None and args.duration <= 0:
        print("trioproxy bench: --rounds and --duration must be positive", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    pin = not args.no_pin and cores >= 2 and hasattr(os, "sched_setaffinity")
    if pin:
        if max(args.gateway_cpu, args.client_cpu) >= cores or args.gateway_cpu == args.client_cpu:
            print(f"trioproxy bench: --gateway-cpu and --client-cpu must be two different cores below {cores}",
                  file=sys.stderr)
            return 2
        os.sched_setaffinity(0, {args.client_cpu})  # the load generator itself
    elif not args.no_pin:
        _progress(f"{cores} core(s): not pinning; the client and the gateway share the CPU")
    commit = None
    if args.baseline is not None or args.baseline_python is not None:
        if args.target_gateway:
            print("trioproxy bench: --baseline starts a gateway of its own: it does not go with --target-gateway",
                  file=sys.stderr)
            return 2
    checkout_under: Baseline | None = None
    try:
        if args.baseline_python is not None:  # (checked first, also with --baseline: nothing started yet)
            checkout_under = baseline_source.this_checkout(args.baseline_python)
        if args.baseline is not None:
            commit = baseline_source.resolve(args.baseline)
    except BenchError as exc:
        print(f"trioproxy bench: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="trioproxy-bench-"))
    received: list[int] = []
    failed = True
    try:
        baseline = (baseline_source.unpack(args.baseline, commit, run_dir, python=args.baseline_python)
                    if commit is not None else checkout_under)
        trio.run(_main, scenarios, _options(args, pin, baseline), args.out, run_dir, received)
        failed = bool(received)
    except BaseException as exc:  # the command's edge: nurseries wrap what they raise in groups
        leaves = _leaves(exc)
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            _progress("interrupted: every process the bench started has been stopped")
            return 130
        if leaves and all(isinstance(e, (BenchError, ConfigError)) for e in leaves):
            for e in leaves:
                print(f"trioproxy bench: {e}", file=sys.stderr)
            return 2 if all(isinstance(e, ConfigError) for e in leaves) else 1
        raise
    finally:
        if args.keep_logs or failed:
            _progress(f"logs kept in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    if received:
        _progress(f"stopped by signal {received[0]}: every process the bench started has been stopped")
        return 128 + received[0]
    return 0
