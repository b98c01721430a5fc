"""GET /metrics after a known sequence of requests: the exposition parsed and checked value by value."""

from __future__ import annotations

import hashlib

import httpx
import pytest
import trio
from hypothesis import given, settings
from loguru import logger
from hypothesis import strategies as st
from prometheus_client import generate_latest

from trioproxy.metrics import Metrics, families
from trioproxy.mock import FaultPlan
from trioproxy.telemetry import AttemptRecord, Record

from .conftest import StartGateway, StartMock, stop, upstream_toml

CHAT = {"model": "m", "messages": [{"role": "user", "content": "count me"}]}
NO_PROBES = "[upstreams.health]\nenabled = false\n"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in families(text) for s in family.samples
    }


@pytest.mark.parametrize("usage_log", [True, False], ids=["usage-log-on", "usage-log-off"])
async def test_metrics_count_a_known_sequence(start_mock: StartMock, start_gateway: StartGateway, usage_log: bool) -> None:
    # With the usage log off the records still feed the metrics (usagelog.run_discarder).
    with trio.fail_after(30):
        down = await start_mock(models=("*",), fault=FaultPlan(kind="status", status=503))
        good = await start_mock(models=("*",), tokens=5, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("down", f"http://127.0.0.1:{down.port}", extra="priority = 0\n" + NO_PROBES)
            + upstream_toml("good", f"http://127.0.0.1:{good.port}", extra="priority = 1\n" + NO_PROBES)
            + ("" if usage_log else "[telemetry]\nenabled = false\n")
        )
        url = f"{gw.url}/v1/chat/completions"
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                assert (await client.post(url, json={**CHAT, "stream": True})).status_code == 200
            assert (await client.post(url, json=CHAT)).status_code == 200
            assert (await client.post(url, content=b"{bad")).status_code == 400
            assert (await client.get(f"{gw.url}/no/such/route")).status_code == 404
            await gw.services.sink.wait_observed(6)
            text = (await client.get(f"{gw.url}/metrics")).text
        said: list[str] = []
        handler = logger.add(lambda m: said.append(str(m)), level="INFO", format="{message}")
        try:
            await stop(gw)
        finally:
            logger.remove(handler)
    stats = gw.services.sink.statistics()  # the scrape's own record too, once stopped
    assert (stats.submitted, stats.written) == (7, 7 if usage_log else 0)
    # What the operator reads at shutdown: with the log off, no "0 written" that looks like a loss.
    assert (["usage records: 7 submitted, 7 written, 0 dropped, 0 lost\n"] if usage_log
            else ["usage log disabled: 7 records counted in the metrics, none written\n"]) == [
        line for line in said if line.startswith("usage ")]
    values = samples(text)

    def v(name: str, **labels: str) -> float:
        return values.get((name, tuple(sorted(labels.items()))), 0.0)

    ok = {"route": "/v1/chat/completions", "model": "m", "upstream": "good", "outcome": "ok"}
    assert v("trioproxy_requests_total", **ok) == 4
    assert v("trioproxy_requests_total", route="/v1/chat/completions", model="", upstream="", outcome="rejected") == 1
    # The unknown path is one "other" series, not a series per path a client invents.
    assert v("trioproxy_requests_total", route="other", model="", upstream="", outcome="rejected") == 1
    assert v("trioproxy_failovers_total", model="m") == 4
    assert v("trioproxy_upstream_attempts_total", upstream="down", outcome="status") == 4
    assert v("trioproxy_upstream_attempts_total", upstream="good", outcome="ok") == 4
    assert v("trioproxy_ttft_seconds_count", model="m", upstream="good") == 3
    assert v("trioproxy_tokens_total", model="m", upstream="good", direction="completion", source="upstream") == 20
    assert v("trioproxy_upstream_healthy", upstream="good") == 1
    assert v("trioproxy_upstream_circuit", upstream="down", state="closed") == 1
    assert v("trioproxy_telemetry_records", fate="dropped") == 0
    assert v("trioproxy_in_flight_requests") == 1  # the scrape itself


async def test_metrics_are_refused_to_other_clients(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """The app asked by a non-loopback client (driven in-process, so its address can be anything)."""
    from trioproxy.app import ProxyApp

    with trio.fail_after(30):
        mock = await start_mock(models=("*",))
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        sent: list[dict[str, object]] = []

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        from trioproxy.auth import AdminGate

        gw.services.admin = AdminGate(digest=hashlib.sha256(b"admin-key").hexdigest())
        cases = [
            (("10.1.2.3", 5000), [], 403),
            (("10.1.2.3", 5000), [(b"authorization", b"Bearer wrong")], 403),
            (("10.1.2.3", 5000), [(b"authorization", b"Bearer admin-key")], 200),
            (("127.0.0.1", 5000), [], 200),
        ]
        for client, headers, expected in cases:
            sent.clear()
            scope = {
                "type": "http", "method": "GET", "path": "/metrics", "raw_path": b"/metrics", "query_string": b"",
                "headers": headers, "client": client,
            }
            await ProxyApp(gw.services)(scope, receive, send)
            assert sent[0]["status"] == expected
            if expected == 403:
                assert b'"type":"permission_error"' in sent[1]["body"]  # type: ignore[operator]
        await stop(gw)


def test_hedges_and_failovers_are_counted_from_the_records() -> None:
    """Sans-IO: records fed to the writer's hook, the exposition parsed."""
    from trioproxy.metrics import Metrics
    from trioproxy.telemetry import AttemptRecord

    from .logrecords import rec

    metrics = Metrics(lambda: None)
    primary_slow = (AttemptRecord("a", "m", "lost_race", None, 250.0), AttemptRecord("b", "m", "ok", 200, 140.0))
    primary_fast = (AttemptRecord("a", "m", "ok", 200, 180.0), AttemptRecord("b", "m", "lost_race", None, 70.0))
    failed_over = (AttemptRecord("a", "m", "connect_error", None, 1.0), AttemptRecord("b", "m", "ok", 200, 90.0))
    # a refused, then b raced by a hedge on c; b answered first (in start order, as recorded).
    failed_then_hedged = (AttemptRecord("a", "m", "connect_error", None, 1.0), AttemptRecord("b", "m", "ok", 200, 800.0),
                          AttemptRecord("c", "m", "lost_race", None, 10.0))
    # The hedge won, then its stream broke: it still won the race.
    hedge_broke = (AttemptRecord("a", "m", "lost_race", None, 250.0), AttemptRecord("b", "m", "broke", 200, 140.0))
    metrics.observe([
        rec(0, upstream="b", hedged=True, attempts=primary_slow),   # the hedge won
        rec(5, upstream="b", hedged=True, attempts=hedge_broke, outcome="upstream_error"),
        rec(1, upstream="b", hedged=True, attempts=primary_slow),
        rec(2, upstream="a", hedged=True, attempts=primary_fast),   # the hedge was cancelled
        rec(3, upstream="b", attempts=failed_over),                 # a failover, no hedge
        rec(4, upstream="b", hedged=True, attempts=failed_then_hedged),  # the hedge (c) was cancelled
    ])
    values = samples(metrics.render().decode())
    assert values[("trioproxy_hedges_total", (("result", "won"),))] == 3
    assert values[("trioproxy_hedges_total", (("result", "cancelled"),))] == 2
    assert values[("trioproxy_failovers_total", (("model", "llama3:8b"),))] == 5  # answered by another than the first
    assert values[("trioproxy_upstream_attempts_total", (("outcome", "lost_race"), ("upstream", "a")))] == 3


# --- counting a batch at once ---------------------------------------------------------------

_names = st.sampled_from(["a", "b"])
_attempt = st.builds(AttemptRecord, _names, st.just("m"), st.sampled_from(["ok", "status", "lost_race"]),
                     st.none() | st.just(200), st.floats(0, 100))
_record = st.builds(
    Record,
    request_id=st.just("r"),
    ts=st.just(0.0),
    route=st.sampled_from(["/v1/chat/completions", "/api/chat", "/nowhere"]),
    method=st.just("POST"),
    model_served=st.none() | st.just("m"),
    upstream=st.none() | _names,
    attempts=st.lists(_attempt, max_size=3).map(tuple),
    hedged=st.booleans(),
    outcome=st.sampled_from(["ok", "upstream_error"]),
    ttft_ms=st.none() | st.floats(0, 5_000),
    total_ms=st.floats(0, 60_000),
    prompt_tokens=st.none() | st.integers(0, 1_000),
    completion_tokens=st.none() | st.integers(0, 1_000),
    token_source=st.sampled_from(["upstream", "estimate"]),
)


@settings(max_examples=200)
@given(st.lists(_record, max_size=30))
def test_a_batch_counts_as_its_records_one_by_one(batch: list[Record]) -> None:
    # observe() sums counters over a batch before incrementing: the same exposition as
    # observing each record on its own.
    together, one_by_one = Metrics(lambda: None), Metrics(lambda: None)
    together.observe(batch)
    for rec in batch:
        one_by_one.observe([rec])

    def exposition(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {k: v for k, v in samples(generate_latest(m.registry).decode()).items() if not k[0].endswith("_created")}

    assert exposition(together) == pytest.approx(exposition(one_by_one))
