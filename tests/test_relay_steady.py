"""The relay's short path for a steady piece (``relay.pump``, ``SSEScanner.steady_piece``).

A piece that is one whole event of the last event's shape, its text plain, skips the usage
filter's and the hold-back's steps: the filter's work on it is one ``bytes.replace`` of the
compact null member (unless another ``"usage"`` is left, when the filter runs as ever). What
the client gets, and what the record says, must be what the whole path gives: ``pump`` is run
here with the scanner as it is and with one that never reports a steady piece, on the same
pieces, with a fake upstream response (no sockets: the steps between the reads are what is
tested; ``test_relay_bytes`` relays through real sockets).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.relay import _ClientWriter, pump, sse_error_event
from trioproxy.usage import SSEScanner
from trioproxy.usagefilter import UsageEventFilter

from .test_usage import OPENAI_CHAT, OPENAI_CHAT_PLAIN, QUIRKS, VLLM_CHOICES_ABSENT, pieces_of
from .test_usagefilter import injected_streams


class NeverSteady(SSEScanner):
    """The scanner with every piece taking the whole path in the relay."""

    steady_piece = property(lambda self: False, lambda self, value: None)  # type: ignore[assignment]


class _Response:
    """The pieces as the upstream's reads give them, then the end of the body."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = [piece for piece in pieces if piece]  # (b"" is the end of the body)

    async def receive_some(self, *, schedule: bool = False) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.pieces.pop(0) if self.pieces else b""


def relay(scanner: SSEScanner, pieces: list[bytes], *, usage_filter: bool = True,
          prefetch: int = 0) -> tuple[list[bytes], dict[str, Any], list[bool]]:
    """What ``pump`` writes for ``pieces``, the record's facts, and ``steady_piece`` after each feed.

    ``prefetch``: the first pieces were read by the attempt (its scanner fed them), as a race's
    winner hands them over; the relay sends them first."""
    pieces = [piece for piece in pieces if piece]
    prefetched, pieces = pieces[:prefetch], pieces[prefetch:]
    first_index = None
    for index, piece in enumerate(prefetched):
        if scanner.feed(piece) and first_index is None:
            first_index = index
    steadies: list[bool] = []
    feed = scanner.feed

    def spy(chunk: bytes) -> bool:
        first = feed(chunk)
        steadies.append(scanner.steady_piece)
        return first

    scanner.feed = spy  # type: ignore[method-assign]
    ex = SimpleNamespace(request_id=b"r", arrival=0.0, status=200, outcome="ok", error=None, response_started=True,
                         atomic_end=False, finished=False, ended=False, client_gone=False, captured=None,
                         ttft_ms=None, bytes_out=0, first_content_index=None)
    winner = SimpleNamespace(response=_Response(pieces), scanner=scanner, prefetched=prefetched, first_content_index=first_index,
                             target=SimpleNamespace(upstream="u"), runtime=SimpleNamespace(redact=lambda text: text))
    writes: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        writes.append(message["body"])

    async def main() -> None:
        writer = _ClientWriter(ex, send, winner, 10.0)  # type: ignore[arg-type]
        await pump(ex, winner, writer, UsageEventFilter() if usage_filter else None,  # type: ignore[arg-type]
                   lambda message: sse_error_event(message), 1 << 30)

    trio.run(main)
    facts = {key: getattr(ex, key) for key in ("first_content_index", "finished", "outcome", "error", "bytes_out")}
    facts.update(content_chars=scanner.content_chars, content_events=scanner.content_events, usage=scanner.usage(),
                 finish_reason=scanner.finish_reason, done=scanner.done, first_content=scanner.first_content)
    return writes, facts, steadies


def by_event(stream: bytes) -> list[bytes]:
    """One piece per event, as a server writes them and a relay reads them at token pace."""
    return [event + b"\n\n" for event in stream.split(b"\n\n")[:-1]] + ([tail] if (tail := stream.split(b"\n\n")[-1]) else [])


def token_stream(n: int, *, usage: bytes = b',"usage":null') -> bytes:
    events = [b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
              b'"delta":{"content":"%s"},"logprobs":null,"finish_reason":null}]%s}\n\n' % (b" t%d" % i, usage)
              for i in range(n)]
    finish = (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
              b'"delta":{},"logprobs":null,"finish_reason":"stop"}]%s}\n\n' % usage)
    tail = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (n, n + 3)
    return b"".join(events) + finish + (tail if usage else b"") + b"data: [DONE]\n\n"


def test_a_token_stream_takes_the_steady_path_and_comes_out_as_the_whole_path_gives_it() -> None:
    """The mock's (and vLLM's) stream with usage injected: all but the first few tokens are steady, and
    the client gets the stream without the injection, the record the same counts."""
    stream = token_stream(40)
    writes, facts, steadies = relay(SSEScanner(), by_event(stream))
    whole, whole_facts, never = relay(NeverSteady(), by_event(stream))
    assert sum(steadies) >= 36 and not any(never)  # (a test that cannot pass vacuously)
    assert writes == whole and facts == whole_facts
    assert b"".join(writes) == token_stream(40, usage=b"")  # the injection taken out: tokens and finish, no tail
    assert facts["usage"] is not None and facts["usage"].completion_tokens == 40 and facts["finish_reason"] == "stop"
    assert facts["outcome"] == "ok" and facts["finished"] and facts["first_content_index"] == 0


def test_a_steady_piece_with_another_usage_goes_through_the_filter() -> None:
    """``"usage": null`` with a space is not the compact member: left after the replace, the filter
    takes the piece (and takes the member out its way)."""
    stream = token_stream(20, usage=b',"usage": null')
    writes, facts, steadies = relay(SSEScanner(), by_event(stream))
    assert sum(steadies) >= 16
    assert (writes, facts) == relay(NeverSteady(), by_event(stream))[:2]
    assert b'"usage"' not in b"".join(writes)


@pytest.mark.parametrize("stream", [OPENAI_CHAT, OPENAI_CHAT_PLAIN, QUIRKS, VLLM_CHOICES_ABSENT], ids=["openai", "openai-plain", "quirks", "vllm-choices-absent"])
@pytest.mark.parametrize("usage_filter", [True, False])
def test_recorded_streams_by_event(stream: bytes, usage_filter: bool) -> None:
    assert relay(SSEScanner(), by_event(stream), usage_filter=usage_filter)[:2] == relay(
        NeverSteady(), by_event(stream), usage_filter=usage_filter)[:2]


@settings(max_examples=300, deadline=None)
@given(injected_streams(), st.data())
def test_any_injected_stream_any_split(streams: tuple[bytes, bytes], data: st.DataObject) -> None:
    """Generated streams (either JSON spacing, CRLF, comments, the usage member anywhere, texts with
    escapes), read an event at a time or cut anywhere: the same writes and facts both ways."""
    injected, plain = streams
    pieces = by_event(injected) if data.draw(st.booleans()) else data.draw(pieces_of(injected))
    writes, facts, _ = relay(SSEScanner(), pieces)
    assert (writes, facts) == relay(NeverSteady(), pieces)[:2]
    assert b"".join(writes) == plain


def test_a_stream_cut_after_steady_pieces_ends_with_the_error_after_whole_events() -> None:
    """Steady pieces, then a piece cut mid-event and the end of the body: the broken event is held
    back and the error follows the last whole one, as on the whole path."""
    events = by_event(token_stream(10))[:8]
    pieces = [*events, events[0][:50]]
    writes, facts, _ = relay(SSEScanner(), pieces)
    assert (writes, facts) == relay(NeverSteady(), pieces)[:2]
    assert facts["outcome"] == "upstream_error" and json.loads(writes[-1][6:])["error"]["type"] == "upstream_error"
    assert b"".join(writes[:-1]) == b"".join(events).replace(b',"usage":null', b"")  # whole events, then the error


#: Pieces a server or a proxy in front of it may put between events, each read on its own: a comment
#: or a field line without its blank line holds the relay's hold-back (and opens the scanner's event).
BETWEEN = st.sampled_from([b": c\n", b": keep-alive\n\n", b"event: message\n", b"id: 7\n", b"retry: 10\n", b"\n"])


@settings(max_examples=300, deadline=None)
@given(injected_streams(), st.data())
def test_pieces_between_events_and_a_prefetched_start(streams: tuple[bytes, bytes], data: st.DataObject) -> None:
    """Comment and field lines read as pieces of their own, anywhere between whole events, and the
    attempt's prefetched pieces: the steady path's claim that nothing is held when it skips the
    filter and the hold-back is put to the test (a scanner that reported steady too early, on the
    piece that learns the shape, fails here)."""
    injected, _ = streams
    pieces: list[bytes] = []
    for event in by_event(injected):
        pieces += data.draw(st.lists(BETWEEN, max_size=2))
        pieces.append(event)
    prefetch = data.draw(st.integers(0, len(pieces)))
    writes, facts, _ = relay(SSEScanner(), pieces, prefetch=prefetch)
    assert (writes, facts) == relay(NeverSteady(), pieces, prefetch=prefetch)[:2]
