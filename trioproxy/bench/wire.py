"""The load generator's wire side: targets, the request bytes, watching a stream [sans-IO].

:class:`StreamWatcher` is what makes TTFT and the gaps between tokens measurable
without decoding JSON: a few C-level scans per received piece find the events with
non-empty content, the end marker and error events, in SSE or NDJSON.
"""

from __future__ import annotations

import json
import re
import socket
from urllib.parse import urlsplit

from attrs import frozen

from ..http1 import serialize_request
from .scenarios import Load

__all__ = ["Address", "StreamWatcher", "build_request", "parse_target"]

#: A streamed line longer than this without a newline is not an event we can judge; it is dropped.
MAX_PENDING_LINE = 1024 * 1024

# A content delta with at least one character: OpenAI chat ("content"), completions
# ("text"), Ollama generate ("response"); an optional space after the colon for
# servers that pretty-print. JSON escapes every '"' inside a string, so the key
# pattern cannot match inside a value.
_CONTENT = re.compile(rb'"(?:content|text|response)": ?"(?!")')



class StreamWatcher:
    """Watches a streamed body for content deltas, its end marker and error events [sans-IO].

    Feed de-chunked body bytes in any split; :meth:`feed` returns how many *complete*
    events with non-empty content the bytes finished. SSE (``data: {...}`` lines, ending
    ``data: [DONE]``) and NDJSON (``{...}`` lines, ending ``"done":true``) are both
    understood, which covers the OpenAI API, vLLM, llama.cpp and Ollama.
    """

    __slots__ = ("_pending", "content_events", "done", "error")

    def __init__(self) -> None:
        self._pending = b""
        #: Events with non-empty content seen so far.
        self.content_events = 0
        #: The end marker was seen (``data: [DONE]`` or an NDJSON ``"done":true``).
        self.done = False
        #: An error event was seen (``data: {"error"...`` or an NDJSON ``{"error"...``).
        self.error = False

    def feed(self, data: bytes) -> int:
        """Take the next body bytes; return the content events they completed."""
        block = self._pending + data if self._pending else data
        end = block.rfind(b"\n")
        if end < 0:
            self._pending = block if len(block) <= MAX_PENDING_LINE else b""
            return 0
        self._pending = block[end + 1 :]
        lines = block[: end + 1]
        # A few C-level scans of the whole block instead of a Python loop per line:
        # each event is one line, and each line holds at most one content key.
        n = len(_CONTENT.findall(lines))
        if b"data: [DONE]" in lines or b"data:[DONE]" in lines or b'"done":true' in lines:
            self.done = True
        if (
            b'data: {"error"' in lines
            or b'data:{"error"' in lines
            or lines.startswith(b'{"error"')
            or b'\n{"error"' in lines
        ):
            self.error = True
        self.content_events += n
        return n


@frozen
class Address:
    """Where a target listens: what ``connect`` takes, and the Host header to send."""

    family: int
    sockaddr: tuple[object, ...]
    host_header: bytes
    url: str


def parse_target(url: str) -> Address:
    """An ``http://host:port`` URL → its address (IP literals and ``localhost`` only).

    The benchmark only ever talks to this machine, so no resolver round trip is made.

    Raises:
      ValueError: not ``http://``, no port, or a host that is not a literal address.
    """
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"expected an http:// URL, got {url!r}")
    host, port = parts.hostname, parts.port
    if not host or port is None:
        raise ValueError(f"expected http://HOST:PORT, got {url!r}")
    if host == "localhost":
        host = "127.0.0.1"
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sockaddr: tuple[object, ...] = (host, port) if family == socket.AF_INET else (host, port, 0, 0)
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        return Address(family, sockaddr, f"{shown}:{port}".encode(), f"http://{shown}:{port}")
    raise ValueError(f"expected an IP address or localhost in {url!r}, got {host!r}")


def build_request(load: Load, host_header: bytes, *, model: str | None = None) -> bytes:
    """The one request a scenario sends, as bytes (built once per target, sent every time).

    The ``x-mock-*`` headers pace the project's mock (a real server ignores them);
    the gateway passes them through, so both paths get the same answer.
    """
    doc: dict[str, object] = {"model": model or load.model}
    if load.path in ("/v1/completions", "/api/generate"):
        doc["prompt"] = load.prompt
    else:
        doc["messages"] = [{"role": "user", "content": load.prompt}]
    doc["stream"] = load.stream
    doc["max_tokens"] = load.tokens
    if load.stream and load.include_usage:
        doc["stream_options"] = {"include_usage": True}
    body = json.dumps(doc, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"accept", b"text/event-stream" if load.stream else b"application/json"),
        (b"user-agent", b"trioproxy-bench"),
        (b"x-mock-tokens", b"%d" % load.tokens),
        (b"x-mock-ttft-ms", f"{load.ttft_ms:g}".encode()),
        (b"x-mock-token-delay-ms", f"{load.token_delay_ms:g}".encode()),
    ]
    return serialize_request(b"POST", load.path.encode(), host_header, headers, body)
