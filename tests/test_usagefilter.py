"""Tests for trioproxy.usagefilter: removing an injected include_usage from SSE streams (sans-IO, sync).

The streams are the recorded-format fixtures of ``test_usage``, in their injected
and plain forms: every split of an injected stream must give the plain bytes, and
a stream the gateway did not touch must come out byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioproxy.usagefilter import UsageEventFilter

from .test_usage import (
    LLAMACPP,
    OLLAMA_CHAT,
    OLLAMA_V1,
    OLLAMA_V1_INJECTED,
    OPENAI_CHAT,
    OPENAI_CHAT_PLAIN,
    OPENAI_COMPLETIONS,
    OPENAI_COMPLETIONS_PLAIN,
    QUIRKS,
    VLLM_CHOICES_ABSENT,
    VLLM_CHOICES_ABSENT_PLAIN,
    VLLM_CONTINUOUS,
    VLLM_CONTINUOUS_EVENTS,
    chunk,
    counts,
    crlf,
    pieces_of,
    sse,
    texts,
)


FILTER_PAIRS = {
    "openai_chat": (OPENAI_CHAT, OPENAI_CHAT_PLAIN),
    "openai_chat_crlf": (crlf(OPENAI_CHAT), crlf(OPENAI_CHAT_PLAIN)),
    "openai_completions": (OPENAI_COMPLETIONS, OPENAI_COMPLETIONS_PLAIN),
    "vllm_choices_absent": (VLLM_CHOICES_ABSENT, VLLM_CHOICES_ABSENT_PLAIN),
    "ollama_v1": (OLLAMA_V1_INJECTED, OLLAMA_V1),
    # Usage on chunks that carry choices stays (continuous stats); only the tail goes.
    "vllm_continuous": (VLLM_CONTINUOUS, sse(*VLLM_CONTINUOUS_EVENTS[:3], "[DONE]")),
    "spaced_first_member": (
        sse('{"usage": null, "choices": [{"index": 0, "delta": {"content": "a"}}]}',
            '{ "usage": null, "choices": [] }',
            '{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}', "[DONE]"),
        sse('{"choices": [{"index": 0, "delta": {"content": "a"}}]}', '{ "choices": [] }', "[DONE]")),
}
# Streams the gateway did not touch: forwarded byte for byte.
UNTOUCHED = {
    "plain_chat": OPENAI_CHAT_PLAIN,
    "llamacpp": LLAMACPP,
    "quirks": QUIRKS,
    "usage_null_in_content": chunk('{"content":",\\"usage\\":null"}'),
    "ndjson": OLLAMA_CHAT,
}


def filtered(pieces: list[bytes], **kwargs: Any) -> tuple[bytes, list[bytes]]:
    usage_filter = UsageEventFilter(**kwargs)
    outs = [usage_filter.feed(piece) for piece in pieces]
    return b"".join(outs) + usage_filter.flush(), outs


FILTER_CASES = [(name, stream, plain) for name, (stream, plain) in FILTER_PAIRS.items()] + [
    (name, stream, stream) for name, stream in UNTOUCHED.items()]


@pytest.mark.parametrize("cut", range(max(len(stream) for _, stream, _ in FILTER_CASES) + 1))
def test_filter_every_single_split_point(cut: int) -> None:
    for name, stream, plain in FILTER_CASES:
        if cut <= len(stream):
            assert filtered([stream[:cut], stream[cut:]])[0] == plain, f"{name} split at {cut}"


@pytest.mark.parametrize("name", list(FILTER_PAIRS) + list(UNTOUCHED))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_filter_arbitrary_multiway_splits(name: str, data: st.DataObject) -> None:
    stream, plain = FILTER_PAIRS.get(name) or (UNTOUCHED[name], UNTOUCHED[name])
    out, _ = filtered(data.draw(pieces_of(stream)))
    assert out == plain


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_filter_never_holds_back_a_complete_line(data: st.DataObject) -> None:
    stream = data.draw(st.sampled_from([OPENAI_CHAT_PLAIN, QUIRKS, LLAMACPP]))
    pieces = data.draw(pieces_of(stream))
    _, outs = filtered(pieces)
    fed = b""
    forwarded = b""
    for piece, out in zip(pieces, outs):
        fed += piece
        forwarded += out
        assert forwarded == fed[: fed.rfind(b"\n") + 1]


@st.composite
def injected_streams(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(injected, plain): chunks with a usage-null member somewhere, and the usage tail."""
    separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    injected = plain = ""
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            comment = ": ping" + eol + eol
            injected += comment
            plain += comment
        members: list[tuple[str, Any]] = [("id", "chatcmpl-1"), ("object", "chat.completion.chunk"),
                   ("choices", [{"index": 0, "delta": {"content": draw(texts)}, "finish_reason": None}])]
        at = draw(st.integers(0, len(members)))
        prefix = draw(st.sampled_from(["data: ", "data:"]))
        plain += prefix + json.dumps(dict(members), separators=separators) + eol + eol
        members.insert(at, ("usage", None))
        injected += prefix + json.dumps(dict(members), separators=separators) + eol + eol
    tail: dict[str, Any] = {"id": "chatcmpl-1"}
    choices = draw(st.sampled_from(["empty", "null", "absent"]))
    if choices != "absent":
        tail["choices"] = [] if choices == "empty" else None
    tail["usage"] = {"prompt_tokens": draw(counts), "completion_tokens": draw(counts)}
    injected += "data: " + json.dumps(tail, separators=separators) + eol + eol
    done = "data: [DONE]" + eol + eol
    return (injected + done).encode(), (plain + done).encode()


@settings(max_examples=300, deadline=None)
@given(injected_streams(), st.data())
def test_filter_removes_exactly_the_injection(streams: tuple[bytes, bytes], data: st.DataObject) -> None:
    injected, plain = streams
    assert filtered(data.draw(pieces_of(injected)))[0] == plain
    assert filtered(data.draw(pieces_of(plain)))[0] == plain


@pytest.mark.parametrize(("line", "kept"), [
    (b'data: {"usage":null}\n', b"data: {}\n"),
    (b'data: {"a":1,"usage":null,"b":2}\n', b'data: {"a":1,"b":2}\n'),
    (b'data: {"a": 1, "usage" : null }\n', b'data: {"a": 1 }\n'),
    (b'data: {"usage":nullx,"a":1}\n', b'data: {"usage":nullx,"a":1}\n'),  # not JSON null: kept
    (b': {"a":1,"usage":null}\n', b': {"a":1,"usage":null}\n'),  # a comment, not data
    (b'data: {"choices":[],"usage":{"prompt_tokens":1},"error":{"message":"x"}}\n',
     b'data: {"choices":[],"usage":{"prompt_tokens":1},"error":{"message":"x"}}\n'),
    (b'data: {"choices":[],"usage":{"prompt_tokens":1}\n', b'data: {"choices":[],"usage":{"prompt_tokens":1}\n'),
])
def test_filter_lines(line: bytes, kept: bytes) -> None:
    assert filtered([line])[0] == kept


def test_filter_drops_the_whole_usage_event_up_to_its_blank_line() -> None:
    stream = (b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n'
              b"id: 9\n\n"
              b"data: [DONE]\n\n")
    assert filtered([stream])[0] == b"data: [DONE]\n\n"


def test_filter_flush_rewrites_a_last_line_without_newline() -> None:
    assert filtered([b'data: {"a":1,"usage":null}'])[0] == b'data: {"a":1}'
    assert filtered([b'data: {"choices":[],"usage":{"prompt_tokens":1}}'])[0] == b""


def test_filter_passes_oversize_lines_untouched_however_they_arrive() -> None:
    line = b'data: {"a":"' + b"x" * 100 + b'","usage":null}\n\n'
    for cut in range(len(line) + 1):
        out, outs = filtered([line[:cut], line[cut:]], max_line_bytes=50)
        assert out == line
        if cut > 50:
            assert outs[0] == line[:cut]  # past the cap nothing is held back


_FRAGMENTS = [
    b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}',
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}',
    b'data: {"usage":null,"id":"c"}',
    b'data: {"id":"c" , "usage" : null}',
    b'data: [DONE]',
    b': keep-alive ,"usage":null',
    b'id: 7,"usage":null',
    b'event: message',
    b"",
    b"\r",
    b'data: {"a":1,"usage":null,"usage":null}',
    b'data: ' + b"x" * 60 + b',"usage":null}',
]


def _line_by_line(block: bytes, max_line_bytes: int) -> bytes:
    slow = UsageEventFilter(max_line_bytes=max_line_bytes)
    slow._all_on_data_lines = lambda block: False  # type: ignore[method-assign]
    return slow.feed(block) + slow.flush()


@given(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=12), st.sampled_from([40, 1 << 20]))
def test_filter_fast_path_gives_the_bytes_of_the_line_by_line_path(lines: list[bytes], max_line: int) -> None:
    """The one-pass replace for blocks of compact null members must equal rewriting each line."""
    block = b"\n".join(lines) + b"\n"
    fast = UsageEventFilter(max_line_bytes=max_line)
    assert fast.feed(block) + fast.flush() == _line_by_line(block, max_line)


def test_filter_fast_path_takes_a_block_of_vllm_chunks_in_one_pass() -> None:
    block = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n' * 3
    f = UsageEventFilter()
    f._rewrite = None  # type: ignore[assignment,method-assign]  # the line path would call it
    assert f.feed(block) == b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n' * 3


def test_the_end_of_an_oversize_line_passes_as_is_even_in_a_piece_of_whole_lines() -> None:
    # The rest of a line that overflowed max_line_bytes is forwarded untouched (like its start);
    # the lines after it in the same piece are filtered as usual.
    long_start = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 60
    rest = b'"}}],"usage":null}\n\n'
    after = b'data: {"choices":[],"x":1,"usage":null}\n\n'
    plain = b'data: {"choices":[],"x":1}\n\n'
    out, outs = filtered([long_start, rest + after, after[:-2], b"\n\n"], max_line_bytes=40)
    assert outs == [long_start, rest + plain, b"", plain]  # the next line held whole again
    assert out == long_start + rest + plain + plain
