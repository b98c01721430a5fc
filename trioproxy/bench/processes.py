"""The processes a benchmark starts: mock upstreams, gateways, the Hypercorn floor.

Each runs in its own session (Ctrl-C in the terminal reaches only the bench, which
then stops them in order), pinned to one core (``taskset -c N``, or the same
affinity set directly when taskset is missing), with its output in a log file we
poll for its "listening on" line, so no pipe can fill up and block it.

No parent-death signal (``PR_SET_PDEATHSIG``): trio starts a child from a worker
thread, and that signal fires when the *thread* exits (an idle worker thread
retires after seconds), which would kill every server mid-run. Only SIGKILL of
the bench itself can therefore leave its children running.

:func:`open_fleet` owns them all: whatever happens inside it (an error, Ctrl-C,
SIGTERM), every process it started is sent SIGTERM, given
:data:`STOP_TIMEOUT_S` to exit (a gateway writes its last usage records then),
and killed after that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from attrs import define, field

__all__ = ["BenchError", "Child", "Fleet", "open_fleet", "override_profile"]

#: A started process has this long to print its "listening on" line.
READY_TIMEOUT_S = 20.0
#: How often the log file is polled while waiting for that line.
READY_POLL_S = 0.05
#: SIGTERM → exit: a gateway drains in-flight requests and writes its usage records first.
STOP_TIMEOUT_S = 10.0
#: After SIGKILL, the kernel reaps at once; this only bounds the wait.
KILL_TIMEOUT_S = 5.0
#: Lines of a failed process's log quoted in the error.
LOG_TAIL_LINES = 15
#: "... listening on http://127.0.0.1:PORT" — the mock, the gateway and the floor all say it so.
LISTENING = re.compile(r"listening on (http://\S+?:\d+)")


class BenchError(Exception):
    """The benchmark cannot go on (a process would not start, a target is unusable)."""


@define
class Child:
    """A started process: its role, its handle, where it logs and where it listens."""

    name: str
    process: trio.Process
    argv: list[str]
    log_path: Path
    cpu: int | None
    url: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None


def _preexec(cpu: int | None, use_taskset: bool) -> Callable[[], None] | None:
    if use_taskset:
        return None
    # Unpinned: every core, not the load generator's own core that a child would inherit.
    cores = {cpu} if cpu is not None else set(range(os.cpu_count() or 1))

    def pin() -> None:  # runs in the child between fork and exec: what `taskset -c CPU` does
        os.sched_setaffinity(0, cores)

    return pin


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL_LINES:])


@define
class Fleet:
    """Every process the benchmark started, stopped by :meth:`aclose` (see :func:`open_fleet`)."""

    log_dir: Path
    #: Pin processes to cores (False on one-core machines or with --no-pin).
    pin: bool = True
    children: list[Child] = field(factory=list)

    async def start(
        self, name: str, argv: Sequence[str], *, cpu: int | None, env: Mapping[str, str] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> Child:
        """Start ``argv`` pinned to ``cpu`` (with ``env``, else ours) and wait for its "listening on URL" line.

        Raises:
          BenchError: it exited, or did not say it listens within ``ready_timeout``.
        """
        cpu = cpu if self.pin else None
        use_taskset = cpu is not None and shutil.which("taskset") is not None
        full = (["taskset", "-c", str(cpu)] if use_taskset else []) + list(argv)
        log_path = self.log_dir / f"{name}.log"
        start_offset = log_path.stat().st_size if log_path.exists() else 0  # a restart appends
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            process = await trio.lowlevel.open_process(
                full,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_preexec(cpu, use_taskset),
                env=env,
            )
        child = Child(name=name, process=process, argv=full, log_path=log_path, cpu=cpu)
        self.children.append(child)
        with trio.move_on_after(ready_timeout):
            while True:  # bounded by ready_timeout
                if not child.running:
                    raise BenchError(f"{name} exited with status {process.returncode}:\n{_tail(log_path)}")
                text = log_path.read_bytes()[start_offset:].decode("utf-8", "replace")
                match = LISTENING.search(text)
                if match:
                    child.url = match[1]
                    return child
                await trio.sleep(READY_POLL_S)
        raise BenchError(f"{name} did not start listening within {ready_timeout:g} s:\n{_tail(log_path)}")

    async def stop(self, child: Child, *, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status. Shielded."""
        with trio.CancelScope(shield=True):
            if child.running:
                try:
                    child.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                with trio.move_on_after(timeout):
                    await child.process.wait()
            if child.running:
                child.process.kill()
                with trio.move_on_after(KILL_TIMEOUT_S):
                    await child.process.wait()
        return child.process.returncode

    def kill_now(self, child: Child) -> None:
        """SIGKILL, no grace: the failover scenario's crash (reaped later by :meth:`stop`)."""
        if child.running:
            child.process.kill()

    async def aclose(self) -> None:
        """Stop every process, the most recently started first (gateways before their upstreams)."""
        with trio.CancelScope(shield=True):
            for child in reversed(self.children):
                await self.stop(child)


@asynccontextmanager
async def open_fleet(log_dir: Path, *, pin: bool = True) -> AsyncIterator[Fleet]:
    """A :class:`Fleet` whose processes are all stopped on the way out, however it is left."""
    fleet = Fleet(log_dir=log_dir, pin=pin)
    try:
        yield fleet
    finally:
        await fleet.aclose()


def override_profile(
    path: Path, *, base_urls: dict[str, str], telemetry_dir: Path, upstream_kind: str | None = None
) -> Path:
    """Write the small profile merged over a bench profile: real upstream URLs, the log directory.

    TOML basic strings take JSON's escapes, so ``json.dumps`` quotes every value safely.
    """
    lines = []
    for upstream_id, url in base_urls.items():
        lines += ["[[upstreams]]", f"id = {json.dumps(upstream_id)}", f"base_url = {json.dumps(url)}"]
        if upstream_kind:
            lines.append(f"kind = {json.dumps(upstream_kind)}")
        lines.append("")
    lines += ["[telemetry]", f"dir = {json.dumps(str(telemetry_dir))}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def python_argv(*args: str) -> list[str]:
    """This interpreter (the venv's), with ``args``."""
    return [sys.executable, *args]
