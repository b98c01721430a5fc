"""The mock upstream's HTTP/1.1 layer: requests in, response framing out [sans-IO].

``mock.py`` feeds received bytes to a :class:`RequestParser` and takes complete
:class:`Request` objects from it; :func:`response_head` and :func:`frame_chunk`
build the status line, headers and chunk framing of every answer.

Kept apart from ``mockwire`` (what to answer) and ``mockreply`` (the answer's
bytes) because it knows HTTP/1.1 and nothing about OpenAI or Ollama: the parser
and its limits are tested on their own, byte by byte.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Literal, NamedTuple

from attrs import frozen


# --- HTTP/1.1 requests ------------------------------------------------------------

#: Bounds memory per connection; 4x h11's 16 KiB default leaves room for large auth headers.
MAX_HEAD_BYTES = 64 * 1024
#: Above the gateway's 8 MiB default, so a gateway test sees the gateway's limit, not ours.
MAX_BODY_BYTES = 64 * 1024 * 1024
#: A chunk-size line (with extensions) or a trailer line longer than this is abuse, not HTTP.
MAX_LINE_BYTES = 4096
#: The interim answer to ``Expect: 100-continue`` (curl waits 1 s for it before a large body).
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Ends a chunked body (no trailers).
LAST_CHUNK = b"0\r\n\r\n"

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
_DIGITS = re.compile(r"[0-9]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
#: Bytes allowed in a request head: HTAB, LF, CR (only in CRLF, checked apart), visible ASCII, obs-text.
_HEAD_BYTES = bytes([9, 10, 13, *range(32, 127), *range(128, 256)])


class ParseError(Exception):
    """The bytes are not an acceptable request: answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@frozen
class Request:
    """One parsed request. Header names are lower-cased, in arrival order."""

    method: str
    target: str
    path: str
    query: str
    http10: bool
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or ``None``."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _Head(NamedTuple):  # internal, one per request: a tuple is 3x cheaper to build than attrs
    method: str
    target: str
    path: str
    query: str
    http10: bool
    headers: list[tuple[str, str]]
    keep_alive: bool
    length: int  # ignored when chunked
    chunked: bool
    expect_continue: bool


def _split_target(target: str) -> tuple[str, str]:
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    if target.startswith(("http://", "https://")):  # absolute-form (RFC 9112 3.2.2)
        rest = target.partition("://")[2]
        slash = rest.find("/")
        path, _, query = (rest[slash:] if slash >= 0 else "/").partition("?")
        return path, query
    if target == "*":
        return "*", ""
    raise ParseError(400, "invalid request target")


def _parse_head(raw: bytes, max_body: int) -> _Head:
    if raw.translate(None, _HEAD_BYTES) or raw.count(b"\r") != raw.count(b"\r\n"):
        raise ParseError(400, "invalid character in request head")  # CTLs, or a bare CR (smuggling)
    lines = raw.decode("latin-1").replace("\r\n", "\n").split("\n")
    method, _, rest = lines[0].partition(" ")
    target, _, version = rest.partition(" ")
    if not _TOKEN.fullmatch(method) or not target or "\t" in target or " " in version:
        raise ParseError(400, "malformed request line")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ParseError(505 if _VERSION.fullmatch(version) else 400, f"unsupported version {version!r}")
    http10 = version == "HTTP/1.0"
    path, query = _split_target(target)
    headers: list[tuple[str, str]] = []
    lengths: set[str] = set()
    codings: list[str] = []
    connection = ""
    expect = False
    names = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name:
            raise ParseError(400, "malformed header line")
        names.append(name)
        name = name.lower()
        value = value.strip(" \t")
        headers.append((name, value))
        if name == "content-length":
            lengths.update(v.strip(" \t") for v in value.split(","))
        elif name == "transfer-encoding":
            codings += [c.strip(" \t").lower() for c in value.split(",")]
        elif name == "connection":
            connection += "," + value.lower()
        elif name == "expect":
            expect = value.lower() == "100-continue"
    if names and not _TOKEN.fullmatch("".join(names)):  # one check for all: rejects obs-fold, "name :"
        raise ParseError(400, "malformed header line")
    if codings and lengths:
        raise ParseError(400, "both Transfer-Encoding and Content-Length")
    if codings and codings != ["chunked"]:
        raise ParseError(501, f"unsupported transfer-encoding {','.join(codings)!r}")
    length = 0
    if lengths:
        if len(lengths) > 1 or not _DIGITS.fullmatch(next(iter(lengths))):
            raise ParseError(400, "invalid Content-Length")
        length = int(next(iter(lengths)))
        if length > max_body:
            raise ParseError(413, f"body larger than {max_body} bytes")
    tokens = {t.strip(" \t") for t in connection.split(",")}
    keep_alive = "close" not in tokens and (not http10 or "keep-alive" in tokens)
    return _Head(method, target, path, query, http10, headers, keep_alive, length, bool(codings), expect)


class RequestParser:
    """Incremental HTTP/1.1 request parser: ``feed`` bytes, take requests with ``next_request``.

    Accepts any split of the input, pipelined requests, Content-Length and chunked
    bodies, CRLF or bare-LF line ends in the head. After a :class:`ParseError` the
    connection must be closed: the parser's state is undefined.
    """

    def __init__(self, *, max_head_bytes: int = MAX_HEAD_BYTES, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._buf = bytearray()
        self._max_head = max_head_bytes
        self._max_body = max_body_bytes
        self._head: _Head | None = None
        self._continue = False
        self._parts: list[bytes] = []
        self._size = 0  # body bytes so far (chunked)
        self._left = 0  # bytes left in the current chunk's data
        self._phase: Literal["size", "data", "crlf", "trailer"] = "size"

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed (the start of the next request)."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        self._buf += data

    def take_continue(self) -> bool:
        """True, once per request, when a ``100 Continue`` should be sent now."""
        pending, self._continue = self._continue, False
        return pending

    def next_request(self) -> Request | None:
        """The next complete request, or ``None`` until more bytes are fed.

        Raises:
          ParseError: malformed (400), too large (413, 431), unsupported (501, 505).
        """
        head = self._head
        if head is None:
            if not self._buf:
                return None
            head = self._read_head()
            if head is None:
                return None
        if head.chunked:
            body = self._read_chunked()
            if body is None:
                return None
        else:
            n = head.length
            if len(self._buf) < n:
                return None
            body = bytes(self._buf[:n])
            del self._buf[:n]
        self._head = None
        self._continue = False
        return Request(head.method, head.target, head.path, head.query, head.http10, head.headers, body,
                       head.keep_alive)

    def _read_head(self) -> _Head | None:
        buf = self._buf
        if buf[0] in b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request line
            del buf[: len(buf) - len(buf.lstrip(b"\r\n"))]
        end = _HEAD_END.search(buf)
        if end is None:
            if len(buf) > self._max_head:
                raise ParseError(431, "request head too large")
            return None
        if end.start() > self._max_head:
            raise ParseError(431, "request head too large")
        head = _parse_head(bytes(buf[: end.start()]), self._max_body)
        del buf[: end.end()]
        self._continue = head.expect_continue and (head.chunked or head.length > 0) and not head.http10
        self._head = head
        self._parts, self._size, self._left, self._phase = [], 0, 0, "size"
        return head

    def _line(self) -> bytes | None:
        buf = self._buf
        i = buf.find(b"\n")
        if i < 0:
            if len(buf) > MAX_LINE_BYTES:
                raise ParseError(400, "chunked body line too long")
            return None
        line = bytes(buf[:i]).removesuffix(b"\r")
        del buf[: i + 1]
        return line

    def _read_chunked(self) -> bytes | None:
        buf = self._buf
        while True:
            if self._phase == "size":
                line = self._line()
                if line is None:
                    return None
                size = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    raise ParseError(400, "invalid chunk size")
                self._left = int(size, 16)
                self._size += self._left
                if self._size > self._max_body:
                    raise ParseError(413, f"body larger than {self._max_body} bytes")
                self._phase = "data" if self._left else "trailer"
            elif self._phase == "data":
                take = min(self._left, len(buf))
                if take == 0:
                    return None
                self._parts.append(bytes(buf[:take]))
                del buf[:take]
                self._left -= take
                if self._left == 0:
                    self._phase = "crlf"
            elif self._phase == "crlf":
                if buf[:2] != b"\r\n":
                    if b"\r\n".startswith(buf[:2]):
                        return None  # not all here yet
                    raise ParseError(400, "chunk data not followed by CRLF")
                del buf[:2]
                self._phase = "size"
            else:  # trailer fields, ignored, up to an empty line
                line = self._line()
                if line is None:
                    return None
                if not line:
                    return b"".join(self._parts)
                if b":" not in line:
                    raise ParseError(400, "malformed trailer")
                self._size += len(line)  # trailers count against the body limit: no endless section
                if self._size > self._max_body:
                    raise ParseError(413, f"body larger than {self._max_body} bytes")


# --- response framing --------------------------------------------------------------

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


def response_head(
    status: int, content_type: str, *, date: bytes, content_length: int | None, keep_alive: bool,
    http10: bool, extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """Status line and headers. ``content_length=None``: chunked, or close-delimited for 1.0."""
    parts = [
        _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status,
        b"date: ", date, b"\r\nserver: trioproxy-mock\r\n",
    ]
    if content_type:
        parts += [b"content-type: ", content_type.encode(), b"\r\n"]
    if content_length is not None:
        parts.append(b"content-length: %d\r\n" % content_length)
    elif http10:
        keep_alive = False  # a 1.0 client cannot parse chunks: the body ends at close
    else:
        parts.append(b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n")
    for name, value in extra:
        parts.append(b"%s: %s\r\n" % (name.encode(), value.encode("latin-1")))
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    elif http10:
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def frame_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: that would end the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)
