"""The mock upstream's wire layer: HTTP/1.1 requests in, response bytes out [sans-IO].

Nothing here does I/O or reads a clock: ``mock.py`` feeds received bytes to a
:class:`RequestParser`, asks :func:`plan_reply` what to answer, and writes what
:class:`Static` and :class:`GenerationRenderer` return, passing the time in.

Determinism (tests rely on it):

- Content token ``i`` is ``TOKENS[i % len(TOKENS)]``.
- ``prompt_tokens`` (Ollama: ``prompt_eval_count``) is the number of
  whitespace-separated words in the request's text (every message ``content``,
  text parts included; ``prompt``; the ``system`` of ``/api/generate``), at least
  1; a token array counts its length. Embeddings count each input so, at least 1 each.
- An embedding is ``EMBEDDING_DIM`` floats from BLAKE2b of the text, L2-normalised,
  rounded to 6 places.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
from collections.abc import Callable
from datetime import datetime, timezone
from functools import lru_cache
from http import HTTPStatus
from typing import Any, Literal, NamedTuple

from attrs import frozen

from .config import MockKind

#: A fixed cycle makes every answer reproducible and its text checkable in tests.
TOKENS: tuple[str, ...] = (
    "Hello", " from", " the", " mock", " upstream", ".", " The", " quick",
    " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".",
)
#: Small on purpose: the mock proves the shape of embeddings, not their meaning.
EMBEDDING_DIM = 8
#: Fixed so /v1/models and /api/tags answers are byte-identical across runs.
MODEL_CREATED = 1_730_000_000
#: Fixed for the same reason as MODEL_CREATED (RFC 3339, as Ollama's Go encoder writes).
MODIFIED_AT = "2024-10-27T03:33:20Z"
#: The model is always loaded: a warm Ollama reports a fraction of a millisecond.
LOAD_DURATION_NS = 250_000
#: What each prompt word "costs" in /api/embed timings: small, positive, deterministic.
PROMPT_EVAL_NS_PER_TOKEN = 50_000
#: The Ollama release whose API this mock follows (GET /api/version).
OLLAMA_VERSION = "0.12.6"
#: Upper bound of x-mock-tokens: a typo must not make the mock build a gigabyte answer.
MAX_OVERRIDE_TOKENS = 1_000_000
#: Realistic numbers for a llama 3.2 3B Q4_K_M, so clients that display them look normal.
MODEL_SIZE = 2_019_393_189
#: Same model's parameter count (model_info); keeps /api/show self-consistent with details.
PARAMETER_COUNT = 3_212_749_888

Api = Literal["chat", "completion", "ollama_chat", "ollama_generate"]
ErrorFormat = Literal["openai", "ollama"]

_STREAM_TYPES: dict[Api, str] = {
    "chat": "text/event-stream", "completion": "text/event-stream",
    "ollama_chat": "application/x-ndjson", "ollama_generate": "application/x-ndjson",
}
_OPENAI_ERROR_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
    404: "NotFoundError", 405: "MethodNotAllowedError", 409: "ConflictError",
    413: "RequestTooLargeError", 422: "UnprocessableEntityError", 429: "RateLimitError",
    500: "InternalServerError", 502: "BadGatewayError", 503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@lru_cache(maxsize=1024)
def _json_str(text: str) -> bytes:
    return json.dumps(text).encode()


@lru_cache(maxsize=256)
def content_text(n: int) -> str:
    """The text of the first ``n`` content tokens."""
    return "".join(TOKENS[i % len(TOKENS)] for i in range(n))


def rfc3339(ts: float) -> str:
    """``ts`` (Unix seconds) as Ollama writes ``created_at``: UTC, microseconds, ``Z``."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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


# --- replies -----------------------------------------------------------------------


@frozen
class Static:
    """A complete answer: status, body, extra headers (``Retry-After``, ``Allow``)."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def render(self, *, date: bytes, keep_alive: bool, http10: bool, head_only: bool = False) -> bytes:
        """The whole response as bytes (only the head for a ``HEAD`` request)."""
        head = response_head(
            self.status, self.content_type, date=date, content_length=len(self.body),
            keep_alive=keep_alive, http10=http10, extra=self.headers,
        )
        return head if head_only else head + self.body


@frozen
class Generation:
    """A completion to produce over time; ``tokens`` is already capped by max_tokens."""

    api: Api
    model: str
    stream: bool
    tokens: int
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    include_usage: bool = False

    @property
    def content_type(self) -> str:
        """SSE or NDJSON when streamed, else JSON."""
        return _STREAM_TYPES[self.api] if self.stream else "application/json"


@frozen
class Timings:
    """Elapsed generation phases in ns, measured by the caller (Ollama's counters)."""

    total_ns: int = 0
    prompt_eval_ns: int = 0
    eval_ns: int = 0


Reply = Static | Generation

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


def error_format(path: str) -> ErrorFormat:
    """Which API's error shape answers ``path``: Ollama's for ``/api/*`` and ``/``."""
    return "ollama" if path.startswith("/api/") or path == "/" else "openai"


def error_reply(fmt: ErrorFormat, status: int, message: str, *, retry_after_s: int | None = None) -> Static:
    """An error in the route's format: vLLM's ``{"error":{...}}`` or Ollama's ``{"error":"..."}``.

    ``retry_after_s`` is sent as ``Retry-After`` only with 429 and 503, as servers do.
    """
    if fmt == "ollama":
        body = _dumps({"error": message})
    else:
        kind = _OPENAI_ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
        body = _dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})
    headers = (("retry-after", str(retry_after_s)),) if retry_after_s is not None and status in (429, 503) else ()
    return Static(status, "application/json", body, headers)


# --- streamed and whole generations -----------------------------------------------

_TOKEN_JSON = tuple(_json_str(t) for t in TOKENS)
_CHAT_TOKEN = tuple(b'[{"index":0,"delta":{"content":%s},"logprobs":null,"finish_reason":null}]' % t for t in _TOKEN_JSON)
_TEXT_TOKEN = tuple(b'[{"index":0,"text":%s,"logprobs":null,"finish_reason":null}]' % t for t in _TOKEN_JSON)
_OLLAMA_CHAT_TOKEN = tuple(b'","message":{"role":"assistant","content":%s},"done":false}\n' % t for t in _TOKEN_JSON)
_OLLAMA_GEN_TOKEN = tuple(b'","response":%s,"done":false}\n' % t for t in _TOKEN_JSON)
_ROLE_CHOICES = b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'


def _identity(data: bytes) -> bytes:
    return data


class GenerationRenderer:
    """The bytes of one :class:`Generation`: stream pieces or the whole answer.

    Each stream piece is one event (an SSE event or an NDJSON line), already framed
    as a chunk unless ``chunked`` is false (an HTTP/1.0 client: close-delimited).
    ``number`` makes the OpenAI ``id``; ``created`` is Unix seconds.
    """

    def __init__(self, gen: Generation, *, number: int, created: int, chunked: bool) -> None:
        self.gen = gen
        self._frame: Callable[[bytes], bytes] = frame_chunk if chunked else _identity
        self._chunked = chunked
        model = _json_str(gen.model)
        self._id = b""  # OpenAI APIs only
        if gen.api == "chat":
            self._id = b"chatcmpl-mock-%d" % number
            self._prefix = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":' % (
                self._id, created, model)
        elif gen.api == "completion":
            self._id = b"cmpl-mock-%d" % number
            self._prefix = b'data: {"id":"%s","object":"text_completion","created":%d,"model":%s,"choices":' % (
                self._id, created, model)
        else:
            self._prefix = b'{"model":%s,"created_at":"' % model
        self._created = created
        self._model = model
        self._usage_null = b',"usage":null' if gen.include_usage else b""

    def _sse(self, choices: bytes) -> bytes:
        return self._frame(self._prefix + choices + self._usage_null + b"}\n\n")

    def opening(self) -> bytes:
        """What goes out with the headers: the chat role chunk, else nothing."""
        return self._sse(_ROLE_CHOICES) if self.gen.api == "chat" else b""

    def token(self, i: int, *, created_at: str = "") -> bytes:
        """Content token ``i`` as one event; ``created_at`` is used by Ollama lines."""
        k = i % len(TOKENS)
        api = self.gen.api
        if api == "chat":
            return self._sse(_CHAT_TOKEN[k])
        if api == "completion":
            return self._sse(_TEXT_TOKEN[k])
        suffix = _OLLAMA_CHAT_TOKEN[k] if api == "ollama_chat" else _OLLAMA_GEN_TOKEN[k]
        return self._frame(self._prefix + created_at.encode() + suffix)

    def _usage(self) -> bytes:
        p, c = self.gen.prompt_tokens, self.gen.tokens
        return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (p, c, p + c)

    def _ollama_final(self, content: bytes, timings: Timings, created_at: str) -> bytes:
        g = self.gen
        reason = g.finish_reason.encode()
        if g.api == "ollama_chat":  # Go field order: message, done_reason, done, metrics
            middle = b'"message":{"role":"assistant","content":%s},"done_reason":"%s","done":true' % (content, reason)
        else:  # GenerateResponse: response, done, done_reason, metrics
            middle = b'"response":%s,"done":true,"done_reason":"%s"' % (content, reason)
        metrics = (
            b'"total_duration":%d,"load_duration":%d,"prompt_eval_count":%d,'
            b'"prompt_eval_duration":%d,"eval_count":%d,"eval_duration":%d}'
            % (timings.total_ns + LOAD_DURATION_NS, LOAD_DURATION_NS, g.prompt_tokens,
               timings.prompt_eval_ns, g.tokens, timings.eval_ns)
        )
        return self._prefix + created_at.encode() + b'",' + middle + b"," + metrics

    def closing(self, timings: Timings, *, created_at: str = "") -> list[bytes]:
        """The events after the last token, one write each; the last one ends the body."""
        g = self.gen
        end = LAST_CHUNK if self._chunked else b""
        if g.api in ("ollama_chat", "ollama_generate"):
            return [self._frame(self._ollama_final(b'""', timings, created_at) + b"\n") + end]
        reason = g.finish_reason.encode()
        if g.api == "chat":
            finish = b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"%s"}]' % reason
        else:
            finish = b'[{"index":0,"text":"","logprobs":null,"finish_reason":"%s"}]' % reason
        pieces = [self._sse(finish)]
        if g.include_usage:
            pieces.append(self._frame(self._prefix + b'[],"usage":' + self._usage() + b"}\n\n"))
        pieces.append(self._frame(b"data: [DONE]\n\n") + end)
        return pieces

    def whole(self, timings: Timings, *, created_at: str = "") -> bytes:
        """The non-streamed answer body."""
        g = self.gen
        content = _json_str(content_text(g.tokens))
        if g.api in ("ollama_chat", "ollama_generate"):
            return self._ollama_final(content, timings, created_at)
        if g.api == "chat":
            obj, choice = b"chat.completion", b'"message":{"role":"assistant","content":%s}' % content
        else:
            obj, choice = b"text_completion", b'"text":%s' % content
        return (
            b'{"id":"%s","object":"%s","created":%d,"model":%s,"choices":[{"index":0,%s,"logprobs":null,'
            b'"finish_reason":"%s"}],"usage":%s}'
            % (self._id, obj, self._created, self._model, choice, g.finish_reason.encode(), self._usage())
        )


# --- routing and request bodies ---------------------------------------------------


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _Reject(400, f"invalid JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise _Reject(400, "the JSON body must be an object")
    return value


def _with_tag(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


@lru_cache(maxsize=64)
def _known_names(models: tuple[str, ...]) -> frozenset[str]:
    return frozenset(models) | {_with_tag(m) for m in models}


def _model(body: dict[str, Any], models: tuple[str, ...], fmt: ErrorFormat, *, key: str = "model") -> str:
    model = body.get(key)
    if not isinstance(model, str) or not model:
        raise _Reject(400, "model is required" if fmt == "ollama" else "you must provide a model parameter")
    if "*" in models or model in _known_names(models) or _with_tag(model) in _known_names(models):
        return model
    if fmt == "ollama":
        raise _Reject(404, f"model '{model}' not found")
    raise _Reject(404, f"The model `{model}` does not exist.")


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Reject(400, f"'{key}' must be a boolean")
    return value


def _cap(values: list[object], tokens: int) -> tuple[int, Literal["stop", "length"]]:
    """Tokens to send and why they end: the first integer limit given caps ``tokens``."""
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _Reject(400, "max_tokens must be a non-negative integer")
        if value < tokens:
            return value, "length"
        break
    return tokens, "stop"


def _words(value: object) -> int:
    """Words in a string; in a list: of its strings and text parts; a token array counts its length.

    Not recursive on purpose: a deeply nested body must not raise RecursionError.
    """
    if isinstance(value, str):
        return len(value.split())
    if not isinstance(value, list):
        return 0
    if value and all(isinstance(v, int) for v in value):
        return len(value)
    total = 0
    for item in value:
        if isinstance(item, dict):
            item = item.get("text")
        if isinstance(item, str):
            total += len(item.split())
        elif isinstance(item, list):  # one token array of a batch
            total += len(item)
    return total


def _messages_words(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(_words(m.get("content")) for m in messages if isinstance(m, dict))


def _inputs(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]  # one token array
        if all(isinstance(v, str) or isinstance(v, list) for v in value):
            return [v if isinstance(v, str) else " ".join(map(str, v)) for v in value]
    raise _Reject(400, "'input' must be a string or a list of strings")


@lru_cache(maxsize=1024)
def embedding(text: str) -> tuple[float, ...]:
    """The deterministic unit vector the mock returns for ``text``."""
    digest = hashlib.blake2b(text.encode(), digest_size=EMBEDDING_DIM).digest()
    raw = [(b - 127.5) / 127.5 for b in digest]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return tuple(round(x / norm, 6) for x in raw)


Handler = Callable[[Request, tuple[str, ...], int], Reply]


def _chat(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    body = _json_object(request.body)
    model = _model(body, models, "openai")
    stream = _flag(body, "stream", False)
    n, reason = _cap([body.get("max_completion_tokens"), body.get("max_tokens")], tokens)
    options = body.get("stream_options")
    usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return Generation("chat", model, stream, n, reason, max(1, _messages_words(body)), usage)


def _completion(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    body = _json_object(request.body)
    model = _model(body, models, "openai")
    stream = _flag(body, "stream", False)
    n, reason = _cap([body.get("max_tokens")], tokens)
    options = body.get("stream_options")
    usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return Generation("completion", model, stream, n, reason, max(1, _words(body.get("prompt"))), usage)


def _ollama(api: Api) -> Handler:
    def handler(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
        body = _json_object(request.body)
        model = _model(body, models, "ollama")
        stream = _flag(body, "stream", True)
        options = body.get("options")
        limit = options.get("num_predict") if isinstance(options, dict) else None
        n, reason = _cap([limit if isinstance(limit, int) and limit > 0 else None], tokens)
        if api == "ollama_chat":
            words = _messages_words(body)
        else:
            words = _words(body.get("prompt")) + _words(body.get("system"))
        return Generation(api, model, stream, n, reason, max(1, words))

    return handler


def _embeddings(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    body = _json_object(request.body)
    model = _model(body, models, "openai")
    texts = _inputs(body)
    as_base64 = body.get("encoding_format") == "base64"  # the openai SDK's default
    data = []
    for i, text in enumerate(texts):
        vector = embedding(text)
        value: object = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    used = sum(max(1, _words(t)) for t in texts)
    payload = {"object": "list", "data": data, "model": model,
               "usage": {"prompt_tokens": used, "total_tokens": used}}
    return Static(200, "application/json", _dumps(payload))


def _ollama_embed(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    body = _json_object(request.body)
    model = _model(body, models, "ollama")
    texts = _inputs(body)
    used = sum(max(1, _words(t)) for t in texts)
    payload = {"model": model, "embeddings": [embedding(t) for t in texts],
               "total_duration": LOAD_DURATION_NS + used * PROMPT_EVAL_NS_PER_TOKEN,
               "load_duration": LOAD_DURATION_NS, "prompt_eval_count": used}
    return Static(200, "application/json", _dumps(payload))


def _listed(models: tuple[str, ...]) -> list[str]:
    return [m for m in models if m != "*"]


def _model_object(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "trioproxy-mock"}


def _models(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    payload = {"object": "list", "data": [_model_object(m) for m in _listed(models)]}
    return Static(200, "application/json", _dumps(payload))


def _model_by_id(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    model = _model({"model": request.path.removeprefix("/v1/models/")}, models, "openai")
    return Static(200, "application/json", _dumps(_model_object(model)))


_DETAILS = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
            "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}


def _tag_entry(name: str) -> dict[str, object]:
    full = _with_tag(name)
    return {"name": full, "model": full, "modified_at": MODIFIED_AT, "size": MODEL_SIZE,
            "digest": hashlib.sha256(full.encode()).hexdigest(), "details": _DETAILS}


def _tags(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    return Static(200, "application/json", _dumps({"models": [_tag_entry(m) for m in _listed(models)]}))


def _ps(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    running = [{**_tag_entry(m), "expires_at": "2099-01-01T00:00:00Z", "size_vram": MODEL_SIZE,
                "context_length": 4096} for m in _listed(models)]
    for entry in running:
        del entry["modified_at"]
    return Static(200, "application/json", _dumps({"models": running}))


_TEMPLATE = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)


def _show(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    body = _json_object(request.body)
    model = _model(body, models, "ollama", key="model" if "model" in body else "name")
    payload = {
        "modelfile": f'# Modelfile generated by "ollama show"\nFROM {_with_tag(model)}\n'
                     f'TEMPLATE """{_TEMPLATE}"""\nPARAMETER stop <|eot_id|>\n',
        "parameters": 'stop                           "<|eot_id|>"',
        "template": _TEMPLATE,
        "details": _DETAILS,
        "model_info": {"general.architecture": "llama", "general.file_type": 15,
                       "general.parameter_count": PARAMETER_COUNT, "general.quantization_version": 2,
                       "llama.context_length": 131072, "llama.embedding_length": 3072, "llama.block_count": 28},
        "capabilities": ["completion"],
        "modified_at": MODIFIED_AT,
    }
    return Static(200, "application/json", _dumps(payload))


def _fixed(status: int, content_type: str, body: bytes) -> Handler:
    reply = Static(status, content_type, body)
    return lambda request, models, tokens: reply


_OPENAI_KINDS = frozenset({"openai", "ollama", "both"})
_OLLAMA_KINDS = frozenset({"ollama", "both"})
_VLLM_KINDS = frozenset({"openai", "both"})
#: path → (method, handler, the mock kinds that serve it)
_ROUTES: dict[str, tuple[str, Handler, frozenset[str]]] = {
    "/v1/chat/completions": ("POST", _chat, _OPENAI_KINDS),
    "/v1/completions": ("POST", _completion, _OPENAI_KINDS),
    "/v1/embeddings": ("POST", _embeddings, _OPENAI_KINDS),
    "/v1/models": ("GET", _models, _OPENAI_KINDS),
    "/health": ("GET", _fixed(200, "", b""), _VLLM_KINDS),  # vLLM: 200, no body, no content-type
    "/": ("GET", _fixed(200, "text/plain; charset=utf-8", b"Ollama is running"), _OLLAMA_KINDS),
    "/api/chat": ("POST", _ollama("ollama_chat"), _OLLAMA_KINDS),
    "/api/generate": ("POST", _ollama("ollama_generate"), _OLLAMA_KINDS),
    "/api/embed": ("POST", _ollama_embed, _OLLAMA_KINDS),
    "/api/tags": ("GET", _tags, _OLLAMA_KINDS),
    "/api/show": ("POST", _show, _OLLAMA_KINDS),
    "/api/ps": ("GET", _ps, _OLLAMA_KINDS),
    "/api/version": ("GET", _fixed(200, "application/json", _dumps({"version": OLLAMA_VERSION})), _OLLAMA_KINDS),
}
_MODEL_BY_ID = ("GET", _model_by_id, _OPENAI_KINDS)


def plan_reply(request: Request, *, kind: MockKind, models: tuple[str, ...], tokens: int) -> Reply:
    """Decide the answer to ``request``: a :class:`Static` reply or a :class:`Generation`.

    Never raises for a bad request: unknown routes (404), wrong methods (405, with
    ``Allow``), bad JSON (400) and unknown models (404) become error replies in the
    route's format. ``HEAD`` is served like ``GET`` (the caller drops the body).

    Args:
      kind: which API family this mock imitates (``/v1/*`` is served by all three).
      models: model names accepted (``"*"``: any); ``name`` matches ``name:latest``.
      tokens: content tokens to produce before any ``max_tokens`` cap.
    """
    path = request.path
    fmt = error_format(path)
    route = _ROUTES.get(path) or (_MODEL_BY_ID if path.startswith("/v1/models/") else None)
    if route is None or kind not in route[2]:
        return error_reply(fmt, 404, f"no route for {request.method} {path}")
    method, handler, _ = route
    if (request.method if request.method != "HEAD" else "GET") != method:
        reply = error_reply(fmt, 405, f"method {request.method} not allowed on {path}")
        return Static(reply.status, reply.content_type, reply.body, (("allow", method),))
    try:
        return handler(request, models, tokens)
    except _Reject as exc:
        return error_reply(fmt, exc.status, exc.message)


@frozen
class Overrides:
    """Per-request settings from ``x-mock-*`` headers; ``None``: use the run's value.

    ``fault`` is ``(kind, argument)``: ``("none", None)`` disables the run's fault,
    ``("status", 429)``, ``("cut", 3)`` (tokens before the cut) or ``(kind, None)``.
    """

    fault: tuple[str, int | None] | None = None
    tokens: int | None = None
    ttft_ms: float | None = None
    token_delay_ms: float | None = None


_FAULT_NAMES = frozenset({"status", "reset", "hang", "cut", "garbage", "none"})


def _non_negative(name: str, text: str, convert: Callable[[str], float]) -> float:
    try:
        value = convert(text)
    except ValueError:
        raise _Reject(400, f"{name}: not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise _Reject(400, f"{name}: must be a finite number >= 0")
    return value


def parse_overrides(request: Request) -> Overrides | Static:
    """Read the ``x-mock-*`` headers; a 400 reply (route format) if one is malformed."""
    fault: tuple[str, int | None] | None = None
    tokens = ttft = delay = None
    try:
        for name, value in request.headers:
            if not name.startswith("x-mock-"):
                continue
            if name == "x-mock-fault":
                kind, _, arg = value.strip().lower().partition("=")
                if kind not in _FAULT_NAMES or (arg and kind not in ("status", "cut")):
                    raise _Reject(400, f"x-mock-fault: unknown fault {value!r}")
                number = int(_non_negative(name, arg, int)) if arg else None
                if kind == "status" and number is not None and not 400 <= number <= 599:
                    raise _Reject(400, "x-mock-fault: status must be 400-599")
                fault = (kind, number)
            elif name == "x-mock-tokens":
                tokens = int(_non_negative(name, value, int))
                if tokens > MAX_OVERRIDE_TOKENS:
                    raise _Reject(400, f"x-mock-tokens: at most {MAX_OVERRIDE_TOKENS}")
            elif name == "x-mock-ttft-ms":
                ttft = _non_negative(name, value, float)
            elif name == "x-mock-token-delay-ms":
                delay = _non_negative(name, value, float)
    except _Reject as exc:
        return error_reply(error_format(request.path), exc.status, exc.message)
    return Overrides(fault, tokens, ttft, delay)
