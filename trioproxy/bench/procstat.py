"""CPU time and memory of a process, read from ``/proc`` (Linux only).

The parsers are sans-IO (they take the file's text) so they are tested on sample
lines; the readers around them are one ``open`` each. ``/proc/<pid>/stat`` counts
every thread of the process (the gateway's usage-log writer thread included) in
clock ticks, usually 100 per second: over a measured window of seconds that is
well under 1 % of error, and it is what ``top`` and ``ps`` report.
"""

from __future__ import annotations

import os

from attrs import frozen

__all__ = [
    "CpuTimes",
    "Memory",
    "cpu_times",
    "descendants",
    "memory",
    "core_ticks",
    "parse_proc_stat",
    "parse_stat",
    "parse_status",
]

#: Clock ticks per second of the utime/stime fields (``getconf CLK_TCK``; 100 on Linux).
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@frozen
class CpuTimes:
    """User and system CPU seconds a process has used since it started."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system


@frozen
class Memory:
    """Resident memory now and at its peak (``VmHWM``), in bytes."""

    rss: int
    peak_rss: int


def parse_stat(text: str, *, ticks_per_second: int = CLK_TCK) -> CpuTimes:
    """User and system CPU seconds from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may itself hold spaces and
    parentheses, so the fields are counted from the *last* ``)``: utime and stime
    are fields 14 and 15 (proc(5)), the 12th and 13th after it.

    Raises:
      ValueError: the text is not a stat line.
    """
    end = text.rfind(")")
    if end < 0:
        raise ValueError("not a /proc/<pid>/stat line: no ')' after the command name")
    fields = text[end + 1 :].split()
    if len(fields) < 13:
        raise ValueError("not a /proc/<pid>/stat line: too few fields")
    return CpuTimes(user=int(fields[11]) / ticks_per_second, system=int(fields[12]) / ticks_per_second)


def parse_status(text: str) -> Memory:
    """``VmRSS`` and ``VmHWM`` (peak RSS) from the text of ``/proc/<pid>/status``, in bytes.

    Raises:
      ValueError: either line is missing (a zombie process has neither).
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name in ("VmRSS", "VmHWM"):
            number, _, unit = rest.strip().partition(" ")
            if unit.strip() != "kB":
                raise ValueError(f"{name}: unexpected unit {unit!r}")
            values[name] = int(number) * 1024
    if "VmRSS" not in values or "VmHWM" not in values:
        raise ValueError("no VmRSS/VmHWM lines: not a live process's status")
    return Memory(rss=values["VmRSS"], peak_rss=values["VmHWM"])


def cpu_times(pid: int) -> CpuTimes:
    """CPU seconds used so far by ``pid`` (every thread).

    Raises:
      OSError: no such process, or no ``/proc``.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return parse_stat(f.read())


def memory(pid: int) -> Memory:
    """Resident memory of ``pid`` now and at its peak.

    Raises:
      OSError: no such process, or no ``/proc``.
      ValueError: the process has exited (a zombie has no memory lines).
    """
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        return parse_status(f.read())


def descendants(pid: int) -> list[int]:
    """``pid``'s children, their children, and so on (``/proc/<pid>/task/*/children``).

    A gateway with ``--workers N`` is a supervisor and N workers: its CPU and memory
    are theirs together.
    """
    found: list[int] = []
    queue = [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", encoding="ascii") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            queue += kids
    return found


def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
    """Per core, (busy ticks, all ticks) since boot, from the text of ``/proc/stat``.

    Busy is everything but idle and iowait (user, nice, system, irq, softirq, steal);
    guest time is already inside user. Comparing two readings tells how busy each
    core was in between, whoever kept it busy: the bench's noise check.
    """
    cores: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if not name[3:].isdigit():
            continue
        values = [int(v) for v in fields[:8]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        total = sum(values)
        cores[int(name[3:])] = (total - idle, total)
    return cores


def core_ticks() -> dict[int, tuple[int, int]]:
    """:func:`parse_proc_stat` of this machine's ``/proc/stat`` ({} where there is none)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return parse_proc_stat(f.read())
    except OSError:
        return {}
