"""The sans-IO HTTP/1.1 parser and serializer: every split, h11 as the oracle, fuzzed."""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioproxy.http1 import (
    MAX_HEAD_SIZE,
    IncompleteMessage,
    ProtocolError,
    ResponseHead,
    ResponseParser,
    serialize_request,
)


@attrs.frozen
class Parsed:
    head: ResponseHead
    body: bytes
    pieces: list[bytes]
    trailers: list[tuple[bytes, bytes]]
    reusable: bool


def drive(parts: Iterable[bytes], *, head_request: bool = False, eof: bool = True) -> Parsed:
    """Feed ``parts`` one by one, polling after each as the pool does; EOF at the end.

    Once the head is parsed, a part goes in as the pool's body reads give it, ``feed_body``
    (its short path for a whole chunk, or ``feed`` and ``next_body_piece``)."""
    parser = ResponseParser(head_request=head_request)
    head: ResponseHead | None = None
    pieces: list[bytes] = []

    def poll() -> None:
        nonlocal head
        if head is None:
            head = parser.next_head()
            if head is None:
                return
        for _ in range(100_000):
            wants = parser.wants_bytes()  # (the relay's shortcut: it must mean "None now")
            piece = parser.next_body_piece()
            assert piece is None or not wants
            if not piece:
                return
            assert type(piece) is bytes
            pieces.append(piece)
        raise AssertionError("body pieces never ended")

    for part in parts:
        if head is not None and part:
            piece = parser.feed_body(part)
            if piece:
                assert type(piece) is bytes
                pieces.append(piece)
        else:
            parser.feed(part)
        poll()
    reusable = parser.reusable
    if eof:
        parser.feed_eof()
        poll()
    assert head is not None
    assert parser.complete
    return Parsed(head, b"".join(pieces), pieces, parser.trailers, reusable)


def h11_parse(data: bytes, *, head_request: bool = False) -> tuple[h11.Response, bytes, list[tuple[bytes, bytes]]]:
    """The same bytes through h11, the reference parser."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"HEAD" if head_request else b"GET", target=b"/", headers=[(b"host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    response: h11.Response | None = None
    body = b""
    for _ in range(10_000):
        event = conn.next_event()
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, body, list(event.headers)
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
    raise AssertionError("h11 did not finish the message")


def splits(data: bytes) -> Iterable[list[bytes]]:
    yield [data]
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]


# --- serialize_request ------------------------------------------------------------


def test_serialize_adds_host_and_length_and_drops_callers() -> None:
    out = serialize_request(
        b"POST",
        b"/v1/chat/completions",
        b"up:8000",
        [(b"Host", b"evil"), (b"content-length", b"1"), (b"Transfer-Encoding", b"chunked"), (b"x-a", b"1")],
        b'{"a":1}',
    )
    assert out == (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: up:8000\r\nx-a: 1\r\nContent-Length: 7\r\n\r\n" b'{"a":1}'
    )


def test_serialize_empty_body() -> None:
    assert serialize_request(b"GET", b"/", b"h", [], b"") == b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize(
    "method, target, host, headers",
    [
        (b"GET", b"/a\r\nX: y", b"h", []),
        (b"GET", b"/", b"h\r\nX: y", []),
        (b"GET", b"/", b"h", [(b"x", b"a\r\nEvil: 1")]),
        (b"GET", b"/", b"h", [(b"x\n", b"a")]),
        (b"GET", b"/", b"h", [(b"x", b"a\rb")]),
    ],
)
def test_serialize_rejects_crlf_injection(
    method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    with pytest.raises(ValueError):
        serialize_request(method, target, host, headers, b"body with\r\nnewlines is fine")


def test_serialized_request_is_what_h11_reads() -> None:
    wire = serialize_request(b"POST", b"/p?q=1", b"h:1", [(b"accept", b"*/*")], b"\r\n\r\nbody")
    server = h11.Connection(h11.SERVER)
    server.receive_data(wire)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method, request.target) == (b"POST", b"/p?q=1")
    assert list(request.headers) == [(b"host", b"h:1"), (b"accept", b"*/*"), (b"content-length", b"8")]
    data = server.next_event()
    assert isinstance(data, h11.Data) and data.data == b"\r\n\r\nbody"


# --- framing, fixed examples at every split point ---------------------------------------

CHUNKED = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n"
    b"1A; quoted=\"a;b\"\r\n" + b"x" * 26 + b"\r\n"
    b"000\r\nX-Trailer: t1\r\nX-Other:t2 \r\n\r\n"
)
LENGTH = b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\nX-A: b\r\n\r\nhello world"
UNTIL_EOF = b"HTTP/1.1 200 OK\r\nServer: s\r\n\r\nrest of the stream"
FIXED = {"chunked": CHUNKED, "length": LENGTH, "until_eof": UNTIL_EOF}
EXPECTED_BODY = {"chunked": b"hello" + b"x" * 26, "length": b"hello world", "until_eof": b"rest of the stream"}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_examples_split_anywhere(name: str) -> None:
    data = FIXED[name]
    whole = drive([data])
    assert whole.body == EXPECTED_BODY[name]
    assert len(whole.pieces) == 1  # everything buffered comes out as one piece
    for parts in splits(data):
        parsed = drive(parts)
        assert parsed.head == whole.head
        assert parsed.body == whole.body
        assert parsed.trailers == whole.trailers


def test_chunked_head_fields_and_trailers() -> None:
    parsed = drive([CHUNKED])
    assert parsed.head.status == 200 and parsed.head.reason == b"OK"
    assert parsed.head.headers == [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")]
    assert parsed.head.chunked and parsed.head.content_length is None and parsed.head.keep_alive
    assert parsed.trailers == [(b"x-trailer", b"t1"), (b"x-other", b"t2")]
    assert parsed.reusable


def test_length_piece_is_the_fed_object_when_nothing_precedes_it() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
    head = parser.next_head()
    assert head is not None and head.content_length == 6
    assert parser.next_body_piece() is None
    data = b"abcdef"
    parser.feed(data)
    assert parser.next_body_piece() is data
    assert parser.next_body_piece() == b""
    assert parser.reusable


def test_chunk_payload_is_returned_before_the_chunk_ends() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc")
    assert parser.next_head() is not None
    assert parser.next_body_piece() == b"abc"
    assert parser.next_body_piece() is None
    parser.feed(b"defghijklmnop\r\n3\r\nxyz\r\n0\r\n\r\n")
    assert parser.next_body_piece() == b"defghijklmnopxyz"  # two chunk payloads coalesced
    assert parser.next_body_piece() == b""
    assert parser.complete and parser.reusable


BOTH_LENGTHS = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
INTERIMS = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"


@pytest.mark.parametrize(
    "data, head_request, keep_alive, body",
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", False, True, b""),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", False, True, b""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", True, True, b""),
        (b"HTTP/1.1 200 OK\r\n\r\n", True, True, b""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False, True, b""),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False, False, b"ok"),
        (b"HTTP/1.1 200 OK\r\nConnection: Upgrade, CLOSE\r\nContent-Length: 2\r\n\r\nok", False, False, b"ok"),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False, False, b"ok"),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", False, True, b"ok"),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nto eof", False, False, b"to eof"),
        (b"HTTP/1.0 200 OK\r\nConnection: close, keep-alive\r\nContent-Length: 2\r\n\r\nok", False, False, b"ok"),
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            False,
            False,
            b"ok",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", False, True, b"ok"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", False, True, b"ok"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", False, True, b"ok"),
        # Both: chunked wins (the bogus length is ignored) and the connection is not reused.
        (BOTH_LENGTHS, False, False, b"ok"),
        (b"HTTP/1.1 200 OK\r\nX-Long: a\r\n  b\r\n\tc\r\nContent-Length: 2\r\n\r\nok", False, True, b"ok"),
        (b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", False, True, b"ok"),
        (INTERIMS + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False, True, b"ok"),
    ],
)
def test_framing_rules(data: bytes, head_request: bool, keep_alive: bool, body: bytes) -> None:
    for parts in splits(data):
        parsed = drive(parts, head_request=head_request)
        assert parsed.head.keep_alive is keep_alive
        assert parsed.reusable is keep_alive
        assert parsed.body == body
    h11_response, h11_body, _ = h11_parse(data, head_request=head_request)
    assert h11_response.status_code == drive([data], head_request=head_request).head.status
    assert h11_body == body


def test_obs_fold_is_joined_like_h11() -> None:
    data = b"HTTP/1.1 200 OK\r\nX-Long: a\r\n  b\r\n\tc\r\nContent-Length: 0\r\n\r\n"
    assert drive([data]).head.headers[0] == (b"x-long", b"a b c")
    assert list(h11_parse(data)[0].headers)[0] == (b"x-long", b"a b c")


def test_both_lengths_report_no_content_length() -> None:
    head = drive([b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]).head
    assert head.chunked and head.content_length is None and not head.keep_alive


def test_bytes_after_the_message_make_it_not_reusable() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert parser.next_head() is not None
    assert parser.next_body_piece() == b"ok"
    assert parser.next_body_piece() == b""
    assert parser.complete and not parser.reusable


def test_close_delimited_ends_only_at_eof() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\n\r\nab")
    head = parser.next_head()
    assert head is not None and not head.keep_alive and head.content_length is None and not head.chunked
    assert parser.next_body_piece() == b"ab"
    assert parser.next_body_piece() is None
    parser.feed(b"cd")
    assert parser.next_body_piece() == b"cd"
    parser.feed_eof()
    assert parser.next_body_piece() == b""
    assert parser.complete and not parser.reusable


def test_misuse_raises_runtime_error() -> None:
    parser = ResponseParser()
    with pytest.raises(RuntimeError):
        parser.next_body_piece()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert parser.next_head() is not None
    with pytest.raises(RuntimeError):
        parser.next_head()


# --- malformed framing -------------------------------------------------------------

OK_HEAD = b"HTTP/1.1 200 OK\r\n"
CHUNKED_HEAD = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
MALFORMED = {
    "empty status line": b"\r\n\r\n",
    "not http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "http/2 status line": b"HTTP/2 200 OK\r\n\r\n",
    "lowercase version": b"http/1.1 200 OK\r\n\r\n",
    "two digit status": b"HTTP/1.1 20 OK\r\n\r\n",
    "four digit status": b"HTTP/1.1 2000 OK\r\n\r\n",
    "status below 100": b"HTTP/1.1 099 Low\r\n\r\n",
    "non digit status": b"HTTP/1.1 2x0 OK\r\n\r\n",
    "double space": b"HTTP/1.1  200 OK\r\n\r\n",
    "no status": b"HTTP/1.1\r\n\r\n",
    "switching protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
    "bare LF head": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "bare LF inside": OK_HEAD + b"X-A: a\nb\r\nContent-Length: 0\r\n\r\n",
    "bare CR inside": OK_HEAD + b"X-A: a\rb\r\nContent-Length: 0\r\n\r\n",
    "NUL in value": OK_HEAD + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "no colon": OK_HEAD + b"X-A\r\nContent-Length: 0\r\n\r\n",
    "empty name": OK_HEAD + b": v\r\nContent-Length: 0\r\n\r\n",
    "space before colon": OK_HEAD + b"X-A : v\r\nContent-Length: 0\r\n\r\n",
    "bad name char": OK_HEAD + b"X(A): v\r\nContent-Length: 0\r\n\r\n",
    "continuation first": OK_HEAD + b" folded\r\nContent-Length: 0\r\n\r\n",
    "length not a number": OK_HEAD + b"Content-Length: ten\r\n\r\n",
    "negative length": OK_HEAD + b"Content-Length: -1\r\n\r\n",
    "signed length": OK_HEAD + b"Content-Length: +1\r\n\r\nx",
    "empty length": OK_HEAD + b"Content-Length:\r\n\r\n",
    "huge length": OK_HEAD + b"Content-Length: 1000000000000000000000\r\n\r\n",
    "conflicting lengths": OK_HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    "conflicting length list": OK_HEAD + b"Content-Length: 1, 2\r\n\r\nxx",
    "gzip coding": OK_HEAD + b"Transfer-Encoding: gzip\r\n\r\n",
    "gzip then chunked": OK_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "chunked twice": OK_HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk size not hex": CHUNKED_HEAD + b"zz\r\nab\r\n0\r\n\r\n",
    "chunk size 0x": CHUNKED_HEAD + b"0x2\r\nab\r\n0\r\n\r\n",
    "chunk size signed": CHUNKED_HEAD + b"+2\r\nab\r\n0\r\n\r\n",
    "chunk size empty": CHUNKED_HEAD + b"\r\nab\r\n0\r\n\r\n",
    "chunk size leading space": CHUNKED_HEAD + b" 2\r\nab\r\n0\r\n\r\n",
    "chunk size underscore": CHUNKED_HEAD + b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
    "chunk size too long": CHUNKED_HEAD + b"1" * 21 + b"\r\n",
    "chunk line over cap": CHUNKED_HEAD + b"2;" + b"e" * (20 * 1024),
    "chunk line over cap complete": CHUNKED_HEAD + b"2;" + b"e" * (20 * 1024) + b"\r\nab\r\n0\r\n\r\n",
    "trailer over cap complete": CHUNKED_HEAD + b"0\r\nX: " + b"v" * (MAX_HEAD_SIZE + 10) + b"\r\n\r\n",
    "chunk data too long": CHUNKED_HEAD + b"2\r\nabc\r\n0\r\n\r\n",
    "chunk data no CR": CHUNKED_HEAD + b"2\r\nab\n0\r\n\r\n",
    "bare CR in extension": CHUNKED_HEAD + b"2;a\rb\r\nab\r\n0\r\n\r\n",
    "bad trailer": CHUNKED_HEAD + b"0\r\nno colon here\r\n\r\n",
    "trailer NUL": CHUNKED_HEAD + b"0\r\nX: \x00\r\n\r\n",
    "trailer over cap": CHUNKED_HEAD + b"0\r\nX: " + b"v" * (MAX_HEAD_SIZE + 10),
    "head over cap": OK_HEAD + b"X-Big: " + b"v" * (MAX_HEAD_SIZE + 10),
    "head over cap complete": OK_HEAD + b"X-Big: " + b"v" * (MAX_HEAD_SIZE + 10) + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_framing_is_a_protocol_error(name: str) -> None:
    data = MALFORMED[name]
    with pytest.raises(ProtocolError) as info:
        drive([data], eof=False)
    assert not isinstance(info.value, IncompleteMessage)
    assert b"v" * 20 not in str(info.value).encode()  # messages never quote values
    with pytest.raises(ProtocolError):  # fed bit by bit: the same verdict, and no other exception
        drive([data[i : i + 7] for i in range(0, len(data), 7)])


@pytest.mark.parametrize(
    "chunk",
    [b"2\r\nabXY", b"2\r\nab\n\n", b"2;" + b"e" * (20 * 1024) + b"\r\nab\r\n", b"0x2\r\nab\r\n", b"2\r\nabc\r\n"],
)
def test_a_malformed_chunk_alone_in_its_piece_is_a_protocol_error(chunk: bytes) -> None:
    # Each read of a relay at token pace is one whole chunk: the parser's shortcut for it
    # must give the same verdicts as the general loop.
    with pytest.raises(ProtocolError):
        drive([CHUNKED_HEAD, chunk], eof=False)


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=300), st.sampled_from([b"", b";x=1", b" ", b"\t;y"]),
                          st.sampled_from(["%x", "%X", "00%x"])), max_size=6), st.data())
def test_whole_chunks_per_piece(chunks: list[tuple[bytes, bytes, str]], data: st.DataObject) -> None:
    # A relay's reads: one whole chunk each at token pace, several when it lags, and the
    # chunks' data comes back joined, one piece per read.
    framed = [(fmt % len(body)).encode() + ext + b"\r\n" + body + b"\r\n" for body, ext, fmt in chunks]
    ends = sorted(data.draw(st.sets(st.integers(1, len(framed)))) | {len(framed)}) if framed else []
    reads = [b"".join(framed[a:b]) for a, b in zip([0, *ends], ends)]
    parsed = drive([CHUNKED_HEAD, *reads, b"0\r\n\r\n"], eof=False)
    assert parsed.pieces == [b"".join(body for body, _, _ in chunks[a:b]) for a, b in zip([0, *ends], ends)]
    assert parsed.reusable

@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Len",
        OK_HEAD + b"Content-Length: 5\r\n\r\nabc",
        CHUNKED_HEAD + b"5\r\nab",
        CHUNKED_HEAD + b"5\r\nabcde\r\n",
        CHUNKED_HEAD + b"5\r\nabcde\r\n0\r\nX: t\r\n",
    ],
)
def test_eof_before_the_end_is_incomplete(data: bytes) -> None:
    with pytest.raises(IncompleteMessage):
        drive([data])


def test_incomplete_body_delivers_what_came_first() -> None:
    parser = ResponseParser()
    parser.feed(OK_HEAD + b"Content-Length: 5\r\n\r\nabc")
    assert parser.next_head() is not None
    parser.feed_eof()
    assert parser.next_body_piece() == b"abc"
    with pytest.raises(IncompleteMessage):
        parser.next_body_piece()


# --- property tests ----------------------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
RESERVED = {"content-length", "transfer-encoding", "connection"}
FIELD_BYTES = [bytes([b]) for b in [*range(0x21, 0x7F), *range(0x80, 0x100)]]
names = st.text(TCHARS, min_size=1, max_size=10).filter(lambda n: n.lower() not in RESERVED).map(str.encode)
words = st.lists(st.sampled_from(FIELD_BYTES), min_size=1, max_size=6).map(b"".join)
values = st.lists(words, max_size=3).map(b" ".join)
ows = st.sampled_from([b"", b" ", b"\t", b" \t "])


@attrs.frozen
class Case:
    wire: bytes
    head_request: bool
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]]
    keep_alive: bool


@st.composite
def fields(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Header lines (with random OWS, sometimes folded) and what a parser must make of them."""
    wire = b""
    parsed = []
    for name, value in draw(st.lists(st.tuples(names, values), max_size=5)):
        if b" " in value and draw(st.booleans()):
            first, rest = value.split(b" ", 1)
            wire += name + b":" + draw(ows) + first + b"\r\n" + draw(st.sampled_from([b" ", b"\t", b"  "])) + rest
            wire += draw(ows) + b"\r\n"
        else:
            wire += name + b":" + draw(ows) + value + draw(ows) + b"\r\n"
        parsed.append((name.lower(), value))
    return wire, parsed


@st.composite
def responses(draw: st.DrawFn) -> Case:
    version = draw(st.sampled_from([b"1.0", b"1.1"]))
    framing = draw(st.sampled_from(["length", "chunked", "until_eof", "no_body"]))
    head_request = draw(st.integers(0, 5)) == 0
    if framing == "no_body":
        status = draw(st.sampled_from([204, 304]))
    else:
        status = draw(st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    reason = draw(st.lists(st.sampled_from([*FIELD_BYTES, b" ", b"\t"]), max_size=12).map(b"".join))
    header_wire, headers = draw(fields())
    body = b"" if framing == "no_body" else draw(st.binary(max_size=200))
    connection = draw(st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive"]))

    wire = b""
    for interim in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
        wire += b"HTTP/1.1 %d Interim\r\n" % interim + draw(fields())[0] + b"\r\n"
    wire += b"HTTP/" + version + b" %d" % status + (b" " + reason if reason or draw(st.booleans()) else b"") + b"\r\n"
    wire += header_wire
    if connection is not None:
        wire += b"Connection: " + connection + b"\r\n"
        headers.append((b"connection", connection))
    trailers: list[tuple[bytes, bytes]] = []
    if framing == "length" or (framing == "no_body" and draw(st.booleans())):
        wire += b"Content-Length: %d\r\n" % len(body)
        headers.append((b"content-length", b"%d" % len(body)))
    elif framing == "chunked" and version == b"1.1":
        wire += b"Transfer-Encoding: chunked\r\n"
        headers.append((b"transfer-encoding", b"chunked"))
    elif framing == "chunked":
        framing = "until_eof"  # HTTP/1.0 has no chunked coding
    wire += b"\r\n"
    if head_request:
        body = b""
    elif framing == "chunked":
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=6)))) if len(body) > 1 else []
        bounds = [0, *cuts, len(body)] if body else [0]
        for start, stop in zip(bounds, bounds[1:]):
            size = format(stop - start, draw(st.sampled_from(["x", "X"]))).encode()
            ext = draw(st.sampled_from([b"", b";a", b";a=b", b';q="x;y"', b";a=b;c"]))
            wire += b"0" * draw(st.integers(0, 2)) + size + ext + draw(ows) + b"\r\n" + body[start:stop] + b"\r\n"
        trailer_wire, trailers = draw(fields())
        last_chunk = b"0" * draw(st.integers(1, 3)) + draw(st.sampled_from([b"", b";last"]))
        wire += last_chunk + b"\r\n" + trailer_wire + b"\r\n"
    else:
        wire += body
    opted_in = connection is not None and connection.lower() == b"keep-alive"
    keep_alive = connection != b"close" and (version == b"1.1" or opted_in)
    if framing == "until_eof" and not head_request:
        keep_alive = False
    return Case(wire, head_request, status, reason, headers, body, trailers, keep_alive)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses())
def test_valid_responses_parse_like_h11_at_every_split(case: Case) -> None:
    whole = drive([case.wire], head_request=case.head_request)
    assert (whole.head.status, whole.head.reason, whole.head.headers) == (case.status, case.reason, case.headers)
    assert whole.body == case.body
    assert whole.trailers == case.trailers
    assert whole.head.keep_alive is case.keep_alive
    assert len(whole.pieces) <= 1  # fed at once: one coalesced piece

    h11_response, h11_body, h11_trailers = h11_parse(case.wire, head_request=case.head_request)
    assert h11_response.status_code == case.status
    assert h11_response.reason == case.reason
    assert list(h11_response.headers) == case.headers
    assert h11_body == case.body
    assert h11_trailers == case.trailers

    for parts in splits(case.wire):
        parsed = drive(parts, head_request=case.head_request)
        assert (parsed.head, parsed.body, parsed.trailers) == (whole.head, whole.body, whole.trailers)


@settings(max_examples=300, deadline=None)
@given(responses(), st.lists(st.integers(0, 10_000), max_size=12))
def test_multiway_splits_agree(case: Case, cut_seeds: list[int]) -> None:
    cuts = sorted({seed % (len(case.wire) + 1) for seed in cut_seeds})
    bounds = [0, *cuts, len(case.wire)]
    parsed = drive([case.wire[a:b] for a, b in zip(bounds, bounds[1:])], head_request=case.head_request)
    assert (parsed.head.status, parsed.head.headers, parsed.body, parsed.trailers) == (
        case.status,
        case.headers,
        case.body,
        case.trailers,
    )


def check_only_protocol_errors(parts: list[bytes], head_request: bool) -> None:
    try:
        drive(parts, head_request=head_request)
    except ProtocolError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8), st.booleans())
def test_arbitrary_bytes_raise_only_protocol_errors(parts: list[bytes], head_request: bool) -> None:
    check_only_protocol_errors([b"HTTP/1.1 200 OK\r\n", *parts], head_request)
    check_only_protocol_errors(parts, head_request)


@settings(max_examples=500, deadline=None)
@given(responses(), st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3)), min_size=1, max_size=4))
def test_mutated_responses_raise_only_protocol_errors(case: Case, edits: list[tuple[int, bytes]]) -> None:
    wire = bytearray(case.wire)
    for seed, replacement in edits:  # replace, insert or delete a few bytes anywhere
        at = seed % (len(wire) + 1)
        wire[at : at + (seed // 7) % 3] = replacement
    data = bytes(wire)
    check_only_protocol_errors([data], case.head_request)
    check_only_protocol_errors([data[i : i + 5] for i in range(0, len(data), 5)], case.head_request)
