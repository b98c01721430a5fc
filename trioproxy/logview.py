"""``trioproxy tail``, and reading the usage log back (``trioproxy stats`` is ``logstats``).

The log is every ``usage-YYYYMMDD[-tag][.N].jsonl`` in one directory: one file per worker
(``tag``) per UTC day, split by size into ``.1``, ``.2``... Reading order: each file in the
order it was written (the order requests *ended*), files merged by end time
(``ts + total_ms``), one UTC day at a time so only that day's files are open at once.
Malformed or partial lines (a crash mid-write, a line being written) are skipped.

``render_tail_line`` and the small formatters are sans-IO; the rest is thin file reading.
This is a plain synchronous CLI: ``--follow`` polls with ``time.sleep``.
"""

from __future__ import annotations

import argparse
import fnmatch
import heapq
import itertools
import json
import math
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any

import attrs
from attrs import frozen
from rich.console import Console
from rich.text import Text

from .telemetry import decode_line

#: The profile default for [telemetry] dir; the lead's CLI resolves --profile on top.
DEFAULT_DIR = "logs"
#: How often --follow looks for new lines: quick enough to feel live, ~free when idle.
FOLLOW_INTERVAL_S = 0.5

_FILE_NAME = re.compile(r"usage-(\d{8})(?:-([A-Za-z0-9_-]+))?(?:\.(\d+))?\.jsonl")
_SINCE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

#: Columns for tables written to a pipe or file (no terminal to fit).
PIPE_WIDTH = 160


# --- reading files -------------------------------------------------------------------------


@frozen(order=True)
class LogFile:
    day: str
    tag: str
    index: int
    path: Path = attrs.field(order=False)


@frozen
class _Entry:
    key: float  # end time, made non-decreasing within one file (heapq.merge needs sorted inputs)
    raw: bytes  # the line as written, without its b"\n"
    rec: dict[str, Any]


def list_files(directory: Path) -> list[LogFile]:
    """Every usage-log file in ``directory``, by (UTC day, worker tag, rotation index)."""
    try:
        names = [p for p in directory.iterdir() if p.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for p in names:
        m = _FILE_NAME.fullmatch(p.name)
        if m:
            found.append(LogFile(m.group(1), m.group(2) or "", int(m.group(3) or 0), p))
    return sorted(found)


def parse_ts(value: Any) -> float | None:
    """A record's ``ts`` ("2026-11-24T06:00:00.123Z") as unix seconds; None if absent or bad."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def parse_since(text: str, *, now: float) -> float:
    """``30m``, ``1h``, ``2d``, ``90s`` ago, or an ISO time (naive = local time) → unix seconds.

    Raises:
        ValueError: neither form.
    """
    m = _SINCE.fullmatch(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"expected 30m, 1h, 2d or an ISO time, got {text!r}") from None
    return moment.timestamp()  # a naive time is taken as local, like the times tail prints


def _read_file(path: Path, offsets: dict[Path, int], since: float | None) -> Iterator[_Entry]:
    """Complete lines of ``path`` from ``offsets[path]`` on, advancing the offset as it goes."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        pos = offsets.get(path, 0)
        f.seek(pos)
        key = -math.inf
        for line in f:
            if not line.endswith(b"\n"):
                break  # still being written (or cut by a crash): not consumed, retried on follow
            pos += len(line)
            offsets[path] = pos
            rec = decode_line(line)
            if rec is None:
                continue
            ts = parse_ts(rec.get("ts"))
            if since is not None and (ts is None or ts < since):
                continue
            if ts is not None:
                total = rec.get("total_ms")
                key = max(key, ts + (total / 1000 if isinstance(total, (int, float)) else 0.0))
            yield _Entry(key, line.rstrip(b"\n"), rec)


def _read_merged(files: list[LogFile], offsets: dict[Path, int], since: float | None) -> Iterator[_Entry]:
    if since is not None:
        # A record is written after it arrived, so one with ts >= since is in a file dated
        # (by its write) on or after since's UTC day.
        first_day = time.strftime("%Y%m%d", time.gmtime(since))
        files = [f for f in files if f.day >= first_day]
    for _, same_day in itertools.groupby(files, key=lambda f: f.day):
        streams = [_read_file(f.path, offsets, since) for f in same_day]
        yield from heapq.merge(*streams, key=lambda e: e.key)


def iter_records(directory: Path, *, since: float | None = None) -> Iterator[dict[str, Any]]:
    """Yield every record in ``directory`` (all workers, rotated files) in time order.

    Args:
        since: unix seconds; only records that arrived (``ts``) at or after it.
    """
    for entry in _read_merged(list_files(directory), {}, since):
        yield entry.rec


class Follower:
    """Remembers how far each file was read, so that each call returns only new lines.

    New files (rotation by size or day, a new worker) are read from the start; so is a
    file that was replaced (another inode) or truncated (it shrank).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.offsets: dict[Path, int] = {}
        self._inodes: dict[Path, int] = {}

    def read_new(self) -> Iterator[_Entry]:
        """Entries not returned before, in time order."""
        return _read_merged(list(self._changed()), self.offsets, None)

    def read_last(self, n: int, keep: Callable[[dict[str, Any]], bool]) -> list[_Entry]:
        """The last ``n`` entries that ``keep`` accepts; then everything counts as read.

        Reads whole UTC days, newest first, and stops at the first day that completes
        ``n``: a tail of a log kept for weeks reads about one day, not all of it.
        """
        changed = self._changed()
        out: list[_Entry] = []
        for day in sorted({f.day for f in changed}, reverse=True):
            if len(out) >= n:  # older days are not needed: skip them, as if read
                for f, size in changed.items():
                    if f.day <= day:
                        self.offsets[f.path] = size
                break
            same_day = [f for f in changed if f.day == day]
            newest = deque((e for e in _read_merged(same_day, self.offsets, None) if keep(e.rec)), maxlen=n)
            out = [*newest, *out][-n:] if n > 0 else []
        return out

    def _changed(self) -> dict[LogFile, int]:
        """Files with unread bytes → their size, after noticing replaced or truncated files."""
        files = list_files(self.directory)
        present = {f.path for f in files}
        for path in [p for p in self._inodes if p not in present]:
            del self._inodes[path]
            self.offsets.pop(path, None)
        changed = {}
        for f in files:
            try:
                st = f.path.stat()
            except FileNotFoundError:
                continue
            if self._inodes.get(f.path) != st.st_ino or st.st_size < self.offsets.get(f.path, 0):
                self._inodes[f.path] = st.st_ino
                self.offsets[f.path] = 0
            if st.st_size > self.offsets[f.path]:
                changed[f] = st.st_size
        return changed


# --- tail ----------------------------------------------------------------------------------

_OUTCOME_STYLE = {
    "ok": "green",
    "upstream_error": "bold red",
    "timeout": "red",
    "client_disconnect": "yellow",
    "rejected": "magenta",
}


def fmt_ms(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    if value < 1000:
        return f"{value:.0f}ms"
    return f"{value / 1000:.2f}s" if value < 10_000 else f"{value / 1000:.0f}s" if value >= 100_000 else f"{value / 1000:.1f}s"


def _fmt_tokens(rec: dict[str, Any]) -> str:
    p, c = rec.get("prompt_tokens"), rec.get("completion_tokens")
    if p is None and c is None:
        return "-"
    mark = "~" if rec.get("token_source") == "estimate" else ""
    return f"{mark}{p if p is not None else '?'}→{c if c is not None else '?'}"


def is_failover(rec: dict[str, Any]) -> bool:
    attempts = rec.get("attempts") or []
    if len(attempts) < 2 or not isinstance(attempts[0], dict):
        return False
    final = rec.get("upstream") or (attempts[-1].get("upstream") if isinstance(attempts[-1], dict) else None)
    return bool(final != attempts[0].get("upstream"))


def render_tail_line(rec: dict[str, Any], *, tz: tzinfo | None = None) -> Text:
    """One aligned line (≤ 120 columns) for one record; ``tz``: display zone, local by default.

    ``time  id  model  upstream  outcome  status  ttft  total  tokens in→out  ×attempts [marks]``;
    ``~`` before the tokens marks an estimate.
    """
    ts = parse_ts(rec.get("ts"))
    if ts is None:
        when = "-".ljust(8)
    else:  # seconds are enough to read along; the JSON line has the milliseconds
        moment = datetime.fromtimestamp(ts, tz) if tz else datetime.fromtimestamp(ts).astimezone()
        when = moment.strftime("%H:%M:%S")
    status = rec.get("status")
    status = status if isinstance(status, int) and not isinstance(status, bool) else 0
    outcome = printable(str(rec.get("outcome") or "?"))
    attempts = rec.get("attempts") or []
    marks = "".join(f" {m}" for m, on in (("hedged", rec.get("hedged") is True), ("failover", is_failover(rec))) if on)
    line = Text()
    line.append(when, "dim")
    line.append(" " + printable(str(rec.get("request_id") or "-"))[:8].ljust(8), "cyan")  # short, like a git hash
    line.append(" " + _cut(rec.get("model_served") or rec.get("model_requested"), 17))
    line.append(" " + _cut(rec.get("upstream"), 10), "blue")
    line.append(" " + outcome.ljust(17), _OUTCOME_STYLE.get(outcome, "bold"))
    line.append(f" {status:>3}" if status else "   -", "red" if status >= 500 else "yellow" if status >= 400 else "")
    line.append(f" ttft {fmt_ms(rec.get('ttft_ms')):>5} total {fmt_ms(rec.get('total_ms')):>5}")
    line.append(f" {_fmt_tokens(rec):>9}")
    line.append(f" ×{len(attempts)}{marks}", "yellow" if marks else "")
    return line


#: C0 and C1 control characters and DEL, shown as ``\xNN``: a record's strings come from clients
#: (a model name) and upstreams, and an escape sequence printed as is would drive the terminal.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """``text`` safe to print to a terminal: control characters as ``\\xNN``."""
    return text.translate(_CONTROLS)


#: For a JSON line: the controls JSON lets through unescaped (DEL, C1; C0 is always escaped), as ``\\u00NN``.
_JSON_CONTROLS = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}


def _cut(value: Any, width: int) -> str:
    text = printable(str(value)) if value is not None else "-"
    return text[: width - 1] + "…" if len(text) > width else text.ljust(width)


def _as_text(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return value if isinstance(value, str) else json.dumps(value)


def _where_arg(text: str) -> tuple[str, str]:
    key, sep, pattern = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, pattern


def matches(rec: dict[str, Any], where: Iterable[tuple[str, str]]) -> bool:
    """Every (key, glob) matches the field as text (null, true, 200, llama3*)."""
    return all(fnmatch.fnmatchcase(_as_text(rec.get(key)), pattern) for key, pattern in where)


def add_tail_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=DEFAULT_DIR, help="usage-log directory (default: %(default)s)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new requests")
    parser.add_argument(
        "--where", action="append", type=_where_arg, default=[], metavar="KEY=VALUE",
        help="only records whose field matches (glob; repeat to AND), e.g. outcome=upstream_error",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON lines")
    parser.add_argument("-n", type=int, default=20, metavar="N", help="show the last N first (default: %(default)s)")


def run_tail(
    args: argparse.Namespace,
    *,
    console: Console | None = None,
    sleep: Callable[[float], None] = time.sleep,
    max_polls: int | None = None,
) -> int:
    """Print the last ``args.n`` requests, then (``--follow``) new ones as they are written.

    Args:
        sleep, max_polls: the follow loop's clock and bound; tests pass a fake sleep
            (which may write new lines) and a finite bound. ``None``: until Ctrl-C.
    """
    # Piped output has no width to fit: give tables room instead of squeezing columns away.
    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)
    directory = Path(args.dir)
    if not args.follow and not directory.is_dir():
        print(f"trioproxy tail: no usage log directory {directory}", file=sys.stderr)
        return 1

    def show(entry: _Entry) -> None:
        if args.json:
            raw = entry.raw.decode("utf-8", "replace").translate(_JSON_CONTROLS)  # (the same JSON, inert)
            console.print(raw, markup=False, highlight=False, soft_wrap=True)
        else:
            # A terminal gets one line per request, cut to fit; a pipe or file gets it whole.
            line = render_tail_line(entry.rec)
            if console.is_terminal:
                console.print(line, no_wrap=True, overflow="ellipsis")
            else:
                console.print(line, soft_wrap=True)

    follower = Follower(directory)
    for entry in follower.read_last(args.n, lambda rec: matches(rec, args.where)):
        show(entry)
    if not args.follow:
        return 0
    try:
        for _ in range(max_polls) if max_polls is not None else itertools.count():
            sleep(FOLLOW_INTERVAL_S)
            for entry in follower.read_new():
                if matches(entry.rec, args.where):
                    show(entry)
    except KeyboardInterrupt:  # Ctrl-C is how a follow ends
        pass
    return 0
