"""The mock upstream's replies and their bytes: tokens, reply types, generations [sans-IO].

``mockwire.plan_reply`` decides on a :class:`Static` reply or a :class:`Generation`;
``mock.py`` writes what :meth:`Static.render` and :class:`GenerationRenderer` return,
passing the time in. Nothing here does I/O or reads a clock.

Kept apart from ``mockpayloads`` and ``mockwire`` (which reply answers a request)
because this is the output side only: the reply types every layer above shares,
and the byte templates of OpenAI SSE, Ollama NDJSON and whole JSON generations,
built from the fixed token cycle below.

Determinism (tests rely on it): content token ``i`` of choice ``c`` (OpenAI's ``n``) is
``TOKENS[(i + c) % len(TOKENS)]``: choice 0 reads "Hello from the mock upstream...", and
each other choice is told apart from it by its text as well as by its index.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from functools import lru_cache
from typing import Literal

from attrs import frozen

from .mockhttp import LAST_CHUNK, frame_chunk, response_head

#: A fixed cycle makes every answer reproducible and its text checkable in tests.
TOKENS: tuple[str, ...] = (
    "Hello", " from", " the", " mock", " upstream", ".", " The", " quick",
    " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".",
)
#: The model is always loaded: a warm Ollama reports a fraction of a millisecond.
LOAD_DURATION_NS = 250_000

Api = Literal["chat", "completion", "ollama_chat", "ollama_generate"]

_STREAM_TYPES: dict[Api, str] = {
    "chat": "text/event-stream", "completion": "text/event-stream",
    "ollama_chat": "application/x-ndjson", "ollama_generate": "application/x-ndjson",
}


@lru_cache(maxsize=1024)
def _json_str(text: str) -> bytes:
    return json.dumps(text).encode()


@lru_cache(maxsize=256)
def content_text(n: int, choice: int = 0) -> str:
    """The text of the first ``n`` content tokens (of choice ``choice``)."""
    return "".join(TOKENS[(i + choice) % len(TOKENS)] for i in range(n))


def rfc3339(ts: float) -> str:
    """``ts`` (Unix seconds) as Ollama writes ``created_at``: UTC, microseconds, ``Z``."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
    """A completion to produce over time; ``tokens`` is already capped by max_tokens.

    ``tokens`` counts each choice's tokens; ``choices`` is OpenAI's ``n`` (1 for Ollama).
    ``finish_reason`` ``"load"``: an Ollama request with nothing to answer (empty
    ``messages`` or ``prompt``) that only loads the model: one ``done`` object without
    content or counters, never streamed, no tokens.
    """

    api: Api
    model: str
    stream: bool
    tokens: int
    finish_reason: Literal["stop", "length", "load"]
    prompt_tokens: int
    include_usage: bool = False
    choices: int = 1

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


# --- streamed and whole generations -----------------------------------------------

_TOKEN_JSON = tuple(_json_str(t) for t in TOKENS)
_CHAT_TOKEN = tuple(b'[{"index":0,"delta":{"content":%s},"logprobs":null,"finish_reason":null}]' % t for t in _TOKEN_JSON)
_TEXT_TOKEN = tuple(b'[{"index":0,"text":%s,"logprobs":null,"finish_reason":null}]' % t for t in _TOKEN_JSON)
_OLLAMA_CHAT_TOKEN = tuple(b'","message":{"role":"assistant","content":%s},"done":false}\n' % t for t in _TOKEN_JSON)
_OLLAMA_GEN_TOKEN = tuple(b'","response":%s,"done":false}\n' % t for t in _TOKEN_JSON)
_ROLE_CHOICES = b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'


@lru_cache(maxsize=256)
def _choice_tokens(api: Api, c: int) -> tuple[bytes, ...]:
    """Choice ``c``'s event payloads (``n`` > 1), one per token of the cycle, in the cycle's order."""
    if api == "chat":
        return tuple(b'[{"index":%d,"delta":{"content":%s},"logprobs":null,"finish_reason":null}]' % (c, t)
                     for t in _TOKEN_JSON)
    return tuple(b'[{"index":%d,"text":%s,"logprobs":null,"finish_reason":null}]' % (c, t) for t in _TOKEN_JSON)


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
        """What goes out with the headers: the chat role chunk (one per choice), else nothing."""
        if self.gen.api != "chat":
            return b""
        if self.gen.choices == 1:
            return self._sse(_ROLE_CHOICES)
        return b"".join(self._sse(b'[{"index":%d,"delta":{"role":"assistant","content":""},"logprobs":null,'
                                  b'"finish_reason":null}]' % c) for c in range(self.gen.choices))

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

    def step(self, i: int) -> bytes:
        """Token ``i`` of every choice (``n`` > 1), one event each, in index order, for one write.

        A server samples the ``n`` sequences together, so a step's events leave together:
        the pacer writes one step per token delay, the schedule of ``n`` = 1.
        """
        size = len(TOKENS)
        return b"".join(self._sse(_choice_tokens(self.gen.api, c)[(i + c) % size])
                        for c in range(self.gen.choices))

    def _usage(self) -> bytes:
        p, c = self.gen.prompt_tokens, self.gen.tokens * self.gen.choices
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

    def _ollama_load(self, created_at: str) -> bytes:
        # Ollama's handlers answer it with c.JSON: its metrics are all omitempty and zero.
        if self.gen.api == "ollama_chat":
            middle = b'"message":{"role":"assistant","content":""},"done_reason":"load","done":true}'
        else:
            middle = b'"response":"","done":true,"done_reason":"load"}'
        return self._prefix + created_at.encode() + b'",' + middle

    def closing(self, timings: Timings, *, created_at: str = "") -> list[bytes]:
        """The events after the last token, one write each; the last one ends the body."""
        g = self.gen
        end = LAST_CHUNK if self._chunked else b""
        if g.api in ("ollama_chat", "ollama_generate"):
            return [self._frame(self._ollama_final(b'""', timings, created_at) + b"\n") + end]
        reason = g.finish_reason.encode()
        if g.api == "chat":
            finish = b'[{"index":%d,"delta":{},"logprobs":null,"finish_reason":"%s"}]'
        else:
            finish = b'[{"index":%d,"text":"","logprobs":null,"finish_reason":"%s"}]'
        pieces = [self._sse(finish % (c, reason)) for c in range(g.choices)]  # each choice's own end
        if g.include_usage:
            pieces.append(self._frame(self._prefix + b'[],"usage":' + self._usage() + b"}\n\n"))
        pieces.append(self._frame(b"data: [DONE]\n\n") + end)
        return pieces

    def whole(self, timings: Timings, *, created_at: str = "") -> bytes:
        """The non-streamed answer body."""
        g = self.gen
        if g.api in ("ollama_chat", "ollama_generate"):
            if g.finish_reason == "load":
                return self._ollama_load(created_at)
            return self._ollama_final(_json_str(content_text(g.tokens)), timings, created_at)
        if g.api == "chat":
            obj, shape = b"chat.completion", b'"message":{"role":"assistant","content":%s}'
        else:
            obj, shape = b"text_completion", b'"text":%s'
        reason = g.finish_reason.encode()
        if g.choices == 1:  # the hot path (a small answer, one choice): one template, as few operations as ever
            return (
                b'{"id":"%s","object":"%s","created":%d,"model":%s,"choices":[{"index":0,%s,"logprobs":null,'
                b'"finish_reason":"%s"}],"usage":%s}'
                % (self._id, obj, self._created, self._model, shape % _json_str(content_text(g.tokens)), reason,
                   self._usage())
            )
        choices = b",".join(b'{"index":%d,%s,"logprobs":null,"finish_reason":"%s"}'
                            % (c, shape % _json_str(content_text(g.tokens, c)), reason) for c in range(g.choices))
        return (
            b'{"id":"%s","object":"%s","created":%d,"model":%s,"choices":[%s],"usage":%s}'
            % (self._id, obj, self._created, self._model, choices, self._usage())
        )
