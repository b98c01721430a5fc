"""What runs beside a round: the server's CPU and RSS, the cores' load, the failover kill.

All readings come from ``/proc`` (``procstat``); the noise check compares how busy
each core was with what the bench's own processes explain (:func:`foreign_load`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from . import procstat

if TYPE_CHECKING:
    from .runner import Target, TargetRound

__all__ = ["Probe", "cpu", "cpu_times", "foreign_load", "rss"]

#: RSS is sampled this often during a round: peaks of a few hundred ms are not missed.
SAMPLE_S = 0.05


def cpu_times(pid: int | None) -> procstat.CpuTimes | None:
    """User and system CPU seconds of ``pid`` and every process under it (a gateway's workers)."""
    if pid is None:
        return None
    try:
        times = procstat.cpu_times(pid)
    except (OSError, ValueError):
        return None
    user, system = times.user, times.system
    for child in procstat.descendants(pid):
        try:
            times = procstat.cpu_times(child)
        except (OSError, ValueError):
            continue  # exited in between
        user, system = user + times.user, system + times.system
    return procstat.CpuTimes(user=user, system=system)


def cpu(pid: int | None) -> float | None:
    """CPU seconds of ``pid`` and every process under it (user + system)."""
    times = cpu_times(pid)
    return times.total if times is not None else None


def rss(pid: int | None) -> int | None:
    """Resident memory of ``pid`` and every process under it."""
    if pid is None:
        return None
    try:
        total = procstat.memory(pid).rss
    except (OSError, ValueError):
        return None
    for child in procstat.descendants(pid):
        try:
            total += procstat.memory(child).rss
        except (OSError, ValueError):
            pass
    return total


class Probe:
    """Runs beside a round: CPU at the window's edges, RSS samples, an optional kill."""

    def __init__(self, target: Target, *, kill: tuple[float, Any] | None = None) -> None:
        self.target = target
        self.kill = kill
        self.rss_peak: int | None = None
        #: RSS samples inside the measured window (every stream of a closed loop open).
        self.rss_window: list[int] = []
        self.server_cpu: float | None = None
        #: The part of ``server_cpu`` spent in the kernel (system time: syscalls, wake-ups).
        self.server_sys: float | None = None
        self.upstream_cpu: float | None = None
        self.killed_at: float | None = None
        #: Per core, the share of the window it was busy, by any process (the noise check).
        self.core_busy: dict[int, float] = {}

    async def __call__(self, window_start: float, window_end: float) -> None:
        async with trio.open_nursery() as probes:
            if self.kill is not None:
                probes.start_soon(self._kill, window_start)
            await self._sample(window_start, window_end)

    async def _kill(self, window_start: float) -> None:
        assert self.kill is not None
        at, kill_now = self.kill
        await trio.sleep_until(window_start + at)
        kill_now()
        self.killed_at = trio.current_time() - window_start

    async def _sample(self, window_start: float, window_end: float) -> None:
        pid = self.target.server_pid
        cpu0 = up0 = None
        cores0: dict[int, tuple[int, int]] = {}
        in_window = False  # (not "cpu0 is not None": a target's CPU may be unreadable)
        while True:  # bounded: ends at window_end
            now = trio.current_time()
            if not in_window and now >= window_start:
                in_window = True
                cpu0 = cpu_times(pid)
                up0 = [cpu(p) for p in self.target.upstream_pids]
                cores0 = procstat.core_ticks()
            if now >= window_end:
                break
            now_rss = rss(pid)
            if now_rss is not None and (self.rss_peak is None or now_rss > self.rss_peak):
                self.rss_peak = now_rss
            if now_rss is not None and in_window:
                self.rss_window.append(now_rss)
            wake = now + SAMPLE_S
            if not in_window:
                wake = min(wake, window_start)
            await trio.sleep_until(min(wake, window_end))
        cpu1 = cpu_times(pid)
        cores1 = procstat.core_ticks()
        if in_window:
            for core, (busy1, total1) in cores1.items():
                busy0, total0 = cores0.get(core, (busy1, total1))
                if total1 > total0:
                    self.core_busy[core] = (busy1 - busy0) / (total1 - total0)
        if cpu0 is not None and cpu1 is not None:
            self.server_sys = cpu1.system - cpu0.system
            # (The two deltas added: a share computed from them stays within 0 and 1, which the
            # difference of two float totals does not always.)
            self.server_cpu = (cpu1.user - cpu0.user) + self.server_sys
        up1 = [cpu(p) for p in self.target.upstream_pids]
        pairs = [(a, b) for a, b in zip(up0 or [], up1) if a is not None and b is not None]
        if pairs:
            self.upstream_cpu = sum(b - a for a, b in pairs)


def foreign_load(r: TargetRound, *, server_core: int | None, client_core: int | None) -> float | None:
    """How busy the two cores were with work that is not the bench's own, as a share of the window.

    Expected: the server core runs the target's server (nothing for ``direct``, whose
    server is the mock on the client's core); the client core runs the load generator
    and the mock. What /proc/stat shows beyond that is someone else's load (or a
    little kernel work for our own packets). None when the cores are unknown.
    """
    if server_core is None or client_core is None or not r.core_busy or r.server_cpu_s is None:
        return None
    window = r.result.window_s
    direct = r.target == "direct"
    expect_server = 0.0 if direct else r.server_cpu_s / window
    expect_client = (r.result.client_cpu_s + (r.server_cpu_s if direct else (r.upstream_cpu_s or 0.0))) / window
    return max(
        r.core_busy.get(server_core, 0.0) - expect_server,
        r.core_busy.get(client_core, 0.0) - expect_client,
        0.0,
    )
