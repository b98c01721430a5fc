"""``trioproxy bench --baseline REV``: a revision's gateway measured in the same rounds as this one.

The unpacking and its checks against real git repositories (this one, and small ones
made here); the report's comparison exactly; and one short end-to-end run in which
both gateways serve real requests. Nothing here asserts a speed.
"""

from __future__ import annotations

import json
import math
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trioproxy.bench.baseline import Baseline, resolve, this_checkout, unpack
from trioproxy.bench.loadgen import Recorder, RoundResult
from trioproxy.bench.processes import BenchError, open_fleet
from trioproxy.bench.report import analyze, markdown
from trioproxy.bench.runner import (
    BenchOptions,
    ScenarioRun,
    Target,
    TargetRound,
    round_order,
    count_usage_records,
    run_scenario,
)
from trioproxy.bench.wire import parse_target
from trioproxy.bench.scenarios import load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (REPO / ".git").exists(), reason="--baseline needs a git checkout")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
                          check=True, capture_output=True, text=True).stdout


def prepare(revision: str, into: Path, *, repo: Path = REPO) -> Baseline:
    return unpack(revision, resolve(revision, repo=repo), into, repo=repo)


def _repo_with(tmp_path: Path, files: dict[str, str]) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text, encoding="utf-8")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "test")
    return repo


# --- unpacking ---------------------------------------------------------------------------


def test_a_revisions_package_is_unpacked_and_a_child_imports_it_from_there(tmp_path: Path) -> None:
    baseline = prepare("HEAD", tmp_path)
    head = _git(REPO, "rev-parse", "HEAD").strip()
    assert baseline.commit == head and baseline.suffix == "@" + head[:7]
    assert baseline.source.is_relative_to(tmp_path)
    # The committed bytes, not this checkout's (which may have uncommitted changes).
    for name in ("__init__.py", "app.py", "bench/baseline.py"):
        committed = subprocess.run(["git", "-C", str(REPO), "show", f"HEAD:trioproxy/{name}"],
                                   capture_output=True, check=False).stdout
        if committed:  # (bench/baseline.py is new in the commit that adds it)
            assert (baseline.source / "trioproxy" / name).read_bytes() == committed
    child = subprocess.run([sys.executable, "-m", "trioproxy", "--help"], env=baseline.env(), cwd=REPO,
                           capture_output=True, text=True, check=False)
    assert child.returncode == 0 and "serve" in child.stdout
    # From the checkout's directory, where `python -m` / `-c` would find its own trioproxy first;
    # and in a process that one starts (serve --workers N): the environment carries over.
    where = "import trioproxy; print(trioproxy.__file__)"
    grandchild = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {where!r}], check=True)"
    for code in (where, grandchild):
        out = subprocess.run([sys.executable, "-c", code], env=baseline.env(), cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        assert Path(out).is_relative_to(baseline.source), code


def test_the_users_pythonpath_is_kept_after_the_baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    baseline = Baseline(revision="HEAD", commit="0" * 40, source=tmp_path / "src")
    monkeypatch.setenv("PYTHONPATH", "/opt/patched")
    assert baseline.env()["PYTHONPATH"] == f"{tmp_path / 'src'}:/opt/patched"
    monkeypatch.delenv("PYTHONPATH")
    assert baseline.env_changes() == {"PYTHONPATH": str(tmp_path / "src"), "PYTHONSAFEPATH": "1"}


def test_an_older_revision_is_unpacked_as_it_was_then(tmp_path: Path) -> None:
    repo = _repo_with(tmp_path, {"trioproxy/__init__.py": "VERSION = 'old'\n"})
    old = _git(repo, "rev-parse", "HEAD").strip()
    (repo / "trioproxy/__init__.py").write_text("VERSION = 'new'\n", encoding="utf-8")
    _git(repo, "commit", "-q", "-am", "new")
    baseline = prepare("HEAD~1", tmp_path / "run", repo=repo)
    assert baseline.commit == old and baseline.revision == "HEAD~1"
    assert (baseline.source / "trioproxy/__init__.py").read_text(encoding="utf-8") == "VERSION = 'old'\n"


@pytest.mark.parametrize("revision", ["no-such-branch", "0" * 40, "--help", "-x"])
def test_a_revision_that_names_no_commit_is_refused_by_name(revision: str) -> None:
    with pytest.raises(BenchError, match=re.escape(revision)):
        resolve(revision)


@pytest.mark.parametrize(("option", "value", "said"), [
    ("--baseline", "no-such-branch", "'no-such-branch' names no commit"),
    ("--baseline-python", "/no/such/python", "cannot run /no/such/python"),
])
def test_the_command_line_refuses_a_bad_baseline_before_starting_anything(
    tmp_path: Path, option: str, value: str, said: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trioproxy", "bench", "-s", "sequential", option, value, "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, cwd=REPO, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert said in done.stderr and "Traceback" not in done.stderr
    assert "logs kept" not in done.stderr and not any(tmp_path.iterdir())


def test_outside_a_git_checkout_it_says_so(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="needs a git checkout"):
        resolve("HEAD", repo=tmp_path)


def test_a_revision_without_the_package_is_refused(tmp_path: Path) -> None:
    repo = _repo_with(tmp_path, {"README.md": "nothing here\n"})
    with pytest.raises(BenchError, match="has no trioproxy package"):
        prepare("HEAD", tmp_path / "run", repo=repo)


def test_a_package_that_does_not_import_is_refused_with_its_error(tmp_path: Path) -> None:
    repo = _repo_with(tmp_path, {"trioproxy/__init__.py": "raise ImportError('needs a newer dependency')\n"})
    with pytest.raises(BenchError, match="does not import here: ImportError: needs a newer dependency"):
        prepare("HEAD", tmp_path / "run", repo=repo)


def test_an_import_that_finds_another_trioproxy_is_refused(tmp_path: Path) -> None:
    # As an import hook ahead of PYTHONPATH would: the module the child got is not the unpacked one.
    repo = _repo_with(tmp_path, {"trioproxy/__init__.py": "__file__ = '/elsewhere/trioproxy/__init__.py'\n"})
    with pytest.raises(BenchError, match="imported trioproxy from /elsewhere"):
        prepare("HEAD", tmp_path / "run", repo=repo)


# --- the report --------------------------------------------------------------------------


def _round(target: str, index: int, total_ms: float, cpu_s: float, sys_s: float | None = None) -> TargetRound:
    rec = Recorder()
    for i in range(10):
        rec.add(i * 0.1, i * 0.1 + total_ms / 1000, 0.1, math.nan, total_ms, None, 200)
    result = RoundResult(recorder=rec, window_s=1.0, sent_total=10, client_cpu_s=0.1, window_start=0.0, window_end=1.0)
    return TargetRound(target=target, index=index, result=result, server_cpu_s=cpu_s, upstream_cpu_s=0.05,
                       rss_baseline=None, rss_peak=None, server_sys_s=sys_s)


def test_each_gateway_is_compared_with_its_twin_round_by_round() -> None:
    scenario = load_scenario(str(REPO / "loadtest/scenarios/sequential.toml"))
    twin = "gateway@1a2b3c4"
    run = ScenarioRun(scenario=scenario, targets=["direct", "gateway", twin], rounds=[], rounds_n=2, duration_s=1.0,
                      warmup_s=0.0)
    run.baseline = Baseline(revision="HEAD~1", commit="1a2b3c4" + "0" * 33, source=Path("/tmp/x"))
    run.baselines = {"gateway": twin}
    for i, (mine, theirs) in enumerate([(0.008, 0.010), (0.010, 0.010)]):  # 800/1,000 µs against 1,000 each
        run.rounds.append(_round("direct", i, 0.3, 0.002))
        run.rounds.append(_round("gateway", i, 1.0, mine, sys_s=0.002))  # 4 of 18 ms: 22 % system time
        run.rounds.append(_round(twin, i, 1.5, theirs, sys_s=0.003))  # 6 of 20 ms: 30 %
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    base = result["baseline"]
    assert base["revision"] == "HEAD~1" and base["commit"].startswith("1a2b3c4")
    [pair] = base["pairs"]
    assert pair["target"] == "gateway" and pair["baseline"] == twin
    assert pair["cpu_ratio"] == pytest.approx(0.9)
    assert pair["cpu_ratio_rounds"] == pytest.approx([0.8, 1.0])
    assert pair["rps_ratio"] == pytest.approx(1.0)
    assert pair["added_total_ms"]["p50"] == pytest.approx(-0.5)
    # The twin is a target like any other: its own row, its own comparison with direct, its own verdicts.
    assert twin in result["targets"] and twin in result["comparisons"]
    assert any(v["target"].startswith(twin + ":") for v in result["verdicts"])
    table = markdown(result)
    assert "Against the baseline, HEAD~1 (1a2b3c400000)" in table
    assert "order direct → gateway → gateway@1a2b3c4, reversed every other round; 2 cores" in table
    assert f"| gateway | {twin} | 900 (22%) vs 1,000 (30%) | 0.900 (0.800–1.000) | 1.000 | -0.50 / -0.50 / -0.50 |" in table
    assert json.loads(json.dumps(base)) == base  # (the JSON file holds exactly this)


def test_without_a_baseline_the_report_has_no_such_section() -> None:
    scenario = load_scenario(str(REPO / "loadtest/scenarios/sequential.toml"))
    run = ScenarioRun(scenario=scenario, targets=["direct", "gateway"], rounds=[], rounds_n=1, duration_s=1.0,
                      warmup_s=0.0)
    run.rounds += [_round("direct", 0, 0.3, 0.002), _round("gateway", 0, 1.0, 0.01)]
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    assert "baseline" not in result and "Against the baseline" not in markdown(result)


# --- end to end --------------------------------------------------------------------------

_SCENARIO = """
name = "baseline-smoke"
description = "a few small streams through this gateway and the committed one, two workers each"
mode = "ab"
floor = false
[[gateways]]
label = "gateway"
workers = 2
[load]
connections = 2
stream = true
tokens = 4
[run]
rounds = 2
duration_s = 0.4
warmup_s = 0.1
"""

_MARKER = "baseline-marker: imported from the unpacked revision"


async def test_both_gateways_serve_the_same_rounds_and_every_baseline_process_runs_the_revision(
    tmp_path: Path,
) -> None:
    baseline = prepare("HEAD", tmp_path)
    # Tell the unpacked copy from the checkout's: every process that imports it says so.
    init = baseline.source / "trioproxy" / "__init__.py"
    init.write_text(init.read_text() + f"\nimport sys as _s\n_s.stderr.write({_MARKER!r} + '\\n')\n")
    scenario = parse_scenario(_SCENARIO)
    options = BenchOptions(pin=False, baseline=baseline)
    logs = tmp_path / "logs"
    logs.mkdir()
    async with open_fleet(logs, pin=False) as fleet:
        run = await run_scenario(scenario, options, fleet, tmp_path)
    twin = "gateway" + baseline.suffix
    assert run.targets == ["direct", "gateway", twin]
    # Interleaved round by round, the order reversed every other round: the gateway and its
    # baseline swap places.
    assert [r.target for r in run.rounds] == ["direct", "gateway", twin, twin, "gateway", "direct"]
    for r in run.rounds:
        assert r.result.recorder.count > 0 and not r.result.recorder.error_counts()
    # The supervisor and both workers of the baseline imported the revision; none of the other's did.
    assert (logs / f"{twin}.log").read_text().count(_MARKER) == 3
    assert _MARKER not in (logs / "gateway.log").read_text()
    assert run.commands[twin][:2] == [f"PYTHONPATH={baseline.source}", "PYTHONSAFEPATH=1"]
    assert run.commands["gateway"][0] == sys.executable
    for label in ("gateway", twin):  # each its own usage log, complete once stopped
        assert run.usage[label]["usage_records"] == run.usage[label]["requests_sent"] > 0
    assert count_usage_records(tmp_path / f"usage-{twin}") == run.usage[twin]["usage_records"]
    assert run.unpinned == {"gateway", twin}
    result = analyze(run)
    assert result["baseline"]["pairs"][0]["baseline"] == twin
    assert len(result["baseline"]["pairs"][0]["cpu_ratio_rounds"]) == 2


_PY_MARKER = "baseline-python-marker: started through the other interpreter"


def _wrapper(tmp_path: Path, body: str) -> Path:
    """An "interpreter" for ``--baseline-python``: a script in front of this one."""
    path = tmp_path / "python-wrapper"
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(0o755)
    return path


async def test_another_interpreter_runs_this_checkouts_gateway_in_the_same_rounds(tmp_path: Path) -> None:
    # ``--baseline-python`` alone: this checkout's code under the other interpreter, beside
    # this one's. The wrapper marks what it starts, then runs this interpreter.
    wrapper = _wrapper(tmp_path, f'echo "{_PY_MARKER}" >&2\nexec "{sys.executable}" "$@"')
    baseline = this_checkout(str(wrapper))
    version = platform.python_version()
    assert (baseline.revision, baseline.commit, baseline.python, baseline.python_version) == (None, None, str(wrapper), version)
    assert baseline.suffix == f"@py{version}" and baseline.env()["PYTHONPATH"].split(":")[0] == str(REPO)
    scenario = parse_scenario(_SCENARIO.replace("workers = 2", "workers = 1"))
    logs = tmp_path / "logs"
    logs.mkdir()
    async with open_fleet(logs, pin=False) as fleet:
        run = await run_scenario(scenario, BenchOptions(pin=False, baseline=baseline), fleet, tmp_path)
    twin = f"gateway@py{version}"
    assert run.targets == ["direct", "gateway", twin]
    assert [r.target for r in run.rounds] == ["direct", "gateway", twin, twin, "gateway", "direct"]
    for r in run.rounds:
        assert r.result.recorder.count > 0 and not r.result.recorder.error_counts()
    assert run.commands[twin][2] == str(wrapper) and run.commands["gateway"][0] == sys.executable
    assert (logs / f"{twin}.log").read_text().count(_PY_MARKER) == 1
    assert _PY_MARKER not in (logs / "gateway.log").read_text()
    assert run.usage[twin]["usage_records"] == run.usage[twin]["requests_sent"] > 0
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": version})
    assert result["baseline"]["python"] == str(wrapper) and result["baseline"]["commit"] is None
    table = markdown(result)
    assert f"Against the baseline, under {wrapper} (Python {version}), measured in the same rounds" in table
    assert f"{twin}: this checkout's trioproxy, under {wrapper} (Python {version}), with the same profiles" in table


def test_a_revision_under_another_interpreter_is_labelled_with_both(tmp_path: Path) -> None:
    wrapper = _wrapper(tmp_path, f'exec "{sys.executable}" "$@"')
    baseline = unpack("HEAD", resolve("HEAD"), tmp_path / "run", python=str(wrapper))
    assert baseline.suffix == f"@{baseline.commit[:7]}-py{platform.python_version()}"  # type: ignore[index]
    assert baseline.interpreter == str(wrapper) and baseline.source.is_relative_to(tmp_path)
    assert baseline.describe().startswith(f"trioproxy as committed at HEAD ({baseline.commit}), under {wrapper}")


def test_an_interpreter_that_cannot_run_or_import_the_gateway_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="cannot run /no/such/python"):
        this_checkout("/no/such/python")
    # An interpreter without the gateway's dependencies (-S: no site-packages), though it
    # finds the package itself on PYTHONPATH.
    bare = _wrapper(tmp_path, f'exec "{sys.executable}" -S "$@"')
    with pytest.raises(BenchError, match=f"does not import under {bare}: ModuleNotFoundError: No module named "):
        this_checkout(str(bare))
    with pytest.raises(BenchError, match="/bin/true did not answer as a Python interpreter"):
        this_checkout("/bin/true")


def test_a_bad_interpreter_is_refused_before_anything_starts_also_with_a_revision(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trioproxy", "bench", "-s", "sequential", "--baseline", "HEAD",
         "--baseline-python", "/no/such/python", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, cwd=REPO, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot run /no/such/python" in done.stderr and "Traceback" not in done.stderr
    assert "logs kept" not in done.stderr and not any(tmp_path.iterdir())


def test_a_baseline_of_an_unpinned_variant_gets_no_noise_check_either() -> None:
    scenario = load_scenario(str(REPO / "loadtest/scenarios/throughput-workers.toml"))
    run = ScenarioRun(scenario=scenario, targets=["workers-1", "workers-2", "workers-2@1"], rounds=[], rounds_n=1,
                      duration_s=1.0, warmup_s=0.0, server_core=0, client_core=1)
    run.unpinned = {"workers-2", "workers-2@1"}
    for label in run.targets:
        r = _round(label, 0, 1.0, 0.01)
        r.core_busy = {0: 0.9, 1: 0.9}  # far more than the target's own 1 % of a core
        run.rounds.append(r)
    targets = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})["targets"]
    assert targets["workers-1"]["foreign_load_max"] > 0.5  # pinned: checked, and flagged
    assert targets["workers-2"]["foreign_load_max"] is None
    assert targets["workers-2@1"]["foreign_load_max"] is None


def _target(label: str) -> Target:
    return Target(label, parse_target("http://127.0.0.1:9"), None, None)


def test_a_gateway_and_its_baseline_swap_places_every_other_round() -> None:
    targets = [_target(x) for x in ("direct", "a", "a@1", "b", "b@1", "floor")]
    labels = [[t.label for t in round_order(targets, i)] for i in range(3)]
    assert labels == [["direct", "a", "a@1", "b", "b@1", "floor"],
                      ["floor", "b@1", "b", "a@1", "a", "direct"],
                      ["direct", "a", "a@1", "b", "b@1", "floor"]]


def test_a_steady_drift_weighs_alike_on_every_target_over_each_pair_of_rounds() -> None:
    # Each run of a target takes one unit of time and the machine slows by one unit per
    # unit: what a target measures is when it ran. With one fixed order the first target
    # would always measure least; reversed every other round, every target's sum is equal.
    targets = [_target(x) for x in ("direct", "gateway", "floor", "floor-stock")]
    measured: dict[str, int] = {t.label: 0 for t in targets}
    clock = 0
    for index in range(4):
        for target in round_order(targets, index):
            measured[target.label] += clock
            clock += 1
    assert len(set(measured.values())) == 1, measured
    assert round_order(targets[:1], 1) == targets[:1]


def _failover_round(target: str, index: int, errors_after: int) -> TargetRound:
    rec = Recorder()
    for i in range(10):  # starts at 0.0, 0.1, ... 0.9 s; the kill at 0.5 s
        err = "stream_error" if i >= 6 and i - 6 < errors_after else None
        rec.add(i * 0.1, i * 0.1 + 0.05, 0.01, 1.0, 50.0, err, 200)
    result = RoundResult(recorder=rec, window_s=1.0, sent_total=10, client_cpu_s=0.1, window_start=0.0, window_end=1.0)
    return TargetRound(target=target, index=index, result=result, server_cpu_s=0.01, upstream_cpu_s=0.01,
                       rss_baseline=None, rss_peak=None, killed_at_s=0.5)


def test_in_failover_each_gateway_has_its_own_phases_and_check() -> None:
    scenario = load_scenario(str(REPO / "loadtest/scenarios/failover.toml"))
    twin = "gateway@1a2b3c4"
    run = ScenarioRun(scenario=scenario, targets=["gateway", twin], rounds=[], rounds_n=1, duration_s=1.0,
                      warmup_s=0.0)
    run.baseline = Baseline(revision="v1", commit="1a2b3c4" + "0" * 33, source=Path("/tmp/x"))
    run.baselines = {"gateway": twin}
    run.rounds += [_failover_round("gateway", 0, 0), _failover_round(twin, 0, 3)]
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    by = result["failover_by_gateway"]
    assert by["gateway"]["phases"]["after"]["errors"] == {}
    assert by[twin]["phases"]["after"]["errors"] == {"stream_error": 3}
    assert result["failover"] == by["gateway"]
    met = {v["target"]: (v["value"], v["met"]) for v in result["verdicts"]}
    assert met["gateway: zero errors for requests started after the kill"] == (0, True)
    assert met[f"{twin}: zero errors for requests started after the kill"] == (3, False)
    table = markdown(result)
    assert "gateway: primary killed at 0.50 s" in table and f"{twin}: primary killed at 0.50 s" in table


def test_in_mode_compare_each_build_is_compared_with_its_own_first_variant() -> None:
    scenario = load_scenario(str(REPO / "loadtest/scenarios/telemetry-on-off.toml"))
    run = ScenarioRun(scenario=scenario, targets=["telemetry-on", "telemetry-on@1", "telemetry-off", "telemetry-off@1"],
                      rounds=[], rounds_n=1, duration_s=1.0, warmup_s=0.0)
    run.baseline = Baseline(revision="v1", commit="1" * 40, source=Path("/tmp/x"))
    run.baselines = {"telemetry-on": "telemetry-on@1", "telemetry-off": "telemetry-off@1"}
    for label in run.targets:
        run.rounds.append(_round(label, 0, 1.0, 0.01))
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    assert {label: c["versus"] for label, c in result["comparisons"].items()} == {
        "telemetry-off": "telemetry-on", "telemetry-off@1": "telemetry-on@1",
    }
    assert [(p["target"], p["baseline"]) for p in result["baseline"]["pairs"]] == [
        ("telemetry-on", "telemetry-on@1"), ("telemetry-off", "telemetry-off@1"),
    ]


def test_the_command_line_refuses_a_baseline_with_a_gateway_it_did_not_start() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trioproxy", "bench", "-s", "sequential", "--baseline", "HEAD",
         "--target-gateway", "http://127.0.0.1:9"], capture_output=True, text=True, check=False, cwd=REPO, timeout=60,
    )
    assert done.returncode == 2 and "does not go with --target-gateway" in done.stderr
