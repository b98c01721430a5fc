"""The log-shipping configs (deploy/otelcol, deploy/vector) against files the real writer makes.

Neither the OpenTelemetry Collector nor Vector can be installed here, so they are not run.
What is checked instead: both files parse (PyYAML, a dev dependency, and a line-level
structural check of the pipeline), their include globs match exactly the usage files
``usagelog.run_writer`` produces (worker-tagged, size-rotated, day-rotated, another
instance's directory; not a compressed old day), and their timestamp layouts, translated
to Python's strptime, read every real ``ts`` as the instant the gateway recorded.
"""

from __future__ import annotations

import calendar
import re
import tomllib
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
import yaml

from trioproxy.config import Telemetry
from trioproxy.telemetry import decode_line, encode_record, open_telemetry
from trioproxy.usagelog import run_writer

from .logrecords import record

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
OTEL = DEPLOY / "otelcol" / "trioproxy-usage.yaml"
VECTOR = DEPLOY / "vector" / "trioproxy-usage.toml"
DAY = 86_400.0
T0 = calendar.timegm((2026, 11, 24, 6, 0, 0)) + 0.123  # 2026-11-24T06:00:00.123Z
#: Arrival times whose milliseconds round up, down, and carry into the next second.
ARRIVALS = (T0, T0 + 0.8774, T0 + 3600.8765, T0 + 59.9996)
#: Writer runs, as two-worker gateways leave a telemetry dir after two days:
#: (subdirectory, worker tag, the writer's clock, arrival times, rotate after every record).
#: "b": another instance on the same host, with its own telemetry.dir under logs/.
RUNS = (
    ("", "", T0, ARRIVALS, True),
    ("", "4242", T0, ARRIVALS[:2], False),
    ("", "", T0 + DAY, (T0 + DAY,), False),
    ("b", "", T0 + DAY, (T0 + DAY + 0.5,), False),
)
#: OpenTelemetry's strptime directives (pkg/stanza docs/types/timestamp.md) → Python's; only those we use.
OTEL_TO_PYTHON = {"%Y": "%Y", "%m": "%m", "%d": "%d", "%H": "%H", "%M": "%M", "%S": "%S", "%L": "%f"}
#: chrono's (Vector's parse_timestamp) → Python's; %.3f is a dot and three digits.
CHRONO_TO_PYTHON = {"%Y": "%Y", "%m": "%m", "%d": "%d", "%H": "%H", "%M": "%M", "%S": "%S", "%.3f": ".%f"}


def to_python_format(layout: str, table: dict[str, str]) -> str:
    """Translate a layout directive by directive; an unknown directive fails the test."""
    return re.sub(r"%\.?\d?[A-Za-z%]", lambda m: table[m.group(0)], layout)


# --- the two configs, read ------------------------------------------------------------------


def otel_sections(text: str) -> dict[str, set[str]]:
    """Top-level section → component names defined in it (two-space keys): a YAML-free reading."""
    assert "\t" not in text, "YAML forbids tabs in indentation"
    sections: dict[str, set[str]] = {}
    current = ""
    for line in text.splitlines():
        if m := re.match(r"([a-z_]+):\s*$", line):
            current = m.group(1)
            sections[current] = set()
        elif m := re.match(r"  ([\w/.-]+):", line):
            sections[current].add(m.group(1))
    return sections


def otel_pipeline_refs(text: str) -> dict[str, set[str]]:
    """What `service:` refers to, by kind (`receivers: [a, b]` lines below it)."""
    service = text[text.index("\nservice:"):]
    refs: dict[str, set[str]] = {}
    for kind, names in re.findall(r"(?m)^\s+(receivers|processors|exporters|extensions):\s*\[([^\]]*)\]", service):
        refs.setdefault(kind, set()).update(n.strip() for n in names.split(","))
    return refs


def otel_filelog() -> tuple[list[str], str, str]:
    """(include globs, timestamp layout, location) of the filelog receiver, read from the text."""
    text = OTEL.read_text()
    receiver = text[text.index("  filelog/"):text.index("\nprocessors:")]
    include = re.findall(r"(?m)^\s+include:\s*\n((?:\s+- .+\n)+)", receiver)
    layout = re.search(r"(?m)^\s+layout:\s*'([^']+)'", receiver)
    location = re.search(r"(?m)^\s+location:\s*(\S+)", receiver)
    assert include and layout and location
    return re.findall(r"- (\S+)", include[0]), layout.group(1), location.group(1)


def vector_settings() -> tuple[list[str], str, str, str]:
    """(include globs, parse_timestamp format, its timezone, the VRL program) from the TOML."""
    config = tomllib.loads(VECTOR.read_text())
    (source,) = config["sources"].values()
    (remap,) = config["transforms"].values()
    call = re.search(r'parse_timestamp!\(string!\(\.ts\), format: "([^"]+)", timezone: "([^"]+)"\)', remap["source"])
    assert call, "the remap parses .ts with an explicit format and timezone"
    return source["include"], call.group(1), call.group(2), remap["source"]


# --- files from the real writer -------------------------------------------------------------


async def write_usage(directory: Path, arrivals: tuple[float, ...], *, run: int, tag: str, day: float,
                      rotate_bytes: int) -> None:
    """Run the gateway's writer until it drained ``arrivals`` (one record each, one batch each)."""
    cfg = Telemetry(dir=str(directory), batch_max=1, rotate_bytes=rotate_bytes)
    sink, records_recv = open_telemetry(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_writer, records_recv, sink, cfg, file_tag=tag, now=lambda: day))
        async with sink:  # closing it stops the writer once every record is written
            for i, ts in enumerate(arrivals):
                sink.submit(record(i, ts=ts, request_id=f"run{run}-{i}"))


@pytest.fixture
async def usage_dir(tmp_path: Path) -> Path:
    """A telemetry dir written by the real writer (RUNS), plus files not to ship."""
    directory = tmp_path / "logs"
    one = len(encode_record(record(0)))
    with trio.fail_after(30):
        for run, (subdir, tag, day, arrivals, rotate) in enumerate(RUNS):
            # rotate: past one record and a half, so each record opens .1, .2, ...
            await write_usage(directory / subdir, arrivals, run=run, tag=tag, day=day,
                              rotate_bytes=one + one // 2 if rotate else 0)
    (directory / "usage-20261101.jsonl.gz").write_bytes(b"\x1f\x8b")  # an old day, compressed by cron
    (directory / "notes.txt").write_text("not a usage log\n")
    return directory


def usage_files(directory: Path) -> list[str]:
    """Every usage file under ``directory``, as a relative path."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*.jsonl"))


def expected_instant(ts: float) -> datetime:
    """The instant the gateway wrote for ``ts``: UTC, rounded to the millisecond."""
    seconds, millis = divmod(round(ts * 1000), 1000)
    return datetime.fromtimestamp(seconds, timezone.utc) + timedelta(milliseconds=millis)


async def test_the_writer_made_every_kind_of_file(usage_dir: Path) -> None:
    assert usage_files(usage_dir) == [
        "b/usage-20261125.jsonl",
        "usage-20261124-4242.jsonl",
        "usage-20261124.1.jsonl",
        "usage-20261124.2.jsonl",
        "usage-20261124.3.jsonl",
        "usage-20261124.jsonl",
        "usage-20261125.jsonl",
    ]


@pytest.mark.parametrize("which", ["otelcol", "vector"])
async def test_the_include_globs_match_exactly_the_usage_files(usage_dir: Path, which: str) -> None:
    include = otel_filelog()[0] if which == "otelcol" else vector_settings()[0]
    # The placeholder directory is the default telemetry.dir under the systemd unit's
    # WorkingDirectory (docs/operations.md); what follows it must match the real files.
    base = Path("/srv/trioproxy") / Telemetry().dir
    assert all(Path(pattern).is_relative_to(base) for pattern in include)
    # Matched as path globs (the Collector's doublestar and Vector's glob crate treat `*`
    # alike: within one path segment), each file by exactly one pattern.
    matched = [str(p.relative_to(usage_dir)) for pattern in include
               for p in usage_dir.glob(str(Path(pattern).relative_to(base)))]
    assert sorted(matched) == usage_files(usage_dir)


@pytest.mark.parametrize("which", ["otelcol", "vector"])
async def test_the_timestamp_layout_reads_every_real_ts(usage_dir: Path, which: str) -> None:
    if which == "otelcol":
        _, layout, location = otel_filelog()
        python_format = to_python_format(layout, OTEL_TO_PYTHON)
    else:
        _, layout, location, _ = vector_settings()
        python_format = to_python_format(layout, CHRONO_TO_PYTHON)
    assert location == "UTC"  # the layout ends in a literal Z: no offset in the value itself
    seen = []
    for name in usage_files(usage_dir):
        for line in (usage_dir / name).read_bytes().splitlines():
            rec = decode_line(line)
            assert rec is not None
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])  # %L / %.3f: 3 digits
            parsed = datetime.strptime(rec["ts"], python_format).replace(tzinfo=timezone.utc)
            seen.append((rec["request_id"], parsed))
    written = {f"run{run}-{i}": ts for run, (*_, arrivals, _) in enumerate(RUNS) for i, ts in enumerate(arrivals)}
    assert len(seen) == len(written)
    assert dict(seen) == {rid: expected_instant(ts) for rid, ts in written.items()}


def test_the_otel_config_is_structurally_sound() -> None:
    text = OTEL.read_text()
    sections = otel_sections(text)
    assert set(sections) == {"extensions", "receivers", "processors", "exporters", "service"}
    refs = otel_pipeline_refs(text)
    for kind, names in refs.items():
        assert names <= sections[kind], f"service refers to undefined {kind}: {names - sections[kind]}"
    assert refs["receivers"] == {"filelog/trioproxy"} and refs["extensions"] == {"file_storage"}
    assert re.search(r"(?m)^\s+storage: file_storage$", text), "offsets are checkpointed"
    assert re.search(r"(?m)^\s+service\.name: trioproxy$", text)
    assert re.search(r"(?m)^\s+field: body\.payload$", text), "payloads are not shipped by default"


def test_the_otel_config_parses_as_yaml() -> None:
    config = yaml.safe_load(OTEL.read_text())
    assert {k: set(v) for k, v in config.items() if k != "service"} == {
        k: v for k, v in otel_sections(OTEL.read_text()).items() if k != "service"}
    (receiver,) = config["receivers"].values()
    include, layout, location = otel_filelog()
    timestamp = receiver["operators"][0]["timestamp"]
    assert (receiver["include"], timestamp["layout"], timestamp["location"]) == (include, layout, location)


def test_the_vector_config_parses_and_keeps_payloads_home() -> None:
    config = tomllib.loads(VECTOR.read_text())
    assert config["data_dir"], "checkpoints need a data_dir"
    (remap_id,) = config["transforms"]
    *_, program = vector_settings()
    assert ". = object!(parse_json!(string!(.message)))" in program
    assert re.search(r"ship_payloads = false\s+if !ship_payloads \{\s+del\(\.payload\)\s+\}", program)
    active = [s for s in config["sinks"].values() if s["inputs"] == [remap_id]]
    assert active and all(s["acknowledgements"]["enabled"] for s in active)


def test_a_payload_field_is_where_the_configs_drop_it() -> None:
    """Both configs drop top-level ``payload``: that is where the writer puts prompts."""
    line = encode_record(attrs.evolve(record(0), payload={"request": {"messages": []}}))
    decoded = decode_line(line)
    assert decoded is not None and decoded["payload"] == {"request": {"messages": []}}
