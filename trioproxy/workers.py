"""``trioproxy serve --workers N``: N gateway processes on one listening socket.

::

    supervise (the parent: no traffic of its own)
    ├─ the listening socket, bound once (port 0 → a real port), inherited by every worker
    ├─ PROMETHEUS_MULTIPROC_DIR, a fresh directory: every worker's metrics, summed at scrape
    └─ nursery
       ├─ _Slot.run × N      start a worker, wait for "ready", restart it if it dies
       │  └─ trio.run_process(python -m trioproxy serve ... --worker-fd FD)
       │     └─ worker: server.main(..., link=WorkerLink) on fd://FD
       └─ _watch_signals     SIGINT/SIGTERM → close the socket, {"stop": "graceful"} to every worker
                             (a second signal: {"stop": "now"}); SIGHUP → reload all

The kernel hands each new connection to whichever worker accepts it first. A worker
is a whole gateway: its own pools, health checks, breakers, limits and usage file
(``usage-DATE-PID.jsonl``). Workers run in their own session, so a terminal's Ctrl-C
reaches only the parent, which shuts them down in order; a worker whose parent dies
sees its stdin close and shuts down gracefully too.

The parent and each worker talk in JSON lines: the worker's stdout to the parent,
the parent to the worker's stdin.

- worker → parent: ``{"ready": pid}`` once it listens; ``{"reload": token}`` after
  ``POST /_/reload`` was applied here (reload every other worker, then tell me);
  ``{"reloaded": token, "errors": [...]}``, its verdict on a reload it was told to do.
- parent → worker: ``{"stop": "graceful"}`` (shut down gracefully, as a first SIGTERM
  does), ``{"stop": "now"}`` (as a second one does);
  ``{"reload": token}`` (reload now and report);
  ``{"reload_done": token, "workers": {pid: [errors]}}`` (the other workers' verdicts).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from typing import Any

import trio
from attrs import define, field
from loguru import logger

from .config import Config, load_profile_texts, read_profiles
from .errors import ConfigError
from .reload import ReloadRequest

#: A worker that runs this long before dying is restarted at once; one dying sooner waits (backoff).
STABLE_S = 30.0
#: The longest wait before restarting a worker that keeps dying.
MAX_RESTART_DELAY_S = 30.0
#: How long the parent waits for the other workers' verdicts on a reload.
RELOAD_FAN_OUT_TIMEOUT_S = 30.0
#: What the parent reads of a worker's line before giving up on it (a line is a few dozen bytes).
MAX_LINE = 64 * 1024


class WorkerFailed(Exception):
    """A worker exited before it was ready: the configuration cannot run (exit status kept)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"a worker exited with status {status} before it was ready")
        self.status = status


def listen_socket(config: Config) -> socket.socket:
    """The one listening socket every worker inherits (the parent binds it, so port 0 works)."""
    server = config.server
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((server.host, server.port))
    sock.listen(server.backlog)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@define
class _Worker:
    process: trio.Process
    pid: int
    ready: trio.Event = field(factory=trio.Event)
    #: One message at a time on its stdin (a fan-out and a SIGHUP reload may both write).
    sending: trio.Lock = field(factory=trio.Lock)


@define
class Supervisor:
    """The parent's state: one slot per worker, and the reloads it is fanning out."""

    command: Callable[[int], list[str]]
    count: int
    env: dict[str, str]
    fd: int
    grace_s: float
    metrics_dir: str
    #: The profiles, by name, and the last version of them every worker accepted (path, text).
    names: list[str]
    snapshot: list[tuple[str, str]]
    #: The listening socket (closed by ``stop``: the kernel then refuses new connections).
    listener: socket.socket | None = None
    stopping: bool = False
    #: Set once stopping "now" (a second signal): a worker that starts after it is told so too.
    now: bool = False
    stopped: trio.Event = field(factory=trio.Event)  # set with ``stopping``: ends restart waits
    #: Workers being spawned (their process handed the listening socket's fd): it stays open meanwhile.
    spawning: int = 0
    workers: dict[int, _Worker] = field(factory=dict)  # slot → its current worker
    #: token → (the verdicts so far by pid, the pids still to answer, set once none is left)
    pending: dict[str, tuple[dict[str, list[str]], set[int], trio.Event]] = field(factory=dict)
    tokens: itertools.count[int] = field(factory=itertools.count)

    async def run_slot(self, slot: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one worker running until shutdown; the first start reports when it is ready."""
        first, failures = True, 0
        while not self.stopping:
            started = trio.current_time()
            status = await self._run_one(slot, task_status if first else None)
            if self.stopping:
                return
            first = False
            failures = 0 if trio.current_time() - started >= STABLE_S else failures + 1
            delay = min(MAX_RESTART_DELAY_S, 0.5 * 2**failures) if failures else 0.0
            logger.error("worker in slot {} exited with status {}; restarting in {:.1f} s", slot, status, delay)
            with trio.move_on_after(delay):
                await self.stopped.wait()

    def begin_stop(self) -> None:
        """Graceful shutdown, its first part, at once (sync: a second signal right after is a second
        one): no more restarts; the listening socket closed, unless a worker is being given it.
        Then ``tell_all({"stop": "graceful"})``: every worker finishes its streams.

        The listening socket is closed: once the workers have closed theirs too, a new
        connection is refused at once (safe to retry elsewhere) instead of waiting in the kernel's
        backlog, which nobody serves any more, until the last worker exits and it is reset.
        Workers are told through their control pipe rather than with SIGTERM: under systemd's
        default ``KillMode=control-group`` every worker gets a SIGTERM of its own at the same
        moment, and a second one would mean "stop now". A worker whose pipe is gone gets SIGTERM.
        """
        self.stopping = True
        self.stopped.set()
        if self.spawning == 0:
            self._close_listener()

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()

    async def stop_now(self) -> None:
        """A second signal: every worker stops at once (what is still running is cut; records are written)."""
        self.now = True
        await self.tell_all({"stop": "now"})

    async def tell_all(self, message: dict[str, Any]) -> None:
        async with trio.open_nursery() as nursery:
            for worker in list(self.workers.values()):
                nursery.start_soon(self._tell, worker, message)

    @staticmethod
    async def _tell(worker: _Worker, message: dict[str, Any]) -> None:
        if not await _send(worker, message):  # its pipe is gone: the signal, then
            try:
                worker.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    async def _run_one(self, slot: int, task_status: trio.TaskStatus[None] | None) -> int:
        async with trio.open_nursery() as nursery:
            self.spawning += 1  # (the process is started in a thread: a stop meanwhile must not close its fd)
            try:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        self.command(self.fd),
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        pass_fds=(self.fd,),
                        env=self.env,
                        start_new_session=True,  # a terminal's Ctrl-C reaches the parent only
                        check=False,
                        deliver_cancel=self._deliver_cancel,
                    )
                )
            finally:
                self.spawning -= 1
                if self.stopping and self.spawning == 0:
                    self._close_listener()
            worker = _Worker(process, process.pid)
            self.workers[slot] = worker
            await _send(worker, {"start": {"profiles": self.snapshot}})
            if self.stopping:  # (stopped while it was being started: told like the others were)
                await self._tell(worker, {"stop": "now" if self.now else "graceful"})
            try:
                await self._read_lines(worker, slot, task_status, nursery)
                status = await process.wait()
            finally:
                self.workers.pop(slot, None)
                _mark_dead(worker.pid, self.metrics_dir)
                self._no_answer_from(worker.pid)
            if task_status is not None and not worker.ready.is_set():
                raise WorkerFailed(status)
            return status

    async def _deliver_cancel(self, process: trio.Process) -> None:
        """Cancelled (the parent is stopping at once): ask nicely, then insist."""
        process.terminate()
        with trio.move_on_after(self.grace_s + 5):
            await process.wait()
            return
        process.kill()

    async def _read_lines(
        self, worker: _Worker, slot: int, task_status: trio.TaskStatus[None] | None, nursery: trio.Nursery
    ) -> None:
        assert worker.process.stdout is not None
        buffer = b""
        while True:
            data = await worker.process.stdout.receive_some()
            if not data:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            if len(buffer) > MAX_LINE:
                buffer = b""
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # not ours: a worker prints nothing else on stdout, but be lenient
                if not isinstance(message, dict):
                    continue
                self._handle(worker, slot, message, task_status, nursery)

    def _handle(
        self,
        worker: _Worker,
        slot: int,
        message: dict[str, Any],
        task_status: trio.TaskStatus[None] | None,
        nursery: trio.Nursery,
    ) -> None:
        if "ready" in message and not worker.ready.is_set():
            worker.ready.set()
            logger.info("worker {} (slot {}) ready", worker.pid, slot)
            if task_status is not None:
                task_status.started()
        elif "reloaded" in message:
            entry = self.pending.get(str(message["reloaded"]))
            if entry is not None:
                verdicts, waiting, done = entry
                verdicts[str(worker.pid)] = [str(e) for e in message.get("errors") or []]
                waiting.discard(worker.pid)
                if not waiting:
                    done.set()
        elif "reload" in message:
            # In a task of its own: this worker's reader must go on reading (its verdicts on other
            # reloads among them: two workers posting at once would otherwise wait on each other).
            nursery.start_soon(self._fan_out, worker, message["reload"])

    def _no_answer_from(self, pid: int) -> None:
        """A worker exited: reloads waiting for its verdict say so instead of waiting it out."""
        for verdicts, waiting, done in self.pending.values():
            if pid in waiting:
                verdicts[str(pid)] = ["the worker exited before it answered"]
                waiting.discard(pid)
                if not waiting:
                    done.set()

    async def _fan_out(self, worker: _Worker, token: object) -> None:
        """POST /_/reload was applied in ``worker``: the others follow, then it answers its client."""
        others = {s: w for s, w in self.workers.items() if w is not worker}
        verdicts = await self.reload_all(others)
        await _send(worker, {"reload_done": token, "workers": verdicts})

    async def reload_all(self, workers: dict[int, _Worker] | None = None) -> dict[str, list[str]]:
        """Tell workers to reload their profiles; their verdicts by pid (``["timed out"]`` if none came)."""
        targets = list((self.workers if workers is None else workers).values())
        token = f"r{next(self.tokens)}"
        verdicts: dict[str, list[str]] = {}
        waiting = {w.pid for w in targets}
        done = trio.Event()
        self.pending[token] = (verdicts, waiting, done)
        try:
            for w in targets:
                if not await _send(w, {"reload": token}):
                    waiting.discard(w.pid)
            if waiting:
                with trio.move_on_after(RELOAD_FAN_OUT_TIMEOUT_S):
                    await done.wait()
            for pid in waiting:
                verdicts[str(pid)] = ["no answer (timed out)"]
        finally:
            del self.pending[token]
        if not any(verdicts.values()):
            self._take_snapshot()
        return verdicts

    def _take_snapshot(self) -> None:
        """After a reload every worker accepted: what a restarted worker starts from from now on."""
        try:
            snapshot = read_profiles(self.names)
            load_profile_texts(snapshot)
        except ConfigError:
            return  # changed again since, and broken: keep the last good one
        self.snapshot = snapshot


async def _send(worker: _Worker, message: dict[str, Any]) -> bool:
    stdin = worker.process.stdin
    if stdin is None:
        return False
    try:
        async with worker.sending:
            await stdin.send_all(json.dumps(message).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges from the shared metrics (its counters stay: they happened)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


def worker_command(argv: list[str]) -> Callable[[int], list[str]]:
    """The worker's command line: this interpreter, the same ``serve`` arguments, plus its socket."""
    return lambda fd: [sys.executable, "-m", "trioproxy", *argv, "--worker-fd", str(fd)]


async def supervise(
    config: Config,
    argv: list[str],
    names: list[str],
    snapshot: list[tuple[str, str]],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run ``config.server.workers`` workers until SIGINT/SIGTERM; the exit status of ``serve``.

    Args:
        argv: the worker's arguments after ``python -m trioproxy`` (``serve``, its profiles...).
        names: the profiles, to read again after a reload every worker accepted.
        snapshot: the profiles ``config`` was loaded from (path, text): what workers start from.
    """
    sock = listen_socket(config)
    url = url_of(sock)
    metrics_dir = tempfile.mkdtemp(prefix="trioproxy-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    supervisor = Supervisor(
        command=worker_command(argv),
        count=config.server.workers,
        env=env,
        fd=sock.fileno(),
        listener=sock,
        grace_s=config.server.shutdown_grace_s,
        metrics_dir=metrics_dir,
        names=names,
        snapshot=snapshot,
    )
    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(_watch_signals, supervisor)
            async with trio.open_nursery() as slots:  # returns once every worker stopped for good
                async with trio.open_nursery() as starting:  # started side by side, ready together
                    for slot in range(supervisor.count):
                        starting.start_soon(partial(slots.start, supervisor.run_slot, slot))
                pids = ", ".join(str(w.pid) for w in supervisor.workers.values())
                logger.info("trioproxy listening on {} ({} workers: {})", url, supervisor.count, pids)
                task_status.started(url)
            outer.cancel_scope.cancel()
    except WorkerFailed as exc:
        logger.error("{}; stopping", exc)
        return exc.status if exc.status > 0 else 1
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


async def _watch_signals(supervisor: Supervisor) -> None:
    """SIGINT/SIGTERM: graceful shutdown of every worker; a second one: stop now. SIGHUP: reload every worker."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    nursery.start_soon(_reload_and_log, supervisor)
                    continue
                if not supervisor.stopping:
                    logger.info("{}: stopping {} workers gracefully", signal.Signals(signum).name, supervisor.count)
                    supervisor.begin_stop()
                    nursery.start_soon(supervisor.tell_all, {"stop": "graceful"})
                else:
                    logger.warning("second signal: stopping the workers now")
                    nursery.start_soon(supervisor.stop_now)


async def _reload_and_log(supervisor: Supervisor) -> None:
    verdicts = await supervisor.reload_all()
    refused = {pid: errors for pid, errors in verdicts.items() if errors}
    if refused:
        logger.error("SIGHUP: reload refused by workers {}", refused)
    else:
        logger.info("SIGHUP: {} workers reloaded", len(verdicts))


def read_start(fd: int = 0) -> list[tuple[str, str]]:
    """A worker's first line from its supervisor: the profiles to start from (path, text).

    Read a byte at a time, so nothing after that line is taken from the pipe before
    ``WorkerLink.run`` reads it.
    """
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise ConfigError(["the supervisor closed the pipe before sending the profile"])
        line += byte
    profiles = json.loads(line)["start"]["profiles"]
    return [(str(path), str(text)) for path, text in profiles]


@define
class WorkerLink:
    """The worker's end of the conversation with its parent (``serve --worker-fd``)."""

    out_fd: int = 1
    in_fd: int = 0
    tokens: itertools.count[int] = field(factory=itertools.count)
    waiting: dict[str, tuple[trio.Event, list[dict[str, Any]]]] = field(factory=dict)

    def tell(self, message: dict[str, Any]) -> None:
        """One line to the parent: a few dozen bytes into a pipe it always reads, so a plain write."""
        os.write(self.out_fd, json.dumps(message).encode() + b"\n")

    async def fan_out_reload(self) -> dict[str, list[str]]:
        """After a ``POST /_/reload`` applied here: have the parent reload the other workers."""
        token = f"w{os.getpid()}-{next(self.tokens)}"
        done, answer = trio.Event(), list[dict[str, Any]]()
        self.waiting[token] = (done, answer)
        try:
            self.tell({"reload": token})
            with trio.move_on_after(RELOAD_FAN_OUT_TIMEOUT_S + 5):
                await done.wait()
        finally:
            del self.waiting[token]
        if not answer:
            return {"parent": ["no answer (timed out)"]}
        workers = answer[0].get("workers")
        return {str(k): list(v) for k, v in workers.items()} if isinstance(workers, dict) else {}

    async def run(
        self, shutdown: trio.Event, reload_send: trio.MemorySendChannel[ReloadRequest], stop_now: Callable[[], None]
    ) -> None:
        """Read the parent's lines until it goes away; then shut this worker down gracefully.

        ``stop_now``: what a second signal does (the supervisor's ``{"stop": "now"}``)."""
        stream = trio.lowlevel.FdStream(os.dup(self.in_fd))
        buffer = b""
        async with stream, trio.open_nursery() as nursery:
            while True:
                data = await stream.receive_some()
                if not data:
                    break
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    try:
                        message = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(message, dict):
                        self._handle(message, nursery, reload_send, shutdown, stop_now)
            if not shutdown.is_set():
                logger.warning("the supervisor went away: shutting down")
                shutdown.set()
            nursery.cancel_scope.cancel()

    def _handle(
        self,
        message: dict[str, Any],
        nursery: trio.Nursery,
        reload_send: trio.MemorySendChannel[ReloadRequest],
        shutdown: trio.Event,
        stop_now: Callable[[], None],
    ) -> None:
        if "stop" in message:
            if message["stop"] == "now":
                logger.warning("the supervisor says: stopping now; writing the usage records queued")
                shutdown.set()
                stop_now()
            elif not shutdown.is_set():
                logger.info("the supervisor is stopping: shutting down gracefully")
                shutdown.set()
        elif "reload_done" in message:
            entry = self.waiting.get(str(message["reload_done"]))
            if entry is not None:
                entry[1].append(message)
                entry[0].set()
        elif "reload" in message:
            nursery.start_soon(self._reload, str(message["reload"]), reload_send)

    async def _reload(self, token: str, reload_send: trio.MemorySendChannel[ReloadRequest]) -> None:
        request = ReloadRequest()
        await reload_send.send(request)
        await request.done.wait()
        self.tell({"reloaded": token, "errors": request.errors})
