"""The live feed: every record reaches every subscriber; a stalled subscriber is dropped, never waited for."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from trioproxy.feed import Broadcaster, parse_event
from trioproxy.telemetry import Record

from .conftest import StartGateway, StartMock, read_records, stop, upstream_toml

NO_PROBES = "[upstreams.health]\nenabled = false\n"


def records(n: int, start: int = 0) -> list[Record]:
    return [Record(request_id=f"r{i}", ts=0.0, route="/v1/chat/completions", method="POST") for i in range(start, start + n)]


def test_a_subscriber_that_falls_behind_is_dropped_and_the_others_get_everything() -> None:
    feed = Broadcaster(buffer=4)
    fast, stalled = feed.subscribe(), feed.subscribe()
    got = []
    for i in range(3):
        feed.publish(records(2, start=2 * i))  # never blocks, whatever the subscribers do
        while True:
            try:
                got.append(parse_event(fast.receive_nowait())["record"]["request_id"])  # type: ignore[index]
            except trio.WouldBlock:
                break
    assert got == [f"r{i}" for i in range(6)]
    stats = feed.statistics()
    assert stats.dropped_subscribers == 1 and stats.subscribers == 1 and stats.published == 6
    drained = [stalled.receive_nowait() for _ in range(4)]  # what it had buffered, then the end
    assert len(drained) == 4
    with pytest.raises(trio.EndOfChannel):
        stalled.receive_nowait()


async def test_two_websocket_subscribers_see_every_request(start_mock: StartMock, start_gateway: StartGateway) -> None:
    n = 20
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=2, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        ws_url = gw.url.replace("http://", "ws://") + "/_/live"
        seen: list[list[str]] = [[], []]
        async with open_websocket_url(ws_url) as a, open_websocket_url(ws_url) as b:
            async with httpx.AsyncClient() as client:
                ids = []
                for _ in range(n):
                    r = await client.post(f"{gw.url}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                    ids.append(r.headers["x-request-id"])
            for i, ws in enumerate((a, b)):
                first = parse_event(await ws.get_message())  # type: ignore[arg-type]
                assert first["type"] == "upstream" and first["upstream"] == "m" and first["healthy"] is True
                while len(seen[i]) < n:
                    event = parse_event(await ws.get_message())  # type: ignore[arg-type]
                    assert event["type"] == "record"
                    seen[i].append(event["record"]["request_id"])  # type: ignore[index]
        with pytest.raises(ConnectionRejected) as refused:
            async with open_websocket_url(gw.url.replace("http://", "ws://") + "/_/nothing") as ws:
                await ws.get_message()
        await stop(gw)
    assert seen == [ids, ids]
    assert refused.value.status_code == 404 and refused.value.body is not None
    assert json.loads(refused.value.body)["error"]["message"] == "Invalid URL (WEBSOCKET /_/nothing)"
    (nothing,) = [r for r in read_records(gw) if r["route"] == "/_/nothing"]
    assert (nothing["status"], nothing["outcome"]) == (404, "rejected")  # (what the client was answered)


async def test_a_web_page_of_another_origin_cannot_use_the_admin_surfaces(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """The browser runs on loopback too: a page from elsewhere open in it could read the live feed
    (a WebSocket handshake has no same-origin rule) and POST a reload. An ``Origin`` other than the
    gateway's own is refused (403); the gateway's own page and clients that send none are served."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=2, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        ws_url = gw.url.replace("http://", "ws://") + "/_/live"
        host = gw.url.removeprefix("http://")
        with pytest.raises(ConnectionRejected) as refused:
            async with open_websocket_url(ws_url, extra_headers=[(b"origin", b"http://evil.example")]) as ws:
                await ws.get_message()
        async with open_websocket_url(ws_url, extra_headers=[(b"origin", f"http://{host}".encode())]) as ws:
            first = parse_event(await ws.get_message())  # type: ignore[arg-type]
        async with httpx.AsyncClient(timeout=30) as client:
            cross = await client.post(gw.url + "/_/reload", headers={"origin": "http://evil.example"})
            null = await client.post(gw.url + "/_/reload", headers={"origin": "null"})
        await stop(gw)
    assert refused.value.status_code == 403
    assert first["type"] == "upstream"
    assert cross.status_code == null.status_code == 403
    assert "another origin" in cross.json()["error"]["message"]


async def test_a_usage_batch_larger_than_the_minimum_buffer_reaches_a_subscriber(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """The writer publishes a batch in bursts of slices: a subscriber that keeps up is not dropped."""
    n = 300  # one batch, over the 256 events a subscriber's buffer used to hold
    with trio.fail_after(60):
        mock = await start_mock(models=("*",), tokens=1, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES)
                                 + "[telemetry]\nflush_ms = 600000\nbatch_max = 1024\n")
        async with open_websocket_url(gw.url.replace("http://", "ws://") + "/_/live") as ws:
            assert parse_event(await ws.get_message())["type"] == "upstream"  # type: ignore[arg-type]
            async with httpx.AsyncClient() as client:
                for _ in range(n):  # held by the writer: its flush wait is ten minutes
                    assert (await client.post(f"{gw.url}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})).status_code == 200
            await trio.testing.wait_all_tasks_blocked()  # the last request's record is submitted too
            assert (gw.services.sink.counters.submitted, gw.services.sink.counters.observed) == (n, 0)
            gw.services.sink.flush()  # the whole batch at once
            got = 0
            while got < n:
                assert parse_event(await ws.get_message())["type"] == "record"  # type: ignore[arg-type]
                got += 1
        assert gw.services.feed is not None and gw.services.feed.statistics().dropped_subscribers == 0
        await stop(gw)


async def test_a_subscriber_does_not_hold_up_shutdown(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """A feed has no end to wait for: on shutdown it closes with 1001 at once, not after the grace period."""
    with trio.fail_after(30):  # far below the grace period below: waiting it out would fail
        mock = await start_mock(models=("*",), tokens=2)
        profile = upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES)
        gw = await start_gateway(profile + "[server]\nshutdown_grace_s = 600\n")
        async with open_websocket_url(gw.url.replace("http://", "ws://") + "/_/live") as ws:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop, gw)
                with pytest.raises(ConnectionClosed) as closed:
                    while True:  # the upstreams' state first, then the close
                        await ws.get_message()
        assert closed.value.reason.code == 1001
    records = [r for r in read_records(gw) if r["route"] == "/_/live"]
    assert [r["outcome"] for r in records] == ["ok"]


async def test_upstream_state_changes_reach_subscribers(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """A subscriber is told each upstream's state on connecting, then each change (here: it goes down)."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=2)
        probes = "[upstreams.health]\nenabled = true\ninterval_ms = 50\nfall = 1\nrise = 1\n"
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=probes))
        async with open_websocket_url(gw.url.replace("http://", "ws://") + "/_/live") as ws:
            first = parse_event(await ws.get_message())  # type: ignore[arg-type]
            assert (first["type"], first["upstream"], first["healthy"], first["circuit"]) == ("upstream", "m", True, "closed")
            mock.drain()  # it stops answering: the next probe fails
            while True:
                event = parse_event(await ws.get_message())  # type: ignore[arg-type]
                if event["type"] == "upstream":
                    break
            assert (event["upstream"], event["healthy"]) == ("m", False)
            assert event["reason"]
        await stop(gw)
