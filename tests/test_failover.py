"""Failover over real sockets: the primary misbehaves in every way the mock can, the client does not notice."""

from __future__ import annotations

from functools import partial

import httpx
import pytest
import trio

from trioproxy.mock import FaultPlan, MockSettings, MockUpstream, serve_mock

from .conftest import StartGateway, StartMock, read_records, stop, upstream_toml

CHAT = {"model": "m", "messages": [{"role": "user", "content": "are you there"}], "stream": True}
NO_PROBES = "[upstreams.health]\nenabled = false\n"


def two_upstreams(primary: int, fallback: int, *, primary_extra: str = "") -> str:
    return (
        upstream_toml("primary", f"http://127.0.0.1:{primary}", extra="priority = 0\n" + primary_extra + NO_PROBES)
        + upstream_toml("fallback", f"http://127.0.0.1:{fallback}", extra="priority = 1\n" + NO_PROBES)
    )


FAULTS = [
    # (name, primary mock settings, expected primary attempt outcome)
    ("refused", {"refuse": True}, "connect_error"),
    ("status 503", {"fault": FaultPlan(kind="status", status=503)}, "status"),
    ("reset before headers", {"fault": FaultPlan(kind="reset")}, "connect_error"),
    ("garbage", {"fault": FaultPlan(kind="garbage")}, "protocol_error"),
    ("hang before headers", {"fault": FaultPlan(kind="hang")}, "timeout"),
]


@pytest.mark.parametrize(("name", "settings", "outcome"), FAULTS, ids=[f[0] for f in FAULTS])
async def test_primary_failure_before_the_first_byte_fails_over(
    start_mock: StartMock, start_gateway: StartGateway, name: str, settings: dict[str, object], outcome: str
) -> None:
    with trio.fail_after(30):
        primary = await start_mock(models=("*",), **settings)
        fallback = await start_mock(models=("*",), tokens=4, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            two_upstreams(primary.port, fallback.port, primary_extra="[upstreams.timeouts]\nfirst_byte_ms = 300\n")
        )
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
        if name == "hang before headers":
            await primary.wait_disconnects(1)  # the silent attempt's connection was closed
        await stop(gw)
    assert r.status_code == 200 and r.headers["x-trioproxy-upstream"] == "fallback"
    assert r.content.endswith(b"data: [DONE]\n\n")
    (record,) = read_records(gw)
    assert record["outcome"] == "ok" and record["upstream"] == "fallback"
    assert [(a["upstream"], a["outcome"]) for a in record["attempts"]] == [("primary", outcome), ("fallback", "ok")]


async def test_a_cut_after_the_first_byte_is_not_failed_over(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        primary = await start_mock(models=("*",), tokens=10, token_delay_ms=0, ttft_ms=0, fault=FaultPlan(kind="cut"))
        fallback = await start_mock(models=("*",))
        gw = await start_gateway(two_upstreams(primary.port, fallback.port))
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
        await stop(gw)
    assert r.status_code == 200 and r.headers["x-trioproxy-upstream"] == "primary"
    body = r.content
    assert b'"content":"Hello"' in body and b"[DONE]" not in body
    last_event = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert body.endswith(b"\n\n") and last_event.startswith(b'data: {"error":{"message":')
    assert fallback.statistics().by_path.get("/v1/chat/completions", 0) == 0
    (record,) = read_records(gw)
    assert record["outcome"] == "upstream_error" and record["bytes_out"] > 0


async def test_a_whole_answer_cut_mid_body_fails_over(start_mock: StartMock, start_gateway: StartGateway) -> None:
    # Nothing of a non-streamed answer reaches the client before its end: a cut one is tried elsewhere,
    # and its attempt says the answer broke (a protocol error), not that the connection was refused.
    with trio.fail_after(30):
        primary = await start_mock(models=("*",), fault=FaultPlan(kind="cut"))
        fallback = await start_mock(models=("*",), tokens=4, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(two_upstreams(primary.port, fallback.port))
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": False})
        await stop(gw)
    assert r.status_code == 200 and r.headers["x-trioproxy-upstream"] == "fallback"
    assert r.json()["choices"][0]["finish_reason"] == "stop" and r.json()["choices"][0]["message"]["content"]
    (record,) = read_records(gw)
    assert record["outcome"] == "ok"
    assert [(a["upstream"], a["outcome"]) for a in record["attempts"]] == [("primary", "protocol_error"), ("fallback", "ok")]


async def test_whole_answers_cut_everywhere_are_a_502(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        primary = await start_mock(models=("*",), fault=FaultPlan(kind="cut"))
        fallback = await start_mock(models=("*",), fault=FaultPlan(kind="cut"))
        gw = await start_gateway(two_upstreams(primary.port, fallback.port))
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": False})
        await stop(gw)
    # A broken answer is a bad gateway (502), not "no healthy upstream" (503): both were up and answered.
    assert r.status_code == 502
    error = r.json()["error"]
    assert error["type"] == "upstream_error"
    assert error["message"] == "upstream 'fallback': connection closed mid-body"
    (record,) = read_records(gw)
    assert record["status"] == 502 and record["outcome"] == "upstream_error"
    assert [(a["upstream"], a["outcome"]) for a in record["attempts"]] == [
        ("primary", "protocol_error"), ("fallback", "protocol_error")]


async def test_the_ollama_routes_fail_over_and_end_cut_streams_in_ndjson(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    with trio.fail_after(30):
        down = await start_mock(kind="ollama", models=("*",), refuse=True)
        cutting = await start_mock(kind="ollama", models=("*",), tokens=10, token_delay_ms=0, ttft_ms=0, fault=FaultPlan(kind="cut"))
        gw = await start_gateway(
            upstream_toml("down", f"http://127.0.0.1:{down.port}", kind="ollama", extra="priority = 0\n" + NO_PROBES)
            + upstream_toml("cutting", f"http://127.0.0.1:{cutting.port}", kind="ollama", extra="priority = 1\n" + NO_PROBES)
        )
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{gw.url}/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        await stop(gw)
    lines = r.content.splitlines()
    assert r.status_code == 200 and r.headers["x-trioproxy-upstream"] == "cutting"
    assert b'"done":false' in lines[0]
    assert lines[-1].startswith(b'{"error":"') and b"incomplete" in lines[-1]


@pytest.mark.load
async def test_primary_stopped_and_restarted_under_load(
    nursery: trio.Nursery, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """300 streams, 50 at a time; the primary stops (gracefully) and comes back: no client sees an error."""
    total, concurrency = 300, 50
    settings = MockSettings(models=("*",), tokens=16, token_delay_ms=2, ttft_ms=0)
    with trio.fail_after(120):
        primary: MockUpstream = await nursery.start(partial(serve_mock, settings))
        port = primary.port
        fallback = await start_mock(models=("*",), tokens=16, token_delay_ms=2, ttft_ms=0)
        probes = "[upstreams.health]\ninterval_ms = 100\ntimeout_ms = 500\nfall = 1\nrise = 1\n"
        gw = await start_gateway(
            upstream_toml("primary", f"http://127.0.0.1:{port}", extra="priority = 0\n" + probes)
            + upstream_toml("fallback", f"http://127.0.0.1:{fallback.port}", extra="priority = 1\n" + probes)
            + "[routing]\nbreaker_cooldown_ms = 200\nmax_attempts = 3\n"
        )
        done, errors = 0, []
        phase_two = trio.Event()  # primary stopped
        phase_three = trio.Event()  # primary back
        restarted: list[MockUpstream] = []
        limiter = trio.Semaphore(concurrency)

        async def one(client: httpx.AsyncClient) -> None:
            nonlocal done
            async with limiter:
                r = await client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
            ok = r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")
            if not ok:
                errors.append((r.status_code, r.content[-200:]))
            done += 1
            if done == total // 3:
                primary.drain()
                phase_two.set()
            elif done == 2 * total // 3:
                restarted.append(await nursery.start(partial(serve_mock, settings, port=port)))
                phase_three.set()

        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            async with trio.open_nursery() as load:
                for _ in range(total):
                    load.start_soon(one, client)
            # After the restart: keep sending (bounded) until the primary has taken traffic again.
            for _ in range(200):
                if restarted[0].statistics().by_path.get("/v1/chat/completions", 0) > 0:
                    break
                await one(client)
        await stop(gw)
    assert errors == []
    assert primary.statistics().by_path.get("/v1/chat/completions", 0) > 0
    assert fallback.statistics().by_path.get("/v1/chat/completions", 0) > 0, "the fallback took the traffic"
    assert restarted[0].statistics().by_path.get("/v1/chat/completions", 0) > 0, "the primary got traffic back"
    records = read_records(gw)
    assert len(records) == done and all(r["outcome"] == "ok" for r in records)


async def test_a_hedge_wins_and_the_slow_attempt_is_closed(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """The primary's first token is slow: after hedge_after_ms the fallback races it and wins; the primary sees its
    connection closed (so a real server would stop generating)."""
    with trio.fail_after(30):
        slow = await start_mock(models=("*",), tokens=4, token_delay_ms=0, ttft_ms=60_000)
        fast = await start_mock(models=("*",), tokens=4, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(two_upstreams(slow.port, fast.port) + "[routing]\nhedge_after_ms = 50\n")
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
        await slow.wait_disconnects(1)
        await stop(gw)
    assert r.status_code == 200 and r.headers["x-trioproxy-upstream"] == "fallback"
    (record,) = read_records(gw)
    assert record["hedged"] is True and record["upstream"] == "fallback"
    assert [(a["upstream"], a["outcome"]) for a in record["attempts"]] == [  # (in start order)
        ("primary", "lost_race"),
        ("fallback", "ok"),
    ]
