"""Shared fixtures: the real mock upstream and the real gateway, on ephemeral loopback ports.

End-to-end tests run with the real clock (real I/O makes the autojump clock
jump falsely); they never wait on time, only on events, and every one is
bounded with ``trio.fail_after`` so a deadlock fails instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from trioproxy import server
from trioproxy.breaker import HedgeBudget
from trioproxy.config import load_config
from trioproxy.health import HealthBoard
from trioproxy.mock import MockSettings, MockUpstream, serve_mock
from trioproxy.server import RunningServer, build_runtimes
from trioproxy.services import Services
from trioproxy.telemetry import Record, TelemetrySink
from trioproxy.watchdog import Watchdog

StartMock = Callable[..., Awaitable[MockUpstream]]
StartGateway = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_mock(nursery: trio.Nursery) -> StartMock:
    """``await start_mock(tokens=3, ...)`` → a running ``MockUpstream`` (settings as keywords)."""

    async def start(**settings: Any) -> MockUpstream:
        mock: MockUpstream = await nursery.start(partial(serve_mock, MockSettings(**settings)))
        return mock

    return start


def upstream_toml(uid: str, url: str, *, kind: str = "openai", models: str = '["*"]', extra: str = "") -> str:
    return f'[[upstreams]]\nid = "{uid}"\nkind = "{kind}"\nbase_url = "{url}"\nmodels = {models}\n{extra}\n'


@pytest.fixture
async def start_gateway(nursery: trio.Nursery, tmp_path: Path) -> StartGateway:
    """``await start_gateway(profile_toml)`` → a running gateway on 127.0.0.1:0, logging under tmp_path.

    Each gateway of a test gets its own usage-log directory (``logs``, ``logs-2``...): one
    writer per file, as in production. ``read_records(running)`` reads the right one.
    """
    started = 0

    async def start(profile: str) -> RunningServer:
        nonlocal started
        started += 1
        config = load_config(profile, source="test-profile")
        config = attrs.evolve(
            config,
            server=attrs.evolve(config.server, host="127.0.0.1", port=0),
            telemetry=attrs.evolve(config.telemetry, dir=str(tmp_path / ("logs" if started == 1 else f"logs-{started}"))),
        )
        running: RunningServer = await nursery.start(server.main, config)
        return running

    return start


async def stop(running: RunningServer) -> None:
    """Graceful shutdown, as SIGTERM does it; returns once every record is written."""
    running.shutdown.set()
    await running.stopped.wait()


def read_records(running: RunningServer) -> list[dict[str, Any]]:
    directory = Path(running.services.config.telemetry.dir)
    records = []
    for path in sorted(directory.glob("usage-*.jsonl")):
        records.extend(json.loads(line) for line in path.read_text().splitlines())
    return records


NO_PROBES = "[upstreams.health]\nenabled = false\n"


@pytest.fixture
async def proxy_services(nursery: trio.Nursery) -> AsyncIterator[Any]:
    """``make(upstream, watch_after_ms)``: a ``Services`` for ``ProxyApp`` with one upstream, ``upstream.handle``
    served on an ephemeral port, the gateway's real Watchdog running, and its usage records' channel."""

    async def make(upstream: Any, watch_after_ms: int) -> tuple[Services, trio.MemoryReceiveChannel[Record]]:
        listeners = await nursery.start(partial(trio.serve_tcp, upstream.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        config = load_config(
            upstream_toml("u", f"http://127.0.0.1:{port}", models='["m"]', extra=NO_PROBES)
            + f"[server]\ndisconnect_watch_after_ms = {watch_after_ms}\n",
            source="test",
        )
        watchdog = Watchdog()
        nursery.start_soon(watchdog.run)
        records_send, records_recv = trio.open_memory_channel[Record](16)
        made = Services(
            config=config,
            runtimes=build_runtimes(config, watchdog=watchdog),
            sink=TelemetrySink(records_send),
            http=http,
            board=HealthBoard(rise={"u": 1}, fall={"u": 1}),
            hedge_budget=HedgeBudget(percent=config.routing.hedge_budget_percent),
            watchdog=watchdog,
        )
        return made, records_recv

    async with httpx.AsyncClient() as http:
        yield make


@asynccontextmanager
async def floor_app(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """``loadtest/floor_app.py`` (the bench's floor, or with ``--upstream`` its relay floor) in a
    child process on the bench profile (``env``: more of its environment): yields its URL; on exit
    SIGINT must stop it cleanly."""
    repo = Path(__file__).resolve().parent.parent
    argv = [sys.executable, str(repo / "loadtest" / "floor_app.py"), "--port", "0",
            "--config", str(repo / "loadtest" / "profiles" / "bench.toml"), *args]
    async with trio.open_nursery() as nursery:
        child = await nursery.start(partial(trio.run_process, argv, stderr=subprocess.PIPE, check=False,
                                            env={**os.environ, **env} if env else None))
        seen = b""
        while b"floor listening on " not in seen or not seen.endswith(b"\n"):  # bounded by its start
            chunk = await child.stderr.receive_some()
            assert chunk, seen
            seen += chunk
        yield seen.split(b"floor listening on ")[1].split()[0].decode()
        child.send_signal(signal.SIGINT)
        assert await child.wait() == 0
