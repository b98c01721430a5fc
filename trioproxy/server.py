"""``main``: one gateway process — its task tree and its shutdown order.

::

    main(config)
    └─ with open_signal_receiver(SIGINT, SIGTERM, SIGHUP)  for the whole run (a late signal is not fatal)
     └─ async with httpx.AsyncClient() as http          probes and model discovery; closes last
       └─ root nursery
          ├─ usagelog.run_writer(records_recv, ...)      drains until records_send is closed
          │  (run_discarder when the log is disabled: the same batches, to the metrics only)
          ├─ _take_late_signals                          once serving stopped: a signal logged; a second
          │                                              cancels the writer; a third exits
          └─ [body] async with sink:                    closing it (records_send) is the writer's stop signal
             └─ service nursery
                ├─ mock.serve_mock(...) × embedded mock  (the demo profile's upstreams)
                ├─ health.run_checker(upstream) × N      loop until cancelled
                ├─ watchdog.Watchdog.run                  every stream's client writes and upstream reads
                ├─ feed.watch_upstreams(feed, services)  health/circuit changes → the live feed
                ├─ _watch_signals(shutdown)              SIGINT/SIGTERM → shutdown.set()
                ├─ _end_after_grace(services)            grace over → end the requests left
                └─ _serve: hypercorn.trio.serve(app, shutdown_trigger=shutdown.wait)
                           then service.cancel_scope.cancel()

Shutdown, bottom-up: Hypercorn stops accepting and gives in-flight requests
``server.shutdown_grace_s``; the gateway then ends the proxied requests still running
(``_end_after_grace``: each answers in its own format, an in-band error or a 503) and
Hypercorn cancels what is left ``SHUTDOWN_CUT_MARGIN_S`` later (each request still sends
its record from its ``finally``); ``serve`` returns; the service nursery is cancelled
(checkers, mocks); ``records_send`` closes; the writer writes every queued record
and returns (a SIGINT/SIGTERM meanwhile is logged; a second cuts the wait short); the pools
and the httpx client close.

Several worker processes (``serve --workers N``, ``workers.py``): each runs this
same ``main`` on the listening socket its supervisor opened (``listen_fd``), writes
its own usage file (``file_tag`` = its pid), keeps its metrics in the shared
multiprocess directory, and talks to the supervisor through ``link`` (ready,
reloads, and a shutdown when the supervisor goes away).
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import attrs
import httpx
import trio
from attrs import frozen
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve
from loguru import logger

from .app import ProxyApp
from .auth import AdminGate, KeyTable
from .breaker import HedgeBudget
from .config import Config, Upstream, resolve_profile
from .errors import ConfigError
from .health import HealthBoard
from . import hypercorn_fast, hypercorn_fix
from .reload import PENDING_RELOADS, Reloader, ReloadRequest, run_reloader, watch_profiles
from .feed import SUBSCRIBER_BUFFER, Broadcaster, follow_usage_files, watch_upstreams
from .metrics import Metrics, refresh_every
from .mock import MockSettings, MockUpstream, serve_mock
from .pool import ConnectionPool
from .services import Services
from .telemetry import Record, TelemetrySink
from .usagelog import run_discarder, run_writer
from .upstream import UpstreamRuntime
from .relayhub import RelayHub
from .watchdog import Watchdog
from .workers import WorkerLink

#: Hypercorn closes keep-alive client connections after this many requests by default (1,000); a proxy should not.
KEEP_ALIVE_MAX_REQUESTS = 2**31
#: The cyclic GC's first threshold while serving (CPython's default is 700). Requests make
#: almost no reference cycles (``loadtest/bench_app.py --garbage``), so each young-generation
#: pass frees nothing and rescans every in-flight request's frames; at 700 that was ~12 % of
#: the gateway's CPU under 256 connections (perf). 50,000 net allocations between passes
#: cut ~7-11 % CPU per request and left memory per open stream unchanged (docs/benchmarks.md).
GC_GEN0_THRESHOLD = 50_000


@frozen
class RunningServer:
    """What ``main`` reports once it listens (tests and the CLI use it)."""

    binds: list[str]
    #: Set it to shut down gracefully (what SIGINT/SIGTERM do).
    shutdown: trio.Event
    #: Set once everything has stopped and every queued usage record is written.
    stopped: trio.Event
    services: Services

    @property
    def url(self) -> str:
        return self.binds[0]


#: How many gateways in this process have settled the GC, and the thresholds from before the first.
_gc_settled: list[tuple[int, int, int]] = []


def settle_gc() -> None:
    """After start-up: freeze what start-up built, space the young-generation passes out.

    What start-up built mostly lives as long as the process, so ``gc.freeze`` keeps it out
    of the full passes (what a reload drops is still freed by refcounting; only its cycles
    wait for the unfreeze). Pair with ``unsettle_gc``; several gateways in one process
    (tests) nest: the last one out restores CPython's settings.
    """
    _gc_settled.append(gc.get_threshold())
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *_gc_settled[0][1:])


def unsettle_gc() -> None:
    """Undo ``settle_gc`` once the last gateway of this process that settled it stops."""
    first = _gc_settled[0]
    _gc_settled.pop()
    if not _gc_settled:
        gc.unfreeze()
        gc.set_threshold(*first)


# Whatever serves with Hypercorn through this module (the gateway, each worker, the bench's
# floor app) closes a connection its client closed while idle at once (hypercorn_fix.py), and
# does its plain-TCP I/O with fewer trips through the scheduler (hypercorn_fast.py; not with
# TRIOPROXY_STOCK_HYPERCORN=1, nor on a Hypercorn release it was not written for).
hypercorn_fix.apply()
hypercorn_fast.apply()


#: How long after the shutdown's grace Hypercorn cuts the connections left: the gateway has
#: then ended each request still running with an error in its own format (``_end_after_grace``).
SHUTDOWN_CUT_MARGIN_S = 1.0


def hypercorn_config(config: Config, listen_fd: int | None = None) -> HyperConfig:
    server = config.server
    hcfg = HyperConfig()
    host = f"[{server.host}]" if ":" in server.host else server.host
    hcfg.bind = [f"fd://{listen_fd}"] if listen_fd is not None else [f"{host}:{server.port}"]
    hcfg.accesslog = "-" if server.access_log else None
    hcfg.errorlog = "-"
    hcfg.loglevel = "WARNING"
    hcfg.keep_alive_timeout = server.keep_alive_timeout_s
    hcfg.keep_alive_max_requests = KEEP_ALIVE_MAX_REQUESTS
    hcfg.backlog = server.backlog
    # The gateway ends what is left once the grace has run out (_end_after_grace); Hypercorn
    # cuts the connections a margin later, for clients that do not read their last bytes.
    hcfg.graceful_timeout = server.shutdown_grace_s + SHUTDOWN_CUT_MARGIN_S
    hcfg.include_server_header = False
    hcfg.h11_max_incomplete_size = server.max_header_bytes
    return hcfg


def auth_headers(upstream: Upstream, environ: dict[str, str] | os._Environ[str]) -> list[tuple[bytes, bytes]]:
    """The upstream's own ``authorization``, from the environment variable its profile names."""
    if not upstream.api_key_env:
        return []
    key = environ.get(upstream.api_key_env)
    if not key:
        raise ConfigError(
            [f"upstream {upstream.id!r}: environment variable {upstream.api_key_env} (api_key_env) is not set"]
        )
    return [(b"authorization", b"Bearer " + key.encode())]


def build_runtime(config: Config, u: Upstream, *, watchdog: Watchdog | None = None) -> UpstreamRuntime:
    pool = ConnectionPool(
        u.base_url,
        upstream_id=u.id,
        max_idle=u.pool_max_idle,
        connect_timeout=u.timeouts.connect_ms / 1000,
        watchdog=watchdog,
    )
    return UpstreamRuntime.create(u, pool, auth_headers(u, os.environ), config.routing)


def build_runtimes(config: Config, *, watchdog: Watchdog | None = None) -> dict[str, UpstreamRuntime]:
    return {u.id: build_runtime(config, u, watchdog=watchdog) for u in config.upstreams}


async def start_embedded_mocks(
    config: Config, nursery: trio.Nursery, started: dict[str, MockUpstream] | None = None
) -> Config:
    """Start the profile's embedded mock upstreams; return the config with their addresses filled in.

    Args:
      started: receives each mock started, by its ``base_url`` (the reloader stops a mock
        once no upstream of the running profile names it).
    """
    upstreams = []
    for u in config.upstreams:
        if u.mock is not None and not u.base_url:  # (a reload keeps the mocks already running)
            mock = await nursery.start(partial(serve_mock, MockSettings.from_config(u.mock), host="127.0.0.1", port=0))
            u = attrs.evolve(u, base_url=f"http://127.0.0.1:{mock.port}")
            logger.info("embedded mock upstream {} ({}) on {}", u.id, u.mock.kind if u.mock else "", u.base_url)
            if started is not None:
                started[u.base_url] = mock
        upstreams.append(u)
    return attrs.evolve(config, upstreams=tuple(upstreams))


async def main(
    config: Config,
    *,
    profiles: list[str] | None = None,
    watch: bool = False,
    listen_fd: int | None = None,
    link: WorkerLink | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until SIGINT/SIGTERM (or ``RunningServer.shutdown`` is set).

    Args:
        profiles: the profile names or paths ``config`` came from; SIGHUP and
            ``POST /_/reload`` read them again (without them, reloads are refused).
        watch: also reload whenever one of those files changes (``serve --watch``).
        listen_fd: serve on this inherited listening socket (a worker of ``serve --workers``).
        link: a worker's channel to its supervisor (``workers.WorkerLink``).
    """
    shutdown, stopped = trio.Event(), trio.Event()
    records_send, records_recv = trio.open_memory_channel[Record](config.telemetry.queue_capacity)
    sink = TelemetrySink(records_send)
    runtimes: dict[str, UpstreamRuntime] = {}
    live: list[Services] = []  # the metrics collector reads the running services, once they exist
    settled = False
    multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") if link is not None else None
    metrics = Metrics(lambda: live[0] if live else None, multiprocess_dir=multiprocess_dir)
    # The writer publishes a batch (up to batch_max records) within a few turns of the loop:
    # a subscriber's buffer holds two, so only one that stays behind is dropped.
    feed = Broadcaster(buffer=max(SUBSCRIBER_BUFFER, 2 * config.telemetry.batch_max))

    # Several workers with a usage log: the feed reads every worker's records back from the files.
    feed_from_files = link is not None and config.telemetry.enabled

    def observe(batch: list[Record]) -> None:  # in the writer's task, never on the request path
        metrics.observe(batch)
        if not feed_from_files:
            feed.publish(batch)

    # Open for the whole run, not only while the service nursery reads it: a signal that comes
    # while the last usage records are written is taken (``_take_late_signals``), where its
    # default action would end the process and lose them.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signal_stream:
        try:
            async with httpx.AsyncClient() as http:
                async with trio.open_nursery() as root:
                    if config.telemetry.enabled:
                        writer = partial(
                            run_writer, records_recv, sink, config.telemetry, file_tag=_file_tag(config),
                            observe=observe,
                        )
                    else:
                        writer = partial(run_discarder, records_recv, sink, config.telemetry, observe=observe)
                    writing, late_signals = trio.CancelScope(), trio.CancelScope()

                    async def write() -> None:
                        with writing:
                            await writer()
                        # The pools too, before late signals are let go: one pending when the
                        # receiver closes would be delivered again, with its default action.
                        with trio.CancelScope(shield=True):
                            for runtime in {**runtimes, **(live[0].runtimes if live else {})}.values():
                                await runtime.pool.aclose()
                        late_signals.cancel()

                    root.start_soon(write)
                    async with sink:  # closes records_send: the writer's stop signal
                        async with trio.open_nursery() as service:
                            mocks: dict[str, MockUpstream] = {}
                            config = await start_embedded_mocks(config, service, mocks)
                            # Started first: the pools' body reads and the relay's client writes rely on it.
                            watchdog = Watchdog()
                            service.start_soon(watchdog.run)
                            hub = RelayHub() if config.server.relay_hub and RelayHub.available() else None
                            if hub is not None:
                                service.start_soon(hub.run)
                            runtimes = build_runtimes(config, watchdog=watchdog)
                            board = HealthBoard(
                                rise={u.id: u.health.rise for u in config.upstreams},
                                fall={u.id: u.health.fall for u in config.upstreams},
                            )
                            reload_send, reload_recv = trio.open_memory_channel[ReloadRequest](PENDING_RELOADS)
                            budget = HedgeBudget(percent=config.routing.hedge_budget_percent)
                            services = Services(
                                config=config,
                                runtimes=runtimes,
                                sink=sink,
                                http=http,
                                board=board,
                                hedge_budget=budget,
                                keys=KeyTable.from_config(config.auth),
                                admin=AdminGate.from_config(config.admin),
                                metrics=metrics,
                                feed=feed,
                                reload_send=reload_send if profiles else None,
                                worker_link=link,
                                shutdown=shutdown,
                                watchdog=watchdog,
                                hub=hub,
                            )
                            live.append(services)
                            reloader = Reloader(
                                profiles=list(profiles or []),
                                services=services,
                                nursery=service,
                                board=board,
                                http=http,
                                build=partial(build_runtime, watchdog=watchdog),
                                start_mocks=start_embedded_mocks,
                                mocks=mocks,
                            )
                            for runtime in runtimes.values():
                                reloader.start_checker(runtime)
                            service.start_soon(run_reloader, reload_recv, reloader)
                            service.start_soon(watch_upstreams, feed, services)
                            if watch and profiles:
                                paths = [resolve_profile(name) for name in profiles]
                                service.start_soon(watch_profiles, paths, reload_send)
                            service.start_soon(_watch_signals, signal_stream, shutdown, service.cancel_scope, reload_send)
                            service.start_soon(_end_after_grace, services)
                            app = ProxyApp(services)

                            async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
                                await hypercorn_serve(
                                    app,  # type: ignore[arg-type]
                                    hypercorn_config(config, listen_fd),
                                    shutdown_trigger=shutdown.wait,
                                    task_status=task_status,
                                )
                                service.cancel_scope.cancel()

                            binds = await service.start(serve)
                            settle_gc()
                            settled = True
                            if link is not None:
                                service.start_soon(link.run, shutdown, reload_send, service.cancel_scope.cancel)
                                service.start_soon(refresh_every, metrics)
                                if feed_from_files:
                                    service.start_soon(follow_usage_files, feed, Path(config.telemetry.dir))
                                link.tell({"ready": os.getpid()})
                            logger.info("trioproxy listening on {} (profile {})", ", ".join(binds), config.source)
                            task_status.started(
                                RunningServer(binds=binds, shutdown=shutdown, stopped=stopped, services=services)
                            )
                    logger.info("stopped serving; writing the last usage records" if config.telemetry.enabled
                                else "stopped serving")
                    root.start_soon(_take_late_signals, signal_stream, late_signals, writing)
        finally:
            if settled:
                unsettle_gc()
            with trio.CancelScope(shield=True):
                for runtime in {**runtimes, **(live[0].runtimes if live else {})}.values():
                    await runtime.pool.aclose()
            stopped.set()
    stats = sink.statistics()
    if config.telemetry.enabled:
        logger.info(
            "usage records: {} submitted, {} written, {} dropped, {} lost",
            stats.submitted,
            stats.written,
            stats.dropped,
            stats.lost,
        )
    else:  # (not "0 written": nothing was lost, nothing was meant to be written)
        logger.info("usage log disabled: {} records counted in the metrics, none written", sink.counters.observed)


async def _end_after_grace(services: Services) -> None:
    """Once the shutdown's grace has run out, end every proxied request still running.

    Each then answers in its own format (``app.py``: an in-band error ending a stream, a 503
    with Retry-After before an answer began) and sends its record; Hypercorn closes the
    connections ``SHUTDOWN_CUT_MARGIN_S`` later. Cancelled with the service nursery once
    ``serve`` returns (nothing was left).
    """
    await services.shutdown.wait()
    await trio.sleep(services.config.server.shutdown_grace_s)
    services.ending = True
    for scope in list(services.open_requests):
        scope.cancel()


async def _take_late_signals(signals: AsyncIterator[int], scope: trio.CancelScope, writing: trio.CancelScope) -> None:
    """Serving has stopped, the last usage records are being written: a first signal now is
    taken and logged; a second stops the writer (a disk that does not answer), which makes one
    last bounded try and counts what it could not write as lost; a third, should the writer
    still not return (a write stuck in the kernel cannot be cancelled), ends the process as
    the signal's default action does. Ended (``scope``) once the records are written and the
    pools closed.
    """
    with scope:
        seen = 0
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                continue
            seen += 1
            if seen == 1:
                logger.warning("{}: already stopping; writing the last usage records (another signal stops "
                               "waiting for them: what is not written is counted as lost)", name)
            elif seen == 2:
                logger.warning("{}: no longer waiting for the usage records", name)
                writing.cancel()
            else:
                logger.warning("{}: exiting now", name)
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)


def _file_tag(config: Config) -> str:
    return str(os.getpid()) if config.server.workers > 1 else ""


async def _watch_signals(
    signals: AsyncIterator[int],
    shutdown: trio.Event,
    service_scope: trio.CancelScope,
    reload_send: trio.MemorySendChannel[ReloadRequest],
) -> None:
    """First SIGINT/SIGTERM: graceful shutdown. A second one: stop now (the usage records
    queued are still written). SIGHUP: reload the profiles.

    Counted in signals: a shutdown begun otherwise (a worker told by its supervisor) does not
    make the first signal a second one (systemd signals every process of the unit at once).
    """
    signalled = False
    async for signum in signals:
        if signum == signal.SIGHUP:
            try:
                reload_send.send_nowait(ReloadRequest())
            except trio.WouldBlock:
                pass  # reloads already pending will read the same files
            continue
        if not signalled:
            signalled = True
            logger.info("{}: shutting down gracefully", signal.Signals(signum).name)
            shutdown.set()
        else:
            logger.warning("second signal: stopping now; writing the usage records queued")
            service_scope.cancel()
            return
