"""Prometheus metrics (``GET /metrics``), built with ``prometheus_client``.

Per-request metrics are fed from the usage records, in the telemetry writer's task
(``usagelog.run_writer(observe=...)``): the request path does no metrics work, and
the numbers agree with the usage log by construction (at most ``flush_ms`` behind).
State that is not a record (in-flight requests, upstream health and circuits,
concurrency queues, telemetry counters) is copied into gauges at scrape time.

Several workers (``serve --workers N``): prometheus_client's multiprocess mode.
Every worker's metrics live in files under ``PROMETHEUS_MULTIPROC_DIR`` (the
supervisor makes a fresh one), and whichever worker a scrape lands on sums them
all: counters and histograms add up; in-flight and queue gauges are summed over
the live workers; health and circuit state, which each worker keeps for itself,
come per worker (a ``pid`` label). Each worker refreshes its gauges every second,
so a scrape sees the other workers' state at most that old.

Label values come from the profile, never from client input: the served model and
upstream ids are configured or discovered names, and routes are the known ones, so
a client cannot grow the number of series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric

from .catalog import ROUTES, route_label
from .telemetry import Record

if TYPE_CHECKING:
    from .services import Services

#: Seconds: TTFT and latency of LLM calls span milliseconds (a cached answer) to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CIRCUIT_STATES = ("closed", "half_open", "open")


#: How often a worker copies its state into the shared gauges (several workers only).
REFRESH_S = 1.0


def hedge_won(rec: Record) -> bool:
    """Whether a hedged request was answered by a hedge: an attempt that lost the race started before
    the winning one (attempts are in start order; one that failed first raced nobody)."""
    lost_before = False
    for attempt in rec.attempts:
        if attempt.outcome == "lost_race":
            lost_before = True
        elif attempt.upstream == rec.upstream and attempt.outcome in ("ok", "client_error", "broke"):
            return lost_before
    return False


class Metrics:
    def __init__(self, services: Callable[[], Services | None], *, multiprocess_dir: str | None = None) -> None:
        self._services = services
        self._multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "trioproxy_requests", "Requests by route, served model, upstream and outcome.",
            ["route", "model", "upstream", "outcome"], registry=r,
        )
        self.ttft = Histogram(
            "trioproxy_ttft_seconds", "Time to first token of streamed answers.",
            ["model", "upstream"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.latency = Histogram(
            "trioproxy_request_duration_seconds", "Whole request time, arrival to last byte.",
            ["route", "model", "upstream"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "trioproxy_tokens", "Tokens by direction (prompt, completion) and source.",
            ["model", "upstream", "direction", "source"], registry=r,
        )
        self.attempts = Counter(
            "trioproxy_upstream_attempts", "Attempts on upstreams by outcome.", ["upstream", "outcome"], registry=r
        )
        self.failovers = Counter(
            "trioproxy_failovers", "Requests answered by another upstream than the first tried.", ["model"], registry=r
        )
        self.hedges = Counter(
            "trioproxy_hedges",
            "Hedged requests by result: won (a hedge answered) or cancelled (the first attempt answered, "
            "the hedge was cancelled); started is their sum.",
            ["result"], registry=r,
        )
        self.in_flight = Gauge(
            "trioproxy_in_flight_requests", "Requests being served now.", registry=r, multiprocess_mode="livesum"
        )
        self.healthy = Gauge(
            "trioproxy_upstream_healthy", "1 when the health check says up.", ["upstream"],
            registry=r, multiprocess_mode="liveall",
        )
        self.circuit = Gauge(
            "trioproxy_upstream_circuit", "1 for the circuit breaker's current state.", ["upstream", "state"],
            registry=r, multiprocess_mode="liveall",
        )
        self.upstream_in_flight = Gauge(
            "trioproxy_upstream_in_flight", "Requests in flight per upstream.", ["upstream"],
            registry=r, multiprocess_mode="livesum",
        )
        self.queue_depth = Gauge(
            "trioproxy_upstream_queue_depth", "Requests waiting for a slot.", ["upstream"],
            registry=r, multiprocess_mode="livesum",
        )
        self.records = Gauge(
            "trioproxy_telemetry_records", "Usage records by fate since start.", ["fate"],
            registry=r, multiprocess_mode="livesum",
        )
        self._upstreams: set[str] = set()
        #: (route, model, upstream, outcome) → its request counter and latency histogram; (model, upstream) → TTFT.
        self._children: dict[tuple[str, str, str, str], tuple[Counter, Histogram]] = {}
        self._ttft_children: dict[tuple[str, str], Histogram] = {}
        #: (model, upstream, direction, source) → token counter; (upstream, outcome) → attempt counter.
        self._token_children: dict[tuple[str, str, str, str], Counter] = {}
        self._attempt_children: dict[tuple[str, str], Counter] = {}

    def observe(self, batch: list[Record]) -> None:
        """Count a batch of usage records (the writer's ``observe`` hook).

        Counters are summed over the batch first and incremented once per label set (each
        ``inc`` takes a lock); histograms take each record's value.
        """
        children = self._children
        requests: dict[Counter, int] = {}
        tokens: dict[tuple[str, str, str, str], int] = {}
        attempts: dict[tuple[str, str], int] = {}
        for rec in batch:
            route = rec.route if rec.route in ROUTES else route_label(rec.route)
            model, upstream = rec.model_served or "", rec.upstream or ""
            key = (route, model, upstream, rec.outcome)
            per_request = children.get(key)
            if per_request is None:  # labels() validates and locks: once per label set, not per record
                per_request = children[key] = (
                    self.requests.labels(route, model, upstream, rec.outcome),
                    self.latency.labels(route, model, upstream),
                )
            counter, latency = per_request
            requests[counter] = requests.get(counter, 0) + 1
            latency.observe(rec.total_ms / 1000)
            if rec.ttft_ms is not None:
                ttft = self._ttft_children.get((model, upstream))
                if ttft is None:
                    ttft = self._ttft_children[(model, upstream)] = self.ttft.labels(model, upstream)
                ttft.observe(rec.ttft_ms / 1000)
            if rec.prompt_tokens:
                key4 = (model, upstream, "prompt", rec.token_source)
                tokens[key4] = tokens.get(key4, 0) + rec.prompt_tokens
            if rec.completion_tokens:
                key4 = (model, upstream, "completion", rec.token_source)
                tokens[key4] = tokens.get(key4, 0) + rec.completion_tokens
            for attempt in rec.attempts:
                key2 = (attempt.upstream, attempt.outcome)
                attempts[key2] = attempts.get(key2, 0) + 1
            if rec.attempts and rec.upstream and rec.attempts[0].upstream != rec.upstream:
                self.failovers.labels(model).inc()
            if rec.hedged and rec.attempts:
                self.hedges.labels("won" if hedge_won(rec) else "cancelled").inc()
        for counter, n in requests.items():
            counter.inc(n)
        for key4, n in tokens.items():
            self._tokens(*key4).inc(n)
        attempt_children = self._attempt_children
        for key2, n in attempts.items():
            child = attempt_children.get(key2)
            if child is None:
                child = attempt_children[key2] = self.attempts.labels(*key2)
            child.inc(n)

    def _tokens(self, model: str, upstream: str, direction: str, source: str) -> Counter:
        key = (model, upstream, direction, source)
        child = self._token_children.get(key)
        if child is None:
            child = self._token_children[key] = self.tokens.labels(*key)
        return child

    def refresh(self) -> None:
        """Copy the running gateway's state into the gauges (at each scrape, and every second with workers)."""
        services = self._services()
        if services is None:
            return
        now = trio.current_time()
        self.in_flight.set(services.active)
        for uid, rt in services.runtimes.items():
            self.healthy.labels(uid).set(1.0 if rt.healthy else 0.0)
            state = rt.breaker.snapshot(now).state
            for name in CIRCUIT_STATES:
                self.circuit.labels(uid, name).set(1.0 if name == state else 0.0)
            self.upstream_in_flight.labels(uid).set(rt.gate.in_flight)
            self.queue_depth.labels(uid).set(rt.gate.waiting)
        for uid in self._upstreams - services.runtimes.keys():  # removed by a reload
            for gauge in (self.healthy, self.upstream_in_flight, self.queue_depth):
                gauge.labels(uid).set(0)  # (what a multiprocess file keeps until the worker exits)
                gauge.remove(uid)
            for name in CIRCUIT_STATES:
                self.circuit.labels(uid, name).set(0)
                self.circuit.remove(uid, name)
        self._upstreams = set(services.runtimes)
        stats = services.sink.statistics()
        for fate, value in (("written", stats.written), ("dropped", stats.dropped), ("lost", stats.lost)):
            self.records.labels(fate).set(value)

    def render(self) -> bytes:
        self.refresh()
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


async def refresh_every(metrics: Metrics, interval: float = REFRESH_S) -> None:
    """Several workers: keep this worker's gauges in the shared files fresh for the others' scrapes."""
    while True:
        metrics.refresh()
        await trio.sleep(interval)


def families(text: str) -> Iterable[Metric]:
    """Parse an exposition (tests, and anyone checking a scrape)."""
    from prometheus_client.parser import text_string_to_metric_families

    return text_string_to_metric_families(text)
