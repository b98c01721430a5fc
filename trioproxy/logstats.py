"""``trioproxy stats``: one row per group of requests, from the usage log.

``summarize`` (one pass over decoded records), ``percentile`` and ``render_stats`` are
sans-IO; ``run_stats`` reads the files through ``logview.iter_records``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
from attrs import frozen
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .logview import DEFAULT_DIR, fmt_ms, is_failover, iter_records, parse_since, printable

BY_CHOICES = ("model", "upstream", "outcome", "route", "key_id")
#: Nearest-rank percentiles reported by stats.
PERCENTILES = (50, 95, 99)

#: Columns for tables written to a pipe or file (no terminal to fit).
PIPE_WIDTH = 160


@frozen
class StatsRow:
    key: str
    requests: int
    errors: int  # outcome != "ok"
    ttft_p50: float | None
    ttft_p95: float | None
    ttft_p99: float | None
    total_p50: float | None
    total_p95: float | None
    total_p99: float | None
    prompt_tokens: int
    completion_tokens: int
    #: Streamed ok requests with tokens: sum(completion_tokens) / sum(total_ms - ttft_ms) s.
    tokens_per_s: float | None
    failovers: int
    hedges: int


def percentile(ordered: list[float], p: int) -> float | None:
    """Nearest-rank percentile of sorted values: an observed value, exact, no interpolation."""
    if not ordered:
        return None
    rank = -(-p * len(ordered) // 100)  # ceil(p/100 * n) in integers: no float rounding
    return ordered[max(rank, 1) - 1]


@attrs.define
class _Group:
    requests: int = 0
    errors: int = 0
    ttft: list[float] = attrs.field(factory=list)
    total: list[float] = attrs.field(factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    failovers: int = 0
    hedges: int = 0

    def add(self, rec: dict[str, Any]) -> None:
        self.requests += 1
        ok = rec.get("outcome") == "ok"
        self.errors += not ok
        ttft, total = _number(rec.get("ttft_ms")), _number(rec.get("total_ms"))
        prompt, completion = _number(rec.get("prompt_tokens")), _number(rec.get("completion_tokens"))
        if ttft is not None:
            self.ttft.append(ttft)
        if total is not None:
            self.total.append(total)
        self.prompt_tokens += int(prompt or 0)
        self.completion_tokens += int(completion or 0)
        if ok and rec.get("stream") and ttft is not None and total is not None and completion is not None:
            if total > ttft:
                self.decode_tokens += int(completion)
                self.decode_s += (total - ttft) / 1000
        self.failovers += is_failover(rec)
        self.hedges += rec.get("hedged") is True

    def row(self, key: str) -> StatsRow:
        ttft, total = sorted(self.ttft), sorted(self.total)
        t50, t95, t99 = (percentile(ttft, p) for p in PERCENTILES)
        l50, l95, l99 = (percentile(total, p) for p in PERCENTILES)
        return StatsRow(
            key, self.requests, self.errors, t50, t95, t99, l50, l95, l99,
            self.prompt_tokens, self.completion_tokens,
            self.decode_tokens / self.decode_s if self.decode_s > 0 else None,
            self.failovers, self.hedges,
        )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _group_key(rec: dict[str, Any], by: str) -> str:
    value = rec.get(by) if by != "model" else rec.get("model_served") or rec.get("model_requested")
    return "-" if value is None else str(value)


def summarize(records: Iterable[dict[str, Any]], *, by: str, total: bool = False) -> list[StatsRow]:
    """One row per group (most requests first), in one pass; ``total``: add an "(all)" row.

    Latency percentiles are over every record of the group that has the value (errors
    included: that is what clients waited); TTFT only exists for requests that got a token.
    """
    if by not in BY_CHOICES:
        raise ValueError(f"by must be one of {BY_CHOICES}, got {by!r}")
    groups: dict[str, _Group] = {}
    everything = _Group()
    for rec in records:
        key = _group_key(rec, by)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group()
        group.add(rec)
        if total:
            everything.add(rec)
    rows = sorted((g.row(k) for k, g in groups.items()), key=lambda r: (-r.requests, r.key))
    if total:
        rows.append(everything.row("(all)"))
    return rows


def _cells_ms(*values: float | None) -> str:
    return "/".join(fmt_ms(v) for v in values)


def render_stats(rows: list[StatsRow], *, by: str = "model", title: str | None = None) -> Table:
    """The stats table: one row per group; latencies as p50/p95/p99 (--json: exact ms)."""
    table = Table(title=title, header_style="bold")
    table.add_column(by, overflow="fold", min_width=12)
    for name in ("req", "err", "TTFT\np50/p95/p99", "total\np50/p95/p99",
                 "prompt\ntok", "compl\ntok", "compl\ntok/s", "fail\nover", "hedged"):
        table.add_column(name, justify="right", no_wrap=True)
    last_group = len(rows) - 2 if rows and rows[-1].key == "(all)" else -1
    for i, r in enumerate(rows):
        table.add_row(
            Text(printable(r.key), style="bold" if r.key == "(all)" else ""),
            str(r.requests),
            Text(str(r.errors), style="red" if r.errors else ""),
            _cells_ms(r.ttft_p50, r.ttft_p95, r.ttft_p99),
            _cells_ms(r.total_p50, r.total_p95, r.total_p99),
            f"{r.prompt_tokens:,}",
            f"{r.completion_tokens:,}",
            "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.1f}",
            str(r.failovers),
            str(r.hedges),
            end_section=i == last_group,  # a rule above the "(all)" row
        )
    return table


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=DEFAULT_DIR, help="usage-log directory (default: %(default)s)")
    parser.add_argument("--since", metavar="WHEN", help="30m, 1h, 2d, or an ISO time (default: everything)")
    parser.add_argument("--by", choices=BY_CHOICES, default="model", help="group rows by (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def run_stats(args: argparse.Namespace, *, console: Console | None = None, now: float | None = None) -> int:
    """Print one table row per group of requests (and an "(all)" row)."""
    # Piped output has no width to fit: give tables room instead of squeezing columns away.
    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)
    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"trioproxy stats: no usage log directory {directory}", file=sys.stderr)
        return 1
    try:
        since = parse_since(args.since, now=time.time() if now is None else now) if args.since else None
    except ValueError as exc:
        print(f"trioproxy stats: --since: {exc}", file=sys.stderr)
        return 2
    rows = summarize(iter_records(directory, since=since), by=args.by, total=True)
    if args.json:
        console.print_json(json.dumps({"by": args.by, "rows": [attrs.asdict(r) for r in rows]}), ensure_ascii=True)
    else:
        when = f" since {args.since}" if args.since else ""
        console.print(render_stats(rows, by=args.by, title=f"trioproxy usage by {args.by}{when} ({directory})"))
    return 0
