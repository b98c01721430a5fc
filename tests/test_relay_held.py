"""The relay's hold-back of a partial event (SSE) or line (NDJSON): sans-IO, any split of the bytes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trioproxy.relay import _Held
from trioproxy.usage import DEFAULT_MAX_LINE_BYTES

SSE_EVENTS = st.lists(
    st.sampled_from([
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n',
        b'data: {"choices":[{"delta":\ndata: {"content":"two lines"}}]}\n\n',  # one event, two data lines
        b'data: {"x":1}\r\n\r\n',  # CRLF framing
        b": keep-alive\n\n",
        b"data: [DONE]\n\n",
    ]),
    max_size=8,
)
NDJSON_LINES = st.lists(st.sampled_from([b'{"message":{"content":"Hi"},"done":false}\n', b"\n", b'{"done":true}\n']), max_size=8)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


def _relay(held: _Held, pieces: list[bytes]) -> list[bytes]:
    return [out for piece in pieces if (out := held.take(piece))]


@given(SSE_EVENTS, st.lists(st.integers(0, 10_000), max_size=12), st.binary(max_size=40))
def test_sse_goes_out_a_whole_event_at_a_time(events: list[bytes], cuts: list[int], cut_off: bytes) -> None:
    stream = b"".join(events)
    held = _Held(sse=True)
    sent = _relay(held, _split(stream + cut_off, cuts))
    # Nothing lost, nothing doubled: what went out and what is held are the stream, in order.
    assert b"".join(sent) + held.tail == stream + cut_off
    # Each write ends an event (a blank line): a cut now leaves the client whole events only.
    assert all(out.endswith((b"\n\n", b"\n\r\n")) for out in sent)
    # Every whole event went out (what is held has no event boundary in it, unless cut_off made one).
    if b"\n\n" not in cut_off and b"\n\r\n" not in cut_off and not cut_off.startswith((b"\n", b"\r\n")):
        assert b"".join(sent) == stream


@given(NDJSON_LINES, st.lists(st.integers(0, 10_000), max_size=12), st.binary(max_size=40).filter(lambda b: b"\n" not in b))
def test_ndjson_goes_out_a_whole_line_at_a_time(lines: list[bytes], cuts: list[int], partial: bytes) -> None:
    stream = b"".join(lines)
    held = _Held(sse=False)
    sent = _relay(held, _split(stream + partial, cuts))
    assert b"".join(sent) == stream and held.tail == partial
    assert all(out.endswith(b"\n") for out in sent)


def test_a_line_longer_than_the_limit_goes_on_as_it_comes() -> None:
    """Held without bound, one endless line would take memory and copying time; past the usage
    filter's line limit it is relayed as it comes (no event that long is a token)."""
    held = _Held(sse=False)
    piece = b"x" * 65_536
    out = [held.take(piece) for _ in range(DEFAULT_MAX_LINE_BYTES // len(piece) + 2)]
    assert any(out) and len(held.tail) <= DEFAULT_MAX_LINE_BYTES
    assert sum(map(len, out)) + len(held.tail) == len(out) * len(piece)
