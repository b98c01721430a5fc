"""Hot profile swap: SIGHUP or ``POST /_/reload`` → validate → swap, without dropping a stream.

A reload request is a message on a channel to ``run_reloader``, a task of the
service nursery (request code never touches that nursery). The reloader reads and
validates the profiles again; on any error the running profile stays and the
errors go back to whoever asked (and to the log). Otherwise it:

- keeps every upstream whose settings did not change, with its pool, breaker,
  concurrency gate and health checker;
- creates the new and changed ones (starting embedded mocks and health checkers);
- swaps ``services.config`` and ``services.runtimes`` together, with no await in
  between: a request takes both once when it starts (``app.ProxyApp._proxy``), so new
  requests see the new profile and in-flight ones finish on their old upstreams;
- cancels the checkers of removed upstreams and closes their pools (a response still
  open on a closed pool closes its own connection when it is released);
- drains the embedded mocks no upstream names any more (removed, or replaced by a
  changed one): they stop accepting, and stop once the answers they are writing end.
  A refused reload drains the mocks it had started.

The listening address, workers and other ``[server]`` settings need a restart:
a reload that changes them keeps the running ones and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from attrs import define, field
from loguru import logger

from .auth import AdminGate, KeyTable
from .config import Config, load_profiles
from .errors import ConfigError
from .health import HealthBoard, run_checker
from .mock import MockUpstream
from .services import Services
from .upstream import UpstreamRuntime

#: Reload requests waiting (a burst of SIGHUPs is one reload, not a queue of them).
PENDING_RELOADS = 4


@define
class ReloadRequest:
    done: trio.Event = field(factory=trio.Event)
    result: dict[str, Any] | None = None
    errors: list[str] = field(factory=list)


@define
class Reloader:
    """What a reload changes, and the tasks it owns in the service nursery."""

    profiles: list[str]
    services: Services
    nursery: trio.Nursery
    board: HealthBoard
    http: httpx.AsyncClient
    #: Builds the runtime of a new upstream (``server.build_runtime``).
    build: Callable[[Config, Any], UpstreamRuntime]
    #: Starts the embedded mocks a config names (``server.start_embedded_mocks``).
    start_mocks: Callable[[Config, trio.Nursery, dict[str, MockUpstream]], Any]
    checkers: dict[str, tuple[UpstreamRuntime, trio.CancelScope]] = field(factory=dict)
    #: The embedded mocks running, by base_url (started at start-up or by a reload).
    mocks: dict[str, MockUpstream] = field(factory=dict)

    def start_checker(self, runtime: UpstreamRuntime) -> None:
        if not (runtime.cfg.health.enabled or runtime.cfg.discovers):
            return
        scope = trio.CancelScope()

        async def checker() -> None:
            with scope:
                await run_checker(runtime, self.board, self.http)

        self.nursery.start_soon(checker)
        self.checkers[runtime.cfg.id] = (runtime, scope)

    async def reload(self) -> dict[str, Any]:
        """Raises: ConfigError: the new profile is not usable (nothing changed)."""
        new = await trio.to_thread.run_sync(load_profiles, self.profiles)
        services = self.services
        old, old_runtimes = services.config, services.runtimes
        notes = []
        # host, port and workers need a new listening socket or new processes: a restart.
        running = attrs.evolve(new.server, host=old.server.host, port=old.server.port, workers=old.server.workers)
        if running != old.server:  # (those three may come from --host, --port, --workers)
            notes.append("[server] settings need a restart; the running ones are kept")
        kept: dict[str, UpstreamRuntime] = {}
        upstreams = []
        for u in new.upstreams:
            previous = old_runtimes.get(u.id)
            if previous is not None and u.mock is not None:
                u = attrs.evolve(u, base_url=previous.cfg.base_url)  # the embedded mock's address
            if previous is not None and previous.cfg == u:
                kept[u.id] = previous
            elif u.mock is not None and (previous is None or previous.cfg.mock != u.mock):
                u = attrs.evolve(u, base_url="")  # a new embedded mock, or new mock settings: started below
            upstreams.append(u)
        started: dict[str, MockUpstream] = {}
        try:
            config = await self.start_mocks(
                attrs.evolve(new, upstreams=tuple(upstreams), server=old.server), self.nursery, started
            )
            keys = KeyTable.from_config(config.auth)  # raises ConfigError before anything changes
            admin = AdminGate.from_config(config.admin)
            # Raises ConfigError too (an api_key_env variable unset). The pools built before
            # that have opened no connection yet: nothing to close.
            runtimes = {u.id: kept.get(u.id) or self.build(config, u) for u in config.upstreams}
        except BaseException:
            for mock in started.values():  # refused (or cancelled): the new mocks serve nobody
                mock.drain()
            raise
        self.mocks.update(started)
        for u in config.upstreams:
            self.board.rise[u.id], self.board.fall[u.id] = u.health.rise, u.health.fall
        # The swap: no await between these lines.
        services.config, services.runtimes, services.keys, services.admin = config, runtimes, keys, admin
        services.catalog_cache.clear()
        for uid, (runtime, scope) in list(self.checkers.items()):
            if runtimes.get(uid) is not runtime:
                scope.cancel()
                del self.checkers[uid]
        for uid, runtime in old_runtimes.items():
            new_runtime = runtimes.get(uid)
            if new_runtime is runtime:
                continue
            if new_runtime is not None and _probed_alike(runtime, new_runtime):
                # Other settings changed (limits, timeouts, models), not what its probes see: its
                # health carries over (/readyz would otherwise drop to "not checked" for a probe).
                new_runtime.healthy = runtime.healthy
                if runtime.checked.is_set():
                    new_runtime.checked.set()
            else:  # another server, other probes, or gone: judged afresh
                self.board.forget(uid)
        for runtime in runtimes.values():
            if runtime.cfg.id not in self.checkers:
                self.start_checker(runtime)
        removed = [uid for uid, rt in old_runtimes.items() if runtimes.get(uid) is not rt]
        named = {u.base_url for u in config.upstreams if u.mock is not None}
        for url in [url for url in self.mocks if url not in named]:
            self.mocks.pop(url).drain()  # in-flight answers on the old upstream still finish
            logger.info("embedded mock upstream on {} stopped: the profile no longer names it", url)
        for uid in removed:
            await old_runtimes[uid].pool.aclose()
        summary = {
            "source": config.source,
            "kept": sorted(kept),
            "started": sorted(uid for uid in runtimes if uid not in kept),
            "closed": sorted(removed),
            "notes": notes,
        }
        logger.info("profile reloaded from {}: {}", config.source, summary)
        return summary


def _probed_alike(old: UpstreamRuntime, new: UpstreamRuntime) -> bool:
    """Whether the health probes of ``new`` see what those of ``old`` saw: same server, same probe, same key."""
    a, b = old.cfg, new.cfg
    return (a.base_url, a.kind, a.health, old.auth_headers) == (b.base_url, b.kind, b.health, new.auth_headers)


#: Seconds between two looks at the profile files (serve --watch): a reload a second at most.
WATCH_INTERVAL_S = 1.0


def file_stamps(paths: list[Path]) -> tuple[tuple[int, int] | None, ...]:
    """What --watch compares: each file's modification time and size (None: missing)."""
    stamps: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            info = path.stat()
        except OSError:
            stamps.append(None)
        else:
            stamps.append((info.st_mtime_ns, info.st_size))
    return tuple(stamps)


async def watch_profiles(
    paths: list[Path], reload_send: trio.MemorySendChannel[ReloadRequest], *, interval: float = WATCH_INTERVAL_S
) -> None:
    """``serve --watch``: ask for a reload whenever a profile file changes (until cancelled).

    A stat of a few small files once a second, on the event loop: cheaper than a thread,
    and far from the request path. An editor's save in several writes settles within one
    interval; an invalid half-written file is refused by the reload and the next look retries.
    """
    last = file_stamps(paths)
    while True:
        await trio.sleep(interval)
        current = file_stamps(paths)
        if current != last:
            last = current
            try:
                reload_send.send_nowait(ReloadRequest())
            except trio.WouldBlock:
                pass  # reloads already pending will read the same files


async def run_reloader(reload_recv: trio.MemoryReceiveChannel[ReloadRequest], reloader: Reloader) -> None:
    """Serve reload requests one at a time, until cancelled."""
    async with reload_recv:
        async for request in reload_recv:
            try:
                request.result = await reloader.reload()
            except ConfigError as exc:
                request.errors = exc.errors or [exc.message]
                logger.error("profile reload refused, the running profile stays:\n{}", exc.message)
            finally:
                request.done.set()
