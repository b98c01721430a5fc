"""Which headers cross the gateway, each way [sans-IO].

Names are lowercased bytes throughout (ASGI gives them so; the pool's parser too).

Client → upstream: end-to-end headers pass (``user-agent``, ``x-stainless-*``, a
test's ``x-mock-*`` ...). Dropped: hop-by-hop headers and any named in
``Connection``; ``host`` and ``content-length`` (the pool writes its own);
``authorization`` (the client's key is for the gateway, never for the upstream:
the upstream gets its own key from ``api_key_env``); ``cookie``; ``content-type``,
replaced by ``application/json`` (every body relayed is JSON the gateway has
decoded); and ``accept-encoding``, replaced by ``identity`` so the stream
scanners see plain bytes.

Upstream → client: end-to-end headers pass (``content-type`` first of all).
Dropped: hop-by-hop, ``content-length`` of bodies we re-frame, ``date`` and
``server`` (Hypercorn writes its own date; the upstream's server banner is not
the caller's business), and the upstream's ``x-request-id`` (kept as
``x-upstream-request-id``: the gateway's own id is the one a client sees).
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

#: RFC 9110 §7.6.1 connection-specific fields, plus the pre-standard ones still seen in the wild.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"content-type",
    b"authorization",
    b"cookie",
    b"accept-encoding",
    b"expect",
}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"date", b"server"}


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def upstream_request_headers(
    client_headers: Iterable[tuple[bytes, bytes]], *, request_id: bytes, extra: Headers, json_body: bool = False
) -> Headers:
    """Headers to send upstream for a client's request.

    Args:
        client_headers: the ASGI scope's headers.
        request_id: the gateway's id for this request, passed on as ``x-request-id``.
        extra: the upstream's own headers (its ``authorization``), added last.
        json_body: the request has a body, which the gateway has decoded as JSON: it goes up as
            ``application/json`` whatever the client labelled it (``curl -d`` says form-urlencoded,
            and FastAPI-based servers such as vLLM refuse that).
    """
    client_headers = list(client_headers)
    named = _connection_tokens(client_headers)
    out = [
        (name, value)
        for name, value in client_headers
        if name not in _REQUEST_DROP and name not in named and name != b"x-request-id"
    ]
    if json_body:
        out.append((b"content-type", b"application/json"))
    out.append((b"accept-encoding", b"identity"))
    out.append((b"x-request-id", request_id))
    out.extend(extra)
    return out


def client_response_headers(
    upstream_headers: Iterable[tuple[bytes, bytes]], *, request_id: bytes, upstream_id: bytes, streamed: bool
) -> Headers:
    """Headers to send the client for a relayed response.

    A streamed body is re-framed by Hypercorn (chunked), so ``content-length`` is
    dropped there and ``cache-control: no-cache`` / ``x-accel-buffering: no`` are
    added so that a proxy in front does not hold the stream back. A non-streamed
    body is sent whole; the caller adds its ``content-length``.
    """
    upstream_headers = list(upstream_headers)
    named = _connection_tokens(upstream_headers)
    out: Headers = []
    for name, value in upstream_headers:
        if name in _RESPONSE_DROP or name in named:
            continue
        if name == b"x-request-id":
            out.append((b"x-upstream-request-id", value))
        elif streamed and name in (b"cache-control", b"x-accel-buffering"):
            continue
        else:
            out.append((name, value))
    out.append((b"x-request-id", request_id))
    out.append((b"x-trioproxy-upstream", upstream_id))
    if streamed:
        out.append((b"cache-control", b"no-cache"))
        out.append((b"x-accel-buffering", b"no"))
    return out


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None
