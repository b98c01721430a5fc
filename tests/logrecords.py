"""Usage records and log files for the log readers' tests (test_logview, test_logstats)."""

from __future__ import annotations

import calendar
import io
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console

from trioproxy.telemetry import AttemptRecord, Record, decode_line, encode_record

T0 = calendar.timegm((2026, 11, 24, 6, 0, 0)) + 0.123  # 2026-11-24T06:00:00.123Z


def rec(i: int, **changes: Any) -> Record:
    base = Record(
        request_id=f"req-{i:04d}",
        ts=T0 + i,
        route="/v1/chat/completions",
        method="POST",
        model_requested="llama3",
        model_served="llama3:8b",
        upstream="ollama-a",
        attempts=(AttemptRecord("ollama-a", "llama3:8b", "ok", 200, 10.0),),
        status=200,
        stream=True,
        ttft_ms=100.0,
        total_ms=1000.0,
        prompt_tokens=10,
        completion_tokens=90,
        token_source="upstream",
    )
    return attrs.evolve(base, **changes)


def as_dict(r: Record) -> dict[str, Any]:
    d = decode_line(encode_record(r))
    assert d is not None
    return d


def write(path: Path, *records: Record, tail: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(b"".join(encode_record(r) for r in records) + tail)


def console() -> Console:
    return Console(record=True, width=120, color_system=None, file=io.StringIO())


def record(i: int = 0, **changes: Any) -> Record:
    base = Record(
        request_id=f"req-{i:06d}",
        ts=T0 + i,
        route="/v1/chat/completions",
        method="POST",
        model_requested="llama3",
        model_served="llama3:8b",
        upstream="ollama-a",
        attempts=(AttemptRecord("ollama-a", "llama3:8b", "ok", 200, 12.3456),),
        status=200,
        stream=True,
        ttft_ms=120.0,
        total_ms=1520.5,
        bytes_in=512,
        bytes_out=20480,
        prompt_tokens=12,
        completion_tokens=345,
        token_source="upstream",
        finish_reason="stop",
        worker=4242,
    )
    return attrs.evolve(base, **changes)
