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
    assert "direct 10%, 0.00 / 3.64 / 4.00" in text
    closed = ScenarioRun(scenario=load_scenario("sequential"), targets=["direct"], rounds=[], rounds_n=1,
                         duration_s=1.0, warmup_s=0.0)
    closed.rounds.append(_round("direct", 0, [1.0] * 10, [0.5] * 10, 0.01))
    result = analyze(closed, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    assert result["targets"]["direct"]["late_ms"] is None and "Open loop" not in markdown(result)


async def test_max_requests_stops_an_open_loop_at_exactly_that_many(start_mock: StartMock) -> None:
    # Workers asleep until their next due time when the limit is reached must not send it.
    with trio.fail_after(30):
        mock = await start_mock(kind="openai", models=("*",), ttft_ms=0.0)
        address = parse_target(f"http://127.0.0.1:{mock.port}")
        load = Load(connections=8, stream=False, tokens=2, rate=100.0, max_requests=10)
        result = await run_load(address, build_request(load, address.host_header),
                                LoadPlan.from_scenario(load, duration_s=20.0, warmup_s=0.0))
    assert result.recorder.count == 10 == len(result.recorder.late_ms)
    assert result.window_s == pytest.approx(0.09)  # request 10 was due at 90 ms


async def test_a_target_that_cannot_keep_up_gets_every_due_request_recorded(start_mock: StartMock) -> None:
    # One connection due every 10 ms, answers of at least 300 ms, a 1 s timeout: the backlog
    # grows by ~0.29 s a request. Requests held past their timeout are timeouts, whether
    # they were sent or not, and every one of the 50 due in the window is recorded.
    with trio.fail_after(30):
        mock = await start_mock(kind="openai", models=("*",), ttft_ms=0.0)
        address = parse_target(f"http://127.0.0.1:{mock.port}")
        load = Load(connections=1, stream=False, tokens=2, ttft_ms=300.0, rate=100.0, request_timeout_s=1.0)
        result = await run_load(address, build_request(load, address.host_header),
                                LoadPlan.from_scenario(load, duration_s=0.495, warmup_s=0.0))
    rec = result.recorder
    assert rec.count == 50 == len(rec.late_ms)
    assert set(rec.error_counts()) == {"timeout"}
    assert rec.error_counts()["timeout"] >= 40
    assert all(total <= 1000.0 + 50.0 for total in rec.total_ms)  # none waits past its timeout (+ a margin)


async def test_an_open_loop_against_a_refusing_port_is_paced_by_its_schedule() -> None:
    import socket

    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        address = parse_target(f"http://127.0.0.1:{bound.getsockname()[1]}")
        load = Load(connections=4, stream=False, rate=1000.0)
        with trio.fail_after(30):
            result = await run_load(address, build_request(load, address.host_header),
                                    LoadPlan.from_scenario(load, duration_s=0.1995, warmup_s=0.0))
    assert result.recorder.count == 200 == result.sent_total
    assert result.recorder.error_counts() == {"connect": 200}
    # Closed loop backs off 50 ms after each refusal: a connection's 50 due requests would
    # then end at least 49 x 50 ms = 2.45 s after the window opened. Paced by the schedule,
    # the last is tried when due, at 0.2 s.
    assert max(result.recorder.ends) < 2.0


def test_a_target_that_did_not_keep_the_schedule_is_named() -> None:
    scenario = load_scenario("open-loop-200")
    run = ScenarioRun(scenario=scenario, targets=["direct", "gateway", "floor"], rounds=[], rounds_n=1,
                      duration_s=1.0, warmup_s=0.0)
    direct = _round("direct", 0, [2000.0] * 10, [0.5] * 10, 0.01)  # long answers, but never held up: kept up
    direct.result.recorder.late_ms.extend([0.0] * 10)
    gateway = _round("gateway", 0, [1.0] * 10, [0.5] * 10, 0.01)
    gateway.result.recorder.late_ms.extend([0.0] * 8 + [3.0, 6.0])  # 2 of 10 waited for their connection
    floor = _round("floor", 0, [1.0] * 10, [0.5] * 10, 0.01)
    floor.result.recorder.late_ms.extend([0.0] * 10)
    floor.result.recorder.errors[:3] = ["timeout"] * 3  # 3 of 10 failed
    run.rounds += [direct, gateway, floor]
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    targets = result["targets"]
    assert (targets["direct"]["ok_rps"], targets["gateway"]["ok_rps"], targets["floor"]["ok_rps"]) == (10, 10, 7)
    assert (targets["direct"]["held_share"], targets["gateway"]["held_share"]) == (0.0, 0.2)
    text = markdown(result)
    assert "Answered without error: direct 10/s; gateway 10/s; floor 7/s" in text
    assert "gateway 20%, 0.00 / 5.73 / 6.00" in text
    assert "Note: did not keep the schedule (over 1 % of requests held up, or over 2 % failed): gateway, floor." in text


def test_any_scenario_runs_open_loop_with_a_rate_given_on_the_command_line() -> None:
    from trioproxy.bench.scenarios import with_rate

    s = with_rate(load_scenario("stream-64"), 50.0)
    assert s.load.rate == 50.0 and s.load.ramp_s == 0.0  # the schedule spreads the connections
    assert s.description.endswith("[--rate: open loop at 50 requests/s]")
    assert s.load.connections == 64 and s.load.stream  # the rest of the load as it was
    for bad in (0.0, -5.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="--rate: expected a positive number"):
            with_rate(s, bad)


def test_bench_rejects_a_bad_rate_before_starting_anything() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "trioproxy", "bench", "-s", "sequential", "--rate", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--rate: expected a positive number of requests per second" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_issues_closed_loop_targets_are_not_judged_at_a_rate() -> None:
    from trioproxy.bench.scenarios import with_rate

    for scenario, judged in ((load_scenario("sequential"), True), (with_rate(load_scenario("sequential"), 50.0), False)):
        run = ScenarioRun(scenario=scenario, targets=["direct", "gateway"], rounds=[], rounds_n=1, duration_s=1.0,
                          warmup_s=0.0)
        run.rounds.append(_round("direct", 0, [1.0] * 10, [0.5] * 10, 0.01))
        run.rounds.append(_round("gateway", 0, [2.0] * 10, [0.5] * 10, 0.01))
        result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
        assert bool(result["verdicts"]) is judged
        assert ("not judged open loop" in markdown(result)) is not judged
