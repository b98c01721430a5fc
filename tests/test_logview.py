"""logview: reading the usage log back, and `trioproxy tail`. Stats: test_logstats."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path

import pytest

from trioproxy.logview import (
    Follower,
    add_tail_arguments,
    iter_records,
    matches,
    parse_since,
    render_tail_line,
    run_tail,
)
from trioproxy.telemetry import AttemptRecord, Record, encode_record

from .logrecords import T0, as_dict, console, rec, write

DAY = 86_400.0


def tail_args(directory: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_tail_arguments(parser)
    return parser.parse_args(["--dir", str(directory), *argv])


# --- reading -------------------------------------------------------------------------------


def test_iter_records_merges_workers_and_rotations_in_time_order_skipping_bad_lines(tmp_path: Path) -> None:
    # Worker 1 rotated by size (base file, then .1); worker 2 in its own file; the next day.
    # Files hold records in the order requests ended: ts + total_ms (1 s unless said).
    write(tmp_path / "usage-20261124-1.jsonl", rec(0), rec(3), tail=b"{not json\n")
    write(tmp_path / "usage-20261124-1.1.jsonl", rec(5), rec(6))
    write(tmp_path / "usage-20261124-2.jsonl", rec(1), rec(4, total_ms=2500.0))  # ends at 6.5
    write(tmp_path / "usage-20261125-1.jsonl", rec(int(DAY)), tail=b'{"schema":1,"request_id":"cut')
    (tmp_path / "notes.txt").write_text("not a usage log\n")
    (tmp_path / "usage-2026.jsonl").write_text("not a usage-log name\n")
    got = [r["request_id"] for r in iter_records(tmp_path)]
    assert got == ["req-0000", "req-0001", "req-0003", "req-0005", "req-0004", "req-0006", f"req-{int(DAY):04d}"]


def test_iter_records_since_skips_earlier_arrivals_and_older_days(tmp_path: Path) -> None:
    write(tmp_path / "usage-20261123.jsonl", rec(-int(DAY)))
    write(tmp_path / "usage-20261124.jsonl", rec(0), rec(10), rec(20))
    assert [r["request_id"] for r in iter_records(tmp_path, since=T0 + 10)] == ["req-0010", "req-0020"]
    assert len(list(iter_records(tmp_path))) == 4
    assert list(iter_records(tmp_path / "missing")) == []


def test_parse_since() -> None:
    now = T0
    assert parse_since("30m", now=now) == now - 1800
    assert parse_since("1h", now=now) == now - 3600
    assert parse_since("2d", now=now) == now - 2 * DAY
    assert parse_since("2026-11-24T06:00:00Z", now=now) == T0 - 0.123
    with pytest.raises(ValueError, match="expected 30m"):
        parse_since("yesterday", now=now)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ([("outcome", "ok")], True),
        ([("outcome", "upstream_error")], False),
        ([("model_served", "llama3*"), ("status", "200")], True),
        ([("error", "null"), ("hedged", "false"), ("stream", "true")], True),
        ([("nonexistent", "null")], True),
    ],
)
def test_where_filters(where: list[tuple[str, str]], expected: bool) -> None:
    assert matches(as_dict(rec(0)), where) is expected


# --- tail ----------------------------------------------------------------------------------


SNAPSHOT = """\
06:00:00 9f86d081 llama3:8b         ollama-a   ok                200 ttft 120ms total 1.52s    12→345 ×1
06:00:01 a1b2c3d4 qwen2.5-coder:32… vllm-b-lo… ok                200 ttft     - total 25.4s   ~1200→? ×2 failover
06:00:02 ffff0000 llama3            -          upstream_error    503 ttft     - total 60.0s         - ×2 hedged failover
06:00:03 c0ffee   -                 -          client_disconnect   - ttft     - total   3ms         - ×0
"""


def test_tail_line_snapshot() -> None:
    records = [
        Record("9f86d081884c7d65", T0, "/v1/chat/completions", "POST", "llama3", "llama3:8b", "ollama-a",
               (AttemptRecord("ollama-a", "llama3:8b", "ok", 200, 80.0),), status=200, stream=True,
               ttft_ms=120.4, total_ms=1520.5, prompt_tokens=12, completion_tokens=345, token_source="upstream"),
        Record("a1b2c3d4e5f6", T0 + 1, "/v1/chat/completions", "POST", "qwen2.5-coder:32b-instruct-q4_K_M",
               "qwen2.5-coder:32b-instruct-q4_K_M", "vllm-b-long-name",
               (AttemptRecord("ollama-a", None, "connect_error", None, 3.0), AttemptRecord("vllm-b", None, "ok", 200, 50.0)),
               status=200, total_ms=25432.0, prompt_tokens=1200, token_source="estimate"),
        Record("ffff0000", T0 + 2, "/api/chat", "POST", "llama3", None, None,
               (AttemptRecord("ollama-a", None, "timeout", None, 55000.0), AttemptRecord("ollama-b", None, "status", 503, 5.0)),
               hedged=True, status=503, outcome="upstream_error", total_ms=60005.0),
        Record("c0ffee", T0 + 3, "/v1/models", "GET", outcome="client_disconnect", total_ms=3.2),
    ]
    out = console()
    for r in records:
        out.print(render_tail_line(as_dict(r), tz=timezone.utc), no_wrap=True, overflow="ellipsis")
    assert out.export_text() == SNAPSHOT


def test_tail_and_stats_print_no_control_characters(tmp_path: Path) -> None:
    """A client's model name with terminal escapes (set the title, clear the screen) is recorded as
    sent; ``tail``, ``stats`` and ``--json`` print it inert, as ``\\x1b``, never as the escape itself."""
    from trioproxy.logstats import add_stats_arguments, run_stats

    hostile = "\x1b]0;PWNED\x07\x1b[2Jgpt\x9b"
    write(tmp_path / "usage-20261124.jsonl", rec(0, model_requested=hostile, model_served=None, upstream=None))
    outputs = []
    for argv in ([], ["--json"]):
        out = console()
        assert run_tail(tail_args(tmp_path, *argv), console=out) == 0
        outputs.append(out.export_text())
    parser = argparse.ArgumentParser()
    add_stats_arguments(parser)
    for argv in ([], ["--json"]):
        out = console()
        assert run_stats(parser.parse_args(["--dir", str(tmp_path), *argv]), console=out) == 0
        outputs.append(out.export_text())
    for text in outputs:
        assert not any(c in text for c in "\x1b\x07\x9b"), repr(text)
    assert "\\x1b]0;PWNED" in outputs[0] and "\\x1b]0;PWNED" in outputs[2]
    assert json.loads(outputs[1])["model_requested"] == hostile  # (JSON escapes it: \u001b)


@pytest.fixture
def utc_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_tail_prints_the_last_n_matching_in_local_time(tmp_path: Path, utc_local_time: None) -> None:
    write(tmp_path / "usage-20261124.jsonl", *(rec(i, outcome="ok" if i % 2 else "rejected") for i in range(10)))
    out = console()
    assert run_tail(tail_args(tmp_path, "-n", "2", "--where", "outcome=ok"), console=out) == 0
    lines = out.export_text().splitlines()
    assert [line.split()[:2] for line in lines] == [["06:00:07", "req-0007"], ["06:00:09", "req-0009"]]


def test_tail_json_prints_the_raw_lines(tmp_path: Path) -> None:
    write(tmp_path / "usage-20261124.jsonl", rec(0, error="[bold]not markup[/bold]"), rec(1))
    out = console()
    assert run_tail(tail_args(tmp_path, "--json", "-n", "5"), console=out) == 0
    assert out.export_text().encode() == encode_record(rec(0, error="[bold]not markup[/bold]")) + encode_record(rec(1))


def test_tail_of_a_missing_directory_fails(tmp_path: Path) -> None:
    assert run_tail(tail_args(tmp_path / "missing"), console=console()) == 1


def test_follow_reads_new_lines_across_rotation(tmp_path: Path) -> None:
    base = tmp_path / "usage-20261124.jsonl"
    write(base, rec(0), rec(1))
    half = encode_record(rec(3))
    steps = [
        lambda: write(base, rec(2), tail=half[:20]),  # a batch, then a line still being written
        lambda: write(base, tail=half[20:]),  # the line completed
        lambda: write(tmp_path / "usage-20261124.1.jsonl", rec(4), rec(5)),  # rotated by size
        lambda: write(tmp_path / "usage-20261125.jsonl", rec(6)),  # rotated by day
        lambda: write(tmp_path / "usage-20261124-77.jsonl", rec(7, outcome="rejected")),  # another worker, filtered out
    ]
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:  # each "sleep" is a moment in which the writer wrote
        sleeps.append(seconds)
        steps[len(sleeps) - 1]()

    out = console()
    args = tail_args(tmp_path, "--follow", "--json", "-n", "1", "--where", "outcome=ok")
    assert run_tail(args, console=out, sleep=fake_sleep, max_polls=len(steps)) == 0
    got = [json.loads(line)["request_id"] for line in out.export_text().splitlines()]
    assert got == ["req-0001", "req-0002", "req-0003", "req-0004", "req-0005", "req-0006"]
    assert len(sleeps) == len(steps)


@pytest.mark.parametrize("how", ["truncated", "replaced"])
def test_follow_rereads_a_file_that_was_truncated_or_replaced(tmp_path: Path, how: str) -> None:
    path = tmp_path / "usage-20261124.jsonl"
    write(path, rec(0), rec(1), rec(2))

    def replace_file(_: float) -> None:  # rewritten from outside, in place or as a new file
        if how == "truncated":
            path.write_bytes(encode_record(rec(9)))
        else:
            new = tmp_path / "new"
            new.write_bytes(encode_record(rec(9)) * 4)  # longer than the old one
            new.replace(path)

    out = console()
    args = tail_args(tmp_path, "--follow", "--json", "-n", "5")
    assert run_tail(args, console=out, sleep=replace_file, max_polls=1) == 0
    got = [json.loads(line)["request_id"] for line in out.export_text().splitlines()]
    assert got == ["req-0000", "req-0001", "req-0002"] + ["req-0009"] * (1 if how == "truncated" else 4)


def test_tail_reads_only_the_newest_days_it_needs(tmp_path: Path) -> None:
    old, new = tmp_path / "usage-20261123.jsonl", tmp_path / "usage-20261124.jsonl"
    write(old, rec(-int(DAY)), rec(-int(DAY) + 1))
    write(new, rec(0), rec(1), rec(2))
    follower = Follower(tmp_path)
    assert [e.rec["request_id"] for e in follower.read_last(2, lambda _: True)] == ["req-0001", "req-0002"]
    assert follower.offsets[old] == old.stat().st_size  # skipped, yet counted as read for --follow
    assert list(follower.read_new()) == []
    follower = Follower(tmp_path)
    got = [e.rec["request_id"] for e in follower.read_last(4, lambda _: True)]
    assert got == ["req--86399", "req-0000", "req-0001", "req-0002"]
    assert Follower(tmp_path).read_last(0, lambda _: True) == []
