"""The usage-event filter: hides a gateway-injected ``include_usage`` from the client [sans-IO].

When the client of an OpenAI streaming request did not ask for usage, the gateway
injects ``stream_options.include_usage`` so that ``usage``'s scanners can count
tokens, and the relay passes each upstream piece through :class:`UsageEventFilter`
so the client gets the bytes it would have got without the injection.

Interface::

    UsageEventFilter(*, max_line_bytes=1 << 20)
        .feed(chunk: bytes) -> bytes   # what to forward now (holds back an incomplete line only)
        .flush() -> bytes              # at the end of the stream

Kept apart from ``usage`` because it rewrites the relayed bytes, where the scanners
only read them: a different job and a different risk (a bug here corrupts client
data, a scanner bug only a log record). Like the scanners, it never does I/O and
never raises on bad input.
"""

from __future__ import annotations

import json
import re
from typing import Final

from .usage import DEFAULT_MAX_LINE_BYTES


_WS: Final = b" \t\r\n"
#: ``"usage":null`` as a later member of compact JSON: what a server that was asked for usage
#: puts on every chunk, taken out with one C-level pass (``bytes.replace``).
NULL_USAGE_MEMBER: Final = b',"usage":null'


def _value_at(data: bytes, i: int) -> int:
    """Index of the value after a key ending at ``i`` (skipping ``ws : ws``), or -1."""
    n = len(data)
    while i < n and data[i] in _WS:
        i += 1
    if i >= n or data[i] != 0x3A:  # ':' -- else the match was a value, not a key
        return -1
    i += 1
    while i < n and data[i] in _WS:
        i += 1
    return i if i < n else -1


def _has_value(data: bytes, key: bytes, first: int) -> bool:
    """Whether some ``key`` in ``data`` is followed by a value starting with byte ``first``."""
    i = data.find(key)
    while i >= 0:
        j = _value_at(data, i + len(key))
        if j >= 0 and data[j] == first:
            return True
        i = data.find(key, i + len(key))
    return False


def _nonempty_array(data: bytes, key: bytes) -> bool:
    """Whether some ``key`` in ``data`` holds an array with at least one element."""
    i = data.find(key)
    while i >= 0:
        j = _value_at(data, i + len(key))
        if j >= 0 and data[j] == 0x5B:  # '['
            j += 1
            while j < len(data) and data[j] in _WS:
                j += 1
            if j < len(data) and data[j] != 0x5D:  # ']'
                return True
        i = data.find(key, i + len(key))
    return False


#: ``"usage": null`` as a later member; the lookahead proves the value is exactly null.
_USAGE_NULL_MEMBER: Final = re.compile(rb',[ \t]*"usage"[ \t]*:[ \t]*null(?=[ \t]*[,}])')
#: ``"usage": null`` as the first member, followed by others (keeps the space after "{").
_USAGE_NULL_FIRST: Final = re.compile(rb'(?<=\{)([ \t]*)"usage"[ \t]*:[ \t]*null[ \t]*,[ \t]*')
#: ``"usage": null`` as the only member.
_USAGE_NULL_ONLY: Final = re.compile(rb'(?<=\{)[ \t]*"usage"[ \t]*:[ \t]*null[ \t]*(?=\})')


class UsageEventFilter:
    """Removes, from an OpenAI SSE stream, what the gateway added by injecting
    ``stream_options.include_usage`` into a request whose client did not ask for usage:
    the usage-only tail event (``choices`` empty, null or absent, plus a ``usage``
    object; the whole event, its blank line included) and the ``,"usage":null``
    member that servers then put on every other chunk, so the client receives exactly
    the bytes it would have without the injection.

    Only complete ``data:`` lines are rewritten; every other byte is forwarded as is,
    in order. ``"usage":null`` cannot occur inside a JSON string (its quotes would be
    escaped there), so removing it by pattern is safe; the compact form, a first
    member (``{"usage":null,``), the only member, and spaces around the colon are all
    handled. A line longer than ``max_line_bytes`` is passed on untouched as it comes
    (policy: never hold back much client data for the sake of usage hiding), or
    dropped if it is inside the dropped event; whole or in pieces, the same.

    Limits: only a one-line usage event is recognised (every known server writes
    one); field lines (``id:``, ``event:``) before its ``data:`` line were already
    forwarded and stay. Servers that send ``"usage":null`` even without the injection
    (vLLM's /v1/completions) lose it too; a client reads null and absent alike.
    """

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._max_line_bytes = max_line_bytes
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._overflow = False  # inside an oversize line: passing it raw up to its b"\n"
        self._dropping = False  # inside the usage-only event: dropping up to its blank line

    def feed(self, chunk: bytes) -> bytes:
        """Take the next piece of the upstream body; return the bytes to send on now.

        Holds back at most an incomplete last line, never a complete one.
        """
        if chunk.endswith(b"\n") and not (self._held or self._overflow):
            return self._filter(chunk)  # the common piece: whole lines, nothing held (no copies)
        nl = chunk.rfind(b"\n")
        if nl < 0:
            return self._hold(chunk)
        head = chunk[: nl + 1]
        out = b""
        if self._overflow:  # the end of an oversize line: as is, unless in a dropped event
            end = head.find(b"\n") + 1
            out = b"" if self._dropping else head[:end]
            head = head[end:]
            self._overflow = False
        elif self._held:
            self._held.append(head)
            head = b"".join(self._held)
            self._held = []
            self._held_bytes = 0
        return out + self._filter(head) + self._hold(chunk[nl + 1 :])

    def flush(self) -> bytes:
        """At the end of the stream: the held-back last line, rewritten like any other."""
        line = b"".join(self._held)
        self._held = []
        self._held_bytes = 0
        if self._dropping or not line:
            return b""
        return self._rewrite(line) or b""

    def _hold(self, tail: bytes) -> bytes:
        if not tail:
            return b""
        if self._overflow:
            return b"" if self._dropping else tail
        self._held_bytes += len(tail)
        if self._held_bytes <= self._max_line_bytes:
            self._held.append(tail)
            return b""
        self._held.append(tail)
        out = b"" if self._dropping else b"".join(self._held)
        self._held = []
        self._held_bytes = 0
        self._overflow = True
        return out

    def _filter(self, block: bytes) -> bytes:
        """Rewrite a run of complete lines (``block`` ends with ``\\n``)."""
        if not self._dropping:
            usages = block.count(b'"usage"')
            if not usages:
                return block  # no usage at all: one search
            if usages == block.count(NULL_USAGE_MEMBER) and (
                # (one usage on the first line, a data line: one relayed event, the common case)
                (usages == 1 and block.startswith(b"data:")
                 and block.find(NULL_USAGE_MEMBER) < block.find(b"\n") <= self._max_line_bytes)
                or self._all_on_data_lines(block)
            ):
                # Every usage is the compact null member on a data line, as vLLM and OpenAI send
                # it on each chunk once usage is asked for: one C-level pass for the whole block,
                # the same bytes as the line-by-line path below (tested against it).
                return block.replace(NULL_USAGE_MEMBER, b"")
        out = []
        for line in block[:-1].split(b"\n"):
            if self._dropping:
                if not line or line == b"\r":
                    self._dropping = False  # the blank line ends the dropped event
                continue
            kept = self._rewrite(line)
            if kept is not None:
                out.append(kept + b"\n")
        return b"".join(out)

    def _all_on_data_lines(self, block: bytes) -> bool:
        """Whether every ``,"usage":null`` of ``block`` is on a ``data:`` line of at most max_line_bytes."""
        i = block.find(NULL_USAGE_MEMBER)
        while i >= 0:  # bounded: each pass moves past one occurrence
            start = block.rfind(b"\n", 0, i) + 1
            end = block.find(b"\n", i)
            if not block.startswith(b"data:", start) or end - start > self._max_line_bytes:
                return False
            i = block.find(NULL_USAGE_MEMBER, i + 13)
        return True

    def _rewrite(self, line: bytes) -> bytes | None:
        """One complete line (without ``\\n``): None to drop it, else its bytes to send."""
        if not line.startswith(b"data:") or len(line) > self._max_line_bytes:
            return line  # an oversize line is passed on as is, however it arrived
        if NULL_USAGE_MEMBER in line:  # compact JSON, the common case: one C-level pass
            line = line.replace(NULL_USAGE_MEMBER, b"")
        if b'"usage"' not in line:
            return line
        # Candidates for the usage-only event: a usage object and no choice in the array;
        # decode to be sure (once per stream). vLLM's continuous usage stats come with
        # choices: the client asked for those, so they stay.
        if (_has_value(line, b'"usage"', 0x7B) and not _nonempty_array(line, b'"choices"')
                and self._is_usage_only(line)):
            self._dropping = True
            return None
        line = _USAGE_NULL_MEMBER.sub(b"", line)
        line = _USAGE_NULL_FIRST.sub(rb"\1", line)
        return _USAGE_NULL_ONLY.sub(b"", line)

    @staticmethod
    def _is_usage_only(line: bytes) -> bool:
        value = line[5:].strip()
        try:
            obj = json.loads(value)
        except ValueError:
            return False  # not ours to judge: forward it
        return (isinstance(obj, dict) and isinstance(obj.get("usage"), dict)
                and obj.get("choices") in (None, []) and "error" not in obj)
