"""Chaos: a bounded streaming load while every upstream misbehaves at random, and one is stopped and restarted.

Three mock upstreams, each with its own seeded fault plan (one fault kind per plan, so the kinds are
spread over the upstreams, the restarted one and a few per-request ``x-mock-fault`` headers):

- ``a``: HTTP 500 on 20% of requests;
- ``b``: connection resets on 20%; drained (graceful stop) a third of the way in, restarted on the
  same port two thirds in, now sending garbage on 20%;
- ``c``: hangs on 10% (its ``first_byte_ms`` is short, so the gateway gives up and fails over);
- and, per request (the header applies to every attempt of that request): 3% are cut after two
  tokens, 1% answered 429 (with ``Retry-After: 0``, so that the cool-down a 429 starts does not
  blank every upstream for the rest of a run this short).

A fourth upstream, ``canary``, serves only the model ``canary`` and sees none of the chaos: the final
"is it alive" request goes to it, so that it does not depend on whether the chaos left every
breaker open for a moment (a 503 with Retry-After would be the right answer then, not a failure).

The promise (issue 7): at the end the gateway is alive and answering; every client request got a
full answer or a clean error (an HTTP error in the API's JSON format, or a stream that ends with an
in-band error event) and never a hang, a reset or garbage; and there is one usage record per request,
none dropped, each saying what the client saw (``ok`` exactly for the full answers).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from functools import partial

import httpx
import pytest
import trio

from trioproxy.mock import FaultKind, FaultPlan, MockSettings, MockUpstream, serve_mock

from .conftest import StartGateway, StartMock, read_records, stop, upstream_toml
from .test_hostile import api_error_problem, sse_events

TOTAL, CONCURRENCY = 400, 40
#: (path, stream) in rotation: both APIs, streamed and whole.
MIX = [
    ("/v1/chat/completions", True),
    ("/v1/chat/completions", False),
    ("/api/chat", True),
    ("/api/chat", False),
    ("/v1/completions", True),
    ("/api/generate", True),
]
COMMON = {"models": ("*",), "tokens": 8, "token_delay_ms": 2, "ttft_ms": 0}
NO_PROBES = "[upstreams.health]\nenabled = false\n"


def plan(kind: FaultKind, *, rate: float = 0.2, seed: int, status: int = 503) -> FaultPlan:
    return FaultPlan(kind=kind, status=status, rate=rate, seed=seed, retry_after_s=0)


def request_body(path: str, stream: bool, model: str = "m") -> dict[str, object]:
    if path in ("/v1/completions", "/api/generate"):
        return {"model": model, "prompt": "say something", "stream": stream}
    return {"model": model, "messages": [{"role": "user", "content": "say something"}], "stream": stream}


def classify(path: str, stream: bool, r: httpx.Response) -> str:
    """"full", "error" (clean), or "bad: <why>"."""
    if r.status_code != 200:
        problem = api_error_problem(path, r.content)
        return "error" if problem is None else f"bad: {r.status_code} {problem}"
    try:
        if path.startswith("/api/"):
            lines = [json.loads(line) for line in r.content.splitlines()]
            if not r.content.endswith(b"\n") and stream:
                return f"bad: NDJSON stream not ended by a newline: {r.content[-80:]!r}"
            last = lines[-1]
            if last.get("done") is True:
                return "full"
            return "error" if stream and isinstance(last.get("error"), str) and len(last) == 1 else f"bad: {last}"
        if not stream:
            return "full" if json.loads(r.content).get("choices") else f"bad: {r.content[:120]!r}"
        if not r.content.endswith(b"\n\n"):
            return f"bad: SSE stream not ended by a blank line: {r.content[-80:]!r}"
        events = sse_events(r.content)
        decoded = [json.loads(e) for e in events[:-1]]  # every event but [DONE] is JSON
        if events[-1] == "[DONE]":
            return "full" if all("error" not in d for d in decoded) else "bad: an error event before [DONE]"
        error = json.loads(events[-1]).get("error")
        return "error" if isinstance(error, dict) and isinstance(error.get("message"), str) else f"bad: {events[-1]}"
    except (ValueError, IndexError, AttributeError) as exc:
        return f"bad: {type(exc).__name__}: {r.content[-120:]!r}"


@pytest.mark.load
async def test_chaos_every_request_ends_cleanly_and_is_recorded(
    nursery: trio.Nursery, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    header_rng = random.Random(7)
    faults_by_request = []
    for _ in range(TOTAL):
        draw = header_rng.random()
        faults_by_request.append("cut" if draw < 0.03 else "status=429" if draw < 0.04 else None)

    with trio.fail_after(90):
        a = await start_mock(**COMMON, fault=plan("status", status=500, seed=1))
        b: MockUpstream = await nursery.start(partial(serve_mock, MockSettings(**COMMON, fault=plan("reset", seed=2))))
        c = await start_mock(**COMMON, fault=plan("hang", rate=0.1, seed=3))
        restarted_settings = MockSettings(**COMMON, fault=plan("garbage", seed=4))
        canary = await start_mock(**COMMON)
        gw = await start_gateway(
            upstream_toml("a", f"http://127.0.0.1:{a.port}", kind="ollama", models='["m"]', extra=NO_PROBES)
            + upstream_toml("b", f"http://127.0.0.1:{b.port}", kind="ollama", models='["m"]', extra=NO_PROBES)
            + upstream_toml(
                "c",
                f"http://127.0.0.1:{c.port}",
                kind="ollama",
                models='["m"]',
                extra=NO_PROBES + "[upstreams.timeouts]\nfirst_byte_ms = 300\n",
            )
            + upstream_toml("canary", f"http://127.0.0.1:{canary.port}", models='["canary"]', extra=NO_PROBES)
            + "[routing]\nmax_attempts = 3\nbreaker_cooldown_ms = 100\nbreaker_max_cooldown_ms = 400\n"
        )
        outcomes: dict[str, str] = {}  # x-request-id → classification
        problems: list[str] = []
        done = 0
        restarted: list[MockUpstream] = []
        limiter = trio.Semaphore(CONCURRENCY)

        async def one(client: httpx.AsyncClient, index: int, fault: str | None) -> None:
            nonlocal done
            path, stream = MIX[index % len(MIX)]
            headers = {"x-mock-fault": fault} if fault else {}
            async with limiter:
                try:
                    r = await client.post(gw.url + path, json=request_body(path, stream), headers=headers)
                except httpx.TransportError as exc:  # a reset, garbage or a hang reached the client
                    problems.append(f"{path} stream={stream}: {type(exc).__name__}: {exc}")
                    return
                finally:
                    done += 1
            verdict = classify(path, stream, r)
            outcomes[r.headers["x-request-id"]] = verdict
            if verdict.startswith("bad"):
                problems.append(f"{path} stream={stream} fault={fault}: {verdict}")
            if done == TOTAL // 3:
                b.drain()
            elif done == 2 * TOTAL // 3:
                restarted.append(await nursery.start(partial(serve_mock, restarted_settings, port=b.port)))

        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=CONCURRENCY), timeout=30) as client:
            async with trio.open_nursery() as load:
                for index, fault in enumerate(faults_by_request):
                    load.start_soon(one, client, index, fault)
            # Bounded: after the restart, until the restarted upstream has served and sent its first garbage (its
            # breaker may still be cooling down; its seeded plan makes the 2nd request it answers garbage).
            for index in range(200):
                if restarted[0].statistics().faults.get("garbage", 0) > 0:
                    break
                await one(client, index, None)
            # Alive and answering: a normal request (faults off for it), the probes.
            normal = await client.post(gw.url + "/v1/chat/completions", json=request_body("/v1/chat/completions", True, "canary"))
            healthz = await client.get(gw.url + "/healthz")
            readyz = await client.get(gw.url + "/readyz")
        await stop(gw)

    assert problems == []
    assert normal.status_code == 200 and normal.content.endswith(b"data: [DONE]\n\n")
    assert healthz.status_code == 200 and readyz.status_code == 200
    # The chaos happened: every fault kind was injected, and the restarted upstream served again.
    injected: Counter[str] = Counter()
    for mock in (a, b, c, *restarted):  # (the canary saw nothing but the last request)
        injected.update(mock.statistics().faults)
    assert set(injected) == {"status", "reset", "hang", "cut", "garbage"}, injected
    assert restarted[0].statistics().requests > 0
    verdicts = Counter(outcomes.values())
    assert verdicts["full"] > 0 and verdicts["error"] > 0, verdicts
    # One record per request (plus the probes of aliveness), none dropped, each saying what the client saw.
    stats = gw.services.sink.statistics()
    records = {r["request_id"]: r for r in read_records(gw)}
    assert len(records) == done + 3 == stats.submitted == stats.written
    assert stats.dropped == 0 and stats.lost == 0
    mismatched = [
        (verdict, records[rid]["outcome"], records[rid]["route"])
        for rid, verdict in outcomes.items()
        if (verdict == "full") != (records[rid]["outcome"] == "ok")
    ]
    assert mismatched == []
