"""The bench's relay floor (``loadtest/floor_app.py --upstream``, ``trioproxy bench --relay-floor``).

A bare relay on the gateway's own I/O parts, measured beside the gateway so that what the
gateway's features cost shows: it must relay the upstream's answers exactly (or the row
measures something else), keep its upstream connections, never hang on a broken answer
(it shares the gateway's core in the bench), and stay out of the verdicts. Real processes,
real Hypercorn, the project's mock or a scripted upstream, httpx as the client.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from trioproxy.bench.processes import open_fleet
from trioproxy.bench.report import analyze, markdown
from trioproxy.bench.runner import RELAY_FLOOR, RELAY_FLOOR_SPIN_ENV, BenchOptions, run_scenario
from trioproxy.bench.scenarios import parse_scenario
from trioproxy.errors import ConfigError

from .conftest import StartMock, floor_app

REPO = Path(__file__).resolve().parent.parent

#: What differs between two answers of the mock: the request counter in its ids, the clock.
_VARYING = re.compile(rb'("id":"[a-z]+-mock-)\d+|("created(?:_at)?":)"?[0-9T:.Z+-]+"?|("[a-z_]*duration":)\d+')


def _same(data: bytes) -> bytes:
    return _VARYING.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + b"N", data)


#: The relay floor as the bench runs it, and with its hub (``TRIOPROXY_RELAY_FLOOR_HUB=1``: one task
#: relays every stream's steady reads): both must relay exactly.
HUB = pytest.mark.parametrize("hub", [None, {"TRIOPROXY_RELAY_FLOOR_HUB": "1"}], ids=["tasks", "hub"])


@HUB
async def test_the_relay_floor_passes_on_whole_and_streamed_answers_exactly_over_one_kept_connection(
    start_mock: StartMock, hub: dict[str, str] | None,
) -> None:
    mock = await start_mock(kind="both", models=("*",), tokens=5, token_delay_ms=1.0, ttft_ms=0.0)
    upstream = f"http://127.0.0.1:{mock.port}"
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    three = {"x-mock-tokens": "3"}  # (the mock's own default is 5: the request's headers must reach it)
    with trio.fail_after(60):
        async with floor_app("--upstream", upstream, env=hub) as url:
            answers: dict[str, list[httpx.Response]] = {}
            for base in (upstream, url):  # the same requests, directly and through the relay
                async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                    answers[base] = [
                        await client.post("/v1/chat/completions?x=1", json=chat),
                        await client.post("/v1/chat/completions", json={**chat, "stream": True}, headers=three),
                        await client.post("/api/chat", json=chat),  # Ollama's NDJSON stream
                        await client.post("/v1/chat/completions", json={**chat, "model": ""}),  # the mock's 400
                    ]
            relayed_connections = mock.statistics().connections - 1  # (the direct client's one)
    direct, relayed = answers[upstream], answers[url]
    for d, r in zip(direct, relayed, strict=True):
        assert r.status_code == d.status_code
        assert _same(r.content) == _same(d.content) and r.content
        assert r.headers["content-type"] == d.headers["content-type"]
        assert r.headers.get_list("date") == [r.headers["date"]]  # Hypercorn's own, not a second one
    whole, stream, ndjson, refused = relayed
    # A body with its length goes whole, with it; a stream is re-chunked by Hypercorn.
    assert whole.headers["content-length"] == str(len(whole.content))
    assert stream.headers["transfer-encoding"] == "chunked" and "content-length" not in stream.headers
    assert stream.content.endswith(b"data: [DONE]\n\n") and stream.content.count(b'"content":"') == 1 + 3
    assert ndjson.content.rstrip(b"\n").rsplit(b"\n", 1)[-1].startswith(b'{"model":')
    assert refused.status_code == 400
    assert relayed_connections == 1  # every request on the one upstream connection, kept alive


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


#: What the scripted upstream answers, by path: raw bytes, then whether it closes the connection.
_SCRIPT: dict[bytes, tuple[bytes, bool]] = {
    b"/head": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Type: text/plain\r\n\r\n", False),
    b"/truncated": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello", True),
    b"/chunked-and-length": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                             + _chunked(b"hello ", b"world"), True),
    b"/until-close": (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\ndata: 2\n\n", True),
    b"/chunked-503": (b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n"
                      b"Content-Type: application/json\r\nRetry-After: 1\r\n\r\n" + _chunked(b'{"error":', b'"busy"}'),
                      False),
    b"/ok": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
}


async def _scripted_upstream(stream: trio.SocketStream, connections: list[int]) -> None:
    """Answers by ``_SCRIPT`` (every request the relay sends has a Content-Length body).

    ``/ok-stale`` on a connection that has answered before is closed without a byte: a
    keep-alive race, which the relay must take as a stale socket and try again on a new one.
    """
    connections.append(len(connections))
    buffer = b""
    answered = 0
    async with stream:
        while True:  # bounded by the client's requests on this connection
            while b"\r\n\r\n" not in buffer:  # bounded by the head's size
                data = await stream.receive_some()
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            target = lines[0].split(b" ")[1]
            length = next(int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
            while len(buffer) < length:  # bounded by the declared length
                data = await stream.receive_some()
                if not data:
                    return
                buffer += data
            buffer = buffer[length:]
            if target == b"/ok-stale" and answered:
                return  # closed as the request came: not a byte of an answer
            raw, close = _SCRIPT[b"/ok" if target == b"/ok-stale" else target]
            await stream.send_all(raw)
            answered += 1
            if close:
                return


@HUB
async def test_the_relay_floor_relays_odd_framing_and_retries_a_kept_connection_closed_meanwhile(
    hub: dict[str, str] | None,
) -> None:
    connections: list[int] = []
    with trio.fail_after(30):  # a relay that hangs on a broken answer fails here
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, partial(_scripted_upstream,
                                                    connections=connections), 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            async with floor_app("--upstream", f"http://127.0.0.1:{port}", env=hub) as url:
                async with httpx.AsyncClient(base_url=url, timeout=20) as client:
                    head = await client.head("/head")  # (no body follows, whatever its length says)
                    truncated = await client.get("/truncated")  # read whole before its head goes: a 500
                    both = await client.get("/chunked-and-length")
                    until_close = await client.get("/until-close")
                    busy = await client.get("/chunked-503")  # its connection kept
                    first = await client.get("/ok")  # on that connection
                    second = await client.get("/ok-stale")  # that one is closed as it asks: a new one
            nursery.cancel_scope.cancel()
    assert (head.status_code, head.headers["content-length"], head.content) == (200, "10", b"")
    assert truncated.status_code == 500
    assert (both.status_code, both.content) == (200, b"hello world")
    assert "content-length" not in both.headers  # the upstream's, beside chunked, is not passed on
    assert (until_close.status_code, until_close.content) == (200, b"data: 1\n\ndata: 2\n\n")
    assert (busy.status_code, busy.content, busy.headers["retry-after"]) == (503, b'{"error":"busy"}', "1")
    assert (first.content, second.content) == (b"ok", b"ok")
    # /head's connection served /truncated, which closed it; /chunked-and-length and
    # /until-close closed theirs; /chunked-503's served /ok, then closed at /ok-stale: a fifth.
    assert len(connections) == 5


_SCENARIO = """
name = "stream-64"
description = "a few small streams: direct, the gateway, the floor and the relay floor"
mode = "ab"
floor = true
[load]
connections = 2
stream = true
tokens = 4
[run]
rounds = 2
duration_s = 0.4
warmup_s = 0.1
"""


async def test_a_run_with_the_relay_floor_measures_it_in_every_round_and_never_judges_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(RELAY_FLOOR_SPIN_ENV, "1")  # (passed on to the relay floor; the report says so)
    scenario = parse_scenario(_SCENARIO)
    logs = tmp_path / "logs"
    logs.mkdir()
    async with open_fleet(logs, pin=False) as fleet:
        run = await run_scenario(scenario, BenchOptions(pin=False, relay_floor=True), fleet, tmp_path)
    assert run.targets == ["direct", "gateway", "floor", RELAY_FLOOR]
    assert [r.target for r in run.rounds] == run.targets + run.targets[::-1]
    for r in run.rounds:
        assert r.result.recorder.count > 0 and not r.result.recorder.error_counts()
        if r.target == RELAY_FLOOR:  # its own process, and the mock behind it (the noise check's share)
            assert r.server_cpu_s is not None and r.server_cpu_s > 0
            assert r.upstream_cpu_s is not None and r.upstream_cpu_s > 0
    assert run.commands[RELAY_FLOOR][0] == f"{RELAY_FLOOR_SPIN_ENV}=1"
    assert run.commands[RELAY_FLOOR][-2] == "--upstream"
    assert run.commands[RELAY_FLOOR][-1].startswith("http://127.0.0.1:")
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    assert RELAY_FLOOR in result["comparisons"]
    # The stream-64 targets, judged for the gateway alone (a second "gateway" would label them).
    assert sorted(v["metric"] for v in result["verdicts"]) == ["added_ttft_p50_ms", "added_ttft_p99_ms",
                                                              "gateway_cpu_us"]
    assert not any(RELAY_FLOOR in v["target"] for v in result["verdicts"])
    table = markdown(result)
    assert "relay-floor: the floor app relaying to the upstream as direct calls it" in table
    assert f"relay-floor: burning 1 µs of CPU per relayed piece ({RELAY_FLOOR_SPIN_ENV})" in table


def test_relay_floor_is_a_reserved_label() -> None:
    with pytest.raises(ConfigError, match="'relay-floor' is reserved"):
        parse_scenario(_SCENARIO + '[[gateways]]\nlabel = "relay-floor"\n')
