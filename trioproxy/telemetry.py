"""Usage telemetry: one JSON line per request, handed off without waiting.

The promise: every request that reached the gateway is accounted for exactly once,
and accounting never slows a request::

    request path ── sink.submit(rec) ──► bounded memory channel ──► run_writer ──► usage-*.jsonl
                   send_nowait; full or            (queue_capacity)     batches; one worker-thread
                   closed → dropped += 1                                hop per batch; OSError →
                                                                        retry, then lost += n

Accounting identity, true at every checkpoint (``TelemetrySink.statistics()``)::

    submitted == written + lost + dropped + queued + in_flight

``Record`` and ``encode_record`` are sans-IO; ``run_writer`` is the only I/O here and is
owned by the root nursery (DESIGN.md): it drains until every send end is closed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio
from attrs import define, field, frozen
from loguru import logger

from .config import Telemetry

SCHEMA_VERSION = 1
#: Tries per batch before its records are counted as lost (4 sleeps: 0.1+0.2+0.4+0.8 s).
WRITE_TRIES = 5
#: First retry delay after a failed write; doubles per failed try of the same batch.
BACKOFF_FIRST_S = 0.1
#: Ceiling of that delay, so a long outage is retried at a steady, cheap pace.
BACKOFF_MAX_S = 5.0
#: Operator log lines about one kind of problem (an errno, drops) are at most this frequent.
LOG_INTERVAL_S = 60.0
#: On cancellation the writer makes one shielded last write of what it holds, this long at most.
CLEANUP_TIMEOUT_S = 5.0

_T = TypeVar("_T")


@frozen
class AttemptRecord:
    upstream: str
    model: str | None
    #: "ok" | "connect_error" | "timeout" | "status" | "protocol_error" | "cancelled" | "lost_race" | "saturated"
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
            the caller); the writer counts such a record as lost.
    """
    obj: dict[str, Any] = {
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
    try:
        text = _STRICT.encode(obj)
    except (TypeError, ValueError) as exc:
        if rec.payload is None:
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
class _Counters:
    """Shared by one sink and its writer; only ever touched from the Trio thread."""

    submitted: int = 0
    dropped: int = 0
    written: int = 0
    lost: int = 0
    write_errors: int = 0
    batches: int = 0
    current_file: str | None = None
    #: The writer's current batch, shared so that statistics() sees records in its hands.
    in_hand: list[Record] = field(factory=list)


class TelemetrySink:
    """The request path's end: submit() never blocks, never raises.

    Requests call ``submit`` from ``finally``; ``send_nowait`` is not a checkpoint, so it
    works inside a cancelled scope. Closing the sink closes the send end, which is the
    writer's signal to drain and return.
    """

    def __init__(self, records_send: trio.MemorySendChannel[Record]) -> None:
        self._records_send = records_send
        # Mutated here and by run_writer (same module, same thread): one object, no copies.
        self._counters = _Counters()

    def submit(self, rec: Record) -> None:
        """Queue ``rec`` for the writer, or count it as dropped; O(1), no await, no raise."""
        self._counters.submitted += 1
        try:
            self._records_send.send_nowait(rec)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            # Full: the writer is behind (slow or broken disk). Closed: shutdown already
            # began, or the writer is gone. Either way the request must not notice.
            self._counters.dropped += 1

    def statistics(self) -> TelemetryStatistics:
        c = self._counters
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

    async def __aenter__(self) -> TelemetrySink:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def open_telemetry(cfg: Telemetry) -> tuple[TelemetrySink, trio.MemoryReceiveChannel[Record]]:
    """Create the sink and the bounded channel behind it (``cfg.queue_capacity`` records).

    ``main`` keeps the sink for the request path and gives the receive end to
    ``run_writer``; ``async with sink:`` in ``main`` closes the send end at shutdown.
    """
    records_send, records_recv = trio.open_memory_channel[Record](cfg.queue_capacity)
    return TelemetrySink(records_send), records_recv


# --- the usage-log file (sync; runs in a worker thread, one call at a time) ----------------

_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def file_name(day: str, tag: str = "", index: int = 0) -> str:
    """``usage-YYYYMMDD[-tag][.N].jsonl``: the one place that spells a usage-log name."""
    return f"usage-{day}{'-' + tag if tag else ''}{f'.{index}' if index else ''}.jsonl"


def _utc_day(now: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now))


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte (``os.write`` may write fewer); the seam tests break to fake a full disk."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@define
class _Appender:
    """The open usage-log file: naming, rotation, reopening after trouble."""

    directory: Path
    tag: str
    rotate_bytes: int
    rotate_daily: bool
    path: Path | None = None
    _fd: int | None = None
    _day: str = ""
    _index: int = 0
    _size: int = 0
    _dev_ino: tuple[int, int] = (0, 0)

    def append(self, batch: Sequence[Record], now: float) -> tuple[int, int]:
        """Encode and append one batch; returns (records written, records not encodable).

        Raises:
            OSError: nothing of the batch is left in the file (it is truncated back), and
                the file is closed so that the next call reopens it.
        """
        lines: list[bytes] = []
        for rec in batch:
            try:
                lines.append(encode_record(rec))
            except (TypeError, ValueError):
                pass  # counted as lost by the caller; the other records still go out
        data = b"".join(lines)
        if data:
            try:
                self._write(data, _utc_day(now))
            except OSError:
                self.close()
                raise
        return len(lines), len(batch) - len(lines)

    def _write(self, data: bytes, day: str) -> None:
        if self._fd is None or not self._still_ours():
            self._open(day)
        elif self.rotate_daily and day != self._day:
            self._open(day)
        elif self.rotate_bytes and self._size and self._size + len(data) > self.rotate_bytes:
            # Rotate before a batch would take the file past rotate_bytes: files stay under
            # the limit unless one batch alone is larger.
            self._open(self._day, index=self._index + 1)
        assert self._fd is not None
        start = self._size
        try:
            _write_all(self._fd, data)
        except OSError:
            # A partial batch would be a broken line plus duplicates after the retry.
            # We are the file's only writer (one file per worker), so cutting it is safe.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass  # best effort: a reader skips the broken line
            raise
        self._size = start + len(data)

    def _still_ours(self) -> bool:
        # The directory deleted, or the file moved away by an outside logrotate: writes to
        # the old inode would vanish, so reopen (one stat per batch).
        try:
            st = os.stat(self.path) if self.path else None
        except FileNotFoundError:
            return False
        return st is not None and (st.st_dev, st.st_ino) == self._dev_ino

    def _open(self, day: str, *, index: int | None = None) -> None:
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        if index is None:  # continue the day's newest file (a restart on the same day)
            index = self._newest_index(day)
        path = self.directory / file_name(day, self.tag, index)
        # O_APPEND and no user-space buffer: each batch is one write(2) straight to the file.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o640)
        st = os.fstat(fd)
        self._fd, self.path, self._day, self._index = fd, path, day, index
        self._size, self._dev_ino = st.st_size, (st.st_dev, st.st_ino)

    def _newest_index(self, day: str) -> int:
        stem = file_name(day, self.tag).removesuffix(".jsonl")
        pattern = re.compile(re.escape(stem) + r"(?:\.(\d+))?\.jsonl")
        found = (pattern.fullmatch(p.name) for p in self.directory.iterdir())
        return max((int(m.group(1) or 0) for m in found if m), default=0)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass  # nothing buffered in user space: no data rides on this close


async def _offload(fn: Callable[..., _T], *args: Any) -> _T:
    """Run blocking file work off the Trio thread. Tests swap this to run inline under MockClock."""
    return await trio.to_thread.run_sync(fn, *args)


# --- the writer ----------------------------------------------------------------------------


@define
class _Throttle:
    """At most one operator log line per kind per LOG_INTERVAL_S (Trio clock: MockClock-driven)."""

    _last: dict[str, float] = field(factory=dict)

    def allow(self, kind: str) -> bool:
        now = trio.current_time()
        last = self._last.get(kind)
        if last is not None and now - last < LOG_INTERVAL_S:
            return False
        self._last[kind] = now
        return True


@define
class _Writer:
    appender: _Appender
    counters: _Counters
    now: Callable[[], float]
    throttle: _Throttle = field(factory=_Throttle)
    dropped_reported: int = 0
    failing: bool = False

    async def write(self, batch: list[Record], *, tries: int = WRITE_TRIES) -> None:
        """Write ``batch`` (then empty it), retrying with backoff; give up after ``tries``."""
        delay = BACKOFF_FIRST_S
        for attempt in range(1, tries + 1):
            try:
                written, unencodable = await _offload(self.appender.append, batch, self.now())
            except OSError as exc:
                self.counters.write_errors += 1
                self._report_error(exc, attempt, tries, len(batch))
                if attempt < tries:
                    await trio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            # No checkpoint from here to the clear(): the batch is counted exactly once.
            c = self.counters
            c.written += written
            c.lost += unencodable
            c.batches += 1
            c.current_file = str(self.appender.path) if self.appender.path else None
            batch.clear()
            if unencodable and self.throttle.allow("unencodable"):
                logger.error("telemetry: {} record(s) could not be encoded (a field of the wrong type)", unencodable)
            if self.failing:
                self.failing = False
                logger.info("telemetry: writing again to {} ({} write errors so far)", c.current_file, c.write_errors)
            self.report_drops()
            return
        self.counters.lost += len(batch)
        batch.clear()
        if self.throttle.allow("lost"):
            logger.error("telemetry: gave up on a batch after {} tries; {} records lost so far", tries, self.counters.lost)

    def _report_error(self, exc: OSError, attempt: int, tries: int, n: int) -> None:
        self.failing = True
        if self.throttle.allow(f"errno:{exc.errno}:{type(exc).__name__}"):
            where = self.appender.path or self.appender.directory
            logger.error(
                "telemetry: cannot write the usage log {} ({}): try {}/{} for {} records; "
                "requests are still served, queued records wait, overflow is dropped and counted",
                where, exc, attempt, tries, n,
            )
        self.report_drops()

    def report_drops(self) -> None:
        dropped = self.counters.dropped
        if dropped > self.dropped_reported and self.throttle.allow("dropped"):
            logger.warning("telemetry: {} records dropped so far (queue full or closed)", dropped)
            self.dropped_reported = dropped


async def _collect(records_recv: trio.MemoryReceiveChannel[Record], batch: list[Record], *, batch_max: int, flush_s: float) -> bool:
    """Fill ``batch`` with the next batch; False once every send end is closed (and drained).

    Waits for one record, takes what is already queued, then, unless the batch is full,
    waits up to ``flush_s`` for more.
    """

    def take_ready() -> None:
        while len(batch) < batch_max:
            try:
                batch.append(records_recv.receive_nowait())
            except trio.WouldBlock:
                return

    try:
        batch.append(await records_recv.receive())
        take_ready()
        if len(batch) < batch_max:
            # receive() is cancel-safe: a record is either in the batch or still queued.
            with trio.move_on_after(flush_s):
                while len(batch) < batch_max:
                    batch.append(await records_recv.receive())
                    take_ready()
    except trio.EndOfChannel:
        return False
    return True


async def run_writer(
    records_recv: trio.MemoryReceiveChannel[Record],
    sink: TelemetrySink,
    cfg: Telemetry,
    *,
    file_tag: str = "",
    now: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Append every record to ``<cfg.dir>/usage-YYYYMMDD[-tag][.N].jsonl`` until the channel ends.

    Owned by the root nursery. Returns after every send end is closed and every queued
    record has been written (or counted lost): that is the shutdown path. If cancelled
    instead, it makes one shielded last write of what it holds (CLEANUP_TIMEOUT_S) and
    counts the rest as lost. It never raises OSError: disk trouble is logged, retried,
    and counted (``sink.statistics()``).

    Args:
        file_tag: added to file names when several workers share ``cfg.dir`` (their pid).
        now: the wall clock used to date files (tests pass a fake one).
    """
    counters = sink._counters
    tag = _TAG_UNSAFE.sub("_", file_tag)
    writer = _Writer(_Appender(Path(cfg.dir), tag, cfg.rotate_bytes, cfg.rotate_daily), counters, now)
    batch = counters.in_hand
    task_status.started()
    try:
        more = True
        while more:
            more = await _collect(records_recv, batch, batch_max=cfg.batch_max, flush_s=cfg.flush_ms / 1000)
            if batch:
                await writer.write(batch)
    finally:
        # Empty on a normal return. After a cancellation: what we hold plus what is queued.
        with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
            while True:
                try:
                    batch.append(records_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if batch:
                await writer.write(batch, tries=1)
        counters.lost += len(batch)  # only if the last write was cut short
        batch.clear()
        records_recv.close()  # later submits count as dropped instead of piling up
        writer.appender.close()
        writer.report_drops()
        if counters.dropped or counters.lost:
            logger.warning(
                "telemetry: writer stopped; {} written, {} dropped, {} lost",
                counters.written, counters.dropped, counters.lost,
            )
