"""The bench's open loop (``[load] rate``): requests due on a schedule, latency from when due.

Real sockets against the real mock; the assertions are about the schedule and what is
counted, never about speed.
"""

from __future__ import annotations

import attrs
import pytest
import trio

from trioproxy.bench.loadgen import LoadPlan, run_load
from trioproxy.bench.report import analyze, markdown
from trioproxy.bench.runner import ScenarioRun
from trioproxy.bench.scenarios import Load, load_scenario, parse_scenario
from trioproxy.bench.wire import build_request, parse_target
from trioproxy.errors import ConfigError

from .conftest import StartMock
from .test_bench import _round

BASE = 'name = "x"\ndescription = "x"\nmode = "ab"\n[load]\nconnections = 4\nstream = false\n'


def test_a_rate_is_a_finite_number_and_not_combined_with_a_ramp() -> None:
    assert parse_scenario(BASE + "rate = 50.0\n").load.rate == 50.0
    assert parse_scenario(BASE).load.rate == 0.0  # closed loop
    with pytest.raises(ConfigError, match=r"\$\.load\.rate"):
        parse_scenario(BASE + "rate = -1.0\n")
    with pytest.raises(ConfigError, match=r"\$\.load\.rate"):
        parse_scenario(BASE + "rate = inf\n")
    with pytest.raises(ConfigError, match=r"\$\.load\.ramp_s: not with a rate"):
        parse_scenario(BASE + "rate = 50.0\nramp_s = 1.0\n")


def test_the_shipped_open_loop_scenario() -> None:
    s = load_scenario("open-loop-200")
    assert s.load.rate == 200.0 and s.load.connections == 32 and s.floor


async def test_requests_due_inside_the_window_are_the_ones_counted(start_mock: StartMock) -> None:
    with trio.fail_after(30):
        mock = await start_mock(kind="openai", models=("*",), ttft_ms=0.0)
        address = parse_target(f"http://127.0.0.1:{mock.port}")
        load = Load(connections=4, stream=False, tokens=4, rate=200.0)
        # Due every 5 ms (request j at j/200 s); the window's edges fall between two due times.
        plan = LoadPlan.from_scenario(load, duration_s=0.5, warmup_s=0.1025)
        result = await run_load(address, build_request(load, address.host_header), plan)
    rec = result.recorder
    assert rec.count == 100  # j = 21 .. 120, however fast or slow the answers came
    assert result.sent_total == 121  # and j = 0 .. 20 in the warm-up
    assert rec.error_counts() == {} and rec.statuses == {200: 100}
    assert len(rec.late_ms) == 100
    # Each connection is due every 20 ms and its answer is back long before: nothing is held
    # up, and the load generator's own timer lateness is not counted.
    assert sorted(rec.late_ms)[50] == 0.0
    assert mock.statistics().connections == 4


async def test_a_request_held_up_by_a_slow_answer_counts_the_wait_in_its_latency(start_mock: StartMock) -> None:
    with trio.fail_after(30):
        mock = await start_mock(kind="openai", models=("*",), ttft_ms=0.0)
        address = parse_target(f"http://127.0.0.1:{mock.port}")
        # One connection due every 10 ms; every answer takes at least 30 ms (x-mock-ttft-ms).
        load = Load(connections=1, stream=False, tokens=2, ttft_ms=30.0, rate=100.0)
        plan = LoadPlan.from_scenario(load, duration_s=0.095, warmup_s=0.0)
        result = await run_load(address, build_request(load, address.host_header), plan)
    rec = result.recorder
    assert rec.count == 10 and rec.error_counts() == {}
    held = rec.late_ms
    assert held[0] == 0.0
    # The queue grows by at least 20 ms per request: each is held longer than the last.
    assert all(later - earlier >= 20.0 for earlier, later in zip(held, held[1:]))
    assert all(total >= wait + 30.0 for total, wait in zip(rec.total_ms, held))
    # Closed loop, the same target shows none of that wait.
    closed = attrs.evolve(load, rate=0.0, max_requests=3)
    with trio.fail_after(30):
        result = await run_load(address, build_request(closed, address.host_header),
                                LoadPlan.from_scenario(closed, duration_s=20.0, warmup_s=0.0))
    assert result.recorder.late_ms == []
    assert max(result.recorder.total_ms) < rec.total_ms[-1]  # the last open-loop one waited over 180 ms


def test_the_report_says_open_loop_and_how_long_requests_were_held() -> None:
    scenario = load_scenario("open-loop-200")
    run = ScenarioRun(scenario=scenario, targets=["direct"], rounds=[], rounds_n=1, duration_s=1.0, warmup_s=0.0)
    r = _round("direct", 0, [1.0] * 10, [0.5] * 10, 0.01)
    r.result.recorder.late_ms.extend([0.0] * 9 + [4.0])
    run.rounds.append(r)
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    assert result["targets"]["direct"]["late_ms"]["max"] == 4.0
    text = markdown(result)
    assert "Open loop: 200 requests/s due over 32 connections" in text
    assert "direct 0.00 / 3.64 / 4.00" in text
    closed = ScenarioRun(scenario=load_scenario("sequential"), targets=["direct"], rounds=[], rounds_n=1,
                         duration_s=1.0, warmup_s=0.0)
    closed.rounds.append(_round("direct", 0, [1.0] * 10, [0.5] * 10, 0.01))
    result = analyze(closed, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    assert result["targets"]["direct"]["late_ms"] is None and "Open loop" not in markdown(result)
