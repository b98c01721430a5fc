"""From what a scenario measured to numbers: JSON, a markdown table, a PNG chart.

``analyze(run)`` is the one place where rounds are pooled and compared, so the
three outputs cannot disagree:

- per target, pooled over its rounds: requests/s (requests started in the
  windows ÷ the windows' length), errors by kind, time to headers, TTFT, gaps
  between tokens and total latency (p50/p90/p99/max), server CPU per request
  (user+sys over the windows ÷ requests), peak RSS and, for streams, memory per
  open stream: the RSS rise from just before a round to its peak ÷ connections (the
  issue's target; the JSON also has the rise to the median of the window's samples, what is
  held while every stream is open: on this guest it moved between runs as much as the peak);
- per gateway: what it adds over ``direct`` (or over the first variant, in mode
  ``compare``), percentile by percentile;
- with ``--baseline`` (or ``--baseline-python``): each gateway against its twin, as committed at
  that revision or under that interpreter (CPU and requests/s as ratios, latency percentile
  by percentile);
- the issue's targets, where the scenario has one, as met / not met;
- failover: errors and TTFT before the kill, in flight at the kill, after it,
  and TTFT over time in buckets.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

from . import hotspots
from .chart import CDF_QUANTILES, write_chart
from .probes import foreign_load
from .runner import NOISE_LIMIT, NOT_GATEWAYS, ScenarioRun, TargetRound, round_order
from .stats import Summary, added, percentile, summarize

__all__ = ["TARGETS", "analyze", "machine_info", "markdown", "write_outputs"]

#: The issue's targets, by scenario name: (metric key, comparison, limit, label).
TARGETS: dict[str, list[tuple[str, str, float, str]]] = {
    "sequential": [
        ("added_total_p50_ms", "<=", 0.45, "added latency p50 ≤ 0.45 ms"),
        ("added_total_p99_ms", "<=", 1.2, "added latency p99 ≤ 1.2 ms"),
    ],
    "throughput": [
        ("gateway_rps", ">=", 3000, "≥ 3,000 requests/s"),
        ("gateway_cpu_us", "<=", 350, "gateway CPU ≤ 350 µs/request"),
    ],
    "stream-64": [
        ("added_ttft_p50_ms", "<=", 2.0, "added TTFT p50 ≤ 2 ms"),
        ("added_ttft_p99_ms", "<=", 8.0, "added TTFT p99 ≤ 8 ms"),
        ("gateway_cpu_us", "<=", 2500, "gateway CPU ≤ 2,500 µs/stream"),
    ],
    "stream-512": [
        ("gateway_errors", "<=", 0, "zero errors"),
        ("added_ttft_p99_ms", "<=", 10.0, "added TTFT p99 ≤ 10 ms"),
        ("gateway_mem_per_stream_kb", "<=", 40, "gateway memory ≤ 40 KB per open stream"),
    ],
    "failover": [
        ("errors_after_kill", "<=", 0, "zero errors for requests started after the kill"),
    ],
    "failover-refused": [
        ("gateway_errors", "<=", 0, "zero errors"),
        ("added_ttft_p99_ms", "<=", 2.0, "extra TTFT p99 ≤ 2 ms over the fallback direct"),
    ],
    "failover-refused-16": [
        ("gateway_errors", "<=", 0, "zero errors"),
        ("added_ttft_p99_ms", "<=", 2.0, "extra TTFT p99 ≤ 2 ms over the fallback direct"),
    ],
    "hedge-slow-primary": [
        ("gateway_errors", "<=", 0, "zero errors"),
    ],
}
#: Components of a py-spy profile, matched on the leaf frame's file (first match wins).
PROFILE_GROUPS = {
    "trioproxy": ("trioproxy/",),
    "hypercorn": ("hypercorn/",),
    "h11": ("h11/",),
    "trio": ("trio/", "outcome/"),
    "loguru": ("loguru/",),
    "attrs": ("attr/", "attrs/"),
    "json": ("json/",),
}


def machine_info() -> dict[str, Any]:
    """The machine the numbers come from: cores, CPU model, kernel, Python and key libraries."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for name in ("trio", "hypercorn", "h11", "httpx"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing library is just not reported
            versions[name] = "?"
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        # Which build: the same version differs by 20-30 % in CPU per request between, say,
        # pyenv's default build and Debian's optimized one (docs/benchmarks.md).
        "python_executable": os.path.realpath(sys.executable),
        "python_build": " ".join(platform.python_build()),
        "libraries": versions,
    }


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def _cdf(values: list[float]) -> list[float]:
    ordered = sorted(v for v in values if v == v)
    return [percentile(ordered, q) for q in CDF_QUANTILES] if ordered else []


def _pooled(rounds: list[TargetRound]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"headers": [], "ttft": [], "gaps": [], "total": []}
    for r in rounds:
        rec = r.result.recorder
        out["headers"] += rec.headers_ms
        out["ttft"] += rec.ttft_ms
        out["gaps"] += rec.gaps_ms
        out["total"] += rec.total_ms
    return out


def _sum_known(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(v for v in values if v is not None)


def _target_stats(run: ScenarioRun, label: str) -> dict[str, Any]:
    rounds = [r for r in run.rounds if r.target == label]
    requests = sum(r.result.recorder.count for r in rounds)
    window = sum(r.result.window_s for r in rounds)
    errors: Counter[str] = Counter()
    for r in rounds:
        errors.update(r.result.recorder.error_counts())
    pooled = _pooled(rounds)
    server_cpu = _sum_known([r.server_cpu_s for r in rounds])
    server_sys = _sum_known([r.server_sys_s for r in rounds])
    client_cpu = sum(r.result.client_cpu_s for r in rounds)
    upstream_cpu = _sum_known([r.upstream_cpu_s for r in rounds])
    # What ran on the client's core: the load generator, plus the mock (the server itself when direct).
    client_core = client_cpu + ((server_cpu or 0.0) if label == "direct" else (upstream_cpu or 0.0))
    peaks = [r.rss_peak for r in rounds if r.rss_peak is not None]
    streams = run.scenario.load.connections
    # Memory per open stream: from the idle process, before its first round, to the highest
    # RSS of any round. Each round from its own start instead (as before 2026-12-07), a later
    # round starts from what earlier ones left and grows little, and the first does not
    # always reach the process's full size: 30-46 KB that way in one day's runs, 43-50 KB
    # from the idle process (docs/benchmarks-history.md).
    start = next((r.rss_start for r in rounds if r.rss_start is not None),
                 next((r.rss_baseline for r in rounds if r.rss_baseline is not None), None))
    helds = [r.rss_held for r in rounds if r.rss_held is not None]
    round_growth = [(r.rss_peak - r.rss_baseline) / streams for r in rounds
                    if r.rss_peak is not None and r.rss_baseline is not None]
    # Unpinned (several workers on every core): no noise check.
    spread = label in run.unpinned or any(g.label == label and g.workers > 1 for g in run.scenario.gateways)
    noise = [n for r in rounds if not spread
             and (n := foreign_load(r, server_core=run.server_core, client_core=run.client_core)) is not None]
    per_round: list[dict[str, Any]] = []
    round_rps = [r.result.recorder.count / r.result.window_s for r in rounds]
    for r in rounds:
        rec = r.result.recorder
        n = rec.count
        per_round.append({
            "round": r.index,
            "requests": n,
            "rps": n / r.result.window_s,
            "errors": sum(rec.error_counts().values()),
            "total_p50_ms": summarize(rec.total_ms).p50,
            "ttft_p50_ms": summarize(rec.ttft_ms).p50,
            "ttft_p99_ms": summarize(rec.ttft_ms).p99,
            "server_cpu_us": (r.server_cpu_s / n * 1e6) if r.server_cpu_s is not None and n else None,
            "rss_peak_mb": r.rss_peak / 2**20 if r.rss_peak is not None else None,
            "rss_baseline_mb": r.rss_baseline / 2**20 if r.rss_baseline is not None else None,
            "rss_held_mb": r.rss_held / 2**20 if r.rss_held is not None else None,
            "core_busy": {str(k): v for k, v in sorted(r.core_busy.items())},
        })
    return {
        "requests": requests,
        "window_s": window,
        "rps": requests / window if window else math.nan,
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "error_rate": sum(errors.values()) / requests if requests else math.nan,
        "statuses": dict(sum((r.result.recorder.statuses for r in rounds), Counter())),
        "headers_ms": summarize(pooled["headers"]).as_dict(),
        "ttft_ms": summarize(pooled["ttft"]).as_dict(),
        "gap_ms": summarize(pooled["gaps"]).as_dict(),
        "total_ms": summarize(pooled["total"]).as_dict(),
        # Open loop: "rps" is the rate offered (requests due in the windows); this is the
        # part of it answered without error (whenever the answer ended).
        "ok_rps": (requests - sum(errors.values())) / window if run.scenario.load.rate and window else None,
        # Open loop: the share of requests whose connection was still busy when they were due.
        "held_share": (sum(1 for r in rounds for v in r.result.recorder.late_ms if v > 0) / requests
                       if run.scenario.load.rate and requests else None),
        # Open loop: how long the requests were held up by their connection's previous answer.
        "late_ms": (summarize([v for r in rounds for v in r.result.recorder.late_ms]).as_dict()
                    if run.scenario.load.rate else None),
        "server_cpu_us_per_request": server_cpu / requests * 1e6 if server_cpu is not None and requests else None,
        "server_core_utilisation": server_cpu / window if server_cpu is not None and window else None,
        # How much of the server's CPU was the kernel's (socket sends and receives, epoll,
        # wake-ups): the Python code lowers it only by making fewer syscalls. None when the
        # two reads do not make sense together (a worker restarted between them).
        "server_sys_share": (server_sys / server_cpu
                             if server_sys is not None and server_cpu and 0 <= server_sys <= server_cpu else None),
        "client_core_utilisation": client_core / window if window else None,
        "peak_rss_mb": max(peaks) / 2**20 if peaks else None,
        "foreign_load_max": max(noise) if noise else None,
        "cores_busy": {
            str(core): sum(r.core_busy.get(core, 0.0) for r in rounds) / len(rounds)
            for core in sorted({c for r in rounds for c in r.core_busy})
        } if rounds else {},
        "rps_range": [min(round_rps), max(round_rps)] if round_rps else None,
        "mem_per_stream_kb": ((max(peaks) - start) / streams / 1024
                              if peaks and start is not None and run.scenario.load.stream else None),
        # The same from the window's median RSS (every stream open), and the former measure:
        # the largest rise of one round from its own start.
        "mem_held_per_stream_kb": ((max(helds) - start) / streams / 1024
                                   if helds and start is not None and run.scenario.load.stream else None),
        "mem_round_growth_kb": (max(round_growth) / 1024
                                if round_growth and run.scenario.load.stream else None),
        "rounds": per_round,
        "cdf": {k: _cdf(v) for k, v in pooled.items()},
    }


def _failover(run: ScenarioRun, label: str) -> dict[str, Any]:
    """One gateway's requests before the kill, in flight at it, and after it; TTFT over time."""
    assert run.scenario.failover is not None
    bucket = run.scenario.failover.bucket_s
    phases: dict[str, dict[str, list[Any]]] = {p: {"ttft": [], "errors": []} for p in ("before", "in_flight", "after")}
    series: dict[int, dict[str, Any]] = {}
    kills = []
    for r in run.rounds:
        if r.target != label:
            continue
        rec, k = r.result.recorder, r.killed_at_s
        kills.append(k)
        for start, end, ttft, err in zip(rec.starts, rec.ends, rec.ttft_ms, rec.errors):
            phase = "before" if k is None or end < k else ("in_flight" if start < k else "after")
            phases[phase]["ttft"].append(ttft)
            phases[phase]["errors"].append(err)
            b = series.setdefault(int(start // bucket), {"ttft": [], "errors": 0})
            b["ttft"].append(ttft)
            b["errors"] += err is not None
    out: dict[str, Any] = {"kill_at_s": kills, "bucket_s": bucket, "phases": {}, "series": []}
    for name, data in phases.items():
        errs = Counter(e for e in data["errors"] if e is not None)
        out["phases"][name] = {"requests": len(data["errors"]), "errors": dict(errs),
                               "ttft_ms": summarize(data["ttft"]).as_dict()}
    for i in sorted(series):
        s = summarize(series[i]["ttft"])
        out["series"].append({"t_s": i * bucket, "requests": len(series[i]["ttft"]), "errors": series[i]["errors"],
                              "ttft_p50_ms": s.p50, "ttft_max_ms": s.max})
    return out


def _verdicts(name: str, metrics: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for key, op, limit, label in TARGETS.get(name, []):
        value = metrics.get(key)
        ok = None if value is None or value != value else (value <= limit if op == "<=" else value >= limit)
        out.append({"target": label, "metric": key, "value": value, "limit": limit, "op": op, "met": ok})
    return out


def _gateway_metrics(g: dict[str, Any], c: dict[str, Any] | None) -> dict[str, float]:
    """One gateway's numbers that the issue's targets are checked against."""
    metrics: dict[str, float] = {"gateway_rps": g["rps"], "gateway_errors": g["error_count"]}
    if g["server_cpu_us_per_request"] is not None:
        metrics["gateway_cpu_us"] = g["server_cpu_us_per_request"]
    if g["mem_per_stream_kb"] is not None:
        metrics["gateway_mem_per_stream_kb"] = g["mem_per_stream_kb"]
    if c is not None:
        metrics.update(
            added_total_p50_ms=c["added_total_ms"]["p50"], added_total_p99_ms=c["added_total_ms"]["p99"],
            added_ttft_p50_ms=c["added_ttft_ms"]["p50"], added_ttft_p99_ms=c["added_ttft_ms"]["p99"],
        )
    return metrics


def _against_baseline(label: str, twin: str, targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """This checkout's gateway against the same variant as the baseline build (a revision, an interpreter)."""
    t, b = targets[label], targets[twin]
    cpu, cpu_b = t["server_cpu_us_per_request"], b["server_cpu_us_per_request"]
    # Round i of each ran back to back: the spread of these ratios is the comparison's noise.
    per_round = [x["server_cpu_us"] / y["server_cpu_us"] for x, y in zip(t["rounds"], b["rounds"])
                 if x["server_cpu_us"] is not None and y["server_cpu_us"]]
    return {
        "target": label,
        "baseline": twin,
        "cpu_ratio": cpu / cpu_b if cpu is not None and cpu_b else None,
        "cpu_ratio_rounds": per_round,
        "rps_ratio": t["rps"] / b["rps"] if b["rps"] else None,
        "added_ttft_ms": added(Summary(**t["ttft_ms"]), Summary(**b["ttft_ms"])),
        "added_total_ms": added(Summary(**t["total_ms"]), Summary(**b["total_ms"])),
    }


def analyze(run: ScenarioRun, *, machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the outputs show, as plain data (the JSON file's content)."""
    s = run.scenario
    targets = {label: _target_stats(run, label) for label in run.targets}
    reference = "direct" if "direct" in targets else (run.targets[0] if s.mode == "compare" else None)
    # In mode compare, a baseline's variants are compared with the baseline's first variant:
    # each build against itself, never across builds (that is the "baseline" table's job).
    twins = set(run.baselines.values())
    comparisons: dict[str, dict[str, Any]] = {}
    if reference is not None:
        for label, st in targets.items():
            versus = run.baselines.get(reference, reference) if label in twins and reference != "direct" else reference
            if label == versus:
                continue
            ref = targets[versus]
            comparisons[label] = {
                "versus": versus,
                "added_headers_ms": added(Summary(**st["headers_ms"]), Summary(**ref["headers_ms"])),
                "added_ttft_ms": added(Summary(**st["ttft_ms"]), Summary(**ref["ttft_ms"])),
                "added_total_ms": added(Summary(**st["total_ms"]), Summary(**ref["total_ms"])),
                "rps_ratio": st["rps"] / ref["rps"] if ref["rps"] else math.nan,
            }
    gateways = [label for label in run.targets if label not in NOT_GATEWAYS]
    metrics_by_gateway = {label: _gateway_metrics(targets[label], comparisons.get(label)) for label in gateways}
    metrics: dict[str, float] = metrics_by_gateway[gateways[0]] if gateways else {}
    result: dict[str, Any] = {
        "scenario": {"name": s.name, "description": s.description, "mode": s.mode, "source": s.source,
                     "load": _attrs(s.load)},
        "run": {"rounds": run.rounds_n, "duration_s": run.duration_s, "warmup_s": run.warmup_s,
                # The first round's order, and whether every other round ran it backwards.
                "order": run.targets,
                "order_reversed_every_other_round": round_order(run.targets, 1) == run.targets[::-1]},
        "machine": machine or machine_info(),
        "commands": run.commands,
        "targets": targets,
        "comparisons": comparisons,
        "usage_log": run.usage,
        "notes": run.notes,
    }
    for label, t in targets.items():
        foreign = t["foreign_load_max"]
        if foreign is not None and foreign > NOISE_LIMIT:
            result["notes"] = [*result["notes"], (
                f"{label}: a kept round still had {foreign:.0%} of a core busy with other load on the "
                "machine: treat its numbers with care, or run again")]
    if run.baseline is not None and run.baselines:
        result["baseline"] = {
            "revision": run.baseline.revision,
            "commit": run.baseline.commit,
            "python": run.baseline.python,
            "python_version": run.baseline.python_version,
            "described": run.baseline.describe(),
            "pairs": [_against_baseline(label, twin, targets) for label, twin in run.baselines.items()],
        }
    if s.mode == "failover":
        per_gateway = {label: _failover(run, label) for label in gateways}
        result["failover"] = per_gateway[gateways[0]]
        if len(per_gateway) > 1:  # (--baseline) each its own phases and check
            result["failover_by_gateway"] = per_gateway
        for label, f in per_gateway.items():
            metrics_by_gateway[label]["errors_after_kill"] = sum(f["phases"]["after"]["errors"].values())
    if len(gateways) > 1:  # every variant against the scenario's targets, each labelled
        result["verdicts"] = [{**v, "target": f"{label}: {v['target']}"} for label in gateways
                              for v in _verdicts(s.name, metrics_by_gateway[label])]
    else:
        result["verdicts"] = _verdicts(s.name, metrics)
    if s.load.rate and result["verdicts"]:  # the targets are the closed-loop scenario's (--rate changed it)
        result["verdicts"] = []
        result["notes"] = [*result["notes"], "the issue's targets for this scenario are for its closed loop: "
                           "not judged open loop"]
    if run.profiles:
        result["hotspots"] = {}
        for label, path in run.profiles.items():
            stacks = hotspots.parse_collapsed(Path(path).read_text(encoding="utf-8", errors="replace"))
            result["hotspots"][label] = {
                "file": path,
                "samples": sum(n for _, n in stacks),
                "by_component": hotspots.group_shares(stacks, PROFILE_GROUPS),
                "top_self": [_attrs(h) for h in hotspots.top_functions(stacks, limit=25)],
                "top_inclusive": [_attrs(h) for h in hotspots.top_functions(stacks, limit=25, by="inclusive")],
            }
    clean: dict[str, Any] = _nan_to_none(result)
    return clean


def _attrs(obj: Any) -> dict[str, Any]:
    data: dict[str, Any] = attrs.asdict(obj)
    return data


# --- markdown --------------------------------------------------------------------------------


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _quad(d: dict[str, Any], keys: tuple[str, ...] = ("p50", "p90", "p99", "max")) -> str:
    if not d.get("count"):
        return "—"
    return " / ".join(_f(d[k]) for k in keys)


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _cpu_cell(t: dict[str, Any]) -> str:
    """A target's server CPU per request, with the system time's share in brackets when known."""
    sys_share = t.get("server_sys_share")  # (absent from results written before 2026-12-07's late afternoon)
    return _f(t["server_cpu_us_per_request"], 0) + (f" ({_share(sys_share)})" if sys_share is not None else "")


def _signed(d: dict[str, Any], keys: tuple[str, ...] = ("p50", "p90", "p99")) -> str:
    if any(d[k] is None for k in keys):
        return "—"
    return " / ".join(("+" if d[k] >= 0 else "") + _f(d[k], 2) for k in keys)


def _loopback_sentence(loopback: dict[str, Any] | None) -> str:
    """" Loopback round trip p50 (p99): ... on one core, ... across the two cores (idle: ...)." or ""."""
    if not loopback or not (loopback.get("same_core") or loopback.get("across_cores")):
        return ""
    parts = []
    for key, where in (("same_core", "on one core"), ("across_cores", "across the two cores")):
        if rt := loopback.get(key):
            parts.append(f"{rt['p50']:,.0f} µs ({rt['p99']:,.0f}) {where}")
    idle = f" (idle: {loopback['cpuidle']})" if loopback.get("cpuidle") else ""
    return " Loopback round trip p50 (p99): " + ", ".join(parts) + idle + "."


def _order_phrase(run: dict[str, Any]) -> str:
    """How the rounds ran their targets (``runner.round_order``): as listed, then reversed every
    other round (a result without the flag ran one order throughout)."""
    order = run["order"]
    if len(order) < 2 or run["rounds"] < 2 or not run.get("order_reversed_every_other_round"):
        return f"order {' → '.join(order)} each round; "
    return f"order {' → '.join(order)}, reversed every other round; "


def markdown(result: dict[str, Any]) -> str:
    """The scenario's results table(s), the gateway's added cost and the targets, in markdown."""
    s, run, m = result["scenario"], result["run"], result["machine"]
    stream = s["load"]["stream"]
    lines = [
        f"### {s['name']}: {s['description']}",
        "",
        f"{run['rounds']} rounds × {run['duration_s']:g} s measured (after {run['warmup_s']:g} s warm-up), "
        + _order_phrase(run)
        + f"{m['cores']} cores ({m['cpu_model']}), "
        f"Python {m['python']}" + (f" ({m['python_executable']})." if m.get("python_executable") else ".")
        + _loopback_sentence(m.get("loopback_us")),
        "",
    ]
    rate = s["load"].get("rate") or 0.0
    if rate:
        lines += [f"Open loop: {rate:,.0f} requests/s due over {s['load']['connections']} connections; "
                  "each request's times count from when it was due if its connection was still busy "
                  "then (that wait is the target's), else from when it was sent (the load generator's "
                  "own timer lateness is not).", ""]
    head = "| target | req/s (rounds) | errors | headers p50/p99 ms |"
    rule = "|---|---:|---:|---|"
    if stream:
        head += " TTFT p50/p90/p99/max ms | gap p50/p99 ms |"
        rule += "---|---|"
    head += " total p50/p90/p99/max ms | server CPU µs/req (sys) | server core | client core | cores busy | peak RSS MB |"
    rule += "---|---:|---:|---:|---|---:|"
    if stream:
        head += " KB/stream |"
        rule += "---:|"
    lines += [head, rule]
    for label, t in result["targets"].items():
        errors = ", ".join(f"{k} {v}" for k, v in sorted(t["errors"].items())) or "0"
        spread = f" ({_f(t['rps_range'][0], 0)}–{_f(t['rps_range'][1], 0)})" if t["rps_range"] and len(t["rounds"]) > 1 else ""
        row = (f"| {label} | {_f(t['rps'], 0)}{spread} | {errors} | "
               f"{_quad(t['headers_ms'], ('p50', 'p99'))} |")
        if stream:
            row += f" {_quad(t['ttft_ms'])} | {_quad(t['gap_ms'], ('p50', 'p99'))} |"
        row += (f" {_quad(t['total_ms'])} | {_cpu_cell(t)} | "
                f"{_share(t['server_core_utilisation'])} | {_share(t['client_core_utilisation'])} | "
                f"{' / '.join(_share(v) for v in t['cores_busy'].values()) or '—'} | "
                f"{_f(t['peak_rss_mb'], 1)} |")
        if stream:
            row += f" {_f(t['mem_per_stream_kb'], 1)} |"
        lines.append(row)
    if rate:
        targets = result["targets"]
        lines += ["", "req/s is the rate offered. Answered without error: "
                  + "; ".join(f"{label} {_f(t.get('ok_rps'), 0)}/s" for label, t in targets.items()) + ". "
                  "Held up past when they were due by the connection's previous answer (share of requests; ms "
                  "p50 / p99 / max; counted in the latency): "
                  + "; ".join(f"{label} {_share(t.get('held_share'))}, {_quad(t['late_ms'], ('p50', 'p99', 'max'))}"
                              for label, t in targets.items() if t.get("late_ms"))]
        behind = [label for label, t in targets.items()
                  if (t.get("ok_rps") is not None and t["ok_rps"] < 0.98 * t["rps"])
                  or (t.get("held_share") or 0.0) > 0.01]
        if behind:
            lines += ["", f"Note: did not keep the schedule (over 1 % of requests held up, or over 2 % failed): "
                      f"{', '.join(behind)}. Its latencies include the wait; its CPU per request is per request "
                      "offered."]
    if result["comparisons"]:
        lines += ["", "Added by going through it (percentile minus percentile, ms):", "",
                  "| target | vs | headers p50/p99 | " + ("TTFT p50/p90/p99 | " if stream else "")
                  + "total p50/p90/p99 | req/s ratio |",
                  "|---|---|---|" + ("---|" if stream else "") + "---|---:|"]
        for label, c in result["comparisons"].items():
            row = f"| {label} | {c['versus']} | {_signed(c['added_headers_ms'], ('p50', 'p99'))} | "
            if stream:
                row += f"{_signed(c['added_ttft_ms'])} | "
            row += f"{_signed(c['added_total_ms'])} | {_f(c['rps_ratio'], 2)} |"
            lines.append(row)
    if "baseline" in result:
        base = result["baseline"]
        what = [f"{base['revision']} ({base['commit'][:12]})"] if base["commit"] is not None else []
        if base.get("python") is not None:
            what.append(f"under {base['python']} (Python {base['python_version']})")
        lines += ["", f"Against the baseline, {', '.join(what)}, measured in the same rounds "
                  "(this checkout's gateway minus the baseline's; CPU and req/s as ratios):", "",
                  "| target | baseline | server CPU µs/req (sys) | CPU ratio (rounds) | req/s ratio | "
                  + ("TTFT p50/p90/p99 ms | " if stream else "") + "total p50/p90/p99 ms |",
                  "|---|---|---|---:|---:|" + ("---|" if stream else "") + "---|"]
        for pair in base["pairs"]:
            cpus = [_cpu_cell(result["targets"][pair[k]]) for k in ("target", "baseline")]
            rounds = pair["cpu_ratio_rounds"]
            spread = f" ({_f(min(rounds), 3)}–{_f(max(rounds), 3)})" if len(rounds) > 1 else ""
            row = (f"| {pair['target']} | {pair['baseline']} | {' vs '.join(cpus)} | "
                   f"{_f(pair['cpu_ratio'], 3)}{spread} | {_f(pair['rps_ratio'], 3)} | ")
            if stream:
                row += f"{_signed(pair['added_ttft_ms'])} | "
            lines.append(row + f"{_signed(pair['added_total_ms'])} |")
    failovers = result.get("failover_by_gateway") or ({"": result["failover"]} if "failover" in result else {})
    for label, f in failovers.items():
        whose = f"{label}: p" if label else "P"
        lines += ["", f"{whose}rimary killed at {', '.join(_f(k, 2) + ' s' for k in f['kill_at_s'])} into the window:",
                  "", "| phase | requests | errors | TTFT p50/p90/p99/max ms |", "|---|---:|---|---|"]
        for name, p in f["phases"].items():
            errors = ", ".join(f"{k} {v}" for k, v in sorted(p["errors"].items())) or "0"
            lines.append(f"| {name.replace('_', ' ')} | {p['requests']} | {errors} | {_quad(p['ttft_ms'])} |")
    usage = result.get("usage_log") or {}
    if usage:
        lines += ["", "Usage log: " + "; ".join(
            f"{label}: {u['usage_records']} records for {u['requests_sent']} requests sent" for label, u in usage.items())]
    if result["verdicts"]:
        lines += ["", "| issue target | measured | met? |", "|---|---:|---|"]
        for v in result["verdicts"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[v["met"]]
            lines.append(f"| {v['target']} | {_f(v['value'], 2)} | {met} |")
    for note in result["notes"]:
        lines += ["", f"Note: {note}"]
    hot = result.get("hotspots") or {}
    for label, h in hot.items():
        lines += ["", f"Profile of {label} ({h['samples']} samples, py-spy): by component "
                  + ", ".join(f"{k} {v:.0%}" for k, v in h["by_component"].items()), "",
                  "| function (self time) | self | inclusive |", "|---|---:|---:|"]
        for spot in h["top_self"][:12]:
            lines.append(f"| `{spot['function']}` | {spot['self_share']:.1%} | {spot['inclusive_share']:.1%} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: Path, stamp: str) -> dict[str, Path]:
    """``<stamp>-<scenario>.json``, ``.md`` and ``.png`` in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{stamp}-{result['scenario']['name']}"
    paths = {"json": base.with_suffix(".json"), "md": base.with_suffix(".md")}
    paths["json"].write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(result), encoding="utf-8")
    if write_chart(result, base.with_suffix(".png")):
        paths["png"] = base.with_suffix(".png")
    return paths


def timestamp() -> str:
    """Local time to the second, the prefix of a run's result files."""
    return time.strftime("%Y%m%d-%H%M%S")
