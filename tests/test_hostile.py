"""Hostile and malformed input, and upstreams that misbehave in ways the mock cannot.

The promise under test (issue 7): each request gets a clear error in the API's own
format (OpenAI-style JSON on ``/v1/*``, ``{"error": "..."}`` on ``/api/*``) or a correct
answer; the gateway keeps serving; and every request that reached the app has exactly
one usage record, matched to its response by ``x-request-id``. Requests that Hypercorn
refuses before their head is read (a malformed head, 431, HTTP/2 protocol errors) never
reach the app and have no record; h11's refusals still carry an error body in the API's
format (``hypercorn_fix``).

Already covered elsewhere and not repeated here: auth, key limits, SSRF and the stalled
client (test_security.py), failover per fault kind (test_failover.py), the basic 400s
(test_gateway.py). A known gateway bug is pinned as a strict xfail, saying what happens
and what should (none is left).

Everything runs over real sockets on 127.0.0.1 with ephemeral ports, except the
property tests, which drive ``ProxyApp`` in process (one ``trio.run`` per example).
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from loguru import logger

from trioproxy.app import ProxyApp
from trioproxy.exchange import decode_json as _decode_json
from trioproxy.exchange import model_of as _model
from trioproxy.auth import KeyTable, digest
from trioproxy.breaker import HedgeBudget
from trioproxy.catalog import DASHBOARD_FILES, ROUTES, dashboard_file
from trioproxy.config import Auth, AuthKey, Config, load_config
from trioproxy.errors import RequestError, RoutingError
from trioproxy.health import HealthBoard
from trioproxy.routing import RoutePlan, UpstreamState, plan_route
from trioproxy.server import RunningServer, build_runtimes
from trioproxy.services import Services
from trioproxy.telemetry import Record, TelemetrySink

from .conftest import StartGateway, StartMock, read_records, stop, upstream_toml

NO_PROBES = "[upstreams.health]\nenabled = false\n"
CHAT = "/v1/chat/completions"
OLLAMA_CHAT = "/api/chat"


# --- helpers -------------------------------------------------------------------------------


def port_of(gw: RunningServer) -> int:
    return int(gw.url.rsplit(":", 1)[1])


def api_error_problem(path: str, body: bytes) -> str | None:
    """None if ``body`` is an error in the API's own format for ``path``; else what is wrong."""
    try:
        doc = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:120]!r}"
    error = doc.get("error") if isinstance(doc, dict) else None
    if path.startswith("/api/"):
        ok = isinstance(error, str) and bool(error)
    else:
        ok = (
            isinstance(error, dict)
            and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str)
            and bool(error["message"])
        )
    return None if ok else f"not a {path} error: {body[:120]!r}"


def answer_problem(path: str, body: bytes) -> str | None:
    """None if ``body`` is a complete answer (non-streamed /v1 JSON, or an NDJSON stream ending done)."""
    try:
        if path.startswith("/api/"):
            lines = [json.loads(line) for line in body.splitlines()]
            return None if lines and lines[-1].get("done") is True else f"stream not done: {body[-120:]!r}"
        doc = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:120]!r}"
    return None if isinstance(doc, dict) and doc.get("choices") else f"no choices: {body[:120]!r}"


@attrs.frozen
class RawResponse:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def parse_responses(data: bytes) -> list[RawResponse]:
    """HTTP/1.x responses one after another (Content-Length, chunked or close-delimited)."""
    responses = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete head: {head[:200]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            body, data = data[:length], data[length:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    data = data.partition(b"\r\n")[2]  # no trailers here
                    break
                body, data = body + data[:size], data[size + 2 :]
        else:  # close-delimited: the rest
            body, data = data, b""
        responses.append(RawResponse(status, headers, body))
    return responses


async def receive_until_eof(stream: trio.SocketStream) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close). The caller bounds it in time."""
    received = b""
    try:
        while data := await stream.receive_some():
            received += data
    except trio.BrokenResourceError:
        pass
    return received


async def raw_exchange(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        return await receive_until_eof(stream)


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def records_by_id(gw: RunningServer) -> dict[str, dict[str, Any]]:
    records = read_records(gw)
    by_id = {r["request_id"]: r for r in records}
    assert len(by_id) == len(records), "a request id was recorded twice"
    return by_id


def request_line(method: str, path: str, body: bytes, *, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"%s %s %s\r\nHost: gw\r\nContent-Length: %d\r\n%s\r\n%s" % (
        method.encode(), path.encode(), version, len(body), extra, body
    )


# --- malformed request bodies ---------------------------------------------------------------


def _nest(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# (name, body, expected status, expected OpenAI "param"); each is sent to both APIs.
REJECTED: list[tuple[str, bytes | dict[str, Any], int, str | None]] = [
    ("invalid JSON", b'{"model": "m", "stream": tru', 400, None),
    ("empty body", b"", 400, None),
    ("only whitespace", b" \r\n\t ", 400, None),
    ("a JSON array", b'[{"model": "m"}]', 400, None),
    ("a JSON string", b'"m"', 400, None),
    ("a JSON number", b"3", 400, None),
    ("JSON null", b"null", 400, None),
    ("two JSON objects", b'{"model": "m"}{"model": "m"}', 400, None),
    ("model missing", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("model empty", {"model": "", "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("model a number", {"model": 7, "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("model a list", {"model": ["m"], "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("model an object", {"model": {"name": "m"}, "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("model true", {"model": True, "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("stream a string", {"model": "m", "stream": "yes", "messages": [{"role": "user", "content": "hi"}]}, 400, "stream"),
    ("stream a number", {"model": "m", "stream": 1, "messages": [{"role": "user", "content": "hi"}]}, 400, "stream"),
    ("stream an object", {"model": "m", "stream": {}, "messages": [{"role": "user", "content": "hi"}]}, 400, "stream"),
    ("invalid UTF-8", b'{"model": "m\xff\xfe", "messages": [{"role": "user", "content": "hi"}]}', 400, None),
    ("truncated UTF-8", b'{"model": "m", "messages": "\xc3', 400, None),
    ("deeply nested arrays", b'{"model": "m", "messages": ' + _nest(100_000) + b"}", 400, None),
    ("deeply nested objects", b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, 400, None),
    ("an integer too long to convert", b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),
    ("unknown model", {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
]

# The gateway checks model and stream only: messages is the upstream's business, so these are
# relayed, and the upstream's answer (the mock checks messages as the real servers do: 400 in the
# API's format for a wrong type, or an answer) is passed through as it gave it.
RELAYED: list[tuple[str, dict[str, Any] | bytes]] = [
    ("messages a string", {"model": "m", "messages": "hello"}),
    ("messages a number", {"model": "m", "messages": 3}),
    ("messages null", {"model": "m", "messages": None}),
    ("messages a list of numbers", {"model": "m", "messages": [1, 2]}),
    ("messages an object", {"model": "m", "messages": {"role": "user"}}),
    ("messages missing", {"model": "m"}),
    ("nested 200 deep (valid JSON)", b'{"model": "m", "messages": [' + _nest(200) + b"]}"),
    ("NaN in a field the gateway ignores", b'{"model": "m", "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}'),
    ("a UTF-8 byte order mark", b'\xef\xbb\xbf{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'),
    ("UTF-16 (json.loads detects it)", json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode("utf-16")),
]


def _encode(body: bytes | dict[str, Any]) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


@pytest.mark.parametrize("path", [CHAT, OLLAMA_CHAT])
async def test_malformed_bodies_get_clean_errors_and_the_gateway_keeps_serving(
    start_mock: StartMock, start_gateway: StartGateway, path: str
) -> None:
    """Every malformed body gets its error in the API's format, in one gateway, one after another; then a
    normal request is answered. Each request has one record (by x-request-id), and nothing rejected
    reached the upstream.

    Surprising, noted for the lead: the gateway decodes with ``json.loads(bytes)``, which also accepts
    UTF-16/UTF-32 and a UTF-8 BOM (the error message says UTF-8); such bytes are forwarded unchanged.
    An integer literal past Python's 4300-digit limit is valid JSON but answered 400.
    """
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", kind="ollama", models='["m"]', extra=NO_PROBES)
            + "[server]\nmax_body_bytes = 1000000\n"
        )
        problems: list[str] = []
        ids: list[str] = []
        async with httpx.AsyncClient(timeout=30) as client:
            for name, body, status, param in REJECTED:
                r = await client.post(gw.url + path, content=_encode(body))
                ids.append(r.headers["x-request-id"])
                if r.status_code != status:
                    problems.append(f"{name}: {r.status_code} {r.text[:120]}")
                elif problem := api_error_problem(path, r.content):
                    problems.append(f"{name}: {problem}")
                elif path == CHAT and r.json()["error"]["param"] != param:
                    problems.append(f"{name}: param {r.json()['error']['param']!r}")
            rejected_upstream = mock.statistics().by_path.get(path, 0)
            for name, body in RELAYED:
                r = await client.post(gw.url + path, content=_encode(body))
                ids.append(r.headers["x-request-id"])
                problem = (answer_problem(path, r.content) if r.status_code == 200
                           else api_error_problem(path, r.content) if r.status_code == 400 else "status")
                if problem:
                    problems.append(f"{name}: {r.status_code} {problem} {r.content[:120]!r}")
            relayed_upstream = mock.statistics().by_path.get(path, 0) - rejected_upstream
            normal = await client.post(gw.url + path, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            ids.append(normal.headers["x-request-id"])
        await stop(gw)
    assert problems == []
    assert rejected_upstream == 0, "a rejected request reached the upstream"
    assert relayed_upstream == len(RELAYED), "a relayed request did not reach the upstream"
    assert normal.status_code == 200 and answer_problem(path, normal.content) is None
    records = records_by_id(gw)
    assert sorted(records) == sorted(ids)
    outcomes = [records[i]["outcome"] for i in ids]
    assert outcomes == ["rejected"] * len(REJECTED) + ["ok"] * (len(RELAYED) + 1)


@pytest.mark.parametrize("path", [CHAT, OLLAMA_CHAT])
async def test_stream_null_means_the_routes_default(start_mock: StartMock, start_gateway: StartGateway, path: str) -> None:
    """OpenAI's schema has ``stream: boolean | null`` (default false); vLLM's is ``Optional[bool]``, Ollama's
    ``*bool`` (default true). Clients that serialize unset options as null work against the upstream
    directly, so they must through the gateway: null means the route's default."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", kind="ollama", extra=NO_PROBES))
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(gw.url + path, json={"model": "m", "stream": None, "messages": [{"role": "user", "content": "hi"}]})
        await stop(gw)
    assert r.status_code == 200, r.text
    assert answer_problem(path, r.content) is None


# --- body size --------------------------------------------------------------------------------

LIMIT = 65_536


def padded(size: int) -> bytes:
    """A valid chat request of exactly ``size`` bytes."""
    skeleton = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "pad": ""}'
    return skeleton[:-2] + b"x" * (size - len(skeleton)) + b'"}'


async def test_bodies_at_and_over_max_body_bytes(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """At the limit: answered. One byte over: 413, declared or chunked. A declared length far over the limit
    is refused from the head alone: the 413 comes without the gateway reading (or waiting for) the body,
    and the connection is closed, since the unread body cannot be skipped."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", kind="ollama", extra=NO_PROBES)
            + f"[server]\nmax_body_bytes = {LIMIT}\n"
        )

        async def chunked(body: bytes) -> AsyncIterator[bytes]:
            for i in range(0, len(body), 10_000):
                yield body[i : i + 10_000]

        async with httpx.AsyncClient(timeout=30) as client:
            at_limit = await client.post(gw.url + CHAT, content=padded(LIMIT))
            over = await client.post(gw.url + CHAT, content=padded(LIMIT + 1))
            over_ollama = await client.post(gw.url + OLLAMA_CHAT, content=padded(LIMIT + 1))
            over_chunked = await client.post(gw.url + CHAT, content=chunked(padded(LIMIT + 1)))
            # Nothing but the head: the answer must not wait for a terabyte that never comes.
            raw = await raw_exchange(port_of(gw), b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000000000\r\n\r\n")
            after = await client.post(gw.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        await stop(gw)
    assert at_limit.status_code == 200 and answer_problem(CHAT, at_limit.content) is None
    for r, path in ((over, CHAT), (over_ollama, OLLAMA_CHAT), (over_chunked, CHAT)):
        assert r.status_code == 413 and api_error_problem(path, r.content) is None
    assert over.json()["error"]["code"] == "request_too_large"
    (declared,) = parse_responses(raw)  # and then the connection was closed (receive_until_eof returned)
    assert declared.status == 413 and api_error_problem(CHAT, declared.body) is None
    assert after.status_code == 200
    assert mock.statistics().by_path[CHAT] == 2
    records = records_by_id(gw)
    assert len(records) == 6
    too_large = [r for r in records.values() if r["status"] == 413]
    assert len(too_large) == 4 and all(r["outcome"] == "rejected" for r in too_large)
    assert records[declared.headers[b"x-request-id"].decode()]["bytes_in"] == 0


# --- content type, duplicate keys -------------------------------------------------------------


async def test_the_content_type_is_not_checked_and_json_goes_upstream(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """Decision: the gateway does not look at the client's Content-Type. The body must be JSON whatever the
    header says (as Ollama does; and the README's ``curl -d`` examples send
    application/x-www-form-urlencoded). Upstream it always goes as application/json, since the gateway has
    decoded it as JSON: FastAPI-based servers such as vLLM would answer 422 to any other type."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    types = [b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x", None]
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        responses = []
        async with httpx.AsyncClient(timeout=30) as client:
            for ctype in types:
                headers = {} if ctype is None else {"content-type": ctype.decode()}
                responses.append(await client.post(gw.url + CHAT, content=body, headers=headers))
                garbage = await client.post(gw.url + CHAT, content=b"model=m", headers=headers)
                assert garbage.status_code == 400 and api_error_problem(CHAT, garbage.content) is None
        forwarded = [dict(r.headers).get("content-type") for r in mock.requests]
        await stop(gw)
    assert [r.status_code for r in responses] == [200] * len(types)
    assert forwarded == ["application/json"] * len(types)
    assert len(read_records(gw)) == 2 * len(types)


async def test_duplicate_keys_route_on_the_value_the_upstream_sees(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """JSON objects with a repeated key: the last one wins in the gateway, as in Python's, Go's and
    most servers' parsers, so the gateway routes and streams on the value the upstream acts on. The
    body goes upstream byte for byte unless the gateway must rewrite it (usage injection), and then the
    rewrite keeps only the value the gateway used."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", models='["m"]', extra=NO_PROBES))
        async with httpx.AsyncClient(timeout=30) as client:

            async def post(raw: bytes) -> tuple[httpx.Response, dict[str, Any] | None]:
                before = len(mock.requests)
                r = await client.post(gw.url + CHAT, content=raw)
                seen = json.loads(mock.requests[-1].body) if len(mock.requests) > before else None
                return r, seen

            last_is_known, seen1 = await post(b'{"model": "unknown", "model": "m", "messages": [{"role": "user", "content": "hi"}]}')
            last_is_unknown, seen2 = await post(b'{"model": "m", "model": "unknown", "messages": [{"role": "user", "content": "hi"}]}')
            last_says_no_stream, seen3 = await post(b'{"model": "m", "stream": true, "stream": false, "messages": [{"role": "user", "content": "hi"}]}')
            last_says_stream, seen4 = await post(b'{"model": "m", "stream": false, "stream": true, "messages": [{"role": "user", "content": "hi"}]}')
        await stop(gw)
    assert last_is_known.status_code == 200 and seen1 is not None and seen1["model"] == "m"
    assert last_is_known.json()["model"] == "m"
    assert last_is_unknown.status_code == 404 and seen2 is None  # routed on "unknown": never sent
    assert last_says_no_stream.headers["content-type"] == "application/json" and seen3 is not None
    assert seen3["stream"] is False
    assert last_says_stream.headers["content-type"].startswith("text/event-stream") and seen4 is not None
    assert seen4["stream"] is True and seen4["stream_options"] == {"include_usage": True}
    assert last_says_stream.content.endswith(b"data: [DONE]\n\n")
    assert len(read_records(gw)) == 4


# --- the wire: endless bodies, pipelining, HTTP/1.0, HTTP/2, big heads -------------------------

#: A head and the first chunk of a body that never goes on.
ENDLESS_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(
    b'{"model": "m", '
).removesuffix(b"0\r\n\r\n")


async def test_a_chunked_body_that_never_ends_does_not_block_anyone_else(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """A client sends a head and part of a chunked body, then nothing. Others are served meanwhile, and
    when it leaves (or the shutdown grace runs out) its request gets its one record."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES)
            + "[server]\nkeep_alive_timeout_s = 0.2\nbody_timeout_s = 0.5\nshutdown_grace_s = 0.5\n"
        )
        endless = await trio.open_tcp_stream("127.0.0.1", port_of(gw))
        await endless.send_all(ENDLESS_HEAD)
        async with httpx.AsyncClient(timeout=30) as client:
            others = [await client.post(gw.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) for _ in range(3)]
        await endless.aclose()
        await stop(gw)
    assert [r.status_code for r in others] == [200] * 3
    records = read_records(gw)
    assert len(records) == 4
    (stuck,) = [r for r in records if r["status"] == 0]
    assert stuck["outcome"] in ("client_disconnect", "cancelled")


async def test_a_chunked_body_that_never_ends_is_eventually_closed(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """With keep_alive_timeout_s = 0.2, the gateway should close (or answer 408 to) a client that stopped
    in the middle of its body well within 2 s. Hypercorn's ``read_timeout`` is not the fix: it also applies
    while a long answer streams to a client that sends nothing. A deadline on ``_read_body`` is."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES)
            + "[server]\nkeep_alive_timeout_s = 0.2\nbody_timeout_s = 0.5\nshutdown_grace_s = 0.5\n"
        )
        endless = await trio.open_tcp_stream("127.0.0.1", port_of(gw))
        async with endless:
            await endless.send_all(ENDLESS_HEAD)
            with trio.move_on_after(2) as waiting:
                answer = await receive_until_eof(endless)
        await stop(gw)
    assert not waiting.cancelled_caught, "the connection was still open after 2 s"
    assert answer == b"" or parse_responses(answer)[0].status == 408
    assert len(read_records(gw)) == 1


async def test_a_head_that_never_ends_is_closed_by_the_keep_alive_timeout(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """Slowloris on the head: until a whole head has arrived the connection counts as idle, so Hypercorn's
    keep-alive timeout closes it. It never reached the app: no record."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES) + "[server]\nkeep_alive_timeout_s = 0.2\n"
        )
        slow = await trio.open_tcp_stream("127.0.0.1", port_of(gw))
        async with slow:
            await slow.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Slow: 1")
            with trio.move_on_after(10) as waiting:
                answer = await receive_until_eof(slow)
        await stop(gw)
    assert not waiting.cancelled_caught and answer == b""
    assert read_records(gw) == []


async def test_requests_h11_cannot_read_get_an_error_in_their_apis_format(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """A malformed chunked body (its head read, so its app has started) on /v1 and on /api, and a
    malformed request line: Hypercorn answers 400, now with a body in the API's own format. The two
    whose app started have a record saying what the client got (400, rejected), not a client gone."""
    bad_body = b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", kind="ollama", extra=NO_PROBES))
        openai_answer = await raw_exchange(port_of(gw), b"POST %s HTTP/1.1\r\nHost: gw\r\n%s" % (CHAT.encode(), bad_body))
        ollama_answer = await raw_exchange(port_of(gw), b"POST %s HTTP/1.1\r\nHost: gw\r\n%s" % (OLLAMA_CHAT.encode(), bad_body))
        bad_line = await raw_exchange(port_of(gw), b"NOT A REQUEST LINE\r\n\r\n")
        await stop(gw)
    (openai_refusal,) = parse_responses(openai_answer)
    assert openai_refusal.status == 400 and api_error_problem(CHAT, openai_refusal.body) is None
    assert "not valid HTTP/1.1" in json.loads(openai_refusal.body)["error"]["message"]
    (ollama_refusal,) = parse_responses(ollama_answer)
    assert ollama_refusal.status == 400 and api_error_problem(OLLAMA_CHAT, ollama_refusal.body) is None
    (line_refusal,) = parse_responses(bad_line)
    assert line_refusal.status == 400 and api_error_problem(CHAT, line_refusal.body) is None
    records = read_records(gw)
    assert sorted((r["route"], r["status"], r["outcome"]) for r in records) == [
        (OLLAMA_CHAT, 400, "rejected"),
        (CHAT, 400, "rejected"),
    ]
    assert all("not valid HTTP/1.1" in r["error"] for r in records)


async def test_an_answer_that_does_not_read_a_malformed_body_and_h11s_refusal_never_mix(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """Routes answered without reading the body (404, 405, an Ollama 404), each with a malformed chunked
    body: h11's 400 and the app's own answer race. Whichever the client gets arrives whole (its body as
    long as its Content-Length says, in the API's format), and the record says that one."""
    bad_body = b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
    answers = []
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        for _ in range(3):
            for path in ("/nope", "/v1/models", "/api/nope"):
                data = await raw_exchange(port_of(gw), b"POST %s HTTP/1.1\r\nHost: gw\r\n%s" % (path.encode(), bad_body))
                (answer,) = parse_responses(data)
                answers.append((path, answer))
        await stop(gw)
    for path, answer in answers:
        assert len(answer.body) == int(answer.headers[b"content-length"]), (path, answer)
        assert answer.status in (400, 404, 405) and api_error_problem(path, answer.body) is None, (path, answer)
    records = read_records(gw)
    assert [(r["route"], r["status"]) for r in records] == [(path, a.status) for path, a in answers]


async def test_pipelined_requests_are_answered_in_order(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """Three requests in one send on one connection (a stream, a local route, an Ollama one that closes):
    three complete answers, in order, and three records."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", kind="ollama", extra=NO_PROBES))
        data = await raw_exchange(
            port_of(gw),
            request_line("POST", CHAT, b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}')
            + b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
            + request_line("POST", OLLAMA_CHAT, b'{"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}]}', extra=b"Connection: close\r\n"),
        )
        await stop(gw)
    streamed, health, ollama = parse_responses(data)
    assert streamed.status == 200 and streamed.body.endswith(b"data: [DONE]\n\n")
    assert health.status == 200 and json.loads(health.body) == {"status": "ok"}
    assert ollama.status == 200 and json.loads(ollama.body)["done"] is True
    records = records_by_id(gw)
    assert [records[r.headers[b"x-request-id"].decode()]["route"] for r in (streamed, health, ollama)] == [
        CHAT,
        "/healthz",
        OLLAMA_CHAT,
    ]


async def test_pipelined_requests_then_a_half_close_are_all_answered(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """A client that sends its requests and then shuts its side (``printf ... | nc -N``): the
    end of its bytes is not the end of the exchange. Each request is answered whole, in
    order, and recorded ``ok``; then the gateway closes."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(gw))
        async with stream:
            await stream.send_all(
                request_line("POST", CHAT, b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}')
                + b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
                + request_line("POST", CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
            )
            await stream.send_eof()
            data = await receive_until_eof(stream)
        await stop(gw)
    streamed, health, whole = parse_responses(data)
    assert streamed.status == 200 and streamed.body.endswith(b"data: [DONE]\n\n")
    assert health.status == 200 and json.loads(health.body) == {"status": "ok"}
    assert whole.status == 200 and answer_problem(CHAT, whole.body) is None
    records = records_by_id(gw)
    ids = [r.headers[b"x-request-id"].decode() for r in (streamed, health, whole)]
    assert [(records[i]["route"], records[i]["outcome"]) for i in ids] == [(CHAT, "ok"), ("/healthz", "ok"), (CHAT, "ok")]
    assert len(records) == 3


async def test_an_http10_client_gets_its_answer_and_the_connection_closes(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """HTTP/1.0 has no keep-alive by default and no chunked encoding: a whole answer carries its length, a
    stream is delimited by the close; either way the connection is closed after it (receive_until_eof
    returns)."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        whole = await raw_exchange(port_of(gw), request_line("POST", CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', version=b"HTTP/1.0"))
        streamed = await raw_exchange(
            port_of(gw), request_line("POST", CHAT, b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}', version=b"HTTP/1.0")
        )
        await stop(gw)
    (answer,) = parse_responses(whole)
    assert answer.status == 200 and answer_problem(CHAT, answer.body) is None
    (stream,) = parse_responses(streamed)
    assert stream.status == 200 and b"transfer-encoding" not in stream.headers
    assert stream.body.endswith(b"data: [DONE]\n\n")
    assert len(read_records(gw)) == 2


async def test_http2_cleartext_with_prior_knowledge_is_served(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """Hypercorn serves h2c with prior knowledge (its ``Upgrade: h2c`` path only takes requests without a
    body, so a POST upgrading stays on HTTP/1.1): whole answers, streams, errors and concurrent streams on
    one connection all work, each with its record."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=5, token_delay_ms=1, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", kind="ollama", extra=NO_PROBES))
        async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as client:
            whole = await client.post(gw.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            async with client.stream("POST", gw.url + CHAT, json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
                streamed = b"".join([chunk async for chunk in r.aiter_bytes()])
                stream_version = r.http_version
            bad = await client.post(gw.url + OLLAMA_CHAT, content=b"{")
            concurrent: list[httpx.Response] = []

            async def one() -> None:
                concurrent.append(await client.post(gw.url + OLLAMA_CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}))

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(one)
        await stop(gw)
    assert whole.http_version == stream_version == "HTTP/2"
    assert whole.status_code == 200 and answer_problem(CHAT, whole.content) is None
    assert streamed.endswith(b"data: [DONE]\n\n")
    assert bad.status_code == 400 and api_error_problem(OLLAMA_CHAT, bad.content) is None
    assert [r.status_code for r in concurrent] == [200] * 3
    assert all(answer_problem(OLLAMA_CHAT, r.content) is None for r in concurrent)
    assert len(read_records(gw)) == 6


async def test_http2_data_after_an_early_answer_is_dropped_and_the_gateway_serves_on(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """A request body over HTTP/2 larger than the first flow-control window (64 KB), to a route answered
    without reading it (404), then the same with a body over ``max_body_bytes`` (413): the rest of each body
    arrives after its stream has closed. Hypercorn 0.17/0.18 look that data's stream up and raise
    ``KeyError``, which under Trio ended the whole server (every connection cut, the port closed):
    ``hypercorn_fix`` acknowledges and drops it. The connection and the gateway serve on."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES) + "[server]\nmax_body_bytes = 100000\n"
        )
        async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as client:
            unknown = await client.post(gw.url + "/nope", content=b"x" * 70_000)
            too_big = await client.post(gw.url + CHAT, content=b"x" * 300_000, headers={"content-type": "application/json"})
            after = await client.post(gw.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        async with httpx.AsyncClient(timeout=30) as client:
            health = await client.get(gw.url + "/healthz")
        await stop(gw)
    assert unknown.http_version == "HTTP/2" and unknown.status_code == 404
    assert api_error_problem(CHAT, unknown.content) is None
    assert too_big.status_code == 413 and api_error_problem(CHAT, too_big.content) is None
    assert after.status_code == 200 and answer_problem(CHAT, after.content) is None
    assert health.status_code == 200
    assert sorted(record["status"] for record in read_records(gw)) == [200, 200, 404, 413]


async def test_an_internal_error_of_hypercorn_ends_its_connection_not_the_server(
    start_mock: StartMock, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error of Hypercorn's own on one connection (here injected into its h11 protocol for one path)
    ends that connection, logged with its traceback; a stream in flight on another connection finishes,
    and the gateway takes new connections. Without ``hypercorn_fix``'s containment, Trio ended the
    server: the stream cut, the port closed."""
    from hypercorn.protocol.h11 import H11Protocol

    stock_check = H11Protocol._check_protocol

    async def check_or_fail(self: Any, event: Any) -> None:
        if event.target == b"/boom":
            raise RuntimeError("an internal error of the server, injected")
        await stock_check(self, event)

    monkeypatch.setattr(H11Protocol, "_check_protocol", check_or_fail)
    errors_logged: list[str] = []
    sink_id = logger.add(errors_logged.append, level="ERROR", format="{message}")
    try:
        with trio.fail_after(30):
            mock = await start_mock(models=("*",), tokens=40, token_delay_ms=5, ttft_ms=0)
            gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
            boom: list[str] = []
            async with httpx.AsyncClient(timeout=30) as streaming, httpx.AsyncClient(timeout=30) as other:
                async with streaming.stream("POST", gw.url + CHAT, json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
                    raw = r.aiter_raw()
                    chunks = [await raw.__anext__()]  # the stream is under way
                    try:
                        await other.post(gw.url + "/boom", content=b"{}")
                    except httpx.RemoteProtocolError as exc:  # (the connection closed without an answer)
                        boom.append(type(exc).__name__)
                    chunks += [chunk async for chunk in raw]
                after = await other.post(gw.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            await stop(gw)
    finally:
        logger.remove(sink_id)
    assert boom == ["RemoteProtocolError"]
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
    assert after.status_code == 200 and answer_problem(CHAT, after.content) is None
    assert any("internal error" in line and "RuntimeError" in line for line in errors_logged), errors_logged
    assert [record["status"] for record in read_records(gw)] == [200, 200]


async def test_an_http2_path_that_http11_would_refuse_never_reaches_an_upstream_malformed(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """``:path = /v1/chat/completions?a b`` over h2c: the gateway forwards ``POST /v1/chat/completions?a b
    HTTP/1.1`` and the upstream (the mock, like h11 or Go) answers 400 "malformed request line", which is
    passed through. No other host or path can be reached this way (CR, LF and NUL are refused by the h2
    library and by the request serializer), but the gateway should refuse the request itself or
    percent-encode the query. Either fix passes: a gateway 400, or a well-formed request upstream."""
    import h2.config
    import h2.connection
    import h2.events

    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        headers = [(":method", "POST"), (":scheme", "http"), (":authority", "gw"), (":path", f"{CHAT}?a b")]
        conn.send_headers(1, headers)
        conn.send_data(1, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', end_stream=True)
        status, body, response_headers = 0, b"", {}
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(gw))
        async with stream:
            await stream.send_all(conn.data_to_send())
            ended = False
            while not ended and (data := await stream.receive_some()):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        response_headers = dict(event.headers)
                        status = int(response_headers[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        ended = True
                await stream.send_all(conn.data_to_send())
        await stop(gw)
    assert status != 0 and (status == 200 or api_error_problem(CHAT, body) is None)
    refused_by_gateway = 400 <= status < 500 and b"x-trioproxy-upstream" not in response_headers
    well_formed_upstream = status == 200 and [r.path for r in mock.requests] == [CHAT]
    assert refused_by_gateway or well_formed_upstream, (status, body)


async def test_a_head_far_over_max_header_bytes_is_refused_and_the_gateway_survives(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """A 200 KB header against max_header_bytes = 4096: Hypercorn (h11) answers 431 or just closes; the app
    never sees it (no record); the next request is served."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES) + "[server]\nmax_header_bytes = 4096\n"
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(gw))
        async with stream:
            try:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
            except trio.BrokenResourceError:
                pass  # closed on us mid-send: a clean refusal too
            answer = await receive_until_eof(stream)
        async with httpx.AsyncClient(timeout=30) as client:
            after = await client.post(gw.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        await stop(gw)
    assert answer == b"" or parse_responses(answer)[0].status == 431
    assert after.status_code == 200
    assert len(read_records(gw)) == 1


async def test_a_head_over_max_header_bytes_is_refused_whole_or_in_pieces(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """A 10 KB head against max_header_bytes = 4096 gets 431 whether it arrives in one write (h11 sees
    it whole and checks nothing: the gateway refuses it, in the API's format, with its record) or in two
    with the first already over the limit (h11 refuses it, before any request exists: no record). A head
    just under the limit is served."""
    big = b"a" * 10_000
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES) + "[server]\nmax_header_bytes = 4096\n"
        )
        whole = await raw_exchange(port_of(gw), b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-Big: " + big + b"\r\n\r\n")
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(gw))
        async with stream:
            await stream.send_all(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Big: " + big[:6000])
            await trio.testing.wait_all_tasks_blocked()  # (the first piece read, alone)
            try:
                await stream.send_all(big[6000:] + b"\r\n\r\n")
            except trio.BrokenResourceError:
                pass  # closed on us already: the 431 is in the answer
            pieces = await receive_until_eof(stream)
        under = await raw_exchange(
            port_of(gw), b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-Big: " + big[:3800] + b"\r\n\r\n"
        )
        await stop(gw)
    (refused,) = parse_responses(whole)
    assert refused.status == 431 and api_error_problem("/v1/models", refused.body) is None
    assert json.loads(refused.body)["error"]["code"] == "request_header_fields_too_large"
    assert parse_responses(pieces)[0].status == 431
    assert parse_responses(under)[0].status == 200
    assert [(r["status"], r["outcome"]) for r in read_records(gw)] == [(431, "rejected"), (200, "ok")]


# --- request bodies that break the gateway itself (bugs) --------------------------------------


async def test_a_lone_surrogate_escape_is_relayed_or_refused_cleanly(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    r"""``{"content": "\ud800"}`` is valid JSON grammar (RFC 8259 leaves its meaning to the receiver). Sent
    as is (non-streamed) it is relayed; once the gateway rewrites the body it is a 500 "internal gateway
    error" and a logged traceback. Fix: re-serialize with ``ensure_ascii=True`` (the escape survives
    as sent), or answer 400."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", models='["m"]', extra=NO_PROBES)
            + '[routing]\naliases = { fast = "m" }\n'
        )
        content = b'"messages": [{"role": "user", "content": "\\ud800"}]'
        async with httpx.AsyncClient(timeout=30) as client:
            streamed = await client.post(gw.url + CHAT, content=b'{"model": "m", "stream": true, %s}' % content)
            aliased = await client.post(gw.url + CHAT, content=b'{"model": "fast", %s}' % content)
        await stop(gw)
    for r in (streamed, aliased):
        assert r.status_code in (200, 400), r.text
        assert r.status_code == 200 or api_error_problem(CHAT, r.content) is None


async def test_deep_nesting_with_payload_logging_is_relayed(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """Without log_payloads the same body is relayed (see RELAYED above for 200 deep). Fix: redact
    iteratively, or cap the depth kept in the payload (e.g. replace deeper values by "...")."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES) + "[telemetry]\nlog_payloads = true\n"
        )
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(gw.url + CHAT, content=b'{"model": "m", "messages": %s}' % _nest(700))
            after = await client.post(gw.url + CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        await stop(gw)
    assert after.status_code == 200
    assert r.status_code in (200, 400), r.text


async def test_a_huge_model_name_does_not_bloat_the_usage_log(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """Any client can write up to 2 x max_body_bytes (16 MiB by default) of the usage log per request. The
    client gets a clean 400 (the gateway refuses names over 256 characters) and the record stays small."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", models='["m"]', extra=NO_PROBES)
            + "[server]\nmax_body_bytes = 2000000\n"
        )
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(gw.url + CHAT, json={"model": "x" * 1_000_000, "messages": [{"role": "user", "content": "hi"}]})
        await stop(gw)
    assert r.status_code == 400 and api_error_problem(CHAT, r.content) is None
    (record,) = read_records(gw)
    assert len(json.dumps(record)) < 64 * 1024


# --- upstreams that misbehave in ways the mock cannot -------------------------------------------


def _head(content_type: bytes, *, length: int | None = None, chunked: bool = True) -> bytes:
    framing = b"content-length: %d\r\n" % length if length is not None else b"transfer-encoding: chunked\r\n" if chunked else b""
    return b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\n%sconnection: close\r\n\r\n" % (content_type, framing)


def _sse(delta: bytes, finish: bytes = b"null") -> bytes:
    return (
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":%s,"finish_reason":%s}]}\n\n' % (delta, finish)
    )


HI, THERE, STOP = _sse(b'{"content":"Hi"}'), _sse(b'{"content":" there"}'), _sse(b"{}", b'"stop"')
ERROR_200 = b'{"error":{"message":"the model is overloaded","type":"server_error","param":null,"code":503}}'
WHOLE = b'{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}]}'
PARTIAL_SSE = b'data: {"id":"c1","object":"chat.compl'
SSE_ERROR = b'data: {"error":{"message":"the model crashed"}}\n\n'
NDJSON_LINE = b'{"model":"m","created_at":"2026-01-01T00:00:00Z","message":{"role":"assistant","content":"Hi"},"done":false}\n'
NDJSON_DONE = b'{"model":"m","created_at":"2026-01-01T00:00:01Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","eval_count":1}'

#: model name → the scripted upstream's whole answer (it closes the connection after).
SCRIPTS: dict[str, bytes] = {
    "error-200": _head(b"application/json", length=len(ERROR_200)) + ERROR_200,
    "error-event": _head(b"text/event-stream") + _chunked(b'data: {"error":{"message":"the model is overloaded"}}\n\n'),
    "plain-sse": _head(b"text/plain") + _chunked(HI, STOP, b"data: [DONE]\n\n"),
    "plain-text": _head(b"text/plain") + _chunked(b"this is not an event stream\n"),
    "finish-no-done": _head(b"text/event-stream") + _chunked(HI, STOP),
    "finish-no-done-close": _head(b"text/event-stream", chunked=False) + HI + STOP,
    # Chunked, closed after the finish_reason (or after [DONE]) without the last chunk.
    "finish-cut-chunked": _head(b"text/event-stream") + b"%x\r\n%s\r\n" % (len(HI + STOP), HI + STOP),
    "finish-line-cut-chunked": _head(b"text/event-stream") + b"%x\r\n%s\r\n" % (len(HI + STOP[:-1]), HI + STOP[:-1]),
    "done-cut-chunked": _head(b"text/event-stream") + b"%x\r\n%s\r\n" % (len(HI + STOP + b"data: [DONE]\n\n"), HI + STOP + b"data: [DONE]\n\n"),
    "no-finish": _head(b"text/event-stream") + _chunked(HI, THERE),
    "no-finish-close": _head(b"text/event-stream", chunked=False) + HI + THERE,
    "json-for-a-stream": _head(b"application/json", length=len(WHOLE)) + WHOLE,
    "ndjson-no-done": _head(b"application/x-ndjson") + _chunked(NDJSON_LINE, NDJSON_LINE),
    # A stream sent whole, with its length (a server or proxy that buffers it): finished, and with an error event.
    "sse-with-length": _head(b"text/event-stream", length=len(HI + STOP + b"data: [DONE]\n\n")) + HI + STOP + b"data: [DONE]\n\n",
    "sse-error-with-length": _head(b"text/event-stream", length=len(HI + SSE_ERROR)) + HI + SSE_ERROR,
    # A done line without its newline (a client reading lines gets it all the same).
    "ndjson-done-no-newline": _head(b"application/x-ndjson") + _chunked(NDJSON_LINE, NDJSON_DONE),
    # Cut in the middle of an event: close-delimited (a clean EOF), and chunked without its last chunk.
    "cut-mid-event": _head(b"text/event-stream", chunked=False) + HI + PARTIAL_SSE,
    "cut-mid-event-chunked": _head(b"text/event-stream") + b"%x\r\n%s\r\n" % (len(HI + PARTIAL_SSE), HI + PARTIAL_SSE),
    "ndjson-cut-mid-line": _head(b"application/x-ndjson", chunked=False) + NDJSON_LINE + NDJSON_LINE[:30],
    # Cut after the first data line of an event with two (whole lines, a broken event).
    "cut-mid-multiline-event": _head(b"text/event-stream", chunked=False) + HI + b'data: {"id":"c1",\n',
    # A whole last line without its newline, not the done one: it went out, then the error.
    "ndjson-whole-line-then-eof": _head(b"application/x-ndjson", chunked=False) + NDJSON_LINE + NDJSON_LINE.strip(),
    # A server that ignores "stream" and answers chunked JSON: relayed as it comes, then the error.
    "json-chunked-for-a-stream": _head(b"application/json") + _chunked(WHOLE),
}


async def read_request(stream: trio.SocketStream) -> tuple[bytes, bytes] | None:
    """One request's head and its Content-Length body, as a scripted upstream reads them (None: closed first)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        if not (data := await stream.receive_some()):
            return None
        buffer += data
    head, _, body = buffer.partition(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    while len(body) < (lengths[0] if lengths else 0):
        if not (data := await stream.receive_some()):
            return None
        body += data
    return head, body


async def serve_scripted(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """An upstream that answers each request with ``SCRIPTS[its model]``, then closes."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            if (request := await read_request(stream)) is not None:
                await stream.send_all(SCRIPTS[json.loads(request[1])["model"]])

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


def sse_events(body: bytes) -> list[str]:
    """The data of each event, as an SSE client (the WHATWG algorithm) sees the stream."""
    events, data = [], []
    for raw in body.split(b"\n"):
        line = raw.removesuffix(b"\r").decode("utf-8", "replace")
        if not line:
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events  # an event without its blank line is never dispatched


def ends_with_sse_error(body: bytes) -> bool:
    """The last event a client sees is a JSON error object."""
    events = sse_events(body)
    try:
        return bool(events) and isinstance(json.loads(events[-1])["error"]["message"], str)
    except (ValueError, KeyError, TypeError):
        return False


def ends_with_ndjson_error(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body.splitlines()[-1])["error"], str)
    except (ValueError, KeyError, TypeError, IndexError):
        return False


async def _scripted_gateway(nursery: trio.Nursery, start_mock: StartMock, start_gateway: StartGateway) -> RunningServer:
    port = await nursery.start(serve_scripted)
    fallback = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
    return await start_gateway(
        upstream_toml("scripted", f"http://127.0.0.1:{port}", kind="ollama", extra="priority = 0\n" + NO_PROBES)
        + upstream_toml("fallback", f"http://127.0.0.1:{fallback.port}", kind="ollama", extra="priority = 1\n" + NO_PROBES)
    )


async def test_an_upstream_that_echoes_its_api_key_does_not_get_it_into_the_usage_log(
    nursery: trio.Nursery, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream's error (an SSE error event mid-stream; an error object in a 200 whole answer; a 401)
    that quotes the Authorization header it received: the usage record's ``error`` keeps its words but
    not the key (telemetry.md: never a header). A passed-through error status's body loses the key too;
    a 200's bytes (a relayed answer) go to the client as they came."""
    key = "sk-S16-ECHOED-SECRET"
    monkeypatch.setenv("S16_UPSTREAM_KEY", key)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            if (request := await read_request(stream)) is None:
                return
            head, buffer = request
            auth = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"authorization"))
            error = b'{"error":{"message":"upstream blew up with key %s"}}' % auth
            if b'"early"' in buffer:  # an error event before any content: a failed attempt, the client gets a 502
                await stream.send_all(_head(b"text/event-stream", chunked=False) + b"data: " + error + b"\n\n")
            elif b'"deny"' in buffer or b'"fail"' in buffer:  # an error status (failed over on: 500), passed through
                status = b"401 Unauthorized" if b'"deny"' in buffer else b"500 Internal Server Error"
                await stream.send_all(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
                                      b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, len(error), error))
            elif b'"stream": true' in buffer or b'"stream":true' in buffer:
                await stream.send_all(_head(b"text/event-stream", chunked=False) + HI + b"data: " + error + b"\n\n")
            else:
                await stream.send_all(_head(b"application/json", length=len(error)) + error)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(30):
        gw = await start_gateway(upstream_toml("echo", f"http://127.0.0.1:{port}", extra='api_key_env = "S16_UPSTREAM_KEY"\n' + NO_PROBES))
        async with httpx.AsyncClient(timeout=30) as client:
            streamed = await client.post(gw.url + CHAT, json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            whole = await client.post(gw.url + CHAT, json={"model": "m", "stream": False, "messages": [{"role": "user", "content": "hi"}]})
            denied = await client.post(gw.url + CHAT, json={"model": "deny", "messages": [{"role": "user", "content": "hi"}]})
            failed = await client.post(gw.url + CHAT, json={"model": "fail", "messages": [{"role": "user", "content": "hi"}]})
            early = await client.post(gw.url + CHAT, json={"model": "early", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        await stop(gw)
    assert key.encode() in streamed.content and key.encode() in whole.content  # (relayed as the upstream sent it)
    # An error status's body is passed through whole, but without the operator's key in it.
    assert denied.status_code == 401 and key.encode() not in denied.content
    assert denied.json()["error"]["message"] == "upstream blew up with key Bearer ***"
    assert failed.status_code == 500 and failed.json()["error"]["message"] == "upstream blew up with key Bearer ***"
    records = read_records(gw)
    assert early.status_code == 502 and key.encode() not in early.content and b"Bearer ***" in early.content
    assert [(r["outcome"], r["status"]) for r in records] == [
        ("upstream_error", 200), ("upstream_error", 200), ("ok", 401), ("upstream_error", 500), ("upstream_error", 502)]
    # The attempts: the two 200s won, then their answers were errors; 401 and 500 were passed through
    # as given (500 after failing over to nothing else); the early error event failed the attempt.
    assert [[(a["outcome"], a["status"]) for a in r["attempts"]] for r in records] == [
        [("broke", 200)], [("broke", 200)], [("client_error", 401)], [("status", 500)], [("protocol_error", 200)]]
    assert all("blew up with key Bearer ***" in r["error"] for r in records[:2]), [r["error"] for r in records]
    log_text = "".join(p.read_text() for p in Path(gw.services.config.telemetry.dir).glob("usage-*.jsonl"))
    assert key not in log_text


def test_a_short_placeholder_key_is_not_searched_for_in_upstream_text() -> None:
    """A key like "ollama" or "test" (a placeholder, no secret) would turn up inside words and JSON:
    it is left alone; a real key is replaced wherever it appears."""
    from trioproxy.upstream import MIN_REDACTED_KEY, UpstreamRuntime

    def runtime(key: bytes) -> UpstreamRuntime:
        return UpstreamRuntime(cfg=None, pool=None, auth_headers=[(b"authorization", b"Bearer " + key)],  # type: ignore[arg-type]
                               breaker=None, gate=None)  # type: ignore[arg-type]

    body = b'{"error":{"message":"try `ollama pull qwen`","param":null}}'
    assert runtime(b"ollama").redact_body(body) == body and runtime(b"null").redact(body.decode()) == body.decode()
    secret = b"k" * MIN_REDACTED_KEY
    assert runtime(secret).redact_body(b"bad key " + secret) == b"bad key ***"


async def test_upstream_misbehaviour_the_mock_cannot_script(
    nursery: trio.Nursery, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """Policy, per case (a fallback upstream stands behind the scripted one):

    - an SSE error event before any content: a failed attempt, failed over; the client never sees it;
    - a stream under a wrong content type (text/plain) is relayed as it is, content type included:
      complete if it is a complete stream, else ended with an SSE error event;
    - a stream that sent its finish_reason but closes without ``[DONE]`` (chunked or close-delimited)
      is complete: relayed as sent, no error added; so is a chunked one cut after its ``[DONE]``,
      before its last chunk; one cut after its finish_reason but before ``[DONE]`` ends with the error
      (its framing broke, and another choice or the usage event may be missing);
    - a stream that closes before any finish_reason ends with an in-band error event (SSE or NDJSON);
    - a whole JSON answer to a streaming request (a server that ignores ``stream``) is relayed whole.

    Surprising, noted for the lead: a stream that ends cleanly before any content (``plain-text``) wins
    the race (nothing was sent to the client yet, yet it is not failed over) and the client gets a 200
    with an in-band error.
    """
    with trio.fail_after(30):
        gw = await _scripted_gateway(nursery, start_mock, start_gateway)

        async def post(path: str, model: str, stream: bool) -> httpx.Response:
            return await client.post(gw.url + path, json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})

        async with httpx.AsyncClient(timeout=30) as client:
            error_event = await post(CHAT, "error-event", True)
            plain_sse = await post(CHAT, "plain-sse", True)
            plain_text = await post(CHAT, "plain-text", True)
            finished = [await post(CHAT, m, True) for m in ("finish-no-done", "finish-no-done-close")]
            finish_cut = await post(CHAT, "finish-cut-chunked", True)
            finish_line_cut = await post(CHAT, "finish-line-cut-chunked", True)
            done_cut = await post(CHAT, "done-cut-chunked", True)
            unfinished = [await post(CHAT, m, True) for m in ("no-finish", "no-finish-close")]
            json_for_stream = await post(CHAT, "json-for-a-stream", True)
            ndjson_unfinished = await post(OLLAMA_CHAT, "ndjson-no-done", True)
            ndjson_done_no_newline = await post(OLLAMA_CHAT, "ndjson-done-no-newline", True)
        await stop(gw)
    records = records_by_id(gw)

    def record(r: httpx.Response) -> dict[str, Any]:
        return records[r.headers["x-request-id"]]

    assert len(records) == 13
    assert error_event.status_code == 200 and error_event.headers["x-trioproxy-upstream"] == "fallback"
    assert error_event.content.endswith(b"data: [DONE]\n\n")
    assert [(a["upstream"], a["outcome"]) for a in record(error_event)["attempts"]] == [
        ("scripted", "protocol_error"),
        ("fallback", "ok"),
    ]
    assert plain_sse.headers["content-type"] == "text/plain" and plain_sse.content == HI + STOP + b"data: [DONE]\n\n"
    assert record(plain_sse)["outcome"] == "ok" and record(plain_sse)["finish_reason"] == "stop"
    assert plain_text.status_code == 200 and plain_text.content.startswith(b"this is not an event stream\n")
    assert ends_with_sse_error(plain_text.content)
    assert record(plain_text)["outcome"] == "upstream_error"
    for r in finished:
        assert r.status_code == 200 and r.content == HI + STOP, r.content
        assert record(r)["outcome"] == "ok" and record(r)["finish_reason"] == "stop"
    assert done_cut.content == HI + STOP + b"data: [DONE]\n\n" and record(done_cut)["outcome"] == "ok"
    # Cut after the finish event (or inside it) but before [DONE]: broken framing, and the answer
    # may lack a choice or its usage; the client gets the finished events, then the error.
    assert finish_cut.content.startswith(HI + STOP) and ends_with_sse_error(finish_cut.content)
    assert finish_line_cut.content.startswith(HI) and b"stop" not in finish_line_cut.content
    assert ends_with_sse_error(finish_line_cut.content)
    assert record(finish_cut)["outcome"] == record(finish_line_cut)["outcome"] == "upstream_error"
    for r in unfinished:
        assert r.status_code == 200 and r.content.startswith(HI + THERE)
        assert ends_with_sse_error(r.content) and b"incomplete" in r.content
        assert record(r)["outcome"] == "upstream_error"
    assert json_for_stream.headers["content-type"] == "application/json" and json_for_stream.content == WHOLE
    assert record(json_for_stream)["outcome"] == "ok"
    lines = ndjson_unfinished.content.splitlines()
    assert lines[:2] == [NDJSON_LINE.strip()] * 2 and ends_with_ndjson_error(ndjson_unfinished.content)
    assert record(ndjson_unfinished)["outcome"] == "upstream_error"
    assert ndjson_done_no_newline.content == NDJSON_LINE + NDJSON_DONE  # as it came, no error line after it
    assert record(ndjson_done_no_newline)["outcome"] == "ok" and record(ndjson_done_no_newline)["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("path", "model", "include_usage"),
    [
        (CHAT, "cut-mid-event", False),
        (CHAT, "cut-mid-event-chunked", True),
        (CHAT, "cut-mid-multiline-event", False),
        (OLLAMA_CHAT, "ndjson-cut-mid-line", False),
    ],
)
async def test_a_stream_cut_mid_event_still_ends_with_a_readable_error(
    nursery: trio.Nursery,
    start_mock: StartMock,
    start_gateway: StartGateway,
    path: str,
    model: str,
    include_usage: bool,
) -> None:
    """The mock only cuts between events; a real server (or a reset) can cut anywhere. What the client
    gets must still parse: whole events (lines), then the gateway's error. The broken line is not
    relayed: a line-framed stream goes out a whole line at a time (``relay.pump``), and the usage
    filter's held line is dropped on the error path. (The gateway used to end the broken line and
    append the error: an SSE client then had an event ``{"id":"c1","object":"chat.compl``, and the
    openai SDK and the ollama client raised a JSON decode error instead of the gateway's message.)

    A close-delimited cut is a clean EOF; a chunked body without its last chunk raises. With
    ``include_usage`` asked by the client, the usage filter is off and the relay holds the line itself."""
    body: dict[str, Any] = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with trio.fail_after(30):
        gw = await _scripted_gateway(nursery, start_mock, start_gateway)
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(gw.url + path, json=body)
        await stop(gw)
    (record,) = read_records(gw)
    assert r.status_code == 200 and record["outcome"] == "upstream_error"
    if path == OLLAMA_CHAT:
        lines = r.content.splitlines()
        assert [json.loads(line) for line in lines[:-1]] == [json.loads(NDJSON_LINE)]
        assert ends_with_ndjson_error(r.content), r.content[-200:]
    else:
        events = sse_events(r.content)
        assert [json.loads(e) for e in events[:-1]] == [json.loads(HI[6:])]  # the whole event, then the error
        assert ends_with_sse_error(r.content), r.content[-200:]


async def test_what_waits_for_its_end_is_relayed_when_it_is_whole_or_not_framed(
    nursery: trio.Nursery, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """The hold-back keeps only a broken event or line from the client: an NDJSON line that is whole
    but lacks its newline at the end goes out before the error; a JSON answer (chunked) to a stream
    request, which is not framed in events, goes out as it comes, then the error."""
    with trio.fail_after(30):
        gw = await _scripted_gateway(nursery, start_mock, start_gateway)
        async with httpx.AsyncClient(timeout=30) as client:
            ndjson = await client.post(gw.url + OLLAMA_CHAT, json={"model": "ndjson-whole-line-then-eof", "messages": [{"role": "user", "content": "hi"}]})
            chunked_json = await client.post(gw.url + CHAT, json={"model": "json-chunked-for-a-stream", "stream": True,
                                                                  "messages": [{"role": "user", "content": "hi"}]})
        await stop(gw)
    lines = ndjson.content.splitlines()
    assert [json.loads(line) for line in lines[:2]] == [json.loads(NDJSON_LINE)] * 2 and ends_with_ndjson_error(ndjson.content)
    assert chunked_json.content.startswith(WHOLE) and ends_with_sse_error(chunked_json.content)


async def test_the_sdks_read_the_error_of_a_stream_cut_mid_line(
    nursery: trio.Nursery, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """The same cut, read by the clients we did not write: each raises its API error with the gateway's
    message (not a JSON decode error), after the content that came whole."""
    import ollama
    import openai

    with trio.fail_after(30):
        gw = await _scripted_gateway(nursery, start_mock, start_gateway)

        def read() -> tuple[str, BaseException | None, str, BaseException | None]:
            sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
            text, sdk_error = "", None
            try:
                for chunk in sdk.chat.completions.create(model="cut-mid-event", messages=[{"role": "user", "content": "hi"}], stream=True):
                    text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            except Exception as exc:
                sdk_error = exc
            client = ollama.Client(host=gw.url)
            said, ollama_error = "", None
            try:
                for part in client.chat(model="ndjson-cut-mid-line", messages=[{"role": "user", "content": "hi"}], stream=True):
                    said += part.message.content or ""
            except Exception as exc:
                ollama_error = exc
            return text, sdk_error, said, ollama_error

        text, sdk_error, said, ollama_error = await trio.to_thread.run_sync(read)
        await stop(gw)
    assert text == "Hi" and isinstance(sdk_error, openai.APIError), repr(sdk_error)
    assert "the answer is incomplete" in str(sdk_error)
    assert said == "Hi" and isinstance(ollama_error, ollama.ResponseError), repr(ollama_error)
    assert "the answer is incomplete" in str(ollama_error)


async def test_a_stream_sent_whole_with_its_length_is_read_as_a_stream(
    nursery: trio.Nursery, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """An event stream that comes with a Content-Length is read whole (not relayed piece by piece), but it
    is still a stream: its record has its end, its TTFT and tokens, and an error event in it (it said
    ``ok`` with no error, no TTFT, no tokens); the usage the gateway asked for does not reach a client
    that did not ask (the mock's usage chunk is absent here, so the bytes go out as they came)."""
    with trio.fail_after(30):
        gw = await _scripted_gateway(nursery, start_mock, start_gateway)
        async with httpx.AsyncClient(timeout=30) as client:
            whole = await client.post(gw.url + CHAT, json={"model": "sse-with-length", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            failed = await client.post(gw.url + CHAT, json={"model": "sse-error-with-length", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        await stop(gw)
    records = records_by_id(gw)
    ok, bad = records[whole.headers["x-request-id"]], records[failed.headers["x-request-id"]]
    assert whole.content == HI + STOP + b"data: [DONE]\n\n" and failed.content == HI + SSE_ERROR
    assert (ok["outcome"], ok["stream"], ok["finish_reason"], ok["token_source"]) == ("ok", True, "stop", "estimate")
    assert ok["ttft_ms"] is not None and ok["completion_tokens"] >= 1
    assert bad["outcome"] == "upstream_error" and "the model crashed" in bad["error"]
    assert [a["outcome"] for a in bad["attempts"]] == ["broke"]


async def test_a_200_with_an_error_body_is_recorded_as_an_error(
    nursery: trio.Nursery, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """What the client gets is the upstream's answer as it gave it (200, the error body): the gateway is not
    the judge of a 200. But the record says ``ok`` with no error, so the usage log hides an upstream
    that is failing. Either fix passes: the record says ``upstream_error`` (with the message), or the
    attempt counts as failed and is failed over."""
    with trio.fail_after(30):
        gw = await _scripted_gateway(nursery, start_mock, start_gateway)
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(gw.url + CHAT, json={"model": "error-200", "messages": [{"role": "user", "content": "hi"}]})
        await stop(gw)
    (record,) = read_records(gw)
    assert r.status_code == 200
    failed_over = r.headers["x-trioproxy-upstream"] == "fallback" and answer_problem(CHAT, r.content) is None
    assert failed_over or (record["outcome"] == "upstream_error" and "overloaded" in (record["error"] or ""))


# --- property tests: parsing and routing (sans-IO) --------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12
)


@given(st.one_of(st.binary(max_size=300), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
@example(b"[" * 100_000)
@example(b'"\\ud800"')
@example(b"\xef\xbb\xbf{}")
def test_decode_json_returns_an_object_or_raises_request_error(body: bytes) -> None:
    try:
        doc = _decode_json(body)
    except RequestError as exc:
        assert exc.status_hint == 400 and exc.message
    else:
        assert isinstance(doc, dict)


@pytest.mark.parametrize(
    ("body", "kind"),
    [(b"null", "null"), (b"[1]", "an array"), (b'"x"', "a string"), (b"true", "a boolean"), (b"3", "a number"),
     (b"2.5", "a number")],
)
def test_a_body_that_is_not_an_object_is_named_in_json_terms(body: bytes, kind: str) -> None:
    with pytest.raises(RequestError) as refused:
        _decode_json(body)
    assert refused.value.message == f"The request body must be a JSON object, not {kind}."
    with pytest.raises(RequestError) as exact:
        _decode_json(body, exact=True)
    assert exact.value.message == refused.value.message


@given(st.dictionaries(st.sampled_from(["model", "stream", "messages"]), JSON_VALUES))
def test_model_is_a_non_empty_string_or_a_request_error(doc: dict[str, Any]) -> None:
    try:
        model = _model(doc)
    except RequestError as exc:
        assert exc.param == "model" and exc.status_hint == 400
    else:
        assert isinstance(model, str) and model and model == doc["model"]


ROUTING_PROFILE = """
[[upstreams]]
id = "a"
base_url = "http://127.0.0.1:1"
models = ["llama*", "exact-model", "q?n", "[abc]*", "ünï*"]
[[upstreams]]
id = "b"
kind = "ollama"
base_url = "http://127.0.0.1:2"
priority = 1
weight = 3
[[upstreams]]
id = "c"
kind = "ollama"
base_url = "http://127.0.0.1:3"
models = "discover"
[routing]
max_attempts = 2
aliases = { fast = "exact-model", "*" = "llama3" }
[[routes]]
model = "route-exact"
targets = [{ upstream = "a" }, { upstream = "b", model = "other" }]
[[routes]]
model = "gpt-*"
targets = [{ upstream = "c", model = "x" }, { upstream = "a" }]
"""
ROUTING_CONFIG = load_config(ROUTING_PROFILE, source="routing-fuzz")
MODEL_NAMES = st.one_of(
    st.text(),
    st.sampled_from(["", "*", "?", "[", "[!]", "[]", "gpt-*", "gpt-4", "llama[", "fast", "route-exact", "ünïcode", "\x00"]),
    st.text(alphabet="*?[]!-^\\ab", max_size=30),
    st.integers(1_000, 50_000).map(lambda n: "llama" + "x" * n),
)
STATES = st.fixed_dictionaries(
    {},
    optional={
        uid: st.builds(
            UpstreamState,
            healthy=st.booleans(),
            available=st.booleans(),
            in_flight=st.integers(0, 50),
            saturated=st.booleans(),
            discovered=st.none() | st.frozensets(st.text(max_size=10) | st.sampled_from(["llama3", "x"]), max_size=4),
        )
        for uid in ("a", "b", "c")
    },
)


@given(model=MODEL_NAMES, family=st.sampled_from(["openai", "ollama"]), states=STATES, rr=st.integers(0, 2**40))
@settings(max_examples=300)
def test_plan_route_returns_a_plan_or_raises_routing_error(
    model: str, family: Any, states: dict[str, UpstreamState], rr: int
) -> None:
    try:
        plan = plan_route(model, family, ROUTING_CONFIG, states, rr=rr)
    except RoutingError as exc:
        assert type(exc) is RoutingError and exc.status_hint == 404 and isinstance(exc.message, str)
        return
    assert isinstance(plan, RoutePlan)
    assert 1 <= len(plan.attempts) <= ROUTING_CONFIG.routing.max_attempts
    for target in plan.attempts:
        upstream = ROUTING_CONFIG.upstream(target.upstream)
        assert isinstance(target.model, str)
        assert family == "openai" or upstream.speaks_ollama


# --- property test: the ASGI app in process ----------------------------------------------------


@pytest.fixture(scope="module")
def refused_port() -> Iterator[int]:
    """A loopback port bound but never listened on: every connect is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def fuzz_config(port: int) -> Config:
    return load_config(
        upstream_toml("u", f"http://127.0.0.1:{port}", kind="ollama", models='["m", "llama*"]', extra=NO_PROBES)
        + "[server]\nmax_body_bytes = 2000\n[routing]\naliases = { fast = \"m\" }\n",
        source="asgi-fuzz",
    )


CLIENT_KEY = "sk-fuzz"
KEYS = Auth(keys=(AuthKey(id="fuzz", key_sha256=digest(CLIENT_KEY)),))

#: Internal errors (500 "internal gateway error") with a known cause, each pinned by an xfail above;
#: remove an entry when its bug is fixed, so the fuzz catches it coming back. Matched in the operator
#: log: the record only says "internal gateway error" (``_send_error`` overwrites the cause).
KNOWN_INTERNAL_ERRORS = ("UnicodeEncodeError",)  # test_a_lone_surrogate_escape_is_relayed_or_refused_cleanly

HEADER_VALUE = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c not in b"\r\n\x00").strip())
HEADERS = st.lists(
    st.one_of(
        st.tuples(st.just(b"content-length"), st.integers(0, 10**20).map(lambda n: str(n).encode())),
        st.tuples(st.just(b"authorization"), st.sampled_from([b"Bearer " + CLIENT_KEY.encode(), b"Bearer nope", b""]) | HEADER_VALUE),
        st.tuples(
            st.sampled_from([b"content-type", b"connection", b"x-request-id", b"host", b"expect", b"cookie", b"x-mock-fault"]),
            HEADER_VALUE,
        ),
        st.tuples(st.text("abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=12).map(str.encode), HEADER_VALUE),
    ),
    max_size=6,
)
SURROGATE_TEXT = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
REQUEST_DOCS = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m", "fast", "llama3", "nope", ""]) | JSON_VALUES | SURROGATE_TEXT,
        "stream": st.booleans() | JSON_VALUES,
        "messages": JSON_VALUES | SURROGATE_TEXT,
        "stream_options": JSON_VALUES,
    },
)
BODIES = st.one_of(
    st.binary(max_size=2500),
    REQUEST_DOCS.map(lambda d: json.dumps(d).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
)
PATHS = st.sampled_from(sorted(ROUTES)) | st.text(max_size=20).map(lambda s: "/" + s)
METHODS = st.sampled_from(["POST", "GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
#: Half the examples look like real requests (a relayed POST route, a routable model, a boolean stream),
#: so that the deep paths (routing, body rewriting, the race) get as much of the fuzz as the edges.
PLAUSIBLE = st.tuples(
    st.just("POST"),
    st.sampled_from(sorted(p for p, r in ROUTES.items() if r.method == "POST")),
    st.fixed_dictionaries(
        {"model": st.sampled_from(["m", "fast", "llama3", "llama\u00e9"]), "stream": st.booleans()},
        optional={"messages": JSON_VALUES | SURROGATE_TEXT, "stream_options": JSON_VALUES},
    ).map(lambda d: json.dumps(d).encode()),
)
REQUESTS = PLAUSIBLE | st.tuples(METHODS, PATHS, BODIES)
SURROGATE_STREAM = (CHAT, json.dumps({"model": "m", "stream": True, "messages": "\ud800"}).encode())


@attrs.frozen
class AppRun:
    sent: list[dict[str, Any]]
    records: list[Record]
    dropped: int
    #: Operator log lines at ERROR and above (an internal error names its exception type there only).
    errors_logged: list[str]


def run_app(port: int, scope: dict[str, Any], messages: list[dict[str, Any]], *, auth: bool) -> AppRun:
    """One request through a fresh ``ProxyApp`` (services as ``server.main`` builds them, the sink on a
    memory channel), driven by a ~10-line ASGI client: ``receive`` pops the scripted messages, then
    waits (the client stays connected) until the app is done."""

    async def main() -> tuple[list[dict[str, Any]], list[Record], int]:
        records_send, records_recv = trio.open_memory_channel[Record](16)
        sink = TelemetrySink(records_send)
        config = fuzz_config(port)
        async with httpx.AsyncClient() as http:
            runtimes = build_runtimes(config)
            services = Services(
                config=config,
                runtimes=runtimes,
                sink=sink,
                http=http,
                board=HealthBoard(rise={"u": 1}, fall={"u": 1}),
                hedge_budget=HedgeBudget(percent=config.routing.hedge_budget_percent),
                keys=KeyTable.from_config(KEYS if auth else Auth()),
            )
            pending, sent, done = list(messages), [], trio.Event()

            async def receive() -> dict[str, Any]:
                if pending:
                    return pending.pop(0)
                await done.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            try:
                with trio.fail_after(10):
                    await ProxyApp(services)(scope, receive, send)
            finally:
                done.set()
                for runtime in runtimes.values():
                    await runtime.pool.aclose()
        sink.close()
        records = [record async for record in records_recv]
        return sent, records, sink.statistics().dropped

    errors_logged: list[str] = []
    sink_id = logger.add(errors_logged.append, level="ERROR", format="{message}")
    try:
        sent, records, dropped = trio.run(main)
    finally:
        logger.remove(sink_id)
    return AppRun(sent, records, dropped, errors_logged)


@given(
    request=REQUESTS,
    query=st.sampled_from([b"", b"a=1", b"x=%00&y=../../etc", b"@evil.example"]),
    headers=HEADERS,
    cuts=st.lists(st.integers(0, 2500), max_size=3),
    client_leaves=st.booleans(),
    auth=st.booleans(),
)
@example(request=("POST", *SURROGATE_STREAM), query=b"", headers=[], cuts=[], client_leaves=False, auth=False)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_app_answers_once_in_json_and_records_once_whatever_comes_in(
    refused_port: int,
    request: tuple[str, str, bytes],
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    cuts: list[int],
    client_leaves: bool,
    auth: bool,
) -> None:
    """Arbitrary methods, paths, headers and bodies (split anywhere; sometimes the client leaves before
    its body ends), with no upstream reachable: the app never raises; a client that stayed gets exactly
    one response start, a body ended once, JSON in the API's error format for errors; a client that
    left gets at most that; always exactly one record, whose status and id are the response's; and no
    500 but the known ones (the pinned example is one)."""
    method, path, body = request
    points = sorted({min(c, len(body)) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)])]
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1} for i, piece in enumerate(pieces)
    ]
    if client_leaves:
        messages[-1]["more_body"] = True
        messages.append({"type": "http.disconnect"})
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    run = run_app(refused_port, scope, messages, auth=auth)
    (record,) = run.records
    assert run.dropped == 0
    starts = [m for m in run.sent if m["type"] == "http.response.start"]
    bodies = [m for m in run.sent if m["type"] == "http.response.body"]
    if client_leaves and not starts:
        assert record.outcome == "client_disconnect" and record.status == 0
        return
    (start,) = starts
    assert run.sent[0] is start and 100 <= start["status"] <= 599
    assert [m.get("more_body", False) for m in bodies] == [True] * (len(bodies) - 1) + [False]
    content = b"".join(m.get("body", b"") for m in bodies)
    response_headers = dict(start["headers"])
    assert response_headers[b"x-request-id"].decode() == record.request_id
    assert record.status == start["status"]
    if b"content-length" in response_headers:
        assert int(response_headers[b"content-length"]) == len(content)
    if response_headers.get(b"content-type", b"").startswith(b"text/plain; version=0.0.4"):
        assert path == "/metrics" and start["status"] == 200  # Prometheus text
    elif path in DASHBOARD_FILES and start["status"] == 200:
        assert content == dashboard_file(path)  # the dashboard's own files
    elif path == "/" and start["status"] == 200:
        assert content == b"Ollama is running"  # Ollama's liveness answer
    else:
        json.loads(content)  # every other answer here is JSON: errors, local routes
    if start["status"] >= 400:
        assert api_error_problem(path, content) is None
    if start["status"] == 500:
        assert any(name in line for line in run.errors_logged for name in KNOWN_INTERNAL_ERRORS), run.errors_logged


def test_the_app_never_answers_an_internal_error(refused_port: int) -> None:
    """The minimal example the fuzz finds for the known internal error, pinned: it must be a clean 4xx or
    the upstream's answer (here: 503, nobody reachable), never a 500."""
    path, body = SURROGATE_STREAM
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
    }
    run = run_app(refused_port, scope, [{"type": "http.request", "body": body, "more_body": False}], auth=False)
    assert run.sent[0]["status"] == 503, run.sent



def _internal_error_run(refused_port: int, monkeypatch: pytest.MonkeyPatch) -> AppRun:
    def broken_plan(*args: object) -> None:
        raise RuntimeError("a bug in the gateway")

    monkeypatch.setattr("trioproxy.app._plan", broken_plan)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": CHAT, "raw_path": CHAT.encode(), "query_string": b"", "root_path": "", "headers": [],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
    }
    return run_app(refused_port, scope, [{"type": "http.request", "body": body, "more_body": False}], auth=False)


def test_an_unexpected_exception_is_a_500_in_the_api_format_with_one_record(
    refused_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one broad boundary in ``app.py``: a bug becomes a 500 in the API's format (no traceback to the
    client), is logged with its type, and the request still has its one record."""
    run = _internal_error_run(refused_port, monkeypatch)
    start, end = run.sent
    assert start["status"] == 500 and end["more_body"] is False
    assert api_error_problem(CHAT, end["body"]) is None and b"a bug in the gateway" not in end["body"]
    assert any("RuntimeError" in line for line in run.errors_logged)
    (record,) = run.records
    assert record.status == 500 and record.outcome == "upstream_error"


def test_an_internal_error_record_names_the_exception_type(refused_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _internal_error_run(refused_port, monkeypatch)
    (record,) = run.records
    assert "RuntimeError" in (record.error or "")
