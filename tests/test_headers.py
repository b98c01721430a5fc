"""Header filtering both ways, without sockets."""

from __future__ import annotations

from trioproxy.headers import client_response_headers, upstream_request_headers


def test_request_headers_drop_hop_by_hop_auth_and_encoding() -> None:
    client = [
        (b"host", b"gw"),
        (b"content-length", b"12"),
        (b"authorization", b"Bearer client-key"),
        (b"connection", b"keep-alive, x-secret-hop"),
        (b"x-secret-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"accept-encoding", b"gzip"),
        (b"cookie", b"a=b"),
        (b"x-request-id", b"client-chosen"),
        (b"user-agent", b"OpenAI/Python"),
        (b"x-stainless-lang", b"python"),
        (b"content-type", b"application/x-www-form-urlencoded"),
    ]
    out = upstream_request_headers(
        client, request_id=b"rid", extra=[(b"authorization", b"Bearer upstream-key")], json_body=True
    )
    assert out == [
        (b"user-agent", b"OpenAI/Python"),
        (b"x-stainless-lang", b"python"),
        (b"content-type", b"application/json"),
        (b"accept-encoding", b"identity"),
        (b"x-request-id", b"rid"),
        (b"authorization", b"Bearer upstream-key"),
    ]


def test_response_headers_streamed() -> None:
    upstream = [
        (b"content-type", b"text/event-stream"),
        (b"transfer-encoding", b"chunked"),
        (b"date", b"x"),
        (b"server", b"uvicorn"),
        (b"x-request-id", b"up-1"),
        (b"cache-control", b"private"),
    ]
    out = client_response_headers(upstream, request_id=b"rid", upstream_id=b"u", streamed=True)
    assert out == [
        (b"content-type", b"text/event-stream"),
        (b"x-upstream-request-id", b"up-1"),
        (b"x-request-id", b"rid"),
        (b"x-trioproxy-upstream", b"u"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    ]


def test_response_headers_whole_body_keep_upstream_cache_control() -> None:
    upstream = [(b"content-type", b"application/json"), (b"content-length", b"5"), (b"cache-control", b"private")]
    out = client_response_headers(upstream, request_id=b"rid", upstream_id=b"u", streamed=False)
    assert (b"cache-control", b"private") in out
    assert all(name != b"content-length" for name, _ in out)
