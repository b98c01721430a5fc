"""The bench's relay floor (``loadtest/floor_app.py --upstream``, ``trioproxy bench --relay-floor``).

A bare relay on the gateway's own I/O parts, measured beside the gateway so that what the
gateway's features cost shows: it must relay the upstream's answers exactly (or the row
measures something else), keep its upstream connections, and stay out of the verdicts.
Real processes, real Hypercorn, the project's mock, httpx as the client.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
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

from .conftest import StartMock

REPO = Path(__file__).resolve().parent.parent

#: What differs between two answers of the mock: the request counter in its ids, the clock.
_VARYING = re.compile(rb'("id":"[a-z]+-mock-)\d+|("created(?:_at)?":)"?[0-9T:.Z+-]+"?|("[a-z_]*duration":)\d+')


def _same(data: bytes) -> bytes:
    return _VARYING.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + b"N", data)


async def test_the_relay_floor_passes_on_whole_and_streamed_answers_exactly_over_one_kept_connection(
    start_mock: StartMock,
) -> None:
    mock = await start_mock(kind="both", models=("*",), tokens=5, token_delay_ms=1.0, ttft_ms=0.0)
    upstream = f"http://127.0.0.1:{mock.port}"
    argv = [sys.executable, str(REPO / "loadtest" / "floor_app.py"), "--port", "0",
            "--config", str(REPO / "loadtest" / "profiles" / "bench.toml"), "--upstream", upstream]
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(partial(trio.run_process, argv, stderr=subprocess.PIPE, check=False))
            seen = b""
            while b"floor listening on " not in seen or not seen.endswith(b"\n"):
                chunk = await relay.stderr.receive_some()
                assert chunk, seen
                seen += chunk
            url = seen.split(b"floor listening on ")[1].split()[0].decode()
            answers: dict[str, list[httpx.Response]] = {}
            for base in (upstream, url):  # the same requests, directly and through the relay
                async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                    answers[base] = [
                        await client.post("/v1/chat/completions?x=1", json=chat),
                        await client.post("/v1/chat/completions", json={**chat, "stream": True}),
                        await client.post("/api/chat", json=chat),  # Ollama's NDJSON stream
                        await client.post("/v1/chat/completions", json={**chat, "model": ""}),  # the mock's 400
                    ]
            relayed_connections = mock.statistics().connections - 1  # (the direct client's one)
            relay.send_signal(signal.SIGINT)
            assert await relay.wait() == 0
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
    assert stream.content.endswith(b"data: [DONE]\n\n") and stream.content.count(b'"content":"') == 6
    assert ndjson.content.rstrip(b"\n").rsplit(b"\n", 1)[-1].startswith(b'{"model":')
    assert refused.status_code == 400
    assert relayed_connections == 1  # every request on the one upstream connection, kept alive


_SCENARIO = """
name = "relay-floor-smoke"
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
        if r.target == RELAY_FLOOR:  # its own process: its CPU is read like the floor's
            assert r.server_cpu_s is not None and r.server_cpu_s > 0
    assert run.commands[RELAY_FLOOR][-2] == "--upstream"
    assert run.commands[RELAY_FLOOR][-1].startswith("http://127.0.0.1:")
    result = analyze(run, machine={"cores": 2, "cpu_model": "test", "python": "3.11"})
    assert RELAY_FLOOR in result["comparisons"]
    assert all(v["target"] == "gateway" for v in result["verdicts"])
    table = markdown(result)
    assert "relay-floor: the floor app relaying to the upstream as direct calls it" in table
    assert f"relay-floor: burning 1 µs of CPU per relayed piece ({RELAY_FLOOR_SPIN_ENV})" in table


def test_relay_floor_is_a_reserved_label() -> None:
    with pytest.raises(ConfigError, match="'relay-floor' is reserved"):
        parse_scenario(_SCENARIO + '[[gateways]]\nlabel = "relay-floor"\n')
