"""usagelog: the JSONL writer (batching, rotation, reopening, disk-error retries, shutdown)."""

from __future__ import annotations

import errno
import inspect
import json
import math
import os
import shutil
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from loguru import logger

from trioproxy import usagelog
from trioproxy.config import Telemetry
from trioproxy.telemetry import Record, TelemetrySink, encode_record, open_telemetry
from trioproxy.usagelog import run_writer

from .logrecords import T0, record

DAY = 86_400.0


# --- the writer ----------------------------------------------------------------------------


@pytest.fixture
def inline_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the writer's file work on the Trio thread: the MockClock cannot jump during a write."""

    async def inline(fn: Callable[..., Any], *args: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(usagelog, "_offload", inline)


def config(tmp_path: Path, **changes: Any) -> Telemetry:
    return attrs.evolve(Telemetry(dir=str(tmp_path / "logs"), queue_capacity=10_000, batch_max=100, flush_ms=200), **changes)


@asynccontextmanager
async def writing(cfg: Telemetry, **kwargs: Any) -> AsyncIterator[TelemetrySink]:
    """A running writer; leaving the block closes the sink and waits for the drain.

    Files are dated by the wall clock: it is T0 unless a test passes its own ``now``.
    """
    kwargs.setdefault("now", lambda: T0)
    sink, records_recv = open_telemetry(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_writer(records_recv, sink, cfg, task_status=task_status, **kwargs))
        async with sink:
            yield sink


def lines_of(directory: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for p in sorted(directory.iterdir()):
        raw = p.read_bytes()
        assert raw.endswith(b"\n")
        out[p.name] = [json.loads(line) for line in raw.splitlines()]
    return out


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["request_id"] for r in rows]


def accounted(sink: TelemetrySink) -> bool:
    s = sink.statistics()
    return s.submitted == s.written + s.lost + s.dropped + s.queued + s.in_flight


async def test_writer_writes_every_record_submitted_before_close(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with writing(config(tmp_path)) as sink:
            for i in range(2_500):
                sink.submit(record(i))
        stats = sink.statistics()
    assert (stats.submitted, stats.written, stats.dropped, stats.lost, stats.batches) == (2_500, 2_500, 0, 0, 25)
    files = lines_of(tmp_path / "logs")
    assert list(files) == ["usage-20261124.jsonl"]
    assert ids(files["usage-20261124.jsonl"]) == [f"req-{i:06d}" for i in range(2_500)]
    assert stats.current_file == str(tmp_path / "logs" / "usage-20261124.jsonl")
    assert trio.current_time() == 0  # closing the channel ends the flush wait: no delay


async def test_batches_respect_batch_max_and_flush_ms(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with writing(config(tmp_path, batch_max=3, flush_ms=200), now=lambda: T0) as sink:
            for i in range(7):
                sink.submit(record(i))
            await trio.testing.wait_all_tasks_blocked()
            # Two full batches go at once; the 7th waits for company until flush_ms.
            assert (sink.statistics().batches, sink.statistics().written, sink.statistics().in_flight) == (2, 6, 1)
            await trio.sleep(0.199)
            assert sink.statistics().batches == 2
            await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked()
            assert (sink.statistics().batches, sink.statistics().written) == (3, 7)
            # A lone record that gets company within flush_ms shares its batch.
            sink.submit(record(7))
            await trio.sleep(0.1)
            sink.submit(record(8))
            await trio.testing.wait_all_tasks_blocked()
            assert sink.statistics().batches == 3
            await trio.sleep(0.1)
            await trio.testing.wait_all_tasks_blocked()
            assert (sink.statistics().batches, sink.statistics().written) == (4, 9)
            assert trio.current_time() == pytest.approx(0.4)


class _OtherSteps(trio.abc.Instrument):
    """Counts the steps of every task but the one that made it (here: the writer's)."""

    def __init__(self) -> None:
        self.me = trio.lowlevel.current_task()
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self.me:
            self.steps += 1


async def test_the_writer_wakes_once_per_batch_not_once_per_record(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    steps = _OtherSteps()
    with trio.fail_after(60):
        async with writing(config(tmp_path, batch_max=1_000, flush_ms=200)) as sink:
            sink.submit(record(0))
            await trio.testing.wait_all_tasks_blocked()  # the writer took it and waits for company
            trio.lowlevel.add_instrument(steps)
            for i in range(1, 100):  # 99 records, one per ms, all within the flush window
                sink.submit(record(i))
                await trio.sleep(0.001)
            assert steps.steps == 0  # they wait in the channel: no wake-up per record
            await trio.sleep(0.2)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.remove_instrument(steps)
            assert (sink.statistics().batches, sink.statistics().written) == (1, 100)
            # Woken by the deadline, a checkpoint between slices, written (one checkpoint), back to waiting.
            assert steps.steps <= 3 + math.ceil(100 / usagelog.SLICE) - 1


async def test_a_big_batch_is_encoded_a_slice_at_a_time_and_requests_run_in_between(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    ticks = 0  # steps of a stand-in for the request path, always ready to run
    seen: list[tuple[int, int]] = []  # per slice handed to the metrics: (records, ticks so far)

    async def request_path() -> None:
        nonlocal ticks
        while True:  # bounded by the cancel below
            ticks += 1
            await trio.lowlevel.checkpoint()

    n = 100
    with trio.fail_after(60):
        async with trio.open_nursery() as outside:
            async with writing(config(tmp_path, batch_max=n), observe=lambda part: seen.append((len(part), ticks))) as sink:
                for i in range(n):
                    sink.submit(record(i))  # a full batch: written at once
                outside.start_soon(request_path)
                await sink.wait_observed(n)
            outside.cancel_scope.cancel()
    sizes = [size for size, _ in seen]
    assert sizes == [usagelog.SLICE] * (n // usagelog.SLICE) + ([n % usagelog.SLICE] if n % usagelog.SLICE else [])
    # One slice per turn of the scheduler, the request path's step in each turn (Trio shuffles
    # the order within a turn, hence the one turn of slack): not the whole batch in one go.
    at = [t for _, t in seen]
    assert at[-1] - at[0] >= len(at) - 2, seen
    [rows] = lines_of(tmp_path / "logs").values()
    assert ids(rows) == [f"req-{i:06d}" for i in range(n)]  # in order, once each


async def test_on_a_saturated_core_the_writer_keeps_up_by_taking_whole_batches(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    """Many requests always ready to run: each of the writer's checkpoints waits for all of their
    steps (on a real core, tens of ms). Sixteen records per turn fell behind 20 arriving per turn,
    and the queue overflowed (records dropped: the gateway at 3,500 requests/s dropped a fifth).
    Once a full batch more is waiting, the writer takes whole batches per turn, and nothing is
    dropped."""
    tasks, steps = 20, 500

    async def request_path(sink: TelemetrySink, first: int) -> None:
        for i in range(steps):  # one record per step, as a request ends
            sink.submit(record(first + i))
            await trio.lowlevel.checkpoint()

    cfg = config(tmp_path, queue_capacity=400, batch_max=100)
    with trio.fail_after(600):
        async with writing(cfg) as sink:
            async with trio.open_nursery() as load:
                for t in range(tasks):
                    load.start_soon(request_path, sink, t * steps)
    stats = sink.statistics()
    assert stats.dropped == 0 and stats.written == tasks * steps, stats


async def test_a_batch_that_fills_is_written_before_the_flush_deadline(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with writing(config(tmp_path, batch_max=3, flush_ms=200)) as sink:
            sink.submit(record(0))
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.05)
            sink.submit(record(1))
            await trio.testing.wait_all_tasks_blocked()
            assert sink.statistics().in_flight == 1  # one more is not a full batch: still waiting
            await trio.sleep(0.05)
            sink.submit(record(2))  # the third fills the batch: the sink ends the writer's wait
            await trio.testing.wait_all_tasks_blocked()
            assert (sink.statistics().batches, sink.statistics().written) == (1, 3)
            assert trio.current_time() == pytest.approx(0.1)
            # A fourth waits for company; closing the sink ends that wait at once.
            sink.submit(record(3))
            await trio.testing.wait_all_tasks_blocked()
            assert sink.statistics().in_flight == 1
        assert sink.statistics().written == 4  # closing the sink ended the last wait: written, not lost
    assert trio.current_time() == pytest.approx(0.1)


async def test_flush_has_the_writer_take_what_is_queued_without_waiting_for_the_deadline(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with writing(config(tmp_path, batch_max=100, flush_ms=200)) as sink:
            sink.submit(record(0))
            sink.submit(record(1))
            await trio.testing.wait_all_tasks_blocked()
            assert sink.statistics().in_flight == 2  # waiting for a fuller batch
            sink.flush()
            await sink.wait_observed(2)
            await trio.testing.wait_all_tasks_blocked()
            assert (sink.statistics().batches, sink.statistics().written) == (1, 2)
            assert trio.current_time() == 0  # not at the 200 ms deadline
            # With nothing pending, a flush changes nothing: the next record waits as usual.
            sink.flush()
            sink.submit(record(2))
            await trio.testing.wait_all_tasks_blocked()
            assert sink.statistics().in_flight == 1
            # Asked while the writer is busy writing, it still covers what was submitted
            # before it: those are taken at once after that write, the later ones wait again.
            sink.submit(record(3))
            sink.flush()
            await sink.wait_observed(4)
            assert trio.current_time() == 0
            sink.submit(record(4))
            await trio.testing.wait_all_tasks_blocked()
            assert sink.statistics().in_flight == 1  # the usual wait again
            await trio.sleep(0.2)
            await trio.testing.wait_all_tasks_blocked()
            assert sink.statistics().written == 5
    assert trio.current_time() == pytest.approx(0.2)


async def test_a_cancelled_writer_counts_what_was_submitted_during_its_last_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    cfg = config(tmp_path, batch_max=100, flush_ms=200)
    sink, records_recv = open_telemetry(cfg)

    async def write_while_a_request_ends(fn: Callable[..., Any], *args: Any) -> Any:
        sink.submit(record(999))  # a request that finishes while the last write is under way
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(usagelog, "_offload", write_while_a_request_ends)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_writer, records_recv, sink, cfg, now=lambda: T0))
            for i in range(5):
                sink.submit(record(i))
            await trio.testing.wait_all_tasks_blocked()  # the writer holds them, waiting for company
            nursery.cancel_scope.cancel()  # from outside, as a forced shutdown does
    stats = sink.statistics()
    assert (stats.written, stats.lost, stats.queued, stats.in_flight) == (5, 1, 0, 0)
    assert stats.submitted == stats.written + stats.dropped + stats.lost  # nothing unaccounted
    assert sink.counters.observed == 0  # none reached the metrics: not counted as observed


async def test_a_cancelled_discarder_still_hands_what_it_holds_to_the_metrics(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cfg = config(tmp_path, enabled=False, batch_max=100, flush_ms=200)
    seen: list[Record] = []
    sink, records_recv = open_telemetry(cfg)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(usagelog.run_discarder, records_recv, sink, cfg, observe=seen.extend))
            await trio.testing.wait_all_tasks_blocked()
            for i in range(5):
                sink.submit(record(i))
            await trio.testing.wait_all_tasks_blocked()  # it holds them, waiting for company
            nursery.cancel_scope.cancel()
    assert [r.request_id for r in seen] == [f"req-{i:06d}" for i in range(5)] and sink.counters.observed == 5


async def test_with_the_log_disabled_records_reach_the_metrics_batched_as_the_writer_batches_them(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cfg = config(tmp_path, enabled=False, batch_max=100, flush_ms=200)
    seen: list[tuple[float, int]] = []  # (when, records) per call
    sink, records_recv = open_telemetry(cfg)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(usagelog.run_discarder, records_recv, sink, cfg,
                                       observe=lambda part: seen.append((trio.current_time(), len(part)))))
            async with sink:
                for i in range(50):  # one per ms: all within one flush window
                    sink.submit(record(i))
                    await trio.sleep(0.001)
                assert seen == []  # no wake-up per record
                await sink.wait_observed(50)
                assert [n for _, n in seen] == [16, 16, 16, 2]  # the writer's slices
                assert all(t == pytest.approx(0.2) for t, _ in seen), seen  # at the flush deadline, not later
                sink.submit(record(50))
                sink.flush()
                await sink.wait_observed(51)
                sink.submit(record(51))  # then closed: observed at once, not lost
    assert sum(n for _, n in seen) == 52 and sink.counters.observed == 52
    assert not (tmp_path / "logs").exists()  # nothing written


async def test_a_queue_smaller_than_a_batch_is_drained_before_it_fills(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    # The writer sleeps while records wait in the channel: with queue_capacity below batch_max
    # the sink must wake it before the channel is full, or records arriving one by one would drop.
    with trio.fail_after(60):
        async with writing(config(tmp_path, queue_capacity=4, batch_max=100, flush_ms=200)) as sink:
            sink.submit(record(0))
            await trio.testing.wait_all_tasks_blocked()
            for i in range(1, 50):
                sink.submit(record(i))
                await trio.sleep(0.001)
            assert sink.statistics().dropped == 0 and accounted(sink)
    assert (sink.statistics().written, sink.statistics().dropped) == (50, 0)


async def test_rotation_by_size_keeps_files_under_the_limit(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    size = len(encode_record(record(0)))
    cfg = config(tmp_path, rotate_bytes=3 * size, batch_max=2)
    with trio.fail_after(60):
        async with writing(cfg, now=lambda: T0) as sink:
            for i in range(10):
                sink.submit(record(i))
        # A restart on the same day continues the newest file.
        async with writing(cfg, now=lambda: T0) as sink:
            sink.submit(record(10))
    files = lines_of(tmp_path / "logs")
    # batches of 2 (10 and 11 are 2 each): [0,1] [2,3] [4,5] [6,7] [8,9] [10]
    assert {name: ids(rows) for name, rows in files.items()} == {
        "usage-20261124.jsonl": ["req-000000", "req-000001"],
        "usage-20261124.1.jsonl": ["req-000002", "req-000003"],
        "usage-20261124.2.jsonl": ["req-000004", "req-000005"],
        "usage-20261124.3.jsonl": ["req-000006", "req-000007"],
        "usage-20261124.4.jsonl": ["req-000008", "req-000009", "req-000010"],
    }
    assert all(p.stat().st_size <= 3 * size for p in (tmp_path / "logs").iterdir())


async def test_rotation_by_utc_date_and_file_tag(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    clock = [T0]
    with trio.fail_after(60):
        async with writing(config(tmp_path, batch_max=1), file_tag="4242", now=lambda: clock[0]) as sink:
            sink.submit(record(0))
            await trio.testing.wait_all_tasks_blocked()
            clock[0] = T0 + DAY
            sink.submit(record(1))
            await trio.testing.wait_all_tasks_blocked()
            clock[0] = T0 + 2 * DAY
            sink.submit(record(2))
    assert {name: ids(rows) for name, rows in lines_of(tmp_path / "logs").items()} == {
        "usage-20261124-4242.jsonl": ["req-000000"],
        "usage-20261125-4242.jsonl": ["req-000001"],
        "usage-20261126-4242.jsonl": ["req-000002"],
    }


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{level} {message}")
    yield lines
    logger.remove(handler)


def failing_writes(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[float]:
    """Make the next ``failures`` file writes raise ENOSPC; returns the times of every try."""
    real = usagelog._write_all
    tries: list[float] = []

    def write_all(fd: int, data: bytes) -> None:
        tries.append(trio.current_time())
        if len(tries) <= failures:
            os.write(fd, data[: len(data) // 2])  # a partial write, as a full disk does
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(usagelog, "_write_all", write_all)
    return tries


async def test_write_errors_are_retried_with_backoff_then_recover(
    tmp_path: Path, inline_io: None, monkeypatch: pytest.MonkeyPatch, log_lines: list[str],
    autojump_clock: trio.testing.MockClock,
) -> None:
    tries = failing_writes(monkeypatch, failures=3)
    with trio.fail_after(60):
        async with writing(config(tmp_path), now=lambda: T0) as sink:
            for i in range(10):
                sink.submit(record(i))
        stats = sink.statistics()
    assert tries == pytest.approx([0.0, 0.1, 0.3, 0.7])
    assert (stats.written, stats.lost, stats.write_errors, stats.batches) == (10, 0, 3, 1)
    # The partial writes were cut back: exactly the 10 records, each once, no broken line.
    assert ids(lines_of(tmp_path / "logs")["usage-20261124.jsonl"]) == [f"req-{i:06d}" for i in range(10)]
    errors = [line for line in log_lines if "cannot write" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0]  # once per kind per minute
    assert any("writing again" in line for line in log_lines)


async def test_a_batch_is_given_up_after_write_tries_and_counted_lost(
    tmp_path: Path, inline_io: None, monkeypatch: pytest.MonkeyPatch, log_lines: list[str],
    autojump_clock: trio.testing.MockClock,
) -> None:
    tries = failing_writes(monkeypatch, failures=usagelog.WRITE_TRIES)
    with trio.fail_after(60):
        async with writing(config(tmp_path, batch_max=4), now=lambda: T0) as sink:
            for i in range(4):
                sink.submit(record(i))
            await trio.testing.wait_all_tasks_blocked()
            assert sink.statistics().in_flight == 4 and accounted(sink)
            await trio.sleep(1.5)
            await trio.testing.wait_all_tasks_blocked()
            assert (sink.statistics().lost, sink.statistics().in_flight) == (4, 0)
            sink.submit(record(4))
        stats = sink.statistics()
    assert tries == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.5, 1.5])  # the next batch goes at once
    assert (stats.submitted, stats.written, stats.lost, stats.write_errors) == (5, 1, 4, 5)
    assert ids(lines_of(tmp_path / "logs")["usage-20261124.jsonl"]) == ["req-000004"]
    assert sum("gave up" in line for line in log_lines) == 1


async def test_a_stuck_write_never_blocks_submit_and_the_excess_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_lines: list[str], autojump_clock: trio.testing.MockClock
) -> None:
    release = trio.Event()

    async def stuck_then_inline(fn: Callable[..., Any], *args: Any) -> Any:
        await release.wait()  # a write that does not return until the test says so
        return fn(*args)

    monkeypatch.setattr(usagelog, "_offload", stuck_then_inline)
    with trio.fail_after(60):
        async with writing(config(tmp_path, queue_capacity=10, batch_max=4), now=lambda: T0) as sink:
            sink.submit(record(0))
            await trio.sleep(1)  # the writer has it and is stuck in the write
            start = trio.current_time()
            for i in range(1, 101):
                sink.submit(record(i))  # sync, never a checkpoint: nothing else runs meanwhile
            assert trio.current_time() == start
            stats = sink.statistics()
            assert (stats.submitted, stats.written, stats.in_flight, stats.queued, stats.dropped) == (101, 0, 1, 10, 90)
            assert accounted(sink)
            release.set()
        stats = sink.statistics()
    assert (stats.written, stats.dropped, stats.lost) == (11, 90, 0)
    assert stats.submitted == stats.written + stats.dropped
    assert ids(lines_of(tmp_path / "logs")["usage-20261124.jsonl"]) == [f"req-{i:06d}" for i in range(11)]
    assert any("90 records dropped" in line for line in log_lines)


async def test_the_directory_deleted_under_the_writer_is_recreated(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        async with writing(config(tmp_path), now=lambda: T0) as sink:
            sink.submit(record(0))
            await trio.sleep(1)
            assert sink.statistics().written == 1
            shutil.rmtree(tmp_path / "logs")
            sink.submit(record(1))
        stats = sink.statistics()
    assert (stats.written, stats.lost, stats.write_errors) == (2, 0, 0)
    assert ids(lines_of(tmp_path / "logs")["usage-20261124.jsonl"]) == ["req-000001"]


async def test_an_unwritable_directory_is_retried_until_it_can_be_created(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the directory should be")
    with trio.fail_after(60):
        async with writing(config(tmp_path, batch_max=1), now=lambda: T0) as sink:
            sink.submit(record(0))
            await trio.sleep(0.2)  # tries at 0 and 0.1 failed (FileExistsError/NotADirectoryError)
            assert sink.statistics().write_errors == 2
            blocker.unlink()
        stats = sink.statistics()
    assert (stats.written, stats.write_errors) == (1, 2)
    assert trio.current_time() == pytest.approx(0.3)


async def test_a_cancelled_writer_makes_one_last_write_of_what_is_queued(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    cfg = config(tmp_path, batch_max=2, flush_ms=10_000)
    sink, records_recv = open_telemetry(cfg)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_writer(records_recv, sink, cfg, now=lambda: T0, task_status=task_status))
            sink.submit(record(0))  # taken, the writer waits flush_ms for a second one
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
            for i in range(1, 4):
                sink.submit(record(i))  # still queued when the cancellation lands
    stats = sink.statistics()
    assert (stats.written, stats.lost, stats.queued, stats.in_flight) == (4, 0, 0, 0)
    sink.submit(record(9))  # after the writer is gone: dropped, not an error
    assert sink.statistics().dropped == 1


@pytest.fixture
def real_io_clock() -> trio.testing.MockClock:
    """Virtual time that only jumps after 1 s of real idleness: real threads cannot cause false jumps."""
    return trio.testing.MockClock(autojump_threshold=1.0)


async def test_the_writer_through_real_worker_threads(tmp_path: Path, real_io_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with writing(config(tmp_path, batch_max=64), file_tag="w/1.x") as sink:
            for i in range(1_000):
                sink.submit(record(i))
        stats = sink.statistics()
    assert (stats.written, stats.batches) == (1_000, 16)
    [(name, rows)] = lines_of(tmp_path / "logs").items()
    assert name.endswith("-w_1_x.jsonl")  # the tag is made safe for a file name
    assert ids(rows) == [f"req-{i:06d}" for i in range(1_000)]


async def test_the_encoded_lines_are_not_held_one_block_each_until_the_batch_is_encoded(
    tmp_path: Path, inline_io: None, autojump_clock: trio.testing.MockClock
) -> None:
    # Each line (~600 B, past pymalloc's 512) is a block of the C heap. Kept in a list until
    # the batch was joined, a batch's lines were interleaved there with what requests
    # allocated meanwhile, and the heap stayed larger: ~6 KB per open stream at 512 streams
    # (docs/benchmarks.md, stream-512-telemetry). Each goes into one buffer as it is made.
    source, first = inspect.getsourcelines(encode_record)
    [dumps_at] = [first + i for i, line in enumerate(source) if "orjson.dumps(" in line]  # where a line is made
    live_lines: list[int] = []

    def count_live_lines(part: list[Record]) -> None:
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, encode_record.__code__.co_filename, dumps_at)])
        live_lines.append(sum(stat.count for stat in snapshot.statistics("lineno")))

    n = 3 * usagelog.SLICE
    tracemalloc.start()
    try:
        with trio.fail_after(60):
            async with writing(config(tmp_path, batch_max=n), observe=count_live_lines) as sink:
                for i in range(n):
                    sink.submit(record(i))  # a full batch: written at once, a slice at a time
                await sink.wait_observed(n)
    finally:
        tracemalloc.stop()
    assert len(live_lines) == 3  # (observed before each slice is encoded: the earlier slices' lines would be live)
    assert live_lines == [0, 0, 0]
    [rows] = lines_of(tmp_path / "logs").values()
    assert [row["request_id"] for row in rows] == [record(i).request_id for i in range(n)]
