"""Every request that reached the gateway is accounted for exactly once, and accounting never slows one down."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from trioproxy import usagelog
from trioproxy.mock import FaultPlan

from .conftest import StartGateway, StartMock, read_records, stop, upstream_toml

CHAT = {"model": "m", "messages": [{"role": "user", "content": "count me"}], "stream": True}


@pytest.mark.load
async def test_blocked_writer_never_slows_requests_and_drops_are_counted(
    start_mock: StartMock, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 streamed requests complete in full while the writer cannot write; the excess is counted, not lost."""
    gate = trio.Event()
    original = usagelog._offload

    async def blocked(fn: Callable[..., Any], *args: Any) -> Any:
        await gate.wait()  # a disk that does not answer until the test says so
        return await original(fn, *args)

    monkeypatch.setattr(usagelog, "_offload", blocked)
    requests, concurrency, capacity = 500, 50, 64
    with trio.fail_after(120):
        mock = await start_mock(models=("*",), tokens=8, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}")
            + f"[telemetry]\nqueue_capacity = {capacity}\nbatch_max = 16\n"
        )
        complete = 0
        limiter = trio.Semaphore(concurrency)

        async def one(client: httpx.AsyncClient) -> None:
            nonlocal complete
            async with limiter:
                r = await client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
            if r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"stop"' in r.content:
                complete += 1

        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client, trio.open_nursery() as nursery:
            for _ in range(requests):
                nursery.start_soon(one, client)
        assert complete == requests, "every client got its full answer while the writer was stuck"
        stats = gw.services.sink.statistics()
        assert stats.submitted == requests
        assert stats.written == 0
        assert stats.dropped == requests - stats.queued - stats.in_flight
        assert stats.dropped >= requests - capacity - 16
        gate.set()
        await stop(gw)
    stats = gw.services.sink.statistics()
    records = read_records(gw)
    assert stats.written == len(records) == requests - stats.dropped
    assert stats.lost == 0 and stats.queued == 0 and stats.in_flight == 0
    assert len({r["request_id"] for r in records}) == len(records)


async def test_one_record_per_request_of_every_outcome(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """N requests of each kind of end, then a graceful shutdown: exactly N records each, with the right outcome."""
    n = 4
    with trio.fail_after(60):
        good = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        slow = await start_mock(models=("*",), tokens=10_000, token_delay_ms=5, ttft_ms=0)
        unavailable = await start_mock(models=("*",), fault=FaultPlan(kind="status", status=503))
        hanging = await start_mock(models=("*",), fault=FaultPlan(kind="hang"))
        gw = await start_gateway(
            upstream_toml("good", f"http://127.0.0.1:{good.port}", models='["ok-model"]')
            + upstream_toml("slow", f"http://127.0.0.1:{slow.port}", models='["slow-model"]')
            + upstream_toml("unavailable", f"http://127.0.0.1:{unavailable.port}", models='["down-model"]')
            + upstream_toml(
                "hanging",
                f"http://127.0.0.1:{hanging.port}",
                models='["hang-model"]',
                extra="[upstreams.timeouts]\nfirst_byte_ms = 200\n",
            )
        )
        url = f"{gw.url}/v1/chat/completions"
        statuses: Counter[tuple[str, int]] = Counter()
        async with httpx.AsyncClient(timeout=30) as client:
            for i in range(n):
                r = await client.post(url, json={**CHAT, "model": "ok-model"})
                statuses["ok", r.status_code] += 1
                r = await client.post(url, json={**CHAT, "model": "down-model"})
                statuses["upstream_error", r.status_code] += 1
                r = await client.post(url, content=b'{"model": "ok-model", "stream": tru')
                statuses["rejected", r.status_code] += 1
                r = await client.post(url, json={**CHAT, "model": "hang-model"})
                statuses["timeout", r.status_code] += 1
                async with client.stream("POST", url, json={**CHAT, "model": "slow-model"}) as streaming:
                    async for chunk in streaming.aiter_bytes():
                        if b'"content":"' in chunk and b'"content":""' not in chunk:
                            break
                await slow.wait_disconnects(i + 1)
        await stop(gw)
    assert statuses == Counter({("ok", 200): n, ("upstream_error", 503): n, ("rejected", 400): n, ("timeout", 504): n})
    outcomes = Counter(r["outcome"] for r in read_records(gw))
    assert outcomes == Counter(
        {"ok": n, "upstream_error": n, "rejected": n, "timeout": n, "client_disconnect": n}
    )


@pytest.mark.parametrize(
    ("watch_after_ms", "outcomes"),
    [
        (1_000, {"cancelled"}),
        # Hypercorn may tell the watcher http.disconnect as it closes the connection: from the
        # app's side that is a client gone, and either outcome is true.
        (0, {"cancelled", "client_disconnect"}),
    ],
    ids=["cut-before-its-watcher", "cut-with-its-watcher"],
)
async def test_requests_cut_by_the_shutdown_grace_still_get_their_record(
    start_mock: StartMock, start_gateway: StartGateway, watch_after_ms: int, outcomes: set[str]
) -> None:
    with trio.fail_after(60):
        mock = await start_mock(models=("*",), tokens=100_000, token_delay_ms=5, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}")
            + f"[server]\nshutdown_grace_s = 0.2\ndisconnect_watch_after_ms = {watch_after_ms}\n"
        )
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", f"{gw.url}/v1/chat/completions", json=CHAT) as streaming:
                async for chunk in streaming.aiter_bytes():
                    if b"content" in chunk:
                        break
                await stop(gw)  # the stream is still open: the grace period runs out and cuts it
        await mock.wait_disconnects(1)
    (record,) = read_records(gw)
    assert record["bytes_out"] > 0
    assert record["outcome"] in outcomes


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_answer_in_hand_when_the_grace_runs_out_arrives_whole(
    start_mock: StartMock, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    """The end of grace lands just as an answer's last bytes are in hand (cut there on purpose: what
    ``server._end_after_grace`` does): a whole answer's head and body, or a stream's end, still go out
    whole, as the record says, not a head without its body or a stream without its end."""
    from trioproxy import app, relay

    gateways = []

    def cut() -> None:
        services = gateways[0].services
        services.ending = True
        for scope in list(services.open_requests):
            scope.cancel()

    if stream:
        stock_finish = relay.finish

        async def cut_then_finish(ex: Any, send: Any, body: bytes = b"") -> None:
            cut()
            await stock_finish(ex, send, body)

        monkeypatch.setattr(relay, "finish", cut_then_finish)
    else:
        stock_relay_whole = app.relay_whole

        async def cut_then_relay(ex: Any, winner: Any, send: Any, body: bytes) -> None:
            cut()
            await stock_relay_whole(ex, winner, send, body)

        monkeypatch.setattr(app, "relay_whole", cut_then_relay)
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gateways.append(await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}")))
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{gateways[0].url}/v1/chat/completions", json={**CHAT, "stream": stream})
        await stop(gateways[0])
    assert r.status_code == 200
    if stream:
        assert r.content.endswith(b"data: [DONE]\n\n")
    else:
        assert r.json()["choices"][0]["finish_reason"] == "stop"
    (record,) = read_records(gateways[0])
    assert (record["status"], record["outcome"], record["bytes_out"]) == (200, "ok", len(r.content))


async def test_a_request_that_starts_once_the_grace_has_run_out_gets_a_503(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """(Hypercorn closes a kept-alive connection after its answer once it is stopping, so this is
    hard to reach from outside: the state is set by hand.) Not a 408 for a body that came whole."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}"))
        gw.services.ending = True  # as server._end_after_grace leaves it
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": False})
        await stop(gw)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    (record,) = read_records(gw)
    assert (record["status"], record["outcome"]) == (503, "cancelled")


async def test_requests_left_when_the_shutdown_grace_runs_out_end_in_their_own_format(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """Once ``shutdown_grace_s`` has run out the gateway ends what is left itself, before Hypercorn cuts
    the connections: an OpenAI stream with an error event, an Ollama stream with an error line (each
    with its framing complete: no transport error), a request whose upstream has not answered with a
    503 ``shutting_down`` and Retry-After. Each has its record, ``cancelled``."""
    with trio.fail_after(60):
        mock = await start_mock(models=("*",), tokens=100_000, token_delay_ms=5, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", kind="ollama")
            + "[server]\nshutdown_grace_s = 0.2\ndisconnect_watch_after_ms = 60000\n"
        )
        answers: dict[str, httpx.Response] = {}
        bodies: dict[str, bytes] = {}
        async with httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:

            async def pending() -> None:  # the upstream takes a minute to begin
                answers["pending"] = await client.post(
                    f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": False}, headers={"x-mock-ttft-ms": "60000"}
                )

            async def stream(name: str, path: str, started: trio.Event) -> None:
                body = {**CHAT, "stream": True}
                async with client.stream("POST", f"{gw.url}{path}", json=body) as streaming:
                    answers[name] = streaming
                    parts = []
                    async for chunk in streaming.aiter_bytes():
                        parts.append(chunk)
                        if b"content" in chunk:
                            started.set()
                    bodies[name] = b"".join(parts)

            nursery.start_soon(pending)
            await trio.testing.wait_all_tasks_blocked()  # (its request waits at the mock)
            sse_started, ndjson_started = trio.Event(), trio.Event()
            nursery.start_soon(stream, "sse", "/v1/chat/completions", sse_started)
            nursery.start_soon(stream, "ndjson", "/api/chat", ndjson_started)
            await sse_started.wait()
            await ndjson_started.wait()
            await stop(gw)
    pending_answer = answers["pending"]
    assert pending_answer.status_code == 503 and pending_answer.headers["retry-after"] == "1"
    assert pending_answer.json()["error"]["code"] == "shutting_down"
    *_, last_event = bodies["sse"].rstrip(b"\n").split(b"\n\n")
    assert b"shutting down" in json.loads(last_event.removeprefix(b"data: "))["error"]["message"].encode()
    *_, last_line = bodies["ndjson"].rstrip(b"\n").split(b"\n")
    assert "shutting down" in json.loads(last_line)["error"]
    records = read_records(gw)
    assert sorted(r["route"] for r in records) == ["/api/chat", "/v1/chat/completions", "/v1/chat/completions"]
    assert {r["outcome"] for r in records} == {"cancelled"}
    assert {r["status"] for r in records} == {200, 503}
