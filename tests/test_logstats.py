"""logstats: `trioproxy stats` (nearest-rank percentiles, grouping, the table, --json/--since)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from trioproxy.logstats import (
    StatsRow,
    add_stats_arguments,
    percentile,
    render_stats,
    run_stats,
    summarize,
)
from trioproxy.telemetry import AttemptRecord

from .logrecords import T0, as_dict, console, rec, write



def stats_args(directory: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_stats_arguments(parser)
    return parser.parse_args(["--dir", str(directory), *argv])


# --- stats ---------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert [percentile(values, p) for p in (50, 95, 99)] == [10.0, 19.0, 20.0]
    hundred = [float(v) for v in range(1, 101)]
    assert [percentile(hundred, p) for p in (50, 95, 99)] == [50.0, 95.0, 99.0]
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None


def known_records() -> list[dict[str, Any]]:
    a = [rec(i, ttft_ms=10.0 * i, total_ms=100.0 * i, completion_tokens=10) for i in range(1, 11)]
    b = [
        # failed over from ollama-a to vllm-b, not streamed: no tokens/s contribution
        rec(11, model_served="qwen", upstream="vllm-b", stream=False, ttft_ms=None, total_ms=50.0,
            attempts=(AttemptRecord("ollama-a", None, "connect_error", None, 1.0),
                      AttemptRecord("vllm-b", "qwen", "ok", 200, 49.0))),
        # hedged: both started, the second won — also a failover by the definition
        rec(12, model_served="qwen", upstream="vllm-b", hedged=True, ttft_ms=20.0, total_ms=220.0,
            completion_tokens=50, attempts=(AttemptRecord("ollama-a", None, "lost_race", None, 30.0),
                                            AttemptRecord("vllm-b", "qwen", "ok", 200, 20.0))),
        # every attempt failed: an error, no upstream served it, still a failover attempt
        rec(13, model_served=None, model_requested="qwen", upstream=None, outcome="upstream_error", status=502,
            ttft_ms=None, total_ms=5000.0, prompt_tokens=None, completion_tokens=None,
            attempts=(AttemptRecord("ollama-a", None, "timeout", None, 2500.0),
                      AttemptRecord("vllm-b", None, "status", 503, 2500.0))),
        # retried on the same upstream: two attempts, not a failover
        rec(14, model_served="qwen", outcome="client_disconnect", status=200, ttft_ms=30.0, total_ms=400.0,
            completion_tokens=7, attempts=(AttemptRecord("ollama-a", None, "status", 429, 1.0),
                                           AttemptRecord("ollama-a", None, "cancelled", 200, 399.0))),
    ]
    return [as_dict(r) for r in a + b]


def test_summarize_by_model_known_records() -> None:
    rows = summarize(known_records(), by="model", total=True)
    llama = StatsRow(
        key="llama3:8b", requests=10, errors=0,
        ttft_p50=50.0, ttft_p95=100.0, ttft_p99=100.0,
        total_p50=500.0, total_p95=1000.0, total_p99=1000.0,
        prompt_tokens=100, completion_tokens=100,
        tokens_per_s=pytest.approx(100 / 4.95),  # type: ignore[arg-type]  # 100 tok / Σ(90·i ms)
        failovers=0, hedges=0,
    )
    qwen = StatsRow(
        key="qwen", requests=4, errors=2,
        ttft_p50=20.0, ttft_p95=30.0, ttft_p99=30.0,
        total_p50=220.0, total_p95=5000.0, total_p99=5000.0,
        prompt_tokens=30, completion_tokens=147,
        tokens_per_s=pytest.approx(50 / 0.2),  # type: ignore[arg-type]  # only streamed *ok* requests
        failovers=3, hedges=1,
    )
    assert rows[0] == llama
    assert rows[1] == qwen
    assert rows[2].key == "(all)" and (rows[2].requests, rows[2].errors, rows[2].failovers) == (14, 2, 3)
    assert rows[2].total_p50 == 400.0  # rank 7 of 14: [50, 100, 200, 220, 300, 400, 400, 500, ...]


def test_summarize_by_outcome_and_upstream() -> None:
    by_outcome = {r.key: r.requests for r in summarize(known_records(), by="outcome")}
    assert by_outcome == {"ok": 12, "upstream_error": 1, "client_disconnect": 1}
    by_upstream = [(r.key, r.requests) for r in summarize(known_records(), by="upstream")]
    assert by_upstream == [("ollama-a", 11), ("vllm-b", 2), ("-", 1)]
    with pytest.raises(ValueError):
        summarize([], by="colour")


def test_render_stats_shows_every_group_and_the_total() -> None:
    out = console()
    out.print(render_stats(summarize(known_records(), by="model", total=True), by="model", title="usage"))
    text = out.export_text()
    assert "│ llama3:8b " in text and "│ qwen " in text and "│ (all) " in text
    assert "50ms/100ms/100ms" in text and "500ms/1.00s/1.00s" in text
    assert "220ms/5.00s/5.00s" in text and "250.0" in text


def test_run_stats_json_and_since(tmp_path: Path) -> None:
    write(tmp_path / "usage-20261124.jsonl", *(attrs.evolve(rec(0), **{}) for _ in range(1)), rec(10), rec(20))
    out = console()
    assert run_stats(stats_args(tmp_path, "--json", "--since", "15s", "--by", "route"), console=out, now=T0 + 25) == 0
    data = json.loads(out.export_text())
    assert data["by"] == "route"
    assert [(r["key"], r["requests"]) for r in data["rows"]] == [("/v1/chat/completions", 2), ("(all)", 2)]


def test_run_stats_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_stats(stats_args(tmp_path / "missing"), console=console()) == 1
    assert run_stats(stats_args(tmp_path, "--since", "last tuesday"), console=console()) == 2
    assert "--since" in capsys.readouterr().err
