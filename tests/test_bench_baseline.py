"""``trioproxy bench --baseline REV``: a revision's gateway measured in the same rounds as this one.

The unpacking and its checks against real git repositories (this one, and small ones
made here); the report's comparison exactly; and one short end-to-end run in which
both gateways serve real requests. Nothing here asserts a speed.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trioproxy.bench.baseline import Baseline, prepare
from trioproxy.bench.loadgen import Recorder, RoundResult
from trioproxy.bench.processes import BenchError, open_fleet
from trioproxy.bench.report import analyze, markdown
from trioproxy.bench.runner import BenchOptions, ScenarioRun, TargetRound, count_usage_records, run_scenario
from trioproxy.bench.scenarios import load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (REPO / ".git").exists(), reason="--baseline needs a git checkout")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
                          check=True, capture_output=True, text=True).stdout


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
    child = subprocess.run(baseline.argv("-m", "trioproxy", "--help"), env=baseline.env(), cwd=REPO,
                           capture_output=True, text=True, check=False)
    assert child.returncode == 0 and "serve" in child.stdout
    where = subprocess.run(baseline.argv("-c", "import trioproxy; print(trioproxy.__file__)"), env=baseline.env(),
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(baseline.source)  # -P: the working directory's copy does not win


def test_an_older_revision_is_unpacked_as_it_was_then(tmp_path: Path) -> None:
    repo = _repo_with(tmp_path, {"trioproxy/__init__.py": "VERSION = 'old'\n"})
    old = _git(repo, "rev-parse", "HEAD").strip()
    (repo / "trioproxy/__init__.py").write_text("VERSION = 'new'\n", encoding="utf-8")
    _git(repo, "commit", "-q", "-am", "new")
    baseline = prepare("HEAD~1", tmp_path / "run", repo=repo)
    assert baseline.commit == old and baseline.revision == "HEAD~1"
    assert (baseline.source / "trioproxy/__init__.py").read_text(encoding="utf-8") == "VERSION = 'old'\n"


@pytest.mark.parametrize("revision", ["no-such-branch", "0" * 40, "--help", "-x"])
def test_a_revision_that_names_no_commit_is_refused_by_name(tmp_path: Path, revision: str) -> None:
    with pytest.raises(BenchError, match=re.escape(revision)):
        prepare(revision, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing unpacked


def test_outside_a_git_checkout_it_says_so(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="needs a git checkout"):
        prepare("HEAD", tmp_path / "run", repo=tmp_path)


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


def _round(target: str, index: int, total_ms: float, cpu_s: float) -> TargetRound:
    rec = Recorder()
    for i in range(10):
        rec.add(i * 0.1, i * 0.1 + total_ms / 1000, 0.1, math.nan, total_ms, None, 200)
    result = RoundResult(recorder=rec, window_s=1.0, sent_total=10, client_cpu_s=0.1, window_start=0.0, window_end=1.0)
    return TargetRound(target=target, index=index, result=result, server_cpu_s=cpu_s, upstream_cpu_s=0.05,
                       rss_baseline=None, rss_peak=None)


def test_each_gateway_is_compared_with_its_twin_round_by_round() -> None:
    scenario = load_scenario(str(REPO / "loadtest/scenarios/sequential.toml"))
    twin = "gateway@1a2b3c4"
    run = ScenarioRun(scenario=scenario, targets=["direct", "gateway", twin], rounds=[], rounds_n=2, duration_s=1.0,
                      warmup_s=0.0)
    run.baseline = Baseline(revision="HEAD~1", commit="1a2b3c4" + "0" * 33, source=Path("/tmp/x"))
    run.baselines = {"gateway": twin}
    for i, (mine, theirs) in enumerate([(0.008, 0.010), (0.010, 0.010)]):  # 800/1,000 µs against 1,000 each
        run.rounds.append(_round("direct", i, 0.3, 0.002))
        run.rounds.append(_round("gateway", i, 1.0, mine))
        run.rounds.append(_round(twin, i, 1.5, theirs))
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
    assert f"| gateway | {twin} | 900 vs 1,000 | 0.900 (0.800–1.000) | 1.000 | -0.50 / -0.50 / -0.50 |" in table
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
description = "a few small requests through this gateway and the committed one"
mode = "ab"
floor = false
[load]
connections = 2
stream = true
tokens = 4
[run]
rounds = 2
duration_s = 0.4
warmup_s = 0.1
"""


async def test_both_gateways_serve_the_same_rounds_and_log_every_request(tmp_path: Path) -> None:
    baseline = prepare("HEAD", tmp_path)
    scenario = parse_scenario(_SCENARIO)
    options = BenchOptions(pin=False, baseline=baseline)
    (tmp_path / "logs").mkdir()
    async with open_fleet(tmp_path / "logs", pin=False) as fleet:
        run = await run_scenario(scenario, options, fleet, tmp_path)
    twin = "gateway" + baseline.suffix
    assert run.targets == ["direct", "gateway", twin]
    assert [r.target for r in run.rounds] == ["direct", "gateway", twin] * 2  # interleaved, round by round
    for r in run.rounds:
        assert r.result.recorder.count > 0 and not r.result.recorder.error_counts()
    assert run.commands[twin][0] == f"PYTHONPATH={baseline.source}"
    assert run.commands[twin][1:3] == [sys.executable, "-P"]
    assert run.commands["gateway"][0] == sys.executable
    for label in ("gateway", twin):  # each its own usage log, complete once stopped
        assert run.usage[label]["usage_records"] == run.usage[label]["requests_sent"] > 0
    assert count_usage_records(tmp_path / f"usage-{twin}") == run.usage[twin]["usage_records"]
    result = analyze(run)
    assert result["baseline"]["pairs"][0]["baseline"] == twin
    assert len(result["baseline"]["pairs"][0]["cpu_ratio_rounds"]) == 2


def test_the_command_line_refuses_a_baseline_with_a_gateway_it_did_not_start() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trioproxy", "bench", "-s", "sequential", "--baseline", "HEAD",
         "--target-gateway", "http://127.0.0.1:9"], capture_output=True, text=True, check=False, cwd=REPO, timeout=60,
    )
    assert done.returncode == 2 and "does not go with --target-gateway" in done.stderr
