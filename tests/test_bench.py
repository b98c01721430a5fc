"""``trioproxy bench``: the sans-IO parts, exactly; one small end-to-end round, for correctness only.

Nothing here asserts a speed: the numbers belong in ``docs/benchmarks.md``, measured
by ``trioproxy bench`` on a quiet machine, never in a timed test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
import trio.testing

from trioproxy.bench import hotspots, probes, procstat
from trioproxy.bench.loadgen import LoadPlan, Recorder, RoundResult, run_load
from trioproxy.bench.chart import write_chart
from trioproxy.bench.cli import DEFAULT_ORDER
from trioproxy.bench.report import analyze, machine_info, markdown, write_outputs
from trioproxy.bench.runner import ScenarioRun, Target, TargetRound, count_usage_records, primary_mock_argv
from trioproxy.bench.scenarios import (
    CHECKOUT,
    Load,
    PrimaryFault,
    known_scenarios,
    load_scenario,
    parse_scenario,
    resolve_bench_profile,
)
from trioproxy.bench.stats import Summary, added, percentile, summarize
from trioproxy.bench.wire import StreamWatcher, build_request, parse_target
from trioproxy.config import load_profiles
from trioproxy.errors import ConfigError

from .conftest import StartMock, floor_app

REPO = Path(__file__).resolve().parents[1]

# --- stats ------------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 0.5) == 2.5
    assert percentile(values, 0.9) == pytest.approx(3.7)
    assert percentile(values, 1.0) == 4.0
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


def test_percentile_rejects_a_quantile_outside_0_1() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_summarize_sorts_skips_nan_and_reports_the_tail() -> None:
    s = summarize([5.0, math.nan, 1.0, 3.0, 2.0, 4.0] + [100.0])
    assert s.count == 6
    assert (s.min, s.p50, s.max) == (1.0, 3.5, 100.0)
    assert s.mean == pytest.approx(115 / 6)
    assert s.p99 == pytest.approx(100.0 - 0.05 * (100.0 - 5.0))


def test_summary_of_nothing_is_nan_not_zero() -> None:
    s = summarize([])
    assert s.count == 0 and math.isnan(s.p50) and math.isnan(s.max)


def test_added_is_percentile_minus_percentile() -> None:
    direct = Summary(count=3, mean=1, p50=1.0, p90=2.0, p99=3.0, max=4.0, min=0.5)
    through = Summary(count=3, mean=2, p50=1.5, p90=2.25, p99=5.0, max=4.0, min=1.0)
    assert added(through, direct) == {"p50": 0.5, "p90": 0.25, "p99": 2.0, "max": 0.0}


# --- the stream watcher (TTFT detection) --------------------------------------------------

ROLE = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
FINISH = b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":3}}\n\n'
SSE = ROLE + TOKEN * 3 + FINISH + USAGE + b"data: [DONE]\n\n"
NDJSON = (
    b'{"model":"m","message":{"role":"assistant","content":"Hi"},"done":false}\n' * 2
    + b'{"model":"m","message":{"role":"assistant","content":""},"done_reason":"stop","done":true}\n'
)


@pytest.mark.parametrize("cut", range(len(SSE) + 1))
def test_sse_content_events_are_counted_whatever_the_split(cut: int) -> None:
    watcher = StreamWatcher()
    first = watcher.feed(SSE[:cut])
    second = watcher.feed(SSE[cut:])
    assert first + second == 3 == watcher.content_events
    assert watcher.done and not watcher.error


def test_the_first_content_is_seen_only_when_its_line_is_complete() -> None:
    watcher = StreamWatcher()
    assert watcher.feed(ROLE) == 0  # the role chunk's content is empty: not a token
    assert watcher.feed(TOKEN[:-3]) == 0  # mid-line: not yet
    assert watcher.feed(TOKEN[-3:]) == 1
    assert not watcher.done


@pytest.mark.parametrize("cut", range(0, len(NDJSON) + 1, 7))
def test_ndjson_streams_count_content_and_see_done(cut: int) -> None:
    watcher = StreamWatcher()
    assert watcher.feed(NDJSON[:cut]) + watcher.feed(NDJSON[cut:]) == 2
    assert watcher.done


def test_error_events_and_cut_streams_are_told_apart() -> None:
    errored = StreamWatcher()
    errored.feed(TOKEN + b'data: {"error":{"message":"upstream died","type":"upstream_error"}}\n\n')
    assert errored.error and not errored.done
    cut = StreamWatcher()
    cut.feed(ROLE + TOKEN)
    assert not cut.error and not cut.done


def test_completions_and_spaced_json_count_as_content() -> None:
    watcher = StreamWatcher()
    assert watcher.feed(b'data: {"choices":[{"text":"Hi"}]}\n\ndata: {"choices":[{"delta":{"content": "x"}}]}\n\n') == 2
    assert watcher.feed(b'data: {"choices":[{"text":""}]}\n\n') == 0


# --- requests, targets ---------------------------------------------------------------------


def test_build_request_is_one_valid_http_request_with_the_mock_pacing() -> None:
    load = Load(connections=1, stream=True, tokens=64, token_delay_ms=5.0)
    raw = build_request(load, b"127.0.0.1:9", model="m")
    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method, request.target) == (b"POST", b"/v1/chat/completions")
    headers = dict(request.headers)
    assert headers[b"x-mock-tokens"] == b"64" and headers[b"x-mock-token-delay-ms"] == b"5"
    body = server.next_event()
    assert isinstance(body, h11.Data)
    assert b'"stream":true' in body.data and b'"model":"m"' in body.data
    assert isinstance(server.next_event(), h11.EndOfMessage)


def test_parse_target_takes_literal_addresses_only() -> None:
    assert parse_target("http://localhost:8080").sockaddr == ("127.0.0.1", 8080)
    assert parse_target("http://[::1]:9").host_header == b"[::1]:9"
    for bad in ("https://127.0.0.1:1", "http://127.0.0.1", "http://example.com:80"):
        with pytest.raises(ValueError):
            parse_target(bad)


# --- scenarios and bench profiles ------------------------------------------------------------


def test_a_run_of_every_scenario_runs_each_known_one_once() -> None:
    assert sorted(DEFAULT_ORDER) == sorted(known_scenarios())


@pytest.mark.parametrize("name", ["sequential", "throughput", "stream-64", "stream-512", "failover", "telemetry-on-off",
                                  "telemetry-on-off-sequential", "failover-refused", "failover-refused-16", "hedge-slow-primary",
                                  "throughput-workers", "stream-64-workers", "stream-512-telemetry"])
def test_every_scenario_the_issue_asks_for_loads(name: str) -> None:
    assert name in known_scenarios()
    scenario = load_scenario(str(REPO / "loadtest" / "scenarios" / f"{name}.toml"))
    assert scenario.name == name


def test_stream_scenarios_match_the_issue() -> None:
    s64 = load_scenario(str(REPO / "loadtest/scenarios/stream-64.toml"))
    s512 = load_scenario(str(REPO / "loadtest/scenarios/stream-512.toml"))
    assert (s64.load.connections, s64.load.tokens, s64.load.token_delay_ms) == (64, 64, 5.0)
    assert (s512.load.connections, s512.load.tokens, s512.load.token_delay_ms) == (512, 64, 20.0)


def test_scenario_problems_are_all_reported_with_their_key_paths() -> None:
    text = 'name = "x"\nmode = "failover"\nbogus = 1\n[load]\nconnections = "many"\nstream = false\n'
    with pytest.raises(ConfigError) as info:
        parse_scenario(text, source="t.toml")
    joined = "\n".join(info.value.errors)
    assert "bogus" in joined and "$.load.connections" in joined


def test_scenario_cross_checks() -> None:
    base = 'name = "x"\n[load]\nconnections = 4\nstream = true\n'
    with pytest.raises(ConfigError, match="failover"):
        parse_scenario('mode = "failover"\n' + base)
    with pytest.raises(ConfigError, match="two or more"):
        parse_scenario('mode = "compare"\n' + base)
    with pytest.raises(ConfigError, match="connections"):
        parse_scenario(base.replace("connections = 4", "connections = 0"))
    assert parse_scenario(base).gateways[0].profiles == ("bench",)


@pytest.mark.parametrize("name", ["throughput-workers", "stream-64-workers"])
def test_worker_scenarios_measure_one_pinned_worker_against_two(name: str) -> None:
    s = load_scenario(str(REPO / "loadtest" / "scenarios" / f"{name}.toml"))
    assert [(g.label, g.workers) for g in s.gateways] == [("workers-1", 1), ("workers-2", 2)]
    with pytest.raises(ConfigError, match="workers"):
        parse_scenario('name = "x"\n[load]\nconnections = 4\nstream = true\n[[gateways]]\nworkers = 0\n')


async def test_the_probe_keeps_the_peak_of_the_whole_round_and_the_samples_of_the_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = Target("gateway", parse_target("http://127.0.0.1:9"), None, os.getpid())
    probe = probes.Probe(target)
    await probe(1.0, 2.0)  # warm-up from 0 to 1 s, then the measured window
    window_samples = round(1.0 / probes.SAMPLE_S)
    assert window_samples <= len(probe.rss_window) <= window_samples + 1  # none from the warm-up
    assert probe.rss_peak is not None and probe.rss_peak >= max(probe.rss_window)
    assert probe.server_cpu is not None and probe.server_sys is not None
    assert 0 <= probe.server_sys <= probe.server_cpu


async def test_the_probe_sleeps_between_samples_even_when_the_server_cannot_be_read(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = 0

    def counted_rss(pid: int | None) -> int | None:
        nonlocal reads
        reads += 1
        if reads > 1_000:  # a spin never lets the mock clock move: fail instead of hanging
            raise AssertionError("the probe spins")
        return None

    monkeypatch.setattr(probes, "rss", counted_rss)
    probe = probes.Probe(Target("gateway", parse_target("http://127.0.0.1:9"), None, None))  # --target-gateway, no pid
    await probe(1.0, 2.0)
    assert reads <= round(2.0 / probes.SAMPLE_S) + 2  # one per sample, not a spin through the window
    assert probe.server_cpu is None and probe.rss_window == []


async def test_a_gateways_cpu_and_memory_include_its_workers() -> None:
    """``--workers N``: the supervisor's children are part of the gateway the probes read."""
    async with trio.open_nursery() as nursery:
        child = await nursery.start(partial(trio.run_process, [sys.executable, "-c", "import sys; sys.stdin.read()"],
                                            stdin=subprocess.PIPE))
        assert child.pid in procstat.descendants(os.getpid())
        own = procstat.memory(os.getpid()).rss
        tree = probes.rss(os.getpid())
        assert tree is not None and tree > own  # the child's resident memory is counted too
        await child.stdin.aclose()


def test_cpu_times_add_up_user_and_system_over_the_process_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    times = {1: procstat.CpuTimes(user=1.0, system=0.25), 2: procstat.CpuTimes(user=0.5, system=0.5)}

    def read(pid: int) -> procstat.CpuTimes:
        if pid == 3:
            raise OSError("exited in between")
        return times[pid]

    monkeypatch.setattr(procstat, "cpu_times", read)
    monkeypatch.setattr(procstat, "descendants", lambda pid: [2, 3] if pid == 1 else [])
    assert probes.cpu_times(1) == procstat.CpuTimes(user=1.5, system=0.75)
    assert probes.cpu(1) == pytest.approx(2.25)
    assert probes.cpu_times(3) is None and probes.cpu(None) is None


@pytest.mark.parametrize(("name", "connections"), [("failover-refused", 1), ("failover-refused-16", 16)])
def test_refused_primary_scenarios_measure_steady_and_cold_gateways_against_the_fallback(
    name: str, connections: int
) -> None:
    s = load_scenario(str(REPO / "loadtest" / "scenarios" / f"{name}.toml"))
    assert (s.mode, s.direct, s.primary) == ("ab", True, PrimaryFault("refuse"))
    assert (s.load.connections, s.load.stream) == (connections, True)
    assert [g.label for g in s.gateways] == ["gateway", "gateway-cold"]
    steady, cold = (load_profiles([str(resolve_bench_profile(p)) for p in g.profiles]) for g in s.gateways)
    for config in (steady, cold):
        assert [(u.id, u.priority) for u in sorted(config.upstreams, key=lambda u: u.priority)] == [
            ("primary", 0), ("fallback", 1)]
        assert config.routing.max_attempts >= 2 and config.telemetry.enabled
    assert all(u.health.enabled for u in steady.upstreams)  # as in production: the primary goes last
    assert not any(u.health.enabled for u in cold.upstreams)  # every request tries the primary first
    assert cold.routing.breaker_failures > 10**6


def test_hedge_scenario_makes_the_primary_slow_at_a_seeded_rate_and_compares_hedging_off_and_on() -> None:
    s = load_scenario(str(REPO / "loadtest/scenarios/hedge-slow-primary.toml"))
    assert s.primary == PrimaryFault("slow", rate=0.1, seed=1, slow_ttft_ms=2000.0)
    assert [g.label for g in s.gateways] == ["hedge-off", "hedge-on"]
    off, on = (load_profiles([str(resolve_bench_profile(p)) for p in g.profiles]) for g in s.gateways)
    assert off.routing.hedge_after_ms == 0
    assert (on.routing.hedge_after_ms, on.routing.max_hedges, on.routing.hedge_budget_percent) == (100, 1, 20.0)
    argv = primary_mock_argv(s.load, s.primary)
    assert argv[argv.index("--fail") + 1] == "slow"
    assert argv[argv.index("--fail-rate") + 1] == "0.1" and argv[argv.index("--seed") + 1] == "1"
    assert argv[argv.index("--slow-ttft-ms") + 1] == "2000"
    assert "--fail-rate" not in primary_mock_argv(s.load, PrimaryFault("refuse"))


def test_primary_fault_cross_checks() -> None:
    base = 'name = "x"\n[load]\nconnections = 4\nstream = true\n'
    with pytest.raises(ConfigError, match=r"\$\.primary\.rate"):
        parse_scenario(base + '[primary]\nfail = "refuse"\nrate = 0.5\n')
    with pytest.raises(ConfigError, match=r"\$\.primary\.rate"):
        parse_scenario(base + '[primary]\nfail = "slow"\nrate = 1.5\n')
    with pytest.raises(ConfigError, match=r"\$\.primary"):
        parse_scenario(base + '[primary]\nfail = "explode"\n')
    with pytest.raises(ConfigError, match="not for mode 'failover'"):
        parse_scenario('mode = "failover"\n' + base + '[failover]\n[primary]\nfail = "refuse"\n')
    assert parse_scenario(base).primary is None


def test_each_gateway_variant_is_judged_against_the_targets() -> None:
    scenario = load_scenario(str(REPO / "loadtest/scenarios/failover-refused.toml"))
    run = ScenarioRun(scenario=scenario, targets=["direct", "gateway", "gateway-cold"], rounds=[], rounds_n=1,
                      duration_s=1.0, warmup_s=0.0)
    run.rounds.append(_round("direct", 0, [1.0] * 10, [0.5] * 10, 0.01))
    run.rounds.append(_round("gateway", 0, [2.0] * 10, [1.5] * 10, 0.01))
    run.rounds.append(_round("gateway-cold", 0, [4.0] * 10, [3.0] * 10, 0.01))
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    verdicts = {v["target"]: v["met"] for v in result["verdicts"]}
    assert verdicts == {
        "gateway: zero errors": True,
        "gateway: extra TTFT p99 ≤ 2 ms over the fallback direct": True,
        "gateway-cold: zero errors": True,
        "gateway-cold: extra TTFT p99 ≤ 2 ms over the fallback direct": False,
    }


@pytest.mark.parametrize("profiles", [["bench"], ["bench", "bench-telemetry-off"], ["bench-failover"],
                                      ["bench-refused"], ["bench-hedge"], ["bench-hedge", "bench-hedge-on"]])
def test_bench_profiles_are_valid_and_keep_the_features_on(profiles: list[str]) -> None:
    config = load_profiles([str(resolve_bench_profile(p)) for p in profiles])
    assert len(config.upstreams) == 2 and all(u.health.enabled for u in config.upstreams)
    assert config.routing.max_attempts >= 2
    assert config.telemetry.enabled == ("bench-telemetry-off" not in profiles)


# --- procstat ----------------------------------------------------------------------------------

# A real line, its command name holding a space and parentheses: fields are counted from the last ')'.
STAT = (
    "4242 (python (x) y) S 1 4242 4242 0 -1 4194560 18716 0 0 0 1234 567 0 0 20 0 3 0 "
    "303398 262705152 11360 18446744073709551615 1 1 0 0 0 0 0 16781312 16386 0 0 0 17 0 0 0 0 0 0"
)
STATUS = "Name:\tpython\nVmPeak:\t  300000 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\nThreads:\t3\n"


def test_parse_stat_reads_utime_and_stime_in_ticks() -> None:
    times = procstat.parse_stat(STAT, ticks_per_second=100)
    assert (times.user, times.system) == (12.34, 5.67)
    assert times.total == pytest.approx(18.01)


def test_parse_stat_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        procstat.parse_stat("not a stat line")


def test_parse_status_reads_rss_and_peak_in_bytes() -> None:
    assert procstat.parse_status(STATUS) == procstat.Memory(rss=40960 * 1024, peak_rss=51200 * 1024)
    with pytest.raises(ValueError):
        procstat.parse_status("Name:\tzombie\n")


# --- hotspots and the report ----------------------------------------------------------------


def test_hotspots_aggregate_lines_into_functions() -> None:
    checkout = CHECKOUT
    baseline = "/tmp/trioproxy-bench-x/baseline-0123456789ab"  # a --baseline gateway's source: the same names
    raw = (
        f"main (/v/site-packages/trio/_core/_run.py:10);send ({checkout}/trioproxy/relay.py:5) 30\n"
        f"main (/v/site-packages/trio/_core/_run.py:10);send ({baseline}/trioproxy/relay.py:9) 10\n"
        "main (/v/site-packages/trio/_core/_run.py:12) 60\n"
        "garbage line\n"
    )
    stacks = hotspots.parse_collapsed(raw)
    top = hotspots.top_functions(stacks)
    assert [(h.function, h.self_share) for h in top] == [
        ("main (trio/_core/_run.py)", 0.6),
        ("send (trioproxy/relay.py)", 0.4),
    ]
    assert top[0].inclusive_share == 1.0
    assert hotspots.group_shares(stacks, {"trioproxy": ("trioproxy/",), "trio": ("trio/",)}) == {
        "trio": 0.6, "trioproxy": 0.4,
    }


def _round(target: str, index: int, totals: list[float], ttfts: list[float], cpu: float,
           sys_s: float | None = None) -> TargetRound:
    rec = Recorder()
    for i, (total, ttft) in enumerate(zip(totals, ttfts)):
        rec.add(i * 0.1, i * 0.1 + total / 1000, 0.1, ttft, total, None, 200)
    result = RoundResult(recorder=rec, window_s=1.0, sent_total=len(totals), client_cpu_s=0.1,
                         window_start=0.0, window_end=1.0)
    return TargetRound(target=target, index=index, result=result, server_cpu_s=cpu, upstream_cpu_s=0.05,
                       rss_baseline=10 * 2**20, rss_peak=10 * 2**20 + 64 * 1024, rss_held=10 * 2**20 + 32 * 1024,
                       server_sys_s=sys_s)


def test_analyze_pools_rounds_compares_and_judges_targets() -> None:
    scenario = load_scenario(str(REPO / "loadtest/scenarios/stream-64.toml"))
    run = ScenarioRun(scenario=scenario, targets=["direct", "gateway"], rounds=[], rounds_n=2, duration_s=1.0,
                      warmup_s=0.0)
    for i in range(2):
        run.rounds.append(_round("direct", i, [300.0] * 10, [1.0] * 10, 0.2))
        run.rounds.append(_round("gateway", i, [301.0] * 10, [2.5] * 10, 0.02 + 0.02 * i, sys_s=0.01 + 0.005 * i))
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    gateway = result["targets"]["gateway"]
    assert gateway["requests"] == 20 and gateway["rps"] == 10.0
    assert gateway["server_cpu_us_per_request"] == pytest.approx(3000.0)
    assert gateway["server_sys_share"] == pytest.approx(0.025 / 0.06)  # pooled over the rounds (not 0.4375)
    assert result["targets"]["direct"]["server_sys_share"] is None  # not read: no share
    assert gateway["mem_per_stream_kb"] == pytest.approx(1.0)  # 64 KiB over 64 connections
    assert gateway["mem_held_per_stream_kb"] == pytest.approx(0.5)  # the window's median: 32 KiB
    assert result["comparisons"]["gateway"]["added_ttft_ms"]["p50"] == pytest.approx(1.5)
    verdicts = {v["metric"]: v["met"] for v in result["verdicts"]}
    assert verdicts == {"added_ttft_p50_ms": True, "added_ttft_p99_ms": True, "gateway_cpu_us": False}
    table = markdown(result)
    assert "| gateway |" in table and "**no**" in table
    assert "| 3,000 (42%) |" in table and "server CPU µs/req (sys)" in table
    del gateway["server_sys_share"]  # a result written before the share existed
    assert "| 3,000 |" in markdown(result)


def test_a_system_time_the_total_cannot_hold_gives_no_share() -> None:
    # With --workers, a worker restarted between the two reads leaves deltas that make no
    # sense together: no share rather than one below 0 % or above 100 %.
    scenario = load_scenario(str(REPO / "loadtest/scenarios/stream-64.toml"))
    run = ScenarioRun(scenario=scenario, targets=["gateway"], rounds=[], rounds_n=1, duration_s=1.0, warmup_s=0.0)
    run.rounds.append(_round("gateway", 0, [301.0] * 10, [2.5] * 10, 0.03, sys_s=0.05))
    assert analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})["targets"]["gateway"][
        "server_sys_share"] is None
    run.rounds[0] = _round("gateway", 0, [301.0] * 10, [2.5] * 10, 0.03, sys_s=-0.01)
    assert analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})["targets"]["gateway"][
        "server_sys_share"] is None


def test_the_floors_are_measured_but_never_judged_as_the_gateway() -> None:
    # --stock-floor adds Hypercorn alone with its own I/O beside the floor: both are
    # compared with direct, and neither is taken for the gateway the targets judge.
    scenario = load_scenario(str(REPO / "loadtest/scenarios/stream-64.toml"))
    run = ScenarioRun(scenario=scenario, targets=["direct", "floor-stock", "floor", "gateway"], rounds=[],
                      rounds_n=1, duration_s=1.0, warmup_s=0.0)
    run.rounds.append(_round("direct", 0, [300.0] * 10, [1.0] * 10, 0.2))
    run.rounds.append(_round("floor-stock", 0, [300.0] * 10, [1.2] * 10, 0.05))
    run.rounds.append(_round("floor", 0, [300.0] * 10, [1.1] * 10, 0.04))
    run.rounds.append(_round("gateway", 0, [301.0] * 10, [2.5] * 10, 0.03))
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    assert result["comparisons"]["floor-stock"]["added_ttft_ms"]["p50"] == pytest.approx(0.2)
    assert result["targets"]["floor-stock"]["server_cpu_us_per_request"] == pytest.approx(5000.0)
    verdicts = {v["metric"]: v["met"] for v in result["verdicts"]}
    assert verdicts == {"added_ttft_p50_ms": True, "added_ttft_p99_ms": True, "gateway_cpu_us": False}
    cpu = next(v for v in result["verdicts"] if v["metric"] == "gateway_cpu_us")
    assert cpu["value"] == pytest.approx(3000.0)  # the gateway's, not a floor's
    assert not any("floor" in v["target"] for v in result["verdicts"])


def test_the_outputs_are_json_markdown_and_a_png_redrawable_from_the_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the bench extra; `make` installs it
    scenario = load_scenario(str(REPO / "loadtest/scenarios/stream-64.toml"))
    run = ScenarioRun(scenario=scenario, targets=["direct", "gateway"], rounds=[], rounds_n=1, duration_s=1.0,
                      warmup_s=0.0)
    run.rounds.append(_round("direct", 0, [300.0] * 10, [1.0] * 10, 0.2))
    run.rounds.append(_round("gateway", 0, [301.0] * 10, [2.5] * 10, 0.03))
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    paths = write_outputs(result, tmp_path, "20260101-000000")
    assert sorted(paths) == ["json", "md", "png"]
    assert paths["png"].name == "20260101-000000-stream-64.png"
    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    again = tmp_path / "again.png"
    assert write_chart(json.loads(paths["json"].read_text(encoding="utf-8")), again)
    assert again.read_bytes().startswith(b"\x89PNG")
    assert "| gateway |" in paths["md"].read_text(encoding="utf-8")


def test_memory_per_stream_counts_from_the_idle_process_to_its_highest_round() -> None:
    # As measured on 2026-12-07: the first round grows the process part of the way, the
    # second, from a higher start, takes it to its full size. From each round's own start
    # the figure was the first round's (less); from the idle process it is the whole growth.
    scenario = load_scenario(str(REPO / "loadtest/scenarios/stream-64.toml"))  # 64 streams
    run = ScenarioRun(scenario=scenario, targets=["gateway"], rounds=[], rounds_n=2, duration_s=1.0, warmup_s=0.0)
    mib = 2**20
    for index, (base, peak, held) in enumerate(((48 * mib, 60 * mib, 59 * mib), (59 * mib, 64 * mib, 63 * mib))):
        r = _round("gateway", index, [300.0] * 10, [1.0] * 10, 0.03)
        r.rss_baseline, r.rss_peak, r.rss_held, r.rss_start = base, peak, held, 48 * mib
        run.rounds.append(r)
    gateway = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})["targets"]["gateway"]
    assert gateway["mem_per_stream_kb"] == pytest.approx(16 * 1024 / 64)  # 64 - 48 MiB over 64 streams
    assert gateway["mem_held_per_stream_kb"] == pytest.approx(15 * 1024 / 64)
    assert gateway["mem_round_growth_kb"] == pytest.approx(12 * 1024 / 64)  # the former measure: round 1's rise


def test_the_results_name_the_interpreter_that_ran_them() -> None:
    machine = machine_info()
    assert machine["python_executable"] == os.path.realpath(sys.executable)
    assert machine["python_build"]  # its build tag and date: two builds of one version differ in speed
    scenario = load_scenario(str(REPO / "loadtest/scenarios/sequential.toml"))
    run = ScenarioRun(scenario=scenario, targets=["direct"], rounds=[], rounds_n=1, duration_s=1.0, warmup_s=0.0)
    run.rounds.append(_round("direct", 0, [1.0] * 10, [0.5] * 10, 0.01))
    assert f"({machine['python_executable']})" in markdown(analyze(run, machine=machine))


needs_valgrind = pytest.mark.skipif(shutil.which("valgrind") is None,
                                    reason="valgrind is not installed (scripts/system-deps installs it)")


def run_loadtest_script(name: str, *args: str) -> str:
    """Run ``loadtest/<name>`` with this interpreter; its standard output, once it has succeeded."""
    run = subprocess.run([sys.executable, str(REPO / "loadtest" / name), *args], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@needs_valgrind
def test_bench_app_counts_the_gateways_instructions_per_request_under_callgrind() -> None:
    # loadtest/bench_app.py --instructions: the A/B measure of the gateway's own code
    # (docs/benchmarks-history.md). A small run end to end: valgrind, the counter switched on
    # only around the measured requests, the dumps read back.
    stdout = run_loadtest_script("bench_app.py", "-n", "30", "--concurrency", "1", "--instructions")
    pool = re.search(r"pool alone: .* ([\d,]+) instructions", stdout)
    app = re.search(r"concurrency +1: .* ([\d,]+) instructions \(30 requests, 0 errors\)", stdout)
    assert pool and app, stdout
    per_request = int(app[1].replace(",", ""))
    # Counted over the requests only: a whole Python start-up would be tens of millions.
    assert 100_000 < int(pool[1].replace(",", "")) < per_request < 5_000_000
    assert "usage records written: 60" in stdout  # the warm-up's 30 and the measured 30


@needs_valgrind
def test_count_process_counts_the_whole_gateways_instructions_per_request() -> None:
    # loadtest/count_process.py: the mock natively, `trioproxy serve` under callgrind, counted only
    # around the measured requests (Hypercorn included), the processes stopped at the end.
    stdout = run_loadtest_script("count_process.py", "--small", "-n", "20", "--warmup", "2")
    counted = re.search(r": ([\d,]+) instructions per small answer \(20 counted, the whole gateway process\)", stdout)
    assert counted, stdout
    # More than the gateway's own code (~0.74M, bench_app.py), far less than a Python start-up.
    assert 800_000 < int(counted[1].replace(",", "")) < 10_000_000


def test_count_usage_records_counts_lines_of_every_usage_file(tmp_path: Path) -> None:
    (tmp_path / "usage-20260101.jsonl").write_bytes(b"{}\n{}\n")
    (tmp_path / "usage-20260102.1.jsonl").write_bytes(b"{}\n")
    (tmp_path / "other.txt").write_bytes(b"x\n")
    assert count_usage_records(tmp_path) == 3
    assert count_usage_records(tmp_path / "missing") == 0


# --- end to end: a tiny round against the real mock (correctness only) ------------------------


async def test_a_small_round_against_the_mock_is_counted_exactly(start_mock: StartMock) -> None:
    with trio.fail_after(30):
        mock = await start_mock(kind="openai", models=("*",), ttft_ms=0.0)
        address = parse_target(f"http://127.0.0.1:{mock.port}")
        for stream in (True, False):
            load = Load(connections=4, stream=stream, tokens=8, token_delay_ms=1.0, max_requests=20)
            plan = LoadPlan.from_scenario(load, duration_s=20.0, warmup_s=0.0)
            result = await run_load(address, build_request(load, address.host_header), plan)
            rec = result.recorder
            assert rec.count == 20 == result.sent_total
            assert rec.error_counts() == {} and rec.statuses == {200: 20}
            assert all(t > 0 for t in rec.total_ms)
            if stream:
                assert all(0 < t <= total for t, total in zip(rec.ttft_ms, rec.total_ms))
                assert len(rec.gaps_ms) == 20 * 7  # every token after the first of each stream
            else:
                assert all(math.isnan(t) for t in rec.ttft_ms) and rec.gaps_ms == []
        assert mock.statistics().connections == 8  # opened up front, kept alive, never reopened


async def test_the_floor_app_streams_the_mocks_events_on_time_and_stops_cleanly() -> None:
    """``loadtest/floor_app.py``, the bench's floor row: real Hypercorn, a real client.

    Its streams are paced by one clock task; a client that leaves mid-stream must not
    disturb the others, and SIGINT stops it gracefully (exit status 0).
    """
    import httpx

    stream_body = {"model": "m", "stream": True, "messages": []}
    with trio.fail_after(60):
        async with floor_app() as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                whole = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})

                async def leave_early() -> None:  # reads the role event, then hangs up
                    async with client.stream("POST", "/v1/chat/completions", json=stream_body,
                                             headers={"x-mock-tokens": "100", "x-mock-token-delay-ms": "5"}) as r:
                        async for _ in r.aiter_raw():
                            return

                async def full(results: list[bytes]) -> None:
                    r = await client.post("/v1/chat/completions", json=stream_body,
                                          headers={"x-mock-tokens": "5", "x-mock-token-delay-ms": "2"})
                    assert r.status_code == 200
                    results.append(r.content)

                results: list[bytes] = []
                async with trio.open_nursery() as streams:
                    streams.start_soon(leave_early)
                    for _ in range(3):
                        streams.start_soon(full, results)
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 16
    assert len(results) == 3
    for body in results:
        events = [e for e in body.split(b"\n\n") if e]
        assert len(events) == 1 + 5 + 2  # the role chunk, 5 content events, the finish event and [DONE]
        assert events[-1] == b"data: [DONE]"
        assert all(b'"content":" tok"' in e for e in events[1:6])


def _floor_module() -> Any:
    spec = importlib.util.spec_from_file_location("floor_app", REPO / "loadtest" / "floor_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_floor_clock_wakes_each_stream_at_its_due_time_and_skips_a_cancelled_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = _floor_module()._Clock()
    woke: list[tuple[str, float]] = []

    async def wait(name: str, due: float) -> None:
        await clock.wait_until(due)
        woke.append((name, trio.current_time()))

    with trio.fail_after(1000):  # virtual seconds: a lost wake-up fails instead of hanging
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clock.run)
            t0 = trio.current_time()
            nursery.start_soon(wait, "late", t0 + 10)
            with trio.move_on_after(3):  # cancelled while parked: the clock must drop it
                await clock.wait_until(t0 + 5)
            nursery.start_soon(wait, "early", t0 + 4)  # earlier than what the clock sleeps for
            await trio.sleep(20)
            nursery.cancel_scope.cancel()
    assert [name for name, _ in woke] == ["early", "late"]
    assert [at - t0 for _, at in woke] == pytest.approx([4, 10])


async def test_streams_cut_or_too_slow_are_errors_and_the_others_still_count(start_mock: StartMock) -> None:
    """The shared stream reader's failure paths: a body cut by EOF, a body past the timeout."""
    from trioproxy.mock import FaultPlan

    with trio.fail_after(30):
        cut = await start_mock(kind="openai", models=("*",), ttft_ms=0.0,
                               fault=FaultPlan("cut", every=2, cut_after_tokens=3))
        slow = await start_mock(kind="openai", models=("*",), ttft_ms=0.0)
        load = Load(connections=2, stream=True, tokens=8, token_delay_ms=1.0, max_requests=10)
        address = parse_target(f"http://127.0.0.1:{cut.port}")
        result = await run_load(address, build_request(load, address.host_header),
                                LoadPlan.from_scenario(load, duration_s=20.0, warmup_s=0.0))
        assert result.recorder.error_counts() == {"incomplete": 5}  # every 2nd of 10, cut after 3 tokens
        assert result.recorder.count == 10
        assert cut.statistics().connections == 2 + 4  # a cut connection is replaced (the 10th's: no request left)
        load = attrs.evolve(load, max_requests=2, request_timeout_s=0.5, token_delay_ms=2000.0)  # (sent as x-mock-*)
        address = parse_target(f"http://127.0.0.1:{slow.port}")
        result = await run_load(address, build_request(load, address.host_header),
                                LoadPlan.from_scenario(load, duration_s=0.1, warmup_s=0.0))
        assert result.recorder.error_counts() == {"timeout": 2}
        assert all(t > 0 for t in result.recorder.ttft_ms)  # the first token came before the timeout


async def test_a_streamed_round_ends_when_its_requests_do_not_at_the_hard_deadline(start_mock: StartMock) -> None:
    # The stream reader runs until the workers are done. Were it left to the round's hard
    # deadline (window + request timeout 30 s + grace), this would take over 30 s: the bound
    # below is that deadline's, not a speed limit (the round itself takes about a second).
    mock = await start_mock(kind="openai", models=("*",), ttft_ms=0.0)
    address = parse_target(f"http://127.0.0.1:{mock.port}")
    load = Load(connections=4, stream=True, tokens=8, token_delay_ms=1.0, request_timeout_s=30.0)
    with trio.fail_after(25):
        result = await run_load(address, build_request(load, address.host_header),
                                LoadPlan.from_scenario(load, duration_s=0.3, warmup_s=0.0))
    rec = result.recorder
    assert rec.count > 0 and rec.error_counts() == {}
    assert all(0 < ttft <= total for ttft, total in zip(rec.ttft_ms, rec.total_ms))
