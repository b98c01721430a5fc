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
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
import trio.testing

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


async def test_a_stream_past_max_response_bytes_is_cut_as_without_the_hub(
    start_mock: StartMock, start_gateway: StartGateway,
) -> None:
    """A piece that would pass ``max_response_bytes`` goes back to the task uncounted (_COUNT), which
    cuts the stream with its error event, as without the hub."""
    with trio.fail_after(60):
        mock = await start_mock(models=("*",), tokens=200, ttft_ms=0, token_delay_ms=1)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES)
                                 + "[server]\nmax_response_bytes = 6000\n")
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            response = await client.post("/v1/chat/completions", json=CHAT)
        await stop(gw)
    assert gw.services.hub.parks >= 1
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert "more than max_response_bytes (6000)" in json.loads(events[-1])["error"]["message"]
    (record,) = read_records(gw)
    assert record["outcome"] == "upstream_error" and "max_response_bytes" in record["error"]


# -- the hub alone, over socket pairs --------------------------------------------------------

class _Stream:
    """A parked stream for the hub alone: ``readable`` reads what came and hands it back, or raises."""

    def __init__(self, hub: Any, sock: socket.socket, *, fail: bool = False) -> None:
        self.hub, self.sock, self.fd, self.fail, self.calls = hub, sock, sock.fileno(), fail, 0

    def readable(self) -> None:
        self.calls += 1
        if self.fail:
            raise RuntimeError("a bug in one stream")
        self.hub.hand_back(self, self.sock.recv(100))


async def test_the_hub_wakes_a_stream_with_what_it_handed_back_and_survives_a_failing_one() -> None:
    from trioproxy.relayhub import RelayHub

    hub = RelayHub()
    pairs = [socket.socketpair() for _ in range(3)]
    for a, b in pairs:
        a.setblocking(False)
    results: dict[int, object] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await trio.testing.wait_all_tasks_blocked()
            streams = [_Stream(hub, a, fail=i == 1) for i, (a, _) in enumerate(pairs)]

            async def park(i: int) -> None:
                try:
                    results[i] = await hub.park(streams[i])
                except RuntimeError as exc:
                    results[i] = exc

            for i in range(3):
                nursery.start_soon(park, i)
            await trio.testing.wait_all_tasks_blocked()
            assert len(hub) == 3 and hub.parks == 3
            for i, (_, b) in enumerate(pairs):
                b.send(b"piece %d" % i)
            while len(results) < 3:  # bounded: each parked task is woken once
                await trio.testing.wait_all_tasks_blocked()
                await trio.lowlevel.checkpoint()
            assert results[0] == b"piece 0" and results[2] == b"piece 2"
            assert isinstance(results[1], RuntimeError)  # (raised in its own task; the hub runs on)
            assert len(hub) == 0 and hub.open
            nursery.cancel_scope.cancel()
    for a, b in pairs:
        a.close()
        b.close()


async def test_a_cancelled_park_leaves_nothing_and_the_hubs_end_hands_every_stream_back() -> None:
    from trioproxy.relayhub import RelayHub

    hub = RelayHub()
    (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
    handed: list[object] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as hub_nursery:
                hub_nursery.start_soon(hub.run)
                await trio.testing.wait_all_tasks_blocked()
                first = _Stream(hub, a1)
                with trio.move_on_after(0) as scope:  # a deadline or a client gone: the wait is cancelled
                    await hub.park(first)
                assert scope.cancelled_caught and len(hub) == 0
                b1.send(b"late")  # (no longer registered: nobody reads it)
                await trio.testing.wait_all_tasks_blocked()
                assert first.calls == 0

                async def park() -> None:
                    handed.append(await hub.park(_Stream(hub, a2)))

                outer.start_soon(park)
                await trio.testing.wait_all_tasks_blocked()
                assert len(hub) == 1
                hub_nursery.cancel_scope.cancel()  # the gateway's shutdown ends the hub
            await trio.testing.wait_all_tasks_blocked()
            assert handed == [None] and not hub.open  # handed back: its task reads for itself
    for s in (a1, b1, a2, b2):
        s.close()


async def test_a_park_the_kernel_refuses_leaves_nothing_behind() -> None:
    """``epoll_ctl`` can fail (ENOSPC past ``max_user_watches``): the task gets the error, and the
    hub keeps no entry whose task it would later wake."""
    from trioproxy.relayhub import RelayHub

    class Refusing:
        def register(self, fd: int, events: int) -> None:
            raise OSError(28, "No space left on device")

    hub = RelayHub()
    hub._epoll.close()
    hub._epoll = Refusing()  # type: ignore[assignment]
    a, b = socket.socketpair()
    with pytest.raises(OSError, match="No space"):
        await hub.park(_Stream(hub, a))
    assert len(hub) == 0 and hub.parks == 0
    a.close()
    b.close()


# -- pump and _HubRelay with a hub that drives readable() itself: every hand-back, no sockets ----

_PENDING = object()


class _DrivingHub:
    """A hub that, when a stream parks, calls its ``readable()`` until it is handed back."""

    open = True

    def __init__(self) -> None:
        self.parks = 0
        self.result: object = _PENDING

    async def park(self, stream: Any) -> object:
        self.parks += 1
        self.result = _PENDING
        while self.result is _PENDING:  # bounded: each call reads one piece, and the pieces end
            await trio.lowlevel.checkpoint()
            stream.readable()
        return self.result

    def hand_back(self, stream: Any, result: object) -> None:
        self.result = result


class _Pieces:
    """The upstream response: its pieces for the task's reads and for the hub's."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces, self.on_expire = list(pieces), None

    async def receive_some(self, *, schedule: bool = False) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.pieces.pop(0) if self.pieces else b""

    def hub_socket(self) -> Any:
        return SimpleNamespace(fileno=lambda: 7)

    def read_ready(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""

    @property
    def complete(self) -> bool:
        return not self.pieces

    def end_hub_wait(self) -> None:
        self.on_expire = None


class _Chunks:
    """The server's chunks written at once: whole, not now (b""), or in part (the rest is ``finish``'s)."""

    def __init__(self, wire: list[bytes], plan: list[str]) -> None:
        self.wire, self.plan = wire, plan

    def try_send(self, body: bytes) -> bytes | None:
        how = self.plan.pop(0) if self.plan else "whole"
        if how == "not now":
            return b""
        if how == "part":
            self.wire.append(body[:10])
            return body[10:]
        self.wire.append(body)
        return None

    async def finish(self, rest: bytes) -> None:
        self.wire.append(rest)


def _pump(pieces: list[bytes], *, hub: Any, plan: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, Any]:
    from trioproxy.relay import _ClientWriter, pump, sse_error_event
    from trioproxy.usage import SSEScanner
    from trioproxy.usagefilter import UsageEventFilter

    wire: list[bytes] = []

    async def sender(body: bytes) -> None:
        wire.append(body)

    monkeypatch.setattr(relay, "chunk_sender", lambda send: sender)
    monkeypatch.setattr(relay, "chunk_nowait", lambda send: _Chunks(wire, plan))
    ex = SimpleNamespace(request_id=b"r", arrival=0.0, status=200, outcome="ok", error=None, response_started=True, atomic_end=False,
            finished=False, ended=False, client_gone=False, captured=None, ttft_ms=None, bytes_out=0, first_content_index=None)
    winner = SimpleNamespace(response=_Pieces(pieces), scanner=SSEScanner(), prefetched=[], first_content_index=None,
                             target=SimpleNamespace(upstream="u"), runtime=SimpleNamespace(redact=lambda text: text))

    async def send(message: dict[str, Any]) -> None:
        wire.append(message["body"])

    async def main() -> None:
        writer = _ClientWriter(ex, send, winner, 10.0)  # type: ignore[arg-type]
        await pump(ex, winner, writer, UsageEventFilter(), lambda m: sse_error_event(m), 1 << 30, hub=hub)  # type: ignore[arg-type]

    trio.run(main)
    return b"".join(wire), ex


def _stream(n: int) -> list[bytes]:
    event = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
             b'"delta":{"content":"t%d"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n')
    finish = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
              b'"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n')
    tail = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":%d}}\n\n' % n
    return [event % i for i in range(n)] + [finish, tail, b"data: [DONE]\n\n"]


@pytest.mark.parametrize("plan", [[], ["not now"], ["part"], ["whole", "part", "not now", "part", "whole"]],
                         ids=["whole", "not-now", "part", "mixed"])
def test_every_hand_back_gives_the_bytes_and_counts_of_a_relay_without_the_hub(
    plan: list[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hub writes whole pieces, or hands one back it could not write now (_FILTERED), or one it
    wrote in part (_REST: the task writes the rest first); the finish event goes back scanned
    (_SCANNED), the usage tail is dropped by the filter, [DONE] and the end come through the task:
    the client's bytes and the record's byte count are those of the relay without the hub."""
    pieces = _stream(12)
    hub = _DrivingHub()
    with_hub, ex = _pump(pieces, hub=hub, plan=list(plan), monkeypatch=monkeypatch)
    without, plain = _pump(pieces, hub=None, plan=[], monkeypatch=monkeypatch)
    assert hub.parks >= (2 if plan else 1)  # (a piece not written now, or in part: parked again after it)
    assert with_hub == without and b'"usage"' not in with_hub and with_hub.endswith(b"data: [DONE]\n\n")
    assert ex.bytes_out == plain.bytes_out and ex.finished and ex.outcome == "ok"
