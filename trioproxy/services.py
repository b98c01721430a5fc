"""``Services``: the one object ``ProxyApp`` receives.

``server.main`` builds every long-lived part (pools, the telemetry sink, the
health board, the httpx client for probes and discovery) and hands them to the
app here; nothing lives at module level.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import httpx
import trio
from attrs import define, field

from .auth import AdminGate, KeyLimiter, KeyTable
from .breaker import HedgeBudget
from .config import Config
from .feed import Broadcaster
from .health import HealthBoard
from .metrics import Metrics
from .relayhub import RelayHub
from .watchdog import Watchdog
from .telemetry import TelemetrySink
from .upstream import UpstreamRuntime

if TYPE_CHECKING:
    from .reload import ReloadRequest
    from .workers import WorkerLink


@define
class Services:
    config: Config
    runtimes: dict[str, UpstreamRuntime]
    sink: TelemetrySink
    http: httpx.AsyncClient
    board: HealthBoard
    hedge_budget: HedgeBudget
    keys: KeyTable = KeyTable(by_digest={})
    admin: AdminGate = AdminGate()
    key_limiter: KeyLimiter = field(factory=KeyLimiter)
    #: Requests being served now (for server.max_concurrent_requests).
    active: int = 0
    #: The Prometheus metrics (None only in tests that build Services by hand).
    metrics: Metrics | None = None
    #: The live feed of ``/_/live`` (None only in tests that build Services by hand).
    feed: Broadcaster | None = None
    #: Where ``POST /_/reload`` sends its request (None: the gateway was not started from profiles).
    reload_send: trio.MemorySendChannel[ReloadRequest] | None = None
    #: A worker of ``serve --workers``: its supervisor, which carries a reload to the other workers.
    worker_link: WorkerLink | None = None
    #: Set when the gateway starts its graceful shutdown (live-feed sessions close at once).
    shutdown: trio.Event = field(factory=trio.Event)
    #: The cancel scope of each proxied request in flight: what the shutdown ends once its
    #: grace has run out (``server.main``; each then answers in its own format).
    open_requests: set[trio.CancelScope] = field(factory=set)
    #: True once the shutdown grace has run out: requests still running are being ended.
    ending: bool = False
    #: Jitter for retry backoff (one generator, no global state).
    rng: random.Random = field(factory=random.Random)
    #: Round-robin counter for routing ties; bumped once per routed request.
    rr: int = 0
    #: Model listings fetched from upstreams: key → (fetched_at, names or entries).
    catalog_cache: dict[str, tuple[float, Any]] = field(factory=dict)
    #: The one watchdog of every relayed stream's client writes and upstream reads, run by
    #: ``server.main`` (None only in tests that build Services by hand: no write timeout then).
    watchdog: Watchdog | None = None
    #: The relay hub of steady stream pieces, run by ``server.main`` (None: off, or in tests that
    #: build Services by hand: each stream's task relays every piece itself).
    hub: RelayHub | None = None
