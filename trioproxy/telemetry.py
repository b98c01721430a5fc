"""Usage telemetry, the record side: one JSON line per request, handed off without waiting.

The promise: every request that reached the gateway is accounted for exactly once,
and accounting never slows a request::

    request path ── sink.submit(rec) ──► bounded memory channel ──► usagelog.run_writer ──► usage-*.jsonl
                   send_nowait; full or            (queue_capacity)     batches; one worker-thread
                   closed → dropped += 1                                hop per batch; OSError →
                                                                        retry, then lost += n

Accounting identity, true at every checkpoint (``TelemetrySink.statistics()``)::

    submitted == written + lost + dropped + queued + in_flight

``Record``, ``encode_record`` and ``decode_line`` are sans-IO. This module does no I/O:
the file side (naming, batching, rotation, disk-error retries) is ``usagelog.run_writer``,
which shares the sink's ``Counters`` and is owned by the root nursery (DESIGN.md).
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import Any

import orjson
import trio
from attrs import define, field, frozen

from .config import Telemetry

SCHEMA_VERSION = 1


@frozen
class AttemptRecord:
    upstream: str
    model: str | None
    #: "ok" | "broke" | "client_error" | "connect_error" | "timeout" | "status" | "context_length" | "protocol_error"
    #: | "cancelled" | "lost_race" | "saturated" | "circuit_open" (docs/telemetry.md)
    outcome: str
    status: int | None
    ms: float


@frozen
class Record:
    """What one request cost and how it went. Never a prompt, a completion or a secret."""

    request_id: str
    ts: float  # unix seconds at arrival
    route: str
    method: str
    model_requested: str | None = None
    model_served: str | None = None
    upstream: str | None = None
    attempts: tuple[AttemptRecord, ...] = ()
    hedged: bool = False
    status: int = 0  # HTTP status sent to the client (0 if none was sent)
    outcome: str = "ok"  # "ok" | "upstream_error" | "client_disconnect" | "rejected" | "timeout"
    stream: bool = False
    ttft_ms: float | None = None
    total_ms: float = 0.0
    queue_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    token_source: str = "none"  # "upstream" | "estimate" | "none"
    finish_reason: str | None = None
    error: str | None = None
    key_id: str | None = None  # client key id (never the key), when auth is on
    worker: int = 0  # pid of the worker process
    payload: dict[str, Any] | None = None  # only when the operator opted in to log_payloads


# --- encoding [sans-IO] ------------------------------------------------------------------

# One encoder built once: json.dumps with options builds a new JSONEncoder per call.
# allow_nan=False because NaN/Infinity are not JSON; _ms() maps them to null first.
_STRICT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# Second chance for a payload holding non-JSON values (bytes, datetimes...): str() them.
_LENIENT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)


@functools.lru_cache(maxsize=64)
def _utc_second(second: int) -> str:
    # Records arrive in bursts within the same second: the cache saves the strftime (~1 µs).
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _iso_utc(ts: float) -> str | None:
    try:
        second, millis = divmod(round(ts * 1000), 1000)
        return f"{_utc_second(second)}.{millis:03d}Z"
    except (OverflowError, ValueError, OSError):  # NaN, ±inf, or a year gmtime cannot show
        return None


def _ms(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 3)


def encode_record(rec: Record) -> bytes:
    """Encode one record as exactly one compact JSON line ending in ``b"\\n"``.

    Keys come in a fixed order (``schema`` first, then the fields of ``Record``), and
    ``None`` stays ``null``, so every line has the same shape. ``ts`` becomes ISO 8601
    UTC with milliseconds; millisecond floats are rounded to 3 decimals (non-finite → null).
    A payload that JSON cannot hold is replaced by ``{"unencodable": "<reason>"}``.

    Raises:
        TypeError, ValueError: only when a field holds a value of the wrong type (a bug in
            the caller) that neither encoder can write; the writer counts such a record as
            lost. (orjson writes some wrong types the json module refused: a datetime, a
            UUID or an enum as its value, a NaN in an int field as null.)
    """
    obj = _as_dict(rec)
    if rec.payload is None:
        # The fast path: the same JSON as the json module's (the same bytes, but for floats of
        # 1e16 and more), about 10x faster. It refuses a lone surrogate (from a client's
        # "\\ud800" in a model name) and an int beyond 64 bits: those, and payloads (whose NaN
        # must be refused, see below), take the json module's path.
        try:
            return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:
            pass
    return _encode_with_json(obj, has_payload=rec.payload is not None)


def _as_dict(rec: Record) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "request_id": rec.request_id,
        "ts": _iso_utc(rec.ts),
        "route": rec.route,
        "method": rec.method,
        "model_requested": rec.model_requested,
        "model_served": rec.model_served,
        "upstream": rec.upstream,
        "attempts": [
            {"upstream": a.upstream, "model": a.model, "outcome": a.outcome, "status": a.status, "ms": _ms(a.ms)}
            for a in rec.attempts
        ],
        "hedged": rec.hedged,
        "status": rec.status,
        "outcome": rec.outcome,
        "stream": rec.stream,
        "ttft_ms": _ms(rec.ttft_ms),
        "total_ms": _ms(rec.total_ms),
        "queue_ms": _ms(rec.queue_ms),
        "bytes_in": rec.bytes_in,
        "bytes_out": rec.bytes_out,
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "token_source": rec.token_source,
        "finish_reason": rec.finish_reason,
        "error": rec.error,
        "key_id": rec.key_id,
        "worker": rec.worker,
        "payload": rec.payload,
    }


def _encode_with_json(obj: dict[str, Any], *, has_payload: bool) -> bytes:
    """The json module's encoding: every record the fast path refuses, and every payload."""
    try:
        text = _STRICT.encode(obj)
    except (TypeError, ValueError) as exc:
        if not has_payload:
            raise
        try:
            text = _LENIENT.encode(obj)
        except (TypeError, ValueError):  # NaN, a cycle, a tuple key...
            obj["payload"] = {"unencodable": type(exc).__name__}
            text = _STRICT.encode(obj)
    # json escapes every control character, so the only b"\n" is ours. A lone surrogate
    # (only reachable from broken input) cannot be UTF-8: backslashreplace writes it as the
    # JSON escape \udXXX, which keeps the line valid JSON and valid UTF-8.
    return (text + "\n").encode("utf-8", "backslashreplace")


def decode_line(line: bytes | str) -> dict[str, Any] | None:
    """Parse one usage-log line for a reader; ``None`` for a malformed or partial line."""
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        return None
    return value if isinstance(value, dict) else None


# --- the hand-off ------------------------------------------------------------------------


@frozen
class TelemetryStatistics:
    submitted: int  # every submit() call
    dropped: int  # channel full (or closed): never queued
    written: int  # on disk
    lost: int  # failed disk writes given up on, or a record that could not be encoded
    write_errors: int  # failed write tries (one batch may fail several times)
    batches: int  # successful writes
    current_file: str | None
    queued: int = 0  # in the channel, not yet taken by the writer
    in_flight: int = 0  # taken by the writer, neither written nor lost yet


@define
class Counters:
    """Shared by one sink and its writer (``usagelog.run_writer``); only ever touched from the Trio thread."""

    submitted: int = 0
    dropped: int = 0
    written: int = 0
    lost: int = 0
    write_errors: int = 0
    batches: int = 0
    current_file: str | None = None
    #: The writer's current batch, shared so that statistics() sees records in its hands.
    in_hand: list[Record] = field(factory=list)
    #: Records the writer has taken and handed to the observers (metrics), if any, so far.
    observed: int = 0


class TelemetrySink:
    """The request path's end: submit() never blocks, never raises.

    Requests call ``submit`` from ``finally``; ``send_nowait`` is not a checkpoint, so it
    works inside a cancelled scope. Closing the sink closes the send end, which is the
    writer's signal to drain and return.
    """

    def __init__(self, records_send: trio.MemorySendChannel[Record]) -> None:
        self._records_send = records_send
        #: Mutated here and by usagelog.run_writer (same thread): one object, no copies.
        #: Everyone else reads statistics().
        self.counters = Counters()
        self._observed_lot = trio.lowlevel.ParkingLot()
        #: The writer's wait for a batch to fill (``usagelog._collect``), and the ``submitted``
        #: count that ends it early: the writer is not woken once per record.
        self._flush_wait: trio.CancelScope | None = None
        self._flush_at = 0
        #: ``flush``: records up to this many observed, the writer does not wait for more.
        self._flush_until = 0

    def wake_writer(self, wait: trio.CancelScope | None, after: int = 0) -> None:
        """(The writer.) Cancel ``wait`` once ``after`` more records are submitted, or on close; None: forget it."""
        self._flush_wait, self._flush_at = wait, self.counters.submitted + after

    def flush(self) -> None:
        """Have the writer take what is queued now, without waiting ``flush_ms`` for a fuller batch.

        Applies to the records submitted so far (and not dropped): once they have all been
        observed, the writer waits as usual again; with none pending it changes nothing.
        Sync, no checkpoint. For measurements that must include the writing of their own
        records (``loadtest/bench_app.py``); ``wait_observed`` tells when they were taken.
        """
        self._flush_until = self.counters.submitted - self.counters.dropped
        if self._flush_wait is not None and self.counters.observed < self._flush_until:
            self._flush_wait.cancel()
            self._flush_wait = None

    def take_flush(self) -> bool:
        """(The writer.) Whether records a ``flush`` covers are still to be observed."""
        return self.counters.observed < self._flush_until

    def note_observed(self, n: int) -> None:
        """The writer handed ``n`` more records to the observers (metrics)."""
        self.counters.observed += n
        self._observed_lot.unpark_all()

    async def wait_observed(self, n: int) -> None:
        """Wait until ``n`` records in all have reached the observers (tests; event-based, no polling)."""
        while self.counters.observed < n:
            await self._observed_lot.park()

    def submit(self, rec: Record) -> None:
        """Queue ``rec`` for the writer, or count it as dropped; O(1), no await, no raise."""
        counters = self.counters
        counters.submitted += 1
        try:
            self._records_send.send_nowait(rec)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            # Full: the writer is behind (slow or broken disk). Closed: shutdown already
            # began, or the writer is gone. Either way the request must not notice.
            counters.dropped += 1
        if self._flush_wait is not None and counters.submitted >= self._flush_at:
            self._flush_wait.cancel()  # sync, not a checkpoint: fine inside a cancelled scope
            self._flush_wait = None

    def statistics(self) -> TelemetryStatistics:
        c = self.counters
        return TelemetryStatistics(
            submitted=c.submitted,
            dropped=c.dropped,
            written=c.written,
            lost=c.lost,
            write_errors=c.write_errors,
            batches=c.batches,
            current_file=c.current_file,
            queued=self._records_send.statistics().current_buffer_used,
            in_flight=len(c.in_hand),
        )

    def close(self) -> None:
        """Close the send end (idempotent): the writer drains what is queued and returns."""
        self._records_send.close()
        if self._flush_wait is not None:
            self._flush_wait.cancel()
            self._flush_wait = None

    async def __aenter__(self) -> TelemetrySink:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def open_telemetry(cfg: Telemetry) -> tuple[TelemetrySink, trio.MemoryReceiveChannel[Record]]:
    """Create the sink and the bounded channel behind it (``cfg.queue_capacity`` records).

    ``main`` keeps the sink for the request path and gives the receive end to
    ``usagelog.run_writer``; ``async with sink:`` in ``main`` closes the send end at shutdown.
    """
    records_send, records_recv = trio.open_memory_channel[Record](cfg.queue_capacity)
    return TelemetrySink(records_send), records_recv
