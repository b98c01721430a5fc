"""The usage-log file: ``run_writer`` drains the telemetry channel into JSONL files.

The file side of ``telemetry`` (which holds the record, its encoding and the sink)::

    records_recv ──► _collect: one batch ──► _prepare ──► _Writer.write ──► _offload(_Appender.append) ──► usage-*.jsonl
                     (batch_max, flush_ms)   metrics and   retries with     one worker-thread hop,
                                             JSONL, SLICE  backoff, then    one O_APPEND write(2)
                                             records at a  lost += n
                                             time

Files are ``<dir>/usage-YYYYMMDD[-tag][.N].jsonl`` (``file_name``): rotated by UTC day
and by size, reopened when the directory or the file is moved away. ``run_writer`` is
owned by the root nursery: it drains until every send end is closed, and it updates the
sink's ``Counters`` so that ``TelemetrySink.statistics()`` keeps its accounting identity.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio
from attrs import define, field
from loguru import logger

from .config import Telemetry
from .telemetry import Counters, Record, TelemetrySink, encode_record

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
#: Records handed to the metrics and encoded between two checkpoints of the writer. It runs
#: on the Trio thread between requests: a request that arrives meanwhile waits for one slice
#: (~10 µs per record on a slow guest), not for a whole batch. Encoding in the worker thread
#: instead held the GIL for the whole batch, which a request then waited for, and cost
#: 4-10 % more CPU per request (docs/benchmarks-history.md). A checkpoint per 16 records is
#: <1 % of their cost. But on a saturated core a checkpoint waits for every other runnable
#: task's step (tens of ms with hundreds of connections): 16 records per turn fell behind
#: 3,500 requests/s and the queue overflowed. So a writer that is behind (a full batch more
#: waiting in the queue) takes its whole batch in one turn (``_slice``).
SLICE = 16

_T = TypeVar("_T")


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

    def append(self, data: bytes, now: float) -> None:
        """Append one encoded batch (whole JSONL lines) to the day's file, rotating first if due.

        Raises:
            OSError: nothing of the batch is left in the file (it is truncated back), and
                the file is closed so that the next call reopens it.
        """
        try:
            self._write(data, _utc_day(now))
        except OSError:
            self.close()
            raise

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
    counters: Counters
    now: Callable[[], float]
    throttle: _Throttle = field(factory=_Throttle)
    dropped_reported: int = 0
    failing: bool = False

    async def write(self, batch: list[Record], encoded: tuple[bytes, int], *, tries: int = WRITE_TRIES) -> None:
        """Write ``batch``, as ``_prepare`` encoded it (then empty it), retrying with backoff; give up after ``tries``."""
        data, unencodable = encoded
        written = len(batch) - unencodable
        delay = BACKOFF_FIRST_S
        for attempt in range(1, tries + 1):
            try:
                if data:
                    await _offload(self.appender.append, data, self.now())
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


async def _collect(
    records_recv: trio.MemoryReceiveChannel[Record], batch: list[Record], sink: TelemetrySink, *, batch_max: int, flush_s: float
) -> bool:
    """Fill ``batch`` with the next batch; False once every send end is closed (and drained).

    Waits for one record, takes what is already queued, then, unless the batch is full (or
    ``sink.flush`` asks for what is pending), waits up to ``flush_s`` for more. That wait
    sleeps: the records pile up in the channel and the sink ends the wait once enough were
    submitted to fill the batch (or on close), so the writer wakes once per batch, not once
    per record (``loadtest/bench_app.py --instructions``).
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
        deadline = trio.current_time() + flush_s
        # Woken once the batch could be full, or the channel half full (a queue_capacity below
        # batch_max): the records wait in the channel, and a full one would drop them.
        capacity = records_recv.statistics().max_buffer_size
        while len(batch) < batch_max and trio.current_time() < deadline:  # bounded: each pass waits, at most to the deadline
            if sink.take_flush():
                break
            with trio.CancelScope(deadline=deadline) as wait:
                sink.wake_writer(wait, int(min(batch_max - len(batch), max(1, capacity // 2))))
                try:
                    await trio.sleep_forever()
                finally:
                    sink.wake_writer(None)
            take_ready()
    except trio.EndOfChannel:
        return False
    return True


def _slice(records_recv: trio.MemoryReceiveChannel[Record], batch_max: int) -> int:
    """Records per turn: ``SLICE``, or, when a full batch more is already waiting (the writer is
    behind: the core is saturated and its checkpoints wait long), a whole batch."""
    return batch_max if records_recv.statistics().current_buffer_used >= batch_max else SLICE


async def _prepare(
    batch: Sequence[Record], observe: Callable[[list[Record]], None] | None, sink: TelemetrySink,
    *, note: bool = True, size: int = SLICE,
) -> tuple[bytes, int]:
    """Hand ``batch`` to ``observe`` and encode it, ``size`` records at a time with a checkpoint between.

    Returns the JSONL lines and how many records could not be encoded (counted as lost; the
    others still go out). ``note``: count the records as observed (``sink.wait_observed``).
    """
    # One buffer, each line added as it is encoded: a line (~600 B, past pymalloc's 512) is a
    # block of the C heap, and a batch's lines kept in a list until the join sat there among
    # what the requests allocated meanwhile; the heap stayed larger by ~6 KB per open stream
    # at 512 streams (docs/benchmarks.md, stream-512-telemetry).
    lines = bytearray()
    unencodable = 0
    for start in range(0, len(batch), size):
        if start:
            await trio.lowlevel.checkpoint()  # let the requests that came meanwhile run
        part = list(batch[start : start + size])
        if observe is not None:
            observe(part)
        if note:
            sink.note_observed(len(part))
        for rec in part:
            try:
                lines += encode_record(rec)
            except (TypeError, ValueError):
                unencodable += 1
    return bytes(lines), unencodable


async def run_discarder(
    records_recv: trio.MemoryReceiveChannel[Record],
    sink: TelemetrySink,
    cfg: Telemetry,
    *,
    observe: Callable[[list[Record]], None],
) -> None:
    """The usage log disabled: nothing is written, but the records still feed ``observe`` (the
    metrics, the live feed), batched as the writer batches them, at most ``flush_ms`` behind.

    One record at a time cost 48k instructions more per small request than writing the log
    did (``loadtest/bench_app.py --instructions --telemetry-off``): the metrics sum their
    counters per call (a slice of up to ``SLICE`` records), and the task wakes once per batch.
    Returns once the channel ends; cancelled, it still hands what it holds and what is
    queued to ``observe`` (sync) before it returns.
    """
    batch: list[Record] = []
    try:
        more = True
        while more:
            more = await _collect(records_recv, batch, sink, batch_max=cfg.batch_max, flush_s=cfg.flush_ms / 1000)
            size = _slice(records_recv, cfg.batch_max)
            while batch:  # a slice at a time, taken off the batch as it goes: what is left is unseen
                part = batch[:size]
                del batch[:size]
                observe(part)
                sink.note_observed(len(part))
                if batch:
                    await trio.lowlevel.checkpoint()
    finally:
        # Cancelled: what it holds and what is queued still reach the metrics (sync, no checkpoint).
        while True:
            try:
                batch.append(records_recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        if batch:
            observe(batch)
            sink.note_observed(len(batch))
        records_recv.close()


async def run_writer(
    records_recv: trio.MemoryReceiveChannel[Record],
    sink: TelemetrySink,
    cfg: Telemetry,
    *,
    file_tag: str = "",
    now: Callable[[], float] = time.time,
    observe: Callable[[list[Record]], None] | None = None,
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
        observe: called with each batch before it is written (the metrics, the live feed),
            ``SLICE`` records at a time, in this task: off the request path, ``flush_ms``
            behind it when it keeps up.
    """
    counters = sink.counters
    tag = _TAG_UNSAFE.sub("_", file_tag)
    writer = _Writer(_Appender(Path(cfg.dir), tag, cfg.rotate_bytes, cfg.rotate_daily), counters, now)
    batch = counters.in_hand
    task_status.started()
    try:
        more = True
        while more:
            more = await _collect(records_recv, batch, sink, batch_max=cfg.batch_max, flush_s=cfg.flush_ms / 1000)
            if batch:
                size = _slice(records_recv, cfg.batch_max)
                await writer.write(batch, await _prepare(batch, observe, sink, size=size))
    finally:
        # Empty on a normal return. After a cancellation: what we hold plus what is queued.
        with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
            while True:
                try:
                    batch.append(records_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if batch:  # (not shown to the metrics, nor noted as observed: the process is going down)
                await writer.write(batch, await _prepare(batch, None, sink, note=False), tries=1)
        counters.lost += len(batch)  # only if the last write was cut short
        batch.clear()
        # Submitted during that last write's checkpoints: nobody will write them. Counted
        # here, with no checkpoint before the close, so the statistics still add up.
        while True:
            try:
                records_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            counters.lost += 1
        records_recv.close()  # later submits count as dropped instead of piling up
        writer.appender.close()
        writer.report_drops()
        if counters.dropped or counters.lost:
            logger.warning(
                "telemetry: writer stopped; {} written, {} dropped, {} lost",
                counters.written, counters.dropped, counters.lost,
            )
