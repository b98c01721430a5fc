"""Stream scanners: first token, usage, finish reason and errors from relayed bytes [sans-IO].

The relay hands every piece of an upstream body, as the socket gave it, to
``scanner.feed(piece)``; these classes never do I/O and never raise on bad input.
``feed`` is on the hot path (one call per relayed chunk), so lines are searched
as bytes and only those that can change a result are JSON-decoded: a non-null
``"usage"``/``"timings"`` object, a non-null ``"finish_reason"`` while none is known,
an ``"error"`` (SSE); a ``"done": true`` or an ``"error"`` (NDJSON). A server writes
every token's SSE event alike, so ``SSEScanner`` remembers the shape of the last line
with one text value and scans a line of that shape without its regex (``_scan_line``).

Interface::

    Usage(prompt_tokens: int | None, completion_tokens: int | None)          @frozen
    ScannerStatistics(lines, decoded, malformed, oversize)                   @frozen
    SSEScanner(*, max_line_bytes=1 << 20)     # OpenAI-style SSE: /v1/chat/completions and
                                              # /v1/completions (OpenAI, vLLM, llama.cpp, Ollama /v1)
    NDJSONScanner(*, max_line_bytes=1 << 20)  # Ollama /api/chat and /api/generate
        .feed(chunk: bytes) -> bool    # True exactly once: for the chunk holding the b"\\n"
                                       # of the line that completes the first event with content
        .first_content: bool           .finish_reason: str | None    .error: str | None
        .done: bool                    .content_chars: int           .content_events: int
        .usage() -> Usage | None       .statistics() -> ScannerStatistics
    estimate_tokens(content_chars: int) -> int

``UsageEventFilter``, which rewrites the relayed bytes rather than reading them,
is in ``usagefilter``.

Policies (each also noted where it is implemented):

- Lines split on ``b"\\n"`` only; a trailing ``\\r`` is dropped. A line is handled
  when its ``\\n`` arrives, so every result, and the chunk ``feed`` says True for, is
  the same however the stream is split. A last line without ``\\n`` is never seen.
- A line longer than ``max_line_bytes`` (counted without its ``\\n``) is dropped and
  counted in ``oversize``; it is never half-processed.
- Content is text the model produced: ``content``, ``text``, ``reasoning_content``,
  ``reasoning``, ``refusal``, tool-call ``arguments`` (SSE); ``content``,
  ``response``, ``thinking`` (NDJSON); or a non-empty ``tool_calls`` array. An empty
  string or ``null`` is not content, so a role-only first delta is not the first token.
- ``content_chars`` counts the bytes between the quotes of those JSON strings (the
  raw JSON text, escapes and UTF-8 included), never decoded characters: the search
  is byte-level so that content lines need no decoding.
- Events are handled line by line: an SSE ``data:`` line is taken as soon as it is
  complete, not at the blank line that ends its event, so a stream whose last blank
  line never comes loses nothing. An event with several ``data:`` lines is joined
  with ``\\n`` as the SSE spec says (see ``SSEScanner``).
- ``finish_reason`` and ``error``: the first one wins. Usage: the last one wins.

Known limits: a bare ``\\r`` line ending (allowed by the SSE spec, sent by no LLM
server) and a leading BOM are not handled; ``data: [DONE]`` must end its line; a key
ending in an escaped quote followed by a known key name (``"x\\"content": "y"``) would
fool the byte search; an in-band error must use an ``"error"`` key (vLLM's old flat
``{"object": "error"}`` form is only used for HTTP error bodies).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from attrs import frozen

from . import jsonread

#: Longest line kept while waiting for its end: bounds memory per stream; 1 MiB
#: holds any real event, even Ollama's /api/generate done line with ``context``.
DEFAULT_MAX_LINE_BYTES: Final = 1 << 20
#: Rough characters per token for English text with BPE tokenizers.
CHARS_PER_TOKEN: Final = 4

#: ``"key" : value`` for the keys that matter, found in one C-level pass (``findall``
#: is ~3x cheaper than ``finditer`` or a ``find`` per key; prefixes are factored because
#: the alternation is tried at every quote). Groups: the key; the body of a string
#: value; else the value's first byte (for an array: "[" and its next one). A key
#: pattern cannot start inside a JSON string, where quotes are escaped.
_VALUE: Final = rb'"[ \t\r\n]*:[ \t\r\n]*(?:"([^"\\]*(?:\\.[^"\\]*)*)"|(\[[ \t\r\n]*.|.))'
_SSE_KEYS: Final = re.compile(
    rb'"(c(?:ontent)|t(?:ext|ool_calls|imings)|r(?:easoning(?:_content)?|efusal)|arguments'
    rb'|error|finish_reason|usage)' + _VALUE, re.S)
_NDJSON_KEYS: Final = re.compile(
    rb'"(content|response|t(?:hinking|ool_calls)|done|error)' + _VALUE, re.S)
#: Keys whose non-empty string value is model output.
_TEXT_KEYS: Final = frozenset((b"content", b"text", b"reasoning_content", b"reasoning",
                               b"refusal", b"arguments", b"response", b"thinking"))
#: First data lines in a row without the remembered shape after which a stream's lines are
#: scanned with the regex alone (a stream of one shape misses on its first lines, and on
#: its finish and usage events at the end).
_SHAPE_MISSES: Final = 3
#: The body of a JSON string (between its quotes), as ``_VALUE`` matches it.
_STRING_BODY: Final = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.S)
#: A string body with nothing to unescape and no line end: what ``SSEScanner.feed``'s steadiest
#: path accepts as an event's text (anything else takes the general path).
_PLAIN_TEXT: Final = re.compile(rb'[^"\\\n]*')
#: A JSON string; used only on the rare multi-line SSE path to measure bracket depth.
_JSON_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"')


@frozen
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None


@frozen
class ScannerStatistics:
    #: Complete lines handled (blank ones included, oversize ones not).
    lines: int
    #: JSON decode attempts (the expensive step this module avoids).
    decoded: int
    #: Lines or events that had to be decoded and failed, or were otherwise invalid.
    malformed: int
    #: Lines dropped for being longer than ``max_line_bytes``.
    oversize: int


def estimate_tokens(content_chars: int) -> int:
    """Guess completion tokens from ``content_chars`` when the upstream sent no usage.

    The rule is ``ceil(content_chars / 4)``: about four bytes of English per token,
    and at least 1 as soon as there is any content. It undercounts CJK text, where a
    character is three UTF-8 bytes and about one token; good enough for a log.

    Args:
      content_chars: ``scanner.content_chars``.

    Returns:
      0 for no content, else at least 1.
    """
    return max(0, content_chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


# -- byte-level helpers ---------------------------------------------------------------

def _json_depth(data: bytes) -> int:
    """Open brackets minus closed ones outside strings (multi-line SSE events only)."""
    bare = _JSON_STRING.sub(b"", data)
    return bare.count(b"{") + bare.count(b"[") - bare.count(b"}") - bare.count(b"]")


def _data_value(line: bytes) -> bytes:
    """The value of a ``data:`` line: one optional space after the colon is not part of it."""
    return line[6:] if line[5:6] == b" " else line[5:]


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _error_message(err: object) -> str:
    if isinstance(err, str):
        return err
    if isinstance(err, dict):
        message = err.get("message")
        if isinstance(message, str):
            return message
    return json.dumps(err)


class _LineScanner:
    """Shared state and line splitting; subclasses handle complete lines."""

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._max_line_bytes = max_line_bytes
        self._held: list[bytes] = []  # pieces of the incomplete last line, joined once
        self._held_bytes = 0
        self._skipping = False  # inside an oversize line: drop up to its b"\n"
        self.first_content = False
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done = False
        self.content_chars = 0
        self.content_events = 0
        self._usage: Usage | None = None
        self._lines = 0
        self._decoded = 0
        self._malformed = 0
        self._oversize = 0

    #: True if the last piece fed was one whole one-line ``data:`` event (ending ``\n\n``) of the
    #: same shape as the event before it, its text plain (no quote, backslash or newline): no
    #: line it ends, no ``[DONE]``, no key but the text's changed (SSE only; ``relay.pump``
    #: relies on it to skip its per-piece steps for such a piece).
    steady_piece = False

    def end_of_body(self) -> None:
        """The body ended (cleanly). A last line without its newline is dropped here: an SSE
        client discards an event the stream did not finish (NDJSON overrides this)."""

    def statistics(self) -> ScannerStatistics:
        """Counters for telemetry: cost (``decoded``) and bad input, which is never raised."""
        return ScannerStatistics(lines=self._lines, decoded=self._decoded,
                                 malformed=self._malformed, oversize=self._oversize)

    def usage(self) -> Usage | None:
        """Token counts reported by the upstream so far, or None if it sent none."""
        return self._usage

    def _split(self, chunk: bytes) -> list[bytes]:
        """The complete lines ``chunk`` finishes (``\\n`` removed); holds the rest."""
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if lines:
            held = self._held_bytes
            if self._skipping:
                self._skipping = False
                del lines[0]  # the end of an oversize line, counted when it overflowed
            elif self._held:
                self._held.append(lines[0])
                lines[0] = b"".join(self._held)
                self._held = []
                self._held_bytes = 0
            if len(chunk) + held > self._max_line_bytes:  # only then can a line be too long
                kept = [line for line in lines if len(line) <= self._max_line_bytes]
                self._oversize += len(lines) - len(kept)
                lines = kept
            self._lines += len(lines)
        if tail:
            self._hold(tail)
        return lines

    def _hold(self, tail: bytes) -> None:
        if self._skipping:
            return
        self._held_bytes += len(tail)
        if self._held_bytes > self._max_line_bytes:
            self._oversize += 1  # the whole line will be longer: drop it now, once
            self._held = []
            self._held_bytes = 0
            self._skipping = True
        else:
            self._held.append(tail)

    def _decode(self, data: bytes) -> dict[str, Any] | None:
        self._decoded += 1
        try:
            obj = jsonread.loads(data)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            return None
        return obj if isinstance(obj, dict) else None

    def _count_content(self, nbytes: int, *, new_event: bool) -> None:
        self.content_chars += nbytes
        if new_event:
            self.content_events += 1
            self.first_content = True


# SSE event status
_OPEN: Final = 0
_FAILED: Final = 1  # its first line needed decoding and failed: malformed unless completed
_SETTLED: Final = 2  # nothing more to learn from it


class SSEScanner(_LineScanner):
    """Scans an OpenAI-style ``text/event-stream`` (OpenAI, vLLM, llama.cpp, Ollama /v1).

    Fields other than ``data`` (``event:``, ``id:``, ``retry:``) and ``:`` comments are
    ignored; ``data:`` may or may not be followed by a space. ``data: [DONE]`` sets
    ``done``.

    Multi-line events: the first ``data:`` line of an event is scanned on its own as
    soon as it is complete (the fast path; every known server writes one line per
    event). If a second ``data:`` line arrives before the blank line, the event's
    data is joined with ``\\n`` and handled again once its JSON brackets balance (or at
    the blank line): content found in the first line counts once, and a decode that
    failed on the first line alone is retried on the joined text instead of counting
    as malformed. A non-blank ``data:`` line after a first line that was already a
    whole JSON value makes the event invalid JSON (as a client would see it): it is
    counted as malformed and ignored, while what the first line gave stands.

    Usage: the last non-null ``usage`` object (the ``include_usage`` tail event, or
    vLLM's ``continuous_usage_stats`` on every chunk); failing that, llama.cpp's
    ``timings`` (``prompt_n``, ``predicted_n``), last one wins too.
    """

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        super().__init__(max_line_bytes=max_line_bytes)
        self._timings: Usage | None = None
        # The current event, reset at each blank line:
        self._ev_lines = 0  # data lines so far
        self._ev_first = b""  # its first data line, kept (by reference) in case more follow
        self._ev_content_bytes = -1  # content bytes counted for it; -1: none yet
        self._ev_status = _OPEN
        # Only for events with several data lines (see _scan_more):
        self._ev_parts: list[bytes] | None = None
        self._ev_bytes = 0
        self._ev_depth = 0
        # The shape of the last line with exactly one text value (see _scan_line): the bytes
        # before that value, the bytes after it, and the other keys' matches. None: no shape yet.
        self._shape_prefix: bytes | None = None
        self._shape_suffix = b""
        # What the other matches give (see _tally), or, if that depends on what is known so
        # far, the matches themselves (kept only then: memory per open stream).
        self._shape_tally: tuple[bool, int, bool] | list[tuple[bytes, bytes, bytes]] = (False, 0, False)
        #: First data lines in a row that did not have the shape (see _SHAPE_MISSES).
        self._shape_misses = 0
        #: While the last event had the shape and nothing is pending (see ``feed``): the shape's
        #: prefix and its length, its suffix with the event's end (``\n\n``) and that length, the
        #: longest text's end a piece within ``max_line_bytes`` has, and what the other keys give
        #: (has, bytes): all that its steadiest path reads, in one tuple.
        self._steady: tuple[bytes, int, bytes, int, int, bool, int] | None = None
        #: True while the pieces fed are taken by the steady path (see ``_LineScanner.steady_piece``).
        self.steady_piece = False

    def usage(self) -> Usage | None:
        """Token counts: the last ``usage`` object, else llama.cpp ``timings``, else None."""
        return self._usage if self._usage is not None else self._timings

    def feed(self, chunk: bytes) -> bool:
        """Scan the next piece of the body.

        Args:
          chunk: any number of bytes, split anywhere.

        Returns:
          True for the one call that completed the first line carrying content.
        """
        steady = self._steady
        if steady is not None:
            # The steadiest piece: one whole event of the shape the last ones had, its text
            # plain (no quote, backslash or newline). What _scan_line would find in it is
            # known but for the text's length: a fifth of the opcodes of the path below.
            prefix, start, suffix, cut, longest, has, nbytes = steady
            end = len(chunk) - cut
            if (start <= end <= longest and chunk.startswith(prefix) and chunk.endswith(suffix)
                    and _PLAIN_TEXT.fullmatch(chunk, start, end) is not None):
                self.steady_piece = True
                self._lines += 2
                if has or end > start:
                    self.content_chars += nbytes + end - start
                    self.content_events += 1
                    if not self.first_content:
                        self.first_content = True
                        return True
                return False
            self._steady = None
            self.steady_piece = False
        if b"\n" not in chunk:  # no line ends here: just hold the bytes
            if chunk:
                self._hold(chunk)
            return False
        seen = self.first_content
        if (
            chunk.endswith(b"\n\n")
            and chunk.startswith(b"data:")
            and chunk.find(b"\n") == len(chunk) - 2
            and not self._ev_lines
            and not self._held
            and not self._skipping
            and len(chunk) <= self._max_line_bytes
        ):
            # The common piece: exactly one whole one-line event, as a server writes it and a
            # relay reads it at token pace (~1 µs less than the loop below, which gives the same).
            line = chunk[:-2]
            crlf = line.endswith(b"\r")
            if crlf:
                line = line[:-1]
            self._lines += 2
            self._ev_lines = 1  # (no _ev_first: only a second data line reads it)
            self._scan_first(line)
            if self._ev_status == _FAILED:
                self._end_event()
            else:
                self._ev_lines = 0
                self._ev_content_bytes = -1
                self._ev_status = _OPEN
                if not self._shape_misses and self._shape_prefix is not None and not crlf:
                    # The line had the shape (no miss since it was learnt), and what its other
                    # keys give does not depend on what the stream said so far: steady.
                    tally = self._shape_tally
                    if isinstance(tally, tuple) and not tally[2]:
                        suffix = self._shape_suffix + b"\n\n"
                        prefix = self._shape_prefix
                        self._steady = (prefix, len(prefix), suffix, len(suffix),
                                        self._max_line_bytes - len(suffix), tally[0], tally[1])
            return self.first_content and not seen
        for line in self._split(chunk):
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:  # the end of an event
                if self._ev_lines:
                    if self._ev_status == _FAILED or self._ev_parts is not None:
                        self._end_event()
                    else:  # inlined: the common case is worth ~0.3 µs here
                        self._ev_lines = 0
                        self._ev_first = b""  # (a stream would hold its last line while it waits)
                        self._ev_content_bytes = -1
                        self._ev_status = _OPEN
            elif line.startswith(b"data:"):
                self._ev_lines += 1
                if self._ev_lines == 1:
                    self._ev_first = line
                    self._scan_first(line)
                else:
                    self._scan_more(_data_value(line))
            elif line == b"data":  # a field name without colon: an empty data line
                self._ev_lines += 1
                if self._ev_lines == 1:
                    self._ev_first = b"data:"
                else:
                    self._scan_more(b"")
            # ":" comments and event:/id:/retry: fields carry nothing we need
        return self.first_content and not seen

    def _scan_first(self, line: bytes) -> None:
        """The fast path: the first data line of an event, most often the whole event."""
        if line.endswith(b"[DONE]") and _data_value(line).strip() == b"[DONE]":
            self.done = True
            self._ev_status = _SETTLED
            return
        has, nbytes, decode = self._scan_line(line)  # the "data:" prefix cannot match a key
        if has:  # (_count_content, inlined: once per token)
            self.content_chars += nbytes
            self.content_events += 1
            self.first_content = True
            self._ev_content_bytes = nbytes
        if decode:
            obj = self._decode(line[5:])  # JSON allows the leading space
            if obj is None:
                # Policy: not malformed yet, the next data line may complete it.
                self._ev_status = _FAILED
            else:
                self._apply(obj)
                self._ev_status = _SETTLED

    def _scan_line(self, line: bytes) -> tuple[bool, int, bool]:
        """``_scan`` of a first data line, a third of the cost when it has the last one's shape.

        A server writes every token's event alike: the same id, model and keys, only the
        text differs. When ``line`` is the remembered prefix, a JSON string body, and the
        remembered suffix, ``_SSE_KEYS.findall`` would find the same matches as in the
        line the shape was taken from, with this text in place of that one: the matches
        before the text end before it (they depend on the prefix's bytes only), the text's
        match ends at the suffix's opening quote (the body has no unescaped quote and no
        dangling backslash), and the search goes on from the same place in the same suffix.
        So only the text's length and the other matches are needed (``test_usage.py``
        checks this against ``_scan`` on generated streams).
        """
        prefix = self._shape_prefix
        if prefix is not None and line.startswith(prefix) and line.endswith(self._shape_suffix):
            start = len(prefix)
            end = len(line) - len(self._shape_suffix)
            if start <= end and (
                (line.find(b'"', start, end) < 0 and line.find(b"\\", start, end) < 0)
                or _STRING_BODY.fullmatch(line, start, end)
            ):
                self._shape_misses = 0
                tally = self._shape_tally
                has, nbytes, decode = self._tally(tally) if isinstance(tally, list) else tally
                return has or end > start, nbytes + end - start, decode
        if self._shape_misses >= _SHAPE_MISSES:
            # Lines that change around their text (OpenAI's "obfuscation", vLLM's continuous
            # usage, logprobs): learning a shape per line costs more than the regex alone.
            return self._scan(line)
        self._shape_misses += 1
        matches: list[tuple[bytes, bytes, bytes]] = []
        texts = text_index = 0
        text_at = (0, 0)
        for m in _SSE_KEYS.finditer(line):
            key, text, other = m.groups(b"")
            if not other and key in _TEXT_KEYS:  # a string value of a text key
                texts += 1
                text_at, text_index = m.span(2), len(matches)
            matches.append((key, text, other))
        if texts == 1:  # (two texts, several choices say: no shape to keep)
            self._shape_prefix, self._shape_suffix = line[: text_at[0]], line[text_at[1] :]
            others = matches[:text_index] + matches[text_index + 1 :]
            self._shape_tally = others if any(
                (key == b"finish_reason" and not other) or (key == b"timings" and other == b"{")
                for key, _, other in others
            ) else self._tally(others)
        return self._tally(matches)

    def _scan(self, data: bytes) -> tuple[bool, int, bool]:
        """(has content, content bytes, worth decoding) of an event's data, from bytes."""
        return self._tally(_SSE_KEYS.findall(data))

    def _tally(self, matches: list[tuple[bytes, bytes, bytes]]) -> tuple[bool, int, bool]:
        """(has content, content bytes, worth decoding) from ``_SSE_KEYS`` matches."""
        has = False
        nbytes = 0
        decode = False
        for key, text, other in matches:
            if not other:  # a string value
                if text and key in _TEXT_KEYS:
                    has = True
                    nbytes += len(text)
                elif key == b"finish_reason":
                    decode = decode or self.finish_reason is None
                elif key == b"error":  # a bare error string
                    decode = True
            elif key == b"tool_calls":  # "[" and then not "]"
                has = has or (len(other) > 1 and other[0] == 0x5B and other[-1] != 0x5D)
            elif key == b"usage":
                decode = decode or other == b"{"
            elif key == b"error":
                decode = decode or other != b"n"  # an error object; null is no error
            elif key == b"timings":  # llama.cpp: only a fallback, skip once usage is known
                decode = decode or (other == b"{" and self._usage is None)
        return has, nbytes, decode

    def _apply(self, obj: dict[str, Any]) -> None:
        err = obj.get("error")
        if err is not None and self.error is None:
            self.error = _error_message(err)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage = Usage(prompt_tokens=_int(usage.get("prompt_tokens")),
                                completion_tokens=_int(usage.get("completion_tokens")))
        timings = obj.get("timings")
        if isinstance(timings, dict):
            self._timings = Usage(prompt_tokens=_int(timings.get("prompt_n")),
                                  completion_tokens=_int(timings.get("predicted_n")))
        choices = obj.get("choices")
        if self.finish_reason is None and isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    reason = choice.get("finish_reason")
                    if isinstance(reason, str):
                        self.finish_reason = reason
                        break

    def _scan_more(self, value: bytes) -> None:
        """A second or later data line of the same event (rare: see the class docstring)."""
        blank = not value.strip()
        if self._ev_status == _SETTLED:
            if not blank:
                self._malformed += 1
            return
        if self._ev_parts is None:
            first = _data_value(self._ev_first)
            self._ev_depth = _json_depth(first)
            if self._ev_depth <= 0 and first.strip() and not blank:
                self._malformed += 1  # the first line was a whole value; this one is extra
                self._ev_status = _SETTLED
                return
            self._ev_parts = [first]
            self._ev_bytes = len(first)
        self._ev_parts.append(value)
        self._ev_bytes += 1 + len(value)
        if self._ev_bytes > self._max_line_bytes:
            self._oversize += 1  # the same cap as for one line
            self._ev_parts = None
            self._ev_status = _SETTLED
            return
        self._ev_depth += _json_depth(value)
        if self._ev_depth <= 0 and not blank:
            self._settle_joined()

    def _settle_joined(self) -> None:
        assert self._ev_parts is not None
        data = b"\n".join(self._ev_parts)
        self._ev_parts = None
        self._ev_status = _SETTLED
        if data.strip() == b"[DONE]":
            self.done = True
            return
        has, nbytes, decode = self._scan(data)
        if has:
            # Matches in the first line are matches in the joined text too: add the rest.
            counted = self._ev_content_bytes  # -1: none yet
            self._count_content(nbytes - max(counted, 0), new_event=counted < 0)
            self._ev_content_bytes = nbytes
        if decode:
            obj = self._decode(data)
            if obj is None:
                self._malformed += 1
            else:
                self._apply(obj)

    def _end_event(self) -> None:
        if self._ev_status != _SETTLED:
            if self._ev_parts is not None:
                self._settle_joined()
            elif self._ev_status == _FAILED:
                self._malformed += 1
        self._ev_lines = 0
        self._ev_first = b""
        self._ev_content_bytes = -1
        self._ev_status = _OPEN
        self._ev_parts = None


class NDJSONScanner(_LineScanner):
    """Scans Ollama's ``application/x-ndjson`` streams (/api/chat and /api/generate).

    One JSON object per line; blank lines are skipped. The ``"done": true`` line sets
    ``done``, ``finish_reason`` (its ``done_reason``) and usage (``prompt_eval_count``,
    ``eval_count``; Ollama omits a zero count, so a missing one reads as 0). A bare
    ``{"error": "..."}`` line sets ``error`` even though the status stayed 200.
    """

    def end_of_body(self) -> None:
        """A last line without its newline is a line all the same (a client reading lines gets it)."""
        if self._held:
            self.feed(b"\n")

    def feed(self, chunk: bytes) -> bool:
        """Scan the next piece of the body.

        Args:
          chunk: any number of bytes, split anywhere.

        Returns:
          True for the one call that completed the first line carrying content.
        """
        if b"\n" not in chunk:
            if chunk:
                self._hold(chunk)
            return False
        seen = self.first_content
        for line in self._split(chunk):
            has = False
            nbytes = 0
            decode = False
            for key, text, other in _NDJSON_KEYS.findall(line):
                if not other:  # a string value
                    if text and key in _TEXT_KEYS:
                        has = True
                        nbytes += len(text)
                    elif key == b"error":
                        decode = True
                elif key == b"done":
                    decode = decode or other == b"t"  # true
                elif key == b"tool_calls":
                    has = has or (len(other) > 1 and other[0] == 0x5B and other[-1] != 0x5D)
                elif key == b"error":
                    decode = decode or other != b"n"
            if has:
                self._count_content(nbytes, new_event=True)
            if decode:
                obj = self._decode(line)
                if obj is None:
                    self._malformed += 1
                else:
                    self._apply(obj)
        return self.first_content and not seen

    def _apply(self, obj: dict[str, Any]) -> None:
        err = obj.get("error")
        if err is not None and self.error is None:
            self.error = _error_message(err)
        if obj.get("done") is True:
            self.done = True
            reason = obj.get("done_reason")
            if self.finish_reason is None and isinstance(reason, str):
                self.finish_reason = reason
            self._usage = Usage(prompt_tokens=_int(obj.get("prompt_eval_count", 0)),
                                completion_tokens=_int(obj.get("eval_count", 0)))
