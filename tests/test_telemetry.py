"""telemetry: the record's encoding (sans-IO) and the zero-wait hand-off. The writer: test_usagelog."""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy import telemetry
from trioproxy.config import Telemetry
from trioproxy.telemetry import (
    SCHEMA_VERSION,
    AttemptRecord,
    Record,
    decode_line,
    encode_record,
    open_telemetry,
)

from .logrecords import T0, record



# --- encoding ----------------------------------------------------------------------------

GOLDEN = (
    b'{"schema":1,"request_id":"req-000000","ts":"2026-11-24T06:00:00.123Z",'
    b'"route":"/v1/chat/completions","method":"POST","model_requested":"llama3",'
    b'"model_served":"llama3:8b","upstream":"ollama-a","attempts":[{"upstream":"ollama-a",'
    b'"model":"llama3:8b","outcome":"ok","status":200,"ms":12.346}],"hedged":false,'
    b'"status":200,"outcome":"ok","stream":true,"ttft_ms":120.0,"total_ms":1520.5,'
    b'"queue_ms":0.0,"bytes_in":512,"bytes_out":20480,"prompt_tokens":12,'
    b'"completion_tokens":345,"token_source":"upstream","finish_reason":"stop","error":null,'
    b'"key_id":null,"worker":4242,"payload":null}\n'
)


def test_encode_is_one_compact_line_in_schema_order() -> None:
    line = encode_record(record())
    assert line == GOLDEN
    keys = list(json.loads(line))
    assert keys == ["schema", *(f.name for f in attrs.fields(Record))]


def test_encode_round_trips_through_decode_line() -> None:
    rec = record(3, error="upstream said no", key_id="team-a", payload={"messages": ["héllo"]})
    decoded = decode_line(encode_record(rec))
    assert decoded is not None
    assert decoded["schema"] == SCHEMA_VERSION
    assert decoded["ts"] == "2026-11-24T06:00:03.123Z"
    assert decoded["attempts"] == [
        {"upstream": "ollama-a", "model": "llama3:8b", "outcome": "ok", "status": 200, "ms": 12.346}
    ]
    plain = {k: v for k, v in attrs.asdict(rec).items() if k not in ("ts", "attempts")}
    assert {k: decoded[k] for k in plain} == {**plain, "total_ms": 1520.5}
    assert decode_line(encode_record(rec).decode()) == decoded  # str works too


@pytest.mark.parametrize(
    ("ts", "text"),
    [(T0, "2026-11-24T06:00:00.123Z"), (T0 - 0.123 + 0.9996, "2026-11-24T06:00:01.000Z"), (0.0, "1970-01-01T00:00:00.000Z")],
)
def test_ts_is_iso_utc_with_milliseconds(ts: float, text: str) -> None:
    expected = json.loads(GOLDEN) | {"ts": text}
    assert decode_line(encode_record(record(ts=ts))) == expected


def test_non_finite_numbers_become_null_and_odd_payloads_still_encode() -> None:
    d = decode_line(encode_record(record(ttft_ms=float("nan"), total_ms=float("inf"), ts=float("nan"))))
    assert d is not None and (d["ttft_ms"], d["total_ms"], d["ts"]) == (None, None, None)
    d = decode_line(encode_record(record(payload={"raw": b"\x00bytes"})))
    assert d is not None and d["payload"] == {"raw": "b'\\x00bytes'"}
    d = decode_line(encode_record(record(payload={"x": float("nan")})))
    assert d is not None and d["payload"] == {"unencodable": "ValueError"}


@pytest.mark.parametrize("bad", [b"", b"{", b'{"schema":1', b"[1, 2]", b"\xff\xfe", "null", b'"text"'])
def test_decode_line_rejects_malformed_lines(bad: bytes | str) -> None:
    assert decode_line(bad) is None


_text = st.text(alphabet=st.characters(codec=None), max_size=40)  # any code point: \n, \u2028, surrogates
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=10,
)
_attempt = st.builds(AttemptRecord, _text, st.none() | _text, _text, st.none() | st.integers(), st.floats())
_records = st.builds(
    Record,
    request_id=_text,
    ts=st.floats(),
    route=_text,
    method=_text,
    model_requested=st.none() | _text,
    attempts=st.lists(_attempt, max_size=3).map(tuple),
    hedged=st.booleans(),
    status=st.integers(),
    ttft_ms=st.none() | st.floats(),
    total_ms=st.floats(),
    prompt_tokens=st.none() | st.integers(),
    error=st.none() | _text,
    payload=st.none() | st.dictionaries(_text, _json, max_size=4),
)


@settings(max_examples=300)
@given(_records)
def test_any_record_encodes_to_exactly_one_json_line(rec: Record) -> None:
    line = encode_record(rec)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    decoded = json.loads(line.decode("utf-8"))  # valid UTF-8 and valid (strict) JSON
    assert list(decoded) == ["schema", *(f.name for f in attrs.fields(Record))]
    assert decode_line(line) == decoded


@settings(max_examples=300)
@given(_records.map(lambda r: attrs.evolve(r, payload=None)))
def test_the_fast_encoder_writes_what_the_json_module_writes(rec: Record) -> None:
    # orjson for records without a payload, the json module when it refuses one (a lone
    # surrogate, an int beyond 64 bits): the same JSON either way. Bytes may differ only in
    # how a float of 1e16 or more is spelt (1e+16 / 1e16).
    line = encode_record(rec)
    slow = telemetry._encode_with_json(telemetry._as_dict(rec), has_payload=False)
    assert json.loads(line) == json.loads(slow)
    spelt_alike = all(
        abs(v) < 1e16
        for v in (rec.ts, rec.ttft_ms or 0.0, rec.total_ms, *(a.ms for a in rec.attempts))
        if math.isfinite(v)
    )
    if spelt_alike:
        assert line == slow


# --- the hand-off ------------------------------------------------------------------------


def test_submit_counts_a_full_or_closed_channel_as_dropped_and_never_raises() -> None:
    sink, records_recv = open_telemetry(Telemetry(queue_capacity=2))
    for i in range(5):
        sink.submit(record(i))
    assert (sink.statistics().submitted, sink.statistics().queued, sink.statistics().dropped) == (5, 2, 3)
    records_recv.close()
    sink.submit(record(6))  # BrokenResourceError inside
    sink.close()
    sink.submit(record(7))  # ClosedResourceError inside
    stats = sink.statistics()
    assert (stats.submitted, stats.dropped) == (7, 5)


def test_the_documented_example_line_is_a_real_record() -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "telemetry.md"
    [line] = [raw for raw in docs.read_text(encoding="utf-8").splitlines() if raw.startswith('{"schema"')]
    decoded = decode_line(line)
    assert decoded is not None and list(decoded) == ["schema", *(f.name for f in attrs.fields(Record))]
    rebuilt = attrs.evolve(
        Record(**{k: v for k, v in decoded.items() if k not in ("schema", "ts", "attempts")}, ts=T0),
        attempts=tuple(AttemptRecord(**a) for a in decoded["attempts"]),
    )
    assert encode_record(rebuilt) == (line + "\n").encode()  # the example is exactly what we write
