"""Sans-IO tests of the mock's HTTP/1.1 layer: parser splits, chunked bodies, limits, framing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.mockhttp import ParseError, Request, RequestParser, frame_chunk, response_head
from trioproxy.mockreply import Static


PIPELINE = (
    b"\r\nGET /api/version?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nX-Odd:  spaced \t\r\n\r\nhello"
    b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: yes\r\n\r\n"
    b"GET / HTTP/1.0\nConnection: keep-alive\n\n"
)


def _drain(parser: RequestParser) -> list[Request]:
    out = []
    for _ in range(10):  # bounded: PIPELINE holds 4 requests
        request = parser.next_request()
        if request is None:
            break
        out.append(request)
    return out


def _check_pipeline(requests: list[Request]) -> None:
    assert [(r.method, r.path, r.query, r.body) for r in requests] == [
        ("GET", "/api/version", "x=1", b""),
        ("POST", "/v1/chat/completions", "", b"hello"),
        ("POST", "/api/chat", "", b"abc0123456789"),
        ("GET", "/", "", b""),
    ]
    assert requests[1].headers == [("content-length", "5"), ("x-odd", "spaced")]
    assert [(r.http10, r.keep_alive) for r in requests] == [(False, True)] * 3 + [(True, True)]


@pytest.mark.parametrize("cut", range(len(PIPELINE) + 1))
def test_parser_is_independent_of_the_split(cut: int) -> None:
    parser = RequestParser()
    parser.feed(PIPELINE[:cut])
    requests = _drain(parser)
    parser.feed(PIPELINE[cut:])
    requests += _drain(parser)
    _check_pipeline(requests)
    assert parser.buffered == 0


def test_parser_byte_by_byte() -> None:
    parser = RequestParser()
    requests: list[Request] = []
    for i in range(len(PIPELINE)):
        parser.feed(PIPELINE[i : i + 1])
        requests += _drain(parser)
    _check_pipeline(requests)


@given(
    body=st.binary(max_size=300),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=20),
    splits=st.lists(st.integers(0, 400), max_size=6),
)
def test_chunked_bodies_any_chunking_any_split(body: bytes, sizes: list[int], splits: list[int]) -> None:
    chunks, i, k = [], 0, 0
    while i < len(body):
        size = sizes[k % len(sizes)]
        chunks.append(b"%x\r\n%b\r\n" % (size if i + size <= len(body) else len(body) - i, body[i : i + size]))
        i, k = i + size, k + 1
    wire = b"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n" + b"".join(chunks) + b"0\r\n\r\n"
    parser = RequestParser()
    got: list[Request] = []
    last = 0
    for cut in sorted({min(s, len(wire)) for s in splits} | {len(wire)}):
        parser.feed(wire[last:cut])
        last = cut
        got += _drain(parser)
    assert [r.body for r in got] == [body]


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nname : v\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: \x00\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET nope HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / FTP/1.1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: " + b"x" * 70_000, 431),
    ],
)
def test_malformed_requests(wire: bytes, status: int) -> None:
    parser = RequestParser()
    parser.feed(wire)
    with pytest.raises(ParseError) as info:
        parser.next_request()
    assert info.value.status == status


def test_chunked_body_limit() -> None:
    parser = RequestParser(max_body_bytes=10)
    parser.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n")
    with pytest.raises(ParseError) as info:
        parser.next_request()
    assert info.value.status == 413


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"GET / HTTP/1.1\r\nConnection: Close\r\n", False),
        (b"GET / HTTP/1.1\r\nConnection: upgrade, close\r\n", False),
        (b"GET / HTTP/1.0\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n", True),
    ],
)
def test_keep_alive_rules(head: bytes, keep_alive: bool) -> None:
    parser = RequestParser()
    parser.feed(head + b"\r\n")
    request = parser.next_request()
    assert request is not None and request.keep_alive is keep_alive


def test_expect_continue_is_offered_once_and_only_while_the_body_is_missing() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert parser.next_request() is None
    assert parser.take_continue() is True
    assert parser.take_continue() is False
    parser.feed(b"hi")
    request = parser.next_request()
    assert request is not None and request.body == b"hi"
    parser.feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")
    assert parser.next_request() is not None
    assert parser.take_continue() is False


def test_absolute_form_target() -> None:
    parser = RequestParser()
    parser.feed(b"GET http://h:1/api/tags?a=b HTTP/1.1\r\n\r\n")
    request = parser.next_request()
    assert request is not None and (request.path, request.query) == ("/api/tags", "a=b")


def test_response_framing() -> None:
    head = response_head(200, "text/event-stream", date=b"D", content_length=None, keep_alive=True, http10=False)
    assert head == (b"HTTP/1.1 200 OK\r\ndate: D\r\nserver: trioproxy-mock\r\ncontent-type: text/event-stream\r\n"
                    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
    head10 = response_head(200, "x/y", date=b"D", content_length=None, keep_alive=True, http10=True)
    assert b"transfer-encoding" not in head10 and head10.endswith(b"connection: close\r\n\r\n")
    assert frame_chunk(b"hello") == b"5\r\nhello\r\n"
    static = Static(404, "application/json", b"{}", (("retry-after", "1"),))
    assert static.render(date=b"D", keep_alive=False, http10=False) == (
        b"HTTP/1.1 404 Not Found\r\ndate: D\r\nserver: trioproxy-mock\r\ncontent-type: application/json\r\n"
        b"content-length: 2\r\nretry-after: 1\r\nconnection: close\r\n\r\n{}")
