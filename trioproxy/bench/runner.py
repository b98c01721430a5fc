"""Running one scenario: start its processes, interleave its rounds, collect the facts.

::

    run_scenario(scenario, options, fleet)
    ├─ fleet.start: mock upstream(s) on the client's core, gateway(s) and the floor on core 0
    ├─ rounds × targets, interleaved, the order reversed every other round (A B [C], [C] B A, …):
    │  └─ loadgen.run_load(target, on_window=_Probe)
    │     └─ _Probe: server CPU at the window's edges, RSS every SAMPLE_S, the failover kill
    ├─ [--profile-dir] one more gateway round under py-spy (not counted)
    └─ stop the gateways (their usage logs are complete then) and count the records

The numbers themselves are derived in ``report.py``; this module only gathers
them (``ScenarioRun``), so what is measured and how it is shown stay apart.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio
from attrs import define, field, frozen

from ..config import load_profiles
from ..hypercorn_fast import STOCK_ENV
from .baseline import Baseline
from .probes import Probe, foreign_load, rss
from .loadgen import LoadPlan, RoundResult, run_load
from .processes import BenchError, Child, Fleet, override_profile, python_argv
from .scenarios import CHECKOUT, Load, PrimaryFault, Scenario, resolve_bench_profile
from .wire import Address, build_request, parse_target

__all__ = ["BenchOptions", "ScenarioRun", "TargetRound", "foreign_load", "run_scenario"]

#: The floor app lives beside the scenarios, in the source checkout.
FLOOR_APP = CHECKOUT / "loadtest" / "floor_app.py"
#: Hypercorn alone with its own plain-TCP I/O (``TRIOPROXY_STOCK_HYPERCORN=1``; ``--stock-floor``).
FLOOR_STOCK = "floor-stock"
#: The floor app relaying to the upstream on the gateway's I/O parts, no features (``--relay-floor``).
RELAY_FLOOR = "relay-floor"
#: The relay floor's knob: µs of CPU it burns per relayed piece (``loadtest/floor_app.py``).
RELAY_FLOOR_SPIN_ENV = "TRIOPROXY_RELAY_FLOOR_SPIN_US"
#: Makes the relay floor relay its streams' steady reads from one hub task (its experiment's knob).
RELAY_FLOOR_HUB_ENV = "TRIOPROXY_RELAY_FLOOR_HUB"
#: Targets that are not gateways: the upstream itself, Hypercorn answering by itself, the bare relay.
NOT_GATEWAYS = ("direct", "floor", FLOOR_STOCK, RELAY_FLOOR)
#: More than this share of a core busy with other load during a window: the round is run again.
NOISE_LIMIT = 0.15
#: Re-runs of disturbed rounds allowed per target and scenario (then the round is kept, with a note).
MAX_REDO = 3
#: py-spy's sampling rate: 250 Hz over a few seconds is thousands of samples at a few % overhead.
PY_SPY_RATE = 250


@frozen
class BenchOptions:
    """The command line's choices that apply to every scenario."""

    rounds: int | None = None
    duration_s: float | None = None
    warmup_s: float | None = None
    #: Measure this gateway instead of starting ours (CPU and RSS only with gateway_pid).
    target_gateway: str | None = None
    gateway_pid: int | None = None
    #: Use this upstream instead of starting the mock (a real Ollama, vLLM...).
    target_upstream: str | None = None
    #: The profile's upstream ``kind`` for target_upstream (its health-check path).
    upstream_kind: str | None = None
    model: str | None = None
    pin: bool = True
    gateway_cpu: int = 0
    client_cpu: int = 1
    #: Where py-spy writes one profile per scenario (None: no profiling round).
    profile_dir: Path | None = None
    #: ``--baseline`` / ``--baseline-python``: each gateway variant is also measured as this build.
    baseline: Baseline | None = None
    #: ``--stock-floor``: also Hypercorn alone with its own I/O (``FLOOR_STOCK``), where the floor runs.
    stock_floor: bool = False
    #: ``--relay-floor``: also the floor app as a bare relay to the upstream (``RELAY_FLOOR``), where the floor runs.
    relay_floor: bool = False


@define
class Target:
    label: str
    address: Address
    #: The process whose CPU and RSS are the target's (None: not ours to read).
    server: Child | None
    server_pid: int | None
    #: Processes on the client's core, read for the "is core 1 saturated?" check.
    upstream_pids: list[int] = field(factory=list)
    #: Gateway only: the directory of its usage log.
    telemetry_dir: Path | None = None
    #: False for a gateway with several workers, spread over every core (no noise check then).
    pinned: bool = True
    sent_total: int = 0
    #: Its RSS before its first round: the idle process the memory per stream grows from.
    rss_start: int | None = None


@define
class TargetRound:
    """One round against one target, with what the probes read beside it."""

    target: str
    index: int
    result: RoundResult
    server_cpu_s: float | None
    upstream_cpu_s: float | None
    rss_baseline: int | None
    rss_peak: int | None
    #: Seconds into the window at which the failover kill happened (failover mode).
    killed_at_s: float | None = None
    #: Per core, the share of the window it was busy (any process): noise shows up here.
    core_busy: dict[int, float] = field(factory=dict)
    #: The median of the RSS samples inside the measured window (None: none taken).
    rss_held: int | None = None
    #: The target's RSS before its first round (``Target.rss_start``), the same in every round.
    rss_start: int | None = None
    #: The part of ``server_cpu_s`` spent in the kernel (system time).
    server_sys_s: float | None = None


@define
class ScenarioRun:
    """Everything one scenario measured, for ``report.py``."""

    scenario: Scenario
    targets: list[str]
    rounds: list[TargetRound]
    rounds_n: int
    duration_s: float
    warmup_s: float
    commands: dict[str, list[str]] = field(factory=dict)
    #: Per gateway label: requests it was sent and usage records it wrote.
    usage: dict[str, dict[str, int]] = field(factory=dict)
    notes: list[str] = field(factory=list)
    #: Collapsed py-spy stacks file per gateway label, when profiled.
    profiles: dict[str, str] = field(factory=dict)
    #: ``--baseline``: the revision measured, and each gateway variant's label → its twin's label.
    baseline: Baseline | None = None
    baselines: dict[str, str] = field(factory=dict)
    #: Gateways with several workers, on every core (no noise check for them).
    unpinned: set[str] = field(factory=set)
    #: The cores the servers and the client were pinned to (None: not pinned).
    server_core: int | None = None
    client_core: int | None = None


def mock_argv(load: Load, *, port: int = 0) -> list[str]:
    return python_argv(
        "-m", "trioproxy", "mock", "--host", "127.0.0.1", "--port", str(port), "--kind", "openai",
        "--models", "*", "--tokens", str(load.tokens), "--token-delay-ms", f"{load.token_delay_ms:g}",
        "--ttft-ms", f"{load.ttft_ms:g}",
    )


def primary_mock_argv(load: Load, fault: PrimaryFault) -> list[str]:
    """The primary's own mock: the load's pacing plus its fault (``trioproxy mock --fail``)."""
    argv = mock_argv(load) + ["--fail", fault.fail]
    if fault.fail == "slow":
        argv += ["--slow-ttft-ms", f"{fault.slow_ttft_ms:g}", "--fail-rate", f"{fault.rate:g}",
                 "--seed", str(fault.seed)]
    return argv


def _profile_paths(names: tuple[str, ...]) -> list[Path]:
    return [resolve_bench_profile(n) for n in names]


def _upstream_ids_by_priority(paths: list[Path]) -> list[str]:
    config = load_profiles([str(p) for p in paths])
    return [u.id for u in sorted(config.upstreams, key=lambda u: u.priority)]


async def _start_gateway(
    fleet: Fleet, label: str, paths: list[Path], base_urls: dict[str, str], options: BenchOptions, run_dir: Path,
    workers: int = 1, baseline: Baseline | None = None,
) -> tuple[Child, Path]:
    """Start one gateway variant: this checkout's trioproxy, or ``baseline``'s."""
    telemetry_dir = run_dir / f"usage-{label}"
    override = override_profile(
        run_dir / f"override-{label}.toml", base_urls=base_urls, telemetry_dir=telemetry_dir,
        upstream_kind=options.upstream_kind,
    )
    args = ["-m", "trioproxy", "--log-level", "INFO", "serve"]
    for p in [*paths, override]:
        args += ["--config", str(p)]
    args += ["--port", "0"]
    if workers > 1:  # every core: the workers share them with the client and the upstream
        args += ["--workers", str(workers)]
    env = baseline.env() if baseline is not None else None
    argv = [baseline.interpreter, *args] if baseline is not None else python_argv(*args)
    child = await fleet.start(label, argv, cpu=options.gateway_cpu if workers == 1 else None, env=env)
    if baseline is not None:  # what to type to start it again by hand (with --keep-logs: the source is kept)
        child.argv = [f"{k}={v}" for k, v in baseline.env_changes().items()] + child.argv
    return child, telemetry_dir


def count_usage_records(directory: Path) -> int:
    """Lines in every usage-*.jsonl file of a gateway's usage-log directory."""
    if not directory.is_dir():
        return 0
    total = 0
    for path in directory.glob("usage-*.jsonl"):
        with open(path, "rb") as f:
            total += sum(1 for _ in f)
    return total


def _quiet(message: str) -> None:
    pass


async def run_scenario(
    scenario: Scenario,
    options: BenchOptions,
    fleet: Fleet,
    run_dir: Path,
    *,
    progress: Callable[[str], None] = _quiet,
) -> ScenarioRun:
    """Run every round of ``scenario`` and return what was measured.

    ``run_dir`` receives the override profiles and the gateways' usage logs;
    ``progress`` is told what is being measured as it starts.

    Raises:
      BenchError: a process would not start, or the scenario cannot run with these options.
    """
    s = scenario
    rounds_n = options.rounds or s.run.rounds
    duration = options.duration_s or s.run.duration_s
    warmup = s.run.warmup_s if options.warmup_s is None else options.warmup_s
    run = ScenarioRun(scenario=s, targets=[], rounds=[], rounds_n=rounds_n, duration_s=duration, warmup_s=warmup,
                      server_core=options.gateway_cpu if options.pin else None,
                      client_core=options.client_cpu if options.pin else None)
    load = s.load
    if (s.mode in ("failover", "compare") or s.primary is not None) and (
            options.target_upstream or options.target_gateway):
        raise BenchError(f"scenario {s.name!r} (mode {s.mode}) needs the bench's own mocks and gateways: "
                         "drop --target-upstream / --target-gateway for it")

    # Upstream(s): the mock on the client's core, or the user's server.
    mocks: list[Child] = []
    if options.target_upstream:
        upstream_url = options.target_upstream
        parse_target(upstream_url)  # fail early on a bad URL
    else:
        if s.primary is not None:  # the primary's own faulty mock, and the fallback (which direct measures)
            mocks.append(await fleet.start("mock-primary", primary_mock_argv(load, s.primary),
                                           cpu=options.client_cpu))
            mocks.append(await fleet.start("mock-fallback", mock_argv(load), cpu=options.client_cpu))
        else:
            names = ["mock-primary", "mock-fallback"] if s.mode == "failover" else ["mock"]
            for name in names:
                mocks.append(await fleet.start(name, mock_argv(load), cpu=options.client_cpu))
        upstream_url = mocks[-1].url if s.primary is not None else mocks[0].url
    for m in mocks:
        run.commands[m.name] = m.argv
    mock_pids = [m.pid for m in mocks]

    targets: list[Target] = []
    if s.direct and s.mode == "ab":
        direct_mock = (mocks[-1] if s.primary is not None else mocks[0]) if mocks else None
        targets.append(Target("direct", parse_target(upstream_url), direct_mock,
                              direct_mock.pid if direct_mock else None))
    for variant in s.gateways:
        paths = _profile_paths(variant.profiles)
        if options.target_gateway:
            targets.append(Target(variant.label, parse_target(options.target_gateway), None, options.gateway_pid,
                                  mock_pids))
            run.notes.append(f"{variant.label}: the gateway at {options.target_gateway} (not started by the bench)")
            break
        ids = _upstream_ids_by_priority(paths)
        if s.mode == "failover" or (s.primary is not None and mocks):
            base_urls = {uid: (mocks[0].url if i == 0 else mocks[1].url) for i, uid in enumerate(ids)}
        else:
            base_urls = {uid: upstream_url for uid in ids}
        sources: list[Baseline | None] = [None] if options.baseline is None else [None, options.baseline]
        for source in sources:  # this checkout's gateway, then (--baseline) the same as the baseline build
            label = variant.label + (source.suffix if source is not None else "")
            child, telemetry_dir = await _start_gateway(fleet, label, paths, base_urls, options, run_dir,
                                                        variant.workers, source)
            run.commands[label] = child.argv
            targets.append(Target(label, parse_target(child.url), child, child.pid, mock_pids, telemetry_dir,
                                  pinned=variant.workers == 1))
            if variant.workers > 1:
                run.unpinned.add(label)
            if source is not None:
                run.baseline = source
                run.baselines[variant.label] = label
                run.notes.append(f"{label}: {source.describe()}, with the same profiles and pinning as "
                                 f"{variant.label}; the two swap places every other round")
        if variant.workers > 1:
            run.notes.append(f"{variant.label}: {variant.workers} workers, not pinned: they share both cores with "
                             "the load generator and the upstream; its CPU is the supervisor's and workers' together")
    if s.floor and s.mode == "ab":
        if FLOOR_APP.is_file():
            paths = _profile_paths(s.gateways[0].profiles)
            argv = python_argv(str(FLOOR_APP), *[a for p in paths for a in ("--config", str(p))], "--port", "0")
            floor = await fleet.start("floor", argv, cpu=options.gateway_cpu)
            run.commands["floor"] = floor.argv
            targets.append(Target("floor", parse_target(floor.url), floor, floor.pid))
            if options.stock_floor:
                stock = await fleet.start(FLOOR_STOCK, argv, cpu=options.gateway_cpu,
                                          env={**os.environ, STOCK_ENV: "1"})
                run.commands[FLOOR_STOCK] = [f"{STOCK_ENV}=1", *stock.argv]
                targets.append(Target(FLOOR_STOCK, parse_target(stock.url), stock, stock.pid))
                run.notes.append(f"{FLOOR_STOCK}: the floor app with Hypercorn's own I/O ({STOCK_ENV}=1); the "
                                 "floor, and every gateway here, run with trioproxy/hypercorn_fast.py's plain-TCP I/O")
            if options.relay_floor:
                relay = await fleet.start(RELAY_FLOOR, [*argv, "--upstream", upstream_url], cpu=options.gateway_cpu)
                spin = os.environ.get(RELAY_FLOOR_SPIN_ENV)
                hub = os.environ.get(RELAY_FLOOR_HUB_ENV, "") not in ("", "0")
                run.commands[RELAY_FLOOR] = [*([f"{RELAY_FLOOR_SPIN_ENV}={spin}"] if spin else []),
                                             *([f"{RELAY_FLOOR_HUB_ENV}=1"] if hub else []), *relay.argv]
                targets.append(Target(RELAY_FLOOR, parse_target(relay.url), relay, relay.pid, mock_pids))
                run.notes.append(f"{RELAY_FLOOR}: the floor app relaying to the upstream as direct calls it, on the "
                                 "gateway's I/O parts (raw upstream sockets, its HTTP/1.1 parser, hypercorn_fast), "
                                 "with no routing, health checks, failover, usage scanning or usage log")
                if spin:
                    run.notes.append(f"{RELAY_FLOOR}: burning {spin} µs of CPU per relayed piece ({RELAY_FLOOR_SPIN_ENV})")
                if hub:
                    run.notes.append(f"{RELAY_FLOOR}: a stream's reads after its first piece relayed by one hub task for "
                                     f"every stream, no task wake-up per event ({RELAY_FLOOR_HUB_ENV}=1)")
        else:
            run.notes.append(f"floor skipped: {FLOOR_APP} not found (run from a source checkout)")
    run.targets = [t.label for t in targets]

    plan = LoadPlan.from_scenario(load, duration_s=duration, warmup_s=warmup)
    requests = {t.label: build_request(load, t.address.host_header, model=options.model) for t in targets}
    primary_port = int(mocks[0].url.rsplit(":", 1)[1]) if mocks else 0
    redone: dict[str, int] = {}
    for index in range(rounds_n):
        for target in round_order(targets, index):
            while True:  # bounded: a disturbed round is run again at most MAX_REDO times per target
                tr = await _one_round(s, options, fleet, run, target, index, rounds_n, plan, requests, mocks,
                                      primary_port, progress)
                noise = (foreign_load(tr, server_core=run.server_core, client_core=run.client_core)
                         if target.pinned else None)  # an unpinned gateway's cores are everyone's
                # Not in failover mode: the killed mock's CPU can no longer be read, so the
                # client core's expected load is unknown there.
                if (noise is None or noise <= NOISE_LIMIT or redone.get(target.label, 0) >= MAX_REDO
                        or s.mode == "failover"):
                    break
                redone[target.label] = redone.get(target.label, 0) + 1
                run.notes.append(f"{target.label} round {index + 1} run again: {noise:.0%} of a core was busy "
                                 "with other load on the machine")
                progress(f"{s.name}: round {index + 1} of {target.label} disturbed by other load "
                         f"({noise:.0%} of a core): running it again")
            run.rounds.append(tr)

    if options.profile_dir is not None and s.mode != "failover":
        progress(f"{s.name}: one more round per gateway under py-spy (not counted)")
        await _profile_round(run, targets, requests, plan, options.profile_dir)

    # Stop our gateways first: a gateway's usage log is complete once it has exited.
    for target in targets:
        if target.telemetry_dir is not None and target.server is not None:
            await fleet.stop(target.server)
            run.usage[target.label] = {
                "requests_sent": target.sent_total,
                "usage_records": count_usage_records(target.telemetry_dir),
            }
    return run


T = TypeVar("T")


def round_order(targets: list[T], index: int) -> list[T]:
    """The targets in round ``index``'s order: as listed, then reversed every other round (A B C,
    then C B A). The machine drifts during a round too; with one fixed order the target that
    always runs first would always meet the round's start, and a steady drift would weigh on
    it alone. Reversed, a steady drift weighs alike on every target over each pair of rounds
    (and a gateway and its baseline, listed side by side, swap places)."""
    return targets if index % 2 == 0 else targets[::-1]


async def _one_round(
    s: Scenario, options: BenchOptions, fleet: Fleet, run: ScenarioRun, target: Target, index: int, rounds_n: int,
    plan: LoadPlan, requests: dict[str, bytes], mocks: list[Child], primary_port: int,
    progress: Callable[[str], None],
) -> TargetRound:
    """One round against one target, with its probes (and, in failover mode, the kill)."""
    kill = None
    if s.mode == "failover":
        assert s.failover is not None
        if not mocks[0].running:  # killed last round: back on the same port, then let health see it
            await fleet.stop(mocks[0])
            mocks[0] = await fleet.start("mock-primary", mock_argv(s.load, port=primary_port), cpu=options.client_cpu)
            target.upstream_pids = [mocks[0].pid, mocks[1].pid]
            await trio.sleep(s.failover.recover_s)
        primary = mocks[0]
        kill = (s.failover.kill_at_s, lambda: fleet.kill_now(primary))
    progress(f"{s.name}: round {index + 1}/{rounds_n}, {target.label}")
    probe = Probe(target, kill=kill)
    baseline = rss(target.server_pid)
    if target.rss_start is None:
        target.rss_start = baseline
    result = await run_load(target.address, requests[target.label], plan, on_window=probe)
    target.sent_total += result.sent_total
    return TargetRound(
        target=target.label, index=index, result=result, server_cpu_s=probe.server_cpu,
        upstream_cpu_s=probe.upstream_cpu, rss_baseline=baseline, rss_peak=probe.rss_peak,
        rss_held=int(statistics.median(probe.rss_window)) if probe.rss_window else None,
        killed_at_s=probe.killed_at, core_busy=probe.core_busy, rss_start=target.rss_start,
        server_sys_s=probe.server_sys,
    )


async def _profile_round(
    run: ScenarioRun, targets: list[Target], requests: dict[str, bytes], plan: LoadPlan, profile_dir: Path
) -> None:
    """One more round per gateway under ``py-spy record`` (not counted in the results)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).is_file():
        run.notes.append("profiling skipped: py-spy not found (pip install py-spy)")
        return
    profile_dir.mkdir(parents=True, exist_ok=True)
    for target in targets:
        if target.server is None or target.label in NOT_GATEWAYS:
            continue
        out = profile_dir / f"{run.scenario.name}-{target.label}.txt"
        seconds = max(1, math.ceil(plan.duration_s))

        async def record(window_start: float, window_end: float, target: Target = target, out: Path = out,
                         seconds: int = seconds) -> None:
            await trio.sleep_until(window_start)
            argv = [py_spy, "record", "--pid", str(target.server_pid), "--rate", str(PY_SPY_RATE),
                    "--duration", str(seconds), "--format", "raw", "--nonblocking", "--output", str(out)]
            await trio.run_process(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

        result = await run_load(target.address, requests[target.label], plan, on_window=record)
        target.sent_total += result.sent_total
        if out.is_file():
            run.profiles[target.label] = str(out)
        else:
            run.notes.append(f"profiling {target.label}: py-spy wrote nothing (ptrace not permitted?)")
