"""The relay hub (``trioproxy.relayhub``, ``relay._HubRelay``) through the real server.

Once a stream's pieces are steady and its first token is out, the hub reads and relays them
in its own task. What the client gets and what the record says must be what a gateway
without the hub gives; and every way a parked stream can end (a silent upstream the watchdog
gives up on, a reset, a cut, a client that leaves) must end it as without the hub.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from typing import Any

import httpx
import pytest
import trio

from trioproxy import relay

from .conftest import NO_PROBES, StartGateway, StartMock, read_records, stop, upstream_toml
from .test_hostile import read_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hub"}], "stream": True}
#: What differs between two answers of the mock: the request counter in its ids, the clock.
_VARYING = re.compile(rb'("id":"[a-z]+-mock-)\d+|("created":)\d+')


def _same(data: bytes) -> bytes:
    return _VARYING.sub(lambda m: (m.group(1) or m.group(2)) + b"N", data)


async def test_a_stream_through_the_hub_is_the_stream_without_it(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """The mock's 40-token stream (usage injected and hidden): byte for byte and record for record
    the same with the hub (``server.relay_hub``, the default) and without it, and the hub took it."""
    with trio.fail_after(60):
        mock = await start_mock(models=("*",), tokens=40, ttft_ms=0, token_delay_ms=2)
        upstream = upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES)
        with_hub = await start_gateway(upstream)
        without = await start_gateway(upstream + "[server]\nrelay_hub = false\n")
        assert without.services.hub is None and with_hub.services.hub is not None
        bodies = []
        for gw in (with_hub, without):
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
                response = await client.post("/v1/chat/completions", json=CHAT)
                assert response.status_code == 200
                bodies.append(_same(response.content))
            await stop(gw)
    assert with_hub.services.hub.parks >= 1  # (a test that could pass without the hub would prove nothing)
    assert bodies[0] == bodies[1] and b'"usage"' not in bodies[0] and bodies[0].endswith(b"data: [DONE]\n\n")
    (hub_record,), (plain_record,) = read_records(with_hub), read_records(without)
    for key in ("outcome", "status", "completion_tokens", "prompt_tokens", "finish_reason", "bytes_out", "token_source"):
        assert hub_record[key] == plain_record[key], key
    assert hub_record["outcome"] == "ok" and hub_record["completion_tokens"] == 40


def _event(i: int) -> bytes:
    data = (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
            b'"delta":{"content":"t%d"},"logprobs":null,"finish_reason":null}]}\n\n' % i)
    return b"%x\r\n%b\r\n" % (len(data), data)


async def _steady_then(end: str, stream: trio.SocketStream, got: list[trio.Event], parked: trio.Event) -> None:
    """The head and ten steady events, each once the client has the one before (one event per read,
    as at token pace); once the gateway's hub has the stream, ``end``."""
    async with stream:
        if await read_request(stream) is None:
            return
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(10):
            await stream.send_all(_event(i))
            await got[i].wait()
        await parked.wait()
        if end == "reset":  # an RST: SO_LINGER 0, then close
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif end == "silence":
            await trio.sleep_forever()  # (until the gateway closes its side: the test's nursery ends it)
        # "cut": a plain close before the last chunk


@pytest.mark.parametrize(("end", "error"), [
    ("silence", "no body data for 0.3s"),
    ("reset", "connection closed mid-body"),
    ("cut", "connection closed mid-body"),
])
async def test_a_parked_stream_that_breaks_ends_with_the_error_event(
    nursery: trio.Nursery, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch, end: str, error: str,
) -> None:
    """The upstream goes silent (the watchdog's idle timeout, which must hand the stream back before it
    closes the socket), resets or is cut while the hub has the stream: the client gets the events and
    then the error event, the record says ``upstream_error``, as without the hub."""
    parked = trio.Event()
    park = relay._HubRelay.park

    async def spy(self: Any, sock: Any) -> object:
        parked.set()
        return await park(self, sock)

    monkeypatch.setattr(relay._HubRelay, "park", spy)
    got = [trio.Event() for _ in range(10)]
    with trio.fail_after(30):
        listeners = await nursery.start(trio.serve_tcp, lambda s: _steady_then(end, s, got, parked), 0)
        port = listeners[0].socket.getsockname()[1]
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{port}",
                                               extra=NO_PROBES + "[upstreams.timeouts]\nidle_ms = 300\n"))
        events = []
        async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
            async with client.stream("POST", "/v1/chat/completions",
                                     json={**CHAT, "stream_options": {"include_usage": True}}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) <= 10:
                            got[len(events) - 1].set()
        await stop(gw)
    assert parked.is_set() and gw.services.hub.parks >= 1
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == [f"t{i}" for i in range(10)]
    assert error in json.loads(events[-1])["error"]["message"]
    (record,) = read_records(gw)
    assert record["outcome"] == "upstream_error" and error in record["error"]


async def test_a_client_that_leaves_while_the_hub_has_its_stream(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """The client reads a few events and hangs up: the request ends (``client_disconnect``), the
    upstream connection is closed (a model stops generating), and the hub no longer holds it."""
    with trio.fail_after(60):
        mock = await start_mock(models=("*",), tokens=2000, ttft_ms=0, token_delay_ms=5)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES)
                                 + "[server]\ndisconnect_watch_after_ms = 0\n")
        hub = gw.services.hub
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            async with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
                seen = 0
                async for line in response.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen == 30 and hub.parks:
                        break
        await mock.wait_disconnects(1)
        await stop(gw)
    assert hub.parks >= 1 and len(hub) == 0
    (record,) = read_records(gw)
    assert record["outcome"] == "client_disconnect"
