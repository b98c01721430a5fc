"""The bench's loopback round trip (``trioproxy.bench.hop``): real sockets to a real echo process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trioproxy.bench import hop
from trioproxy.bench.report import analyze, markdown
from trioproxy.bench.runner import ScenarioRun
from trioproxy.bench.scenarios import load_scenario

from .test_bench import REPO, _round

CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def test_round_trips_to_a_pinned_echo_are_timed_one_by_one() -> None:
    times = hop.round_trips(CORES[0] if CORES else None, n=50)
    assert len(times) == 50
    assert all(t > 0 for t in times)


def test_round_trips_stop_when_the_budget_is_spent() -> None:
    # The budget is checked after each round trip: none left means exactly one.
    assert len(hop.round_trips(None, n=1000, budget_s=0.0)) == 1


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores to cross")
def test_loopback_measures_one_core_and_across_two() -> None:
    result = hop.loopback(CORES[0], CORES[1])
    for key in ("same_core", "across_cores"):
        assert 0 < result[key]["count"] <= hop.ROUND_TRIPS  # fewer if the time budget ran out
        assert 0 < result[key]["p50"] <= result[key]["p99"]
    assert hop.loopback(CORES[0], CORES[0])["across_cores"] is None


def _sys(tmp_path: Path, driver: str | None, poll_ns: str | None = None) -> Path:
    if driver is not None:
        (tmp_path / "devices/system/cpu/cpuidle").mkdir(parents=True)
        (tmp_path / "devices/system/cpu/cpuidle/current_driver").write_text(driver + "\n")
    if poll_ns is not None:
        (tmp_path / "module/haltpoll/parameters").mkdir(parents=True)
        (tmp_path / "module/haltpoll/parameters/guest_halt_poll_ns").write_text(poll_ns + "\n")
    return tmp_path


def test_cpuidle_names_the_driver_and_a_guests_halt_polling(tmp_path: Path) -> None:
    assert hop.cpuidle(_sys(tmp_path / "a", "haltpoll", "0")) == "haltpoll, halt polling 0 ns"
    assert hop.cpuidle(_sys(tmp_path / "b", "haltpoll")) == "haltpoll"
    assert hop.cpuidle(_sys(tmp_path / "c", "intel_idle")) == "intel_idle"
    assert hop.cpuidle(_sys(tmp_path / "d", None)) is None


def test_the_report_header_gives_the_round_trips() -> None:
    scenario = load_scenario(str(REPO / "loadtest/scenarios/sequential.toml"))
    run = ScenarioRun(scenario=scenario, targets=["direct"], rounds=[], rounds_n=1, duration_s=1.0, warmup_s=0.0)
    run.rounds.append(_round("direct", 0, [1.0] * 10, [0.5] * 10, 0.01))
    machine = {"cores": 2, "cpu_model": "test", "python": "3.11"}
    assert "Loopback" not in markdown(analyze(run, machine=machine))
    rt = {"count": 2000, "mean": 1.0, "p50": 22.4, "p90": 30.0, "p99": 41.6, "max": 90.0, "min": 15.0}
    across = {**rt, "p50": 145.2, "p99": 957.0}
    machine["loopback_us"] = {"same_core": rt, "across_cores": across, "cpuidle": "haltpoll, halt polling 0 ns"}
    assert ("Loopback round trip p50 (p99): 22 µs (42) on one core, 145 µs (957) across the two cores "
            "(idle: haltpoll, halt polling 0 ns).") in markdown(analyze(run, machine=machine))


def test_a_core_the_echo_may_not_use_leaves_that_side_unmeasured() -> None:
    # The echo pins itself and exits when it may not; the bench runs on without the number.
    assert hop.loopback(0, 4095)["across_cores"] is None
