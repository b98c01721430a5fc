"""Tests for trioproxy.usage: stream scanners (sans-IO, sync); the usage-event filter is
tested in ``test_usagefilter``, on the fixtures defined here, and below on garbage.

Fixtures follow the servers' recorded formats (OpenAI, vLLM, llama.cpp, Ollama). Every
result must not depend on how the body is split: each fixture is checked at every
single split point, and under hypothesis-generated multi-way splits. Generated streams
are checked against an oracle that reads the event objects themselves, never the bytes.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioproxy.usage import (
    NDJSONScanner,
    ScannerStatistics,
    SSEScanner,
    Usage,
    estimate_tokens,
)
from trioproxy.usagefilter import UsageEventFilter

Scanner = SSEScanner | NDJSONScanner
Event = dict[str, Any] | str  # a decoded SSE event, or "[DONE]"
GeneratedSSE = tuple[bytes, list[Event], list[int], bool]  # body, events, their ends, ensure_ascii

# -- recorded-format streams ------------------------------------------------------------

OA = ('"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
      '"created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default",'
      '"system_fingerprint":"fp_eb9dce56a8"')
OA_USAGE = ('"usage":{"prompt_tokens":19,"completion_tokens":3,"total_tokens":22,'
            '"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
            '"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
            '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}')


def sse(*payloads: str, eol: str = "\n") -> bytes:
    """One ``data:`` event per payload; a payload starting with ":" is a comment line."""
    out = []
    for p in payloads:
        out.append(f"{p}{eol}{eol}" if p.startswith(":") else f"data: {p}{eol}{eol}")
    return "".join(out).encode()


def injected_and_plain(template: list[str], tail: str | None) -> tuple[bytes, bytes]:
    """A stream with ``{U}`` as ``,"usage":null`` plus the usage tail, and one without both."""
    with_usage = [t.replace("{U}", ',"usage":null') for t in template]
    if tail is not None:
        with_usage.insert(len(with_usage) - 1, tail)  # just before [DONE]
    return sse(*with_usage), sse(*(t.replace("{U}", "") for t in template))


OPENAI_CHAT_TEMPLATE = [
    '{' + OA + ',"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    '"logprobs":null,"finish_reason":null}]{U}}',
    '{' + OA + ',"choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,'
    '"finish_reason":null}]{U}}',
    '{' + OA + ',"choices":[{"index":0,"delta":{"content":" there"},"logprobs":null,'
    '"finish_reason":null}]{U}}',
    '{' + OA + ',"choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,'
    '"finish_reason":null}]{U}}',
    '{' + OA + ',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]{U}}',
    "[DONE]",
]
OPENAI_CHAT, OPENAI_CHAT_PLAIN = injected_and_plain(
    OPENAI_CHAT_TEMPLATE, "{" + OA + ',"choices":[],' + OA_USAGE + "}")

OPENAI_COMPLETIONS_TEMPLATE = [
    '{"id":"cmpl-AzYx","object":"text_completion","created":1741570283,"model":"gpt-3.5-turbo-instruct",'
    '"choices":[{"text":"\\n\\n","index":0,"logprobs":null,"finish_reason":null}]{U}}',
    '{"id":"cmpl-AzYx","object":"text_completion","created":1741570283,"model":"gpt-3.5-turbo-instruct",'
    '"choices":[{"text":"Paris","index":0,"logprobs":null,"finish_reason":null}]{U}}',
    '{"id":"cmpl-AzYx","object":"text_completion","created":1741570283,"model":"gpt-3.5-turbo-instruct",'
    '"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}]{U}}',
    "[DONE]",
]
OPENAI_COMPLETIONS, OPENAI_COMPLETIONS_PLAIN = injected_and_plain(
    OPENAI_COMPLETIONS_TEMPLATE,
    '{"id":"cmpl-AzYx","object":"text_completion","created":1741570283,'
    '"model":"gpt-3.5-turbo-instruct","choices":[],'
    '"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}')

VL = '"id":"chatcmpl-7f3e","object":"chat.completion.chunk","created":1730000000,"model":"meta-llama/Llama-3.1-8B-Instruct"'
# vLLM: pydantic dumps with exclude_unset, so no "usage":null; a stream_options object
# turns include_usage on; continuous_usage_stats puts running usage on every chunk.
VLLM_CONTINUOUS_EVENTS = [
    '{' + VL + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    '"finish_reason":null}],"usage":{"prompt_tokens":12,"total_tokens":12,"completion_tokens":0}}',
    '{' + VL + ',"choices":[{"index":0,"delta":{"content":"Par"},"logprobs":null,'
    '"finish_reason":null}],"usage":{"prompt_tokens":12,"total_tokens":13,"completion_tokens":1}}',
    '{' + VL + ',"choices":[{"index":0,"delta":{"content":"is"},"logprobs":null,'
    '"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":12,"total_tokens":14,'
    '"completion_tokens":2}}',
    '{' + VL + ',"choices":[],"usage":{"prompt_tokens":12,"total_tokens":14,"completion_tokens":2}}',
    "[DONE]",
]
VLLM_CONTINUOUS = sse(*VLLM_CONTINUOUS_EVENTS)
# Some servers omit "choices" from the usage tail, or send null.
VLLM_CHOICES_ABSENT_TEMPLATE = [
    '{' + VL + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    '"finish_reason":null}]}',
    '{' + VL + ',"choices":[{"index":0,"delta":{"reasoning_content":"Let me think"},'
    '"logprobs":null,"finish_reason":null}]}',
    '{' + VL + ',"choices":[{"index":0,"delta":{"content":"4"},"logprobs":null,'
    '"finish_reason":"stop","stop_reason":null}]}',
    "[DONE]",
]
VLLM_CHOICES_ABSENT, VLLM_CHOICES_ABSENT_PLAIN = injected_and_plain(
    VLLM_CHOICES_ABSENT_TEMPLATE,
    '{' + VL + ',"usage":{"prompt_tokens":30,"total_tokens":35,"completion_tokens":5}}')
VLLM_CHOICES_NULL, _ = injected_and_plain(
    VLLM_CHOICES_ABSENT_TEMPLATE,
    '{' + VL + ',"choices":null,"usage":{"prompt_tokens":30,"total_tokens":35,"completion_tokens":5}}')
# vLLM reports a failure after the stream started with json.dumps: spaces after ":" and ",".
VLLM_ERROR = sse(
    '{' + VL + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    '"finish_reason":null}]}',
    '{"error": {"message": "The decoder prompt is longer than the maximum model length", '
    '"type": "BadRequestError", "param": null, "code": 400}}',
    "[DONE]",
)
# vLLM /v1/completions dumps with exclude_unset=False: "usage":null on every chunk.
VLLM_COMPLETIONS = sse(
    '{"id":"cmpl-5d1","object":"text_completion","created":1730000000,"model":"m","choices":[{"index":0,'
    '"text":" Paris","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_logprobs":null}],'
    '"usage":null}',
    '{"id":"cmpl-5d1","object":"text_completion","created":1730000000,"model":"m","choices":[{"index":0,'
    '"text":".","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_logprobs":null}],'
    '"usage":null}',
    '{"id":"cmpl-5d1","object":"text_completion","created":1730000000,"model":"m","choices":[],'
    '"usage":{"prompt_tokens":6,"total_tokens":8,"completion_tokens":2}}',
    "[DONE]",
)

LC = ('"created":1754523863,"id":"chatcmpl-X6urH4f6JOotPwco2EgcgeoM6ZWup59u","model":"gpt-oss:20b",'
      '"system_fingerprint":"b6097-9515c613","object":"chat.completion.chunk"')
LC_TIMINGS = ('"timings":{"prompt_n":1085,"prompt_ms":203.378,"prompt_per_token_ms":0.1874,'
              '"prompt_per_second":5334.89,"predicted_n":247,"predicted_ms":933.63,'
              '"predicted_per_token_ms":3.78,"predicted_per_second":264.56}')
# llama.cpp: role delta with content null; timings on the last chunk; usage only with include_usage.
LLAMACPP = sse(
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],' + LC + '}',
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"User"}}],' + LC + '}',
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hello"}}],' + LC + '}',
    '{"choices":[{"finish_reason":"stop","index":0,"delta":{}}],' + LC + ',' + LC_TIMINGS + '}',
    "[DONE]",
)
LLAMACPP_USAGE = sse(
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],' + LC + '}',
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hello"}}],' + LC + '}',
    '{"choices":[{"finish_reason":"stop","index":0,"delta":{}}],' + LC + '}',
    '{"choices":[],' + LC + ',"usage":{"completion_tokens":2,"prompt_tokens":1085,"total_tokens":1087,'
    '"prompt_tokens_details":{"cached_tokens":1000}},' + LC_TIMINGS + '}',
    "[DONE]",
)

OL = '"id":"chatcmpl-297","object":"chat.completion.chunk","created":1730000000,"model":"llama3.2","system_fingerprint":"fp_ollama"'
OLLAMA_V1_TEMPLATE = [
    '{' + OL + ',"choices":[{"index":0,"delta":{"role":"assistant","content":"The"},"finish_reason":null}]}',
    '{' + OL + ',"choices":[{"index":0,"delta":{"role":"assistant","content":" sky"},"finish_reason":null}]}',
    '{' + OL + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"stop"}]}',
    "[DONE]",
]
OLLAMA_V1, OLLAMA_V1_INJECTED = injected_and_plain(OLLAMA_V1_TEMPLATE, None)[1], injected_and_plain(
    OLLAMA_V1_TEMPLATE,
    '{' + OL + ',"choices":[],"usage":{"prompt_tokens":26,"completion_tokens":2,"total_tokens":28}}')[0]

# Keep-alives, other fields, "data:" without a space, CRLF, multi-line data, and a last
# event whose blank line never comes.
QUIRKS = (
    b": ping\r\n\r\n"
    b"retry: 3000\r\n"
    b"event: message\r\nid: 1\r\n"
    b'data:{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\r\n\r\n'
    b": keep-alive\r\n\r\n"
    b'data: {"choices":[{"index":0,\r\n'
    b': a comment inside the event\r\n'
    b'data: "delta":{"content":"Hi \\"there\\""},\r\n'
    b'data: "finish_reason":null}]}\r\n\r\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\r\n\r\n'
    b"data: {\r\n"
    b'data:  "choices": [],\r\n'
    b'data:  "usage": {"prompt_tokens": 7, "completion_tokens": 3}\r\n'
    b"data: }\r\n\r\n"
    b"data: [DONE]\r\n"
)

OC = '"model":"llama3.2","created_at":"2025-10-26T17:21:2{}.19Z"'
OLLAMA_CHAT = (
    '{' + OC.format(0) + ',"message":{"role":"assistant","content":"","thinking":"Hmm"},"done":false}\n'
    '{' + OC.format(1) + ',"message":{"role":"assistant","content":"Hel"},"done":false}\n'
    '{' + OC.format(2) + ',"message":{"role":"assistant","content":"lo"},"done":false}\n'
    '{' + OC.format(3) + ',"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
    '"total_duration":4353619900,"load_duration":63915300,"prompt_eval_count":10,'
    '"prompt_eval_duration":246847000,"eval_count":17,"eval_duration":4032296000}\n'
).encode()
OLLAMA_GENERATE = (
    '{' + OC.format(0) + ',"response":"","done":false}\n'
    '{' + OC.format(1) + ',"response":"The","done":false}\n'
    '{' + OC.format(2) + ',"response":" sky is blue.","done":false}\n'
    # a cached prompt: Ollama omits the zero prompt_eval_count (omitempty)
    '{' + OC.format(3) + ',"response":"","done":true,"done_reason":"length",'
    '"context":[128006,9125,128007,271,38766,1303,33025,2696],"total_duration":512345678,'
    '"load_duration":1234567,"eval_count":5,"eval_duration":434567000}\n'
).encode()
OLLAMA_ERROR = (
    '{' + OC.format(0) + ',"message":{"role":"assistant","content":"Once"},"done":false}\n'
    '{"error":"an error was encountered while running the model: unexpected EOF"}\n'
).encode()
OLLAMA_TOOL = (
    '{' + OC.format(0) + ',"message":{"role":"assistant","content":"","tool_calls":[{"function":'
    '{"name":"get_weather","arguments":{"city":"Paris"}}}]},"done":false}\n'
    '{' + OC.format(1) + ',"message":{"role":"assistant","content":""},"done":true,'
    '"done_reason":"stop","prompt_eval_count":120,"eval_count":20}\n'
).encode()


@attrs.frozen
class Expected:
    marker: bytes | None  # the first content is complete at the b"\n" after this
    usage: Usage | None
    finish_reason: str | None
    error: str | None
    done: bool
    content_events: int
    content_chars: int


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


SSE_CASES: dict[str, tuple[bytes, Expected]] = {
    "openai_chat": (OPENAI_CHAT, Expected(b'"Hello"', Usage(19, 3), "stop", None, True, 3, 12)),
    "openai_chat_no_usage": (OPENAI_CHAT_PLAIN, Expected(b'"Hello"', None, "stop", None, True, 3, 12)),
    "openai_completions": (OPENAI_COMPLETIONS, Expected(b'"\\n\\n"', Usage(5, 3), "length", None, True, 2, 9)),
    "vllm_continuous": (VLLM_CONTINUOUS, Expected(b'"Par"', Usage(12, 2), "stop", None, True, 2, 5)),
    "vllm_choices_absent": (VLLM_CHOICES_ABSENT, Expected(b'"Let me think"', Usage(30, 5), "stop", None, True, 2, 13)),
    "vllm_choices_null": (VLLM_CHOICES_NULL, Expected(b'"Let me think"', Usage(30, 5), "stop", None, True, 2, 13)),
    "vllm_error": (VLLM_ERROR, Expected(None, None, None,
                                        "The decoder prompt is longer than the maximum model length",
                                        True, 0, 0)),
    "vllm_completions": (VLLM_COMPLETIONS, Expected(b'" Paris"', Usage(6, 2), "length", None, True, 2, 7)),
    "llamacpp_timings": (LLAMACPP, Expected(b'"User"', Usage(1085, 247), "stop", None, True, 2, 9)),
    "llamacpp_usage": (LLAMACPP_USAGE, Expected(b'"Hello"', Usage(1085, 2), "stop", None, True, 1, 5)),
    "ollama_v1": (OLLAMA_V1, Expected(b'"The"', None, "stop", None, True, 2, 7)),
    "ollama_v1_usage": (OLLAMA_V1_INJECTED, Expected(b'"The"', Usage(26, 2), "stop", None, True, 2, 7)),
    "quirks_multiline_crlf": (QUIRKS, Expected(b'data: "finish_reason":null}]}', Usage(7, 3), "length", None, True, 1, 12)),
}
SSE_CASES |= {f"{name}_crlf": (crlf(data), exp) for name, (data, exp) in SSE_CASES.items()
              if name in ("openai_chat", "vllm_choices_absent", "llamacpp_timings", "vllm_error")}
NDJSON_CASES: dict[str, tuple[bytes, Expected]] = {
    "ollama_chat": (OLLAMA_CHAT, Expected(b'"Hmm"', Usage(10, 17), "stop", None, True, 3, 8)),
    "ollama_generate": (OLLAMA_GENERATE, Expected(b'"The"', Usage(0, 5), "length", None, True, 2, 16)),
    "ollama_error": (OLLAMA_ERROR, Expected(b'"Once"', None, None,
                                            "an error was encountered while running the model: unexpected EOF",
                                            False, 1, 4)),
    "ollama_tool_calls": (OLLAMA_TOOL, Expected(b'"get_weather"', Usage(120, 20), "stop", None, True, 1, 0)),
    "ollama_chat_crlf": (crlf(OLLAMA_CHAT), Expected(b'"Hmm"', Usage(10, 17), "stop", None, True, 3, 8)),
}
CASES = [(SSEScanner, name, data, exp) for name, (data, exp) in SSE_CASES.items()] + [
    (NDJSONScanner, name, data, exp) for name, (data, exp) in NDJSON_CASES.items()]
CASE_IDS = [name for _, name, _, _ in CASES]


# -- helpers ----------------------------------------------------------------------------

@attrs.frozen
class Outcome:
    first_content: bool
    usage: Usage | None
    finish_reason: str | None
    error: str | None
    done: bool
    content_events: int
    content_chars: int
    statistics: ScannerStatistics


def run(scanner: Scanner, pieces: list[bytes]) -> tuple[Outcome, list[tuple[int, int]]]:
    """Feed ``pieces``; the outcome and the (start, end) offsets of pieces feed() said True for."""
    pos = 0
    true_at = []
    for piece in pieces:
        if scanner.feed(piece):
            true_at.append((pos, pos + len(piece)))
        pos += len(piece)
    outcome = Outcome(scanner.first_content, scanner.usage(), scanner.finish_reason, scanner.error,
                      scanner.done, scanner.content_events, scanner.content_chars,
                      scanner.statistics())
    return outcome, true_at


def cut_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def first_content_offset(data: bytes, marker: bytes | None) -> int | None:
    return None if marker is None else data.index(b"\n", data.index(marker))


def check_split(cls: type[Scanner], data: bytes, pieces: list[bytes], offset: int | None) -> None:
    whole, _ = run(cls(), [data])
    split, true_at = run(cls(), pieces)
    assert split == whole
    if offset is None:
        assert true_at == []
    else:
        assert len(true_at) == 1
        start, end = true_at[0]
        assert start <= offset < end


def pieces_of(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=24).map(lambda cuts: cut_at(data, cuts))


# -- recorded streams ---------------------------------------------------------------------

@pytest.mark.parametrize(("cls", "name", "data", "exp"), CASES, ids=CASE_IDS)
def test_recorded_stream(cls: type[Scanner], name: str, data: bytes, exp: Expected) -> None:
    outcome, true_at = run(cls(), [data])
    assert outcome.usage == exp.usage
    assert outcome.finish_reason == exp.finish_reason
    assert outcome.error == exp.error
    assert outcome.done is exp.done
    assert outcome.first_content is (exp.marker is not None)
    assert (outcome.content_events, outcome.content_chars) == (exp.content_events, exp.content_chars)
    assert outcome.statistics.malformed == outcome.statistics.oversize == 0
    assert true_at == ([(0, len(data))] if exp.marker else [])


@pytest.mark.parametrize("cut", range(max(len(data) for _, _, data, _ in CASES) + 1))
def test_every_single_split_point(cut: int) -> None:
    # One item per cut, every stream at that cut: 31k items cost pytest ~80 s, this ~3 s.
    for cls, name, data, exp in CASES:
        if cut <= len(data):
            try:
                check_split(cls, data, [data[:cut], data[cut:]], first_content_offset(data, exp.marker))
            except AssertionError as exc:
                raise AssertionError(f"{name} split at {cut}") from exc


@pytest.mark.parametrize(("cls", "name", "data", "exp"), CASES, ids=CASE_IDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_arbitrary_multiway_splits(cls: type[Scanner], name: str, data: bytes, exp: Expected,
                                   pieces: st.DataObject) -> None:
    check_split(cls, data, pieces.draw(pieces_of(data)), first_content_offset(data, exp.marker))


def test_byte_by_byte() -> None:
    for cls, _, data, exp in CASES:
        check_split(cls, data, [bytes([b]) for b in data], first_content_offset(data, exp.marker))


# -- specific behaviour -------------------------------------------------------------------

def chunk(delta: str, finish: str = "null", extra: str = "") -> bytes:
    return sse('{"choices":[{"index":0,"delta":' + delta + ',"finish_reason":' + finish + "}]" + extra + "}")


@pytest.mark.parametrize("body", [
    chunk('{"role":"assistant","content":""}'),
    chunk('{"role":"assistant","content":null}'),
    chunk('{"role":"assistant"}'),
    chunk('{"tool_calls":[]}'),
    b": ping\n\n: content\n\n",
    b'event: {"content":"x"}\nid: "text":"y"\n\n',
    sse('{"choices":[{"index":0,"text":"","finish_reason":null}]}'),
    sse('{"choices":[{"index":0,"delta":{"content" : ""},"finish_reason":null}]}'),
    sse('{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":0}}'),
])
def test_not_content(body: bytes) -> None:
    scanner = SSEScanner()
    assert scanner.feed(body) is False
    assert (scanner.first_content, scanner.content_events, scanner.content_chars) == (False, 0, 0)


@pytest.mark.parametrize(("body", "nbytes"), [
    (chunk('{"content":"a"}'), 1),
    (chunk('{"reasoning_content":"ab"}'), 2),
    (chunk('{"reasoning":"abc"}'), 3),
    (chunk('{"refusal":"no"}'), 2),
    (chunk('{"content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function",'
           '"function":{"name":"f","arguments":""}}]}'), 0),
    (chunk('{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a\\":1}"}}]}'), 9),
    (sse('{"choices": [{"index": 0, "delta": {"content": "\\u00e9\\n"}, "finish_reason": null}]}'), 8),
    (sse('{"choices":[{"index":0,"text":"caf\u00e9","finish_reason":null}]}'), 5),
    (sse('{"content":"llama.cpp /completion","stop":false}'), 21),
])
def test_content(body: bytes, nbytes: int) -> None:
    scanner = SSEScanner()
    assert scanner.feed(body) is True
    assert (scanner.content_events, scanner.content_chars) == (1, nbytes)
    assert scanner.feed(body) is False  # True exactly once
    assert (scanner.content_events, scanner.content_chars) == (2, 2 * nbytes)


def test_content_chars_counts_json_bytes_not_characters() -> None:
    scanner = SSEScanner()
    scanner.feed(chunk('{"content":"\\"\\\\é"}'))  # \" \\ é: 4 + 2 bytes of JSON text
    assert scanner.content_chars == 6


def test_finish_reason_of_choice_zero_first_non_null_wins() -> None:
    scanner = SSEScanner()
    scanner.feed(sse('{"choices":[{"index":1,"delta":{},"finish_reason":"length"},'
                     '{"index":0,"delta":{},"finish_reason":null}]}'))
    assert scanner.finish_reason is None
    scanner.feed(sse('{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}'))
    scanner.feed(sse('{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'))
    assert scanner.finish_reason == "tool_calls"


def test_usage_last_wins_and_timings_are_only_a_fallback() -> None:
    scanner = SSEScanner()
    assert scanner.usage() is None
    scanner.feed(sse('{"choices":[],"timings":{"prompt_n":5,"predicted_n":6}}'))
    assert scanner.usage() == Usage(5, 6)
    scanner.feed(sse('{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}'))
    scanner.feed(sse('{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'))
    scanner.feed(sse('{"choices":[],"timings":{"prompt_n":7,"predicted_n":8}}'))
    assert scanner.usage() == Usage(3, 4)


def test_usage_null_members_are_not_decoded() -> None:
    scanner = SSEScanner()
    scanner.feed(OPENAI_CHAT[: OPENAI_CHAT.index(b'"finish_reason":"stop"')])
    assert scanner.statistics().decoded == 0  # content chunks with "usage":null
    scanner.feed(OPENAI_CHAT[OPENAI_CHAT.index(b'"finish_reason":"stop"'):])
    assert scanner.statistics().decoded == 2  # the finish chunk and the usage tail


def test_usage_fields_that_are_not_integers_read_as_none() -> None:
    scanner = SSEScanner()
    scanner.feed(sse('{"choices":[],"usage":{"prompt_tokens":"9","completion_tokens":2.0}}'))
    assert scanner.usage() == Usage(None, 2)


@pytest.mark.parametrize(("body", "message"), [
    (sse('{"error":{"message":"boom","type":"server_error","param":null,"code":null}}'), "boom"),
    (sse('{"error": "plain string"}'), "plain string"),
    (sse('{"error":{"code":500}}'), '{"code": 500}'),
    (b'event: error\ndata:{"error":{"message":"late"}}\n\n', "late"),
])
def test_sse_error(body: bytes, message: str) -> None:
    scanner = SSEScanner()
    scanner.feed(body)
    assert scanner.error == message


def test_sse_error_null_is_no_error() -> None:
    scanner = SSEScanner()
    scanner.feed(chunk('{"content":"x"}', extra=',"error":null'))
    assert scanner.error is None
    assert scanner.statistics().decoded == 0


def test_first_error_wins() -> None:
    scanner = NDJSONScanner()
    scanner.feed(b'{"error":"first"}\n{"error":"second"}\n')
    assert scanner.error == "first"


def test_event_without_its_blank_line_still_counts() -> None:
    scanner = SSEScanner()
    scanner.feed(b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n')
    assert scanner.usage() == Usage(1, 2)


def test_a_last_line_without_newline_is_never_seen() -> None:
    # Policy pinned: only complete lines count, or results would depend on the split.
    scanner = SSEScanner()
    scanner.feed(b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}')
    assert (scanner.first_content, scanner.finish_reason, scanner.statistics().lines) == (False, None, 0)


def test_multiline_event_with_usage_in_the_middle_line() -> None:
    scanner = SSEScanner()
    body = b'data: {"choices":[],\ndata: "usage":{"prompt_tokens":4,\ndata:  "completion_tokens":5}}\n\n'
    scanner.feed(body)
    assert scanner.usage() == Usage(4, 5)
    assert scanner.statistics() == ScannerStatistics(lines=4, decoded=1, malformed=0, oversize=0)


def test_multiline_event_first_line_failing_alone_is_not_malformed() -> None:
    scanner = SSEScanner()
    scanner.feed(b'data: {"usage":{"prompt_tokens":4},\ndata: "choices":[{"index":0,"finish_reason":"stop"}]}\n\n')
    assert (scanner.usage(), scanner.finish_reason) == (Usage(4, None), "stop")
    assert scanner.statistics().malformed == 0
    assert scanner.statistics().decoded == 2  # the first line alone, then the whole


def test_content_counted_once_when_a_multiline_event_completes() -> None:
    scanner = SSEScanner()
    assert scanner.feed(b'data: {"choices":[{"delta":{"content":"ab"}},\n') is True
    assert scanner.feed(b'data: {"delta":{"content":"cde"}}]}\n\n') is False
    assert (scanner.content_events, scanner.content_chars) == (1, 5)


def test_a_data_line_after_a_whole_json_value_is_malformed() -> None:
    # SSE joins the two lines with "\n": the event is not valid JSON for a client either.
    scanner = SSEScanner()
    scanner.feed(b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n'
                 b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2}}\n'
                 b"data:\n\n")
    assert scanner.usage() == Usage(1, 1)
    assert scanner.statistics().malformed == 1


@pytest.mark.parametrize("body", [
    b'data: {"choices":[],"usage":{"prompt_tokens":1\n\n',
    b'data: {"choices":[{"index":0,"finish_reason":"stop"}]\n\n',
    b'data: {"error": {"message": "cut\n\n',
    b'data: ["usage", {"usage":{"a":1}}]\n\n',
    b'data: {"usage":{"prompt_tokens":1}} trailing\n\n',
])
def test_malformed_lines_are_counted_not_raised(body: bytes) -> None:
    for pieces in ([body], [bytes([b]) for b in body]):
        scanner = SSEScanner()
        for piece in pieces:
            scanner.feed(piece)
        assert scanner.statistics().malformed == 1
        assert (scanner.usage(), scanner.finish_reason, scanner.error) == (None, None, None)


def test_ndjson_malformed_done_line() -> None:
    scanner = NDJSONScanner()
    scanner.feed(b'{"done":true,"eval_count":3\n{"response":"ok","done":false}\n')
    assert scanner.statistics() == ScannerStatistics(lines=2, decoded=1, malformed=1, oversize=0)
    assert (scanner.done, scanner.content_events) == (False, 1)


def test_oversize_lines_are_dropped_and_counted() -> None:
    long_line = chunk('{"content":"' + "x" * 200 + '"}', finish='"length"')
    body = long_line + OLLAMA_V1
    offset = body.index(b"\n", body.index(b'"The"'))
    for cut in range(len(body) + 1):
        scanner = SSEScanner(max_line_bytes=250)
        outcome, true_at = run(scanner, [body[:cut], body[cut:]])
        assert outcome.statistics.oversize == 1
        assert outcome.finish_reason == "stop"  # not "length": that line was dropped
        assert (outcome.content_events, outcome.content_chars) == (2, 7)
        assert len(true_at) == 1 and true_at[0][0] <= offset < true_at[0][1]


def test_an_unfinished_oversize_line_is_counted_once() -> None:
    scanner = NDJSONScanner(max_line_bytes=16)
    for _ in range(5):
        scanner.feed(b"0123456789")
    assert scanner.statistics() == ScannerStatistics(lines=0, decoded=0, malformed=0, oversize=1)
    scanner.feed(b'xx\n{"done":true}\n')
    assert scanner.statistics() == ScannerStatistics(lines=1, decoded=1, malformed=0, oversize=1)
    assert scanner.done


@pytest.mark.parametrize(("chars", "tokens"), [(0, 0), (1, 1), (4, 1), (5, 2), (400, 100), (401, 101)])
def test_estimate_tokens(chars: int, tokens: int) -> None:
    assert estimate_tokens(chars) == tokens


# -- generated streams against an oracle -----------------------------------------------------

TRICKY = ['"', "\\", "\n", "\r\n\r\n", '"usage":null', ',"usage":null', '"content":"x"',
          "data: [DONE]", "é", "日本", "\U0001f642", "\u2028", "\x00"]
texts = st.one_of(st.text(max_size=6), st.sampled_from(TRICKY))
reasons = st.sampled_from(["stop", "length", "tool_calls", "content_filter"])
counts = st.integers(0, 10**6)


@st.composite
def sse_events(draw: st.DrawFn) -> Event:
    kind = draw(st.sampled_from(["role", "delta", "delta", "text", "tool", "finish", "usage_tail",
                                 "continuous", "timings", "error", "done", "two_choices"]))
    fr: Any = None
    if kind == "role":
        return {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": draw(
            st.sampled_from(["", None]))}, "finish_reason": None}]}
    if kind == "delta":
        key = draw(st.sampled_from(["content", "reasoning_content", "reasoning", "refusal"]))
        return {"id": "c", "choices": [{"index": 0, "delta": {key: draw(texts)}, "finish_reason": fr}]}
    if kind == "text":
        return {"id": "c", "object": "text_completion",
                "choices": [{"index": 0, "text": draw(texts), "finish_reason": fr}]}
    if kind == "tool":
        return {"id": "c", "choices": [{"index": 0, "delta": {"content": None, "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": draw(texts)}}]}, "finish_reason": fr}]}
    if kind == "finish":
        return {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": draw(reasons)}]}
    if kind == "two_choices":
        return {"id": "c", "choices": [
            {"index": 1, "delta": {"content": draw(texts)}, "finish_reason": draw(reasons)},
            {"index": 0, "delta": {"content": draw(texts)}, "finish_reason": None}]}
    usage = {"prompt_tokens": draw(counts), "completion_tokens": draw(counts), "total_tokens": 0}
    if kind == "usage_tail":
        tail: dict[str, Any] = {"id": "c"}
        choices = draw(st.sampled_from(["empty", "null", "absent"]))
        if choices != "absent":
            tail["choices"] = [] if choices == "empty" else None
        tail["usage"] = usage
        return tail
    if kind == "continuous":
        return {"id": "c", "choices": [{"index": 0, "delta": {"content": draw(texts)},
                                        "finish_reason": None}], "usage": usage}
    if kind == "timings":
        return {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": draw(reasons)}],
                "timings": {"prompt_n": draw(counts), "predicted_n": draw(counts), "prompt_ms": 1.5}}
    if kind == "error":
        message = draw(texts)
        return {"error": draw(st.sampled_from([message, {"message": message, "type": "server_error",
                                                         "param": None, "code": None}]))}
    return "[DONE]"


def json_text(value: str, ensure_ascii: bool) -> int:
    """Bytes of a string's JSON text between its quotes: what content_chars counts."""
    return len(json.dumps(value, ensure_ascii=ensure_ascii)[1:-1].encode())


def oracle(events: list[Event], ends: list[int], ensure_ascii: bool) -> tuple[Outcome, int | None]:
    """Expected results, read from the event objects; ``ends[i]``: where event i completes."""
    first_at = None
    content_events = content_chars = 0
    usage = timings = None
    finish_reason = error = None
    done = False
    for event, end in zip(events, ends):
        if event == "[DONE]":
            done = True
            continue
        assert isinstance(event, dict)
        has = False
        for choice in event.get("choices") or []:
            delta = choice.get("delta", {})
            for key in ("content", "reasoning_content", "reasoning", "refusal"):
                if delta.get(key):
                    has = True
                    content_chars += json_text(delta[key], ensure_ascii)
            if choice.get("text"):
                has = True
                content_chars += json_text(choice["text"], ensure_ascii)
            for call in delta.get("tool_calls") or []:
                has = True
                if call["function"]["arguments"]:
                    content_chars += json_text(call["function"]["arguments"], ensure_ascii)
            if choice["index"] == 0 and finish_reason is None and choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
        if has:
            content_events += 1
            first_at = end if first_at is None else first_at
        if isinstance(event.get("usage"), dict):
            usage = Usage(event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
        if isinstance(event.get("timings"), dict):
            timings = Usage(event["timings"]["prompt_n"], event["timings"]["predicted_n"])
        if event.get("error") is not None and error is None:
            err = event["error"]
            error = err if isinstance(err, str) else err["message"]
    stats = ScannerStatistics(0, 0, 0, 0)  # not compared
    return Outcome(first_at is not None, usage if usage is not None else timings, finish_reason,
                   error, done, content_events, content_chars, stats), first_at


@st.composite
def sse_streams(draw: st.DrawFn) -> GeneratedSSE:
    events = draw(st.lists(sse_events(), max_size=12))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    ensure_ascii = draw(st.booleans())
    out = ""
    ends = []
    for n, event in enumerate(events):
        for _ in range(draw(st.integers(0, 2))):
            out += draw(st.sampled_from([": ping", "event: message", "id: 7", "retry: 100", ":"])) + eol
            if out.endswith(": ping" + eol):
                out += eol
        prefix = draw(st.sampled_from(["data: ", "data:"]))
        if event == "[DONE]":
            lines = ["[DONE]"]
        elif draw(st.integers(0, 4)) == 0:  # multi-line data: pretty-printed JSON
            lines = json.dumps(event, indent=1, ensure_ascii=ensure_ascii).split("\n")
        else:
            separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
            lines = [json.dumps(event, separators=separators, ensure_ascii=ensure_ascii)]
        for line in lines:
            out += prefix + line + eol
        ends.append(len(out.encode()) - 1)  # the b"\n" of its last data line
        if n < len(events) - 1 or draw(st.booleans()):  # the very last blank line may be missing
            out += eol
    return out.encode(), events, ends, ensure_ascii


@settings(max_examples=400, deadline=None)
@given(sse_streams(), st.data())
def test_generated_sse_streams_match_the_oracle(stream: GeneratedSSE, data: st.DataObject) -> None:
    body, events, ends, ensure_ascii = stream
    expected, first_at = oracle(events, ends, ensure_ascii)
    outcome, true_at = run(SSEScanner(), data.draw(pieces_of(body)))
    assert attrs.evolve(outcome, statistics=expected.statistics) == expected
    assert outcome.statistics.malformed == outcome.statistics.oversize == 0
    if first_at is None:
        assert true_at == []
    else:
        assert body[first_at:first_at + 1] == b"\n"
        assert len(true_at) == 1 and true_at[0][0] <= first_at < true_at[0][1]



@settings(max_examples=300, deadline=None)
@given(sse_streams())
def test_generated_sse_streams_event_by_event(stream: GeneratedSSE) -> None:
    # One piece per event, as a relay reads a server at token pace: feed()'s path for a
    # piece that is exactly one whole event, and _scan_line's remembered shapes.
    body, events, ends, ensure_ascii = stream
    expected, first_at = oracle(events, ends, ensure_ascii)
    pieces = [p for p in re.split(rb"(?<=\n\n)|(?<=\r\n\r\n)", body) if p]
    assert b"".join(pieces) == body
    outcome, true_at = run(SSEScanner(), pieces)
    assert attrs.evolve(outcome, statistics=expected.statistics) == expected
    assert outcome == run(SSEScanner(), [bytes([b]) for b in body])[0]
    if first_at is not None:
        assert len(true_at) == 1 and true_at[0][0] <= first_at < true_at[0][1]



#: Token texts as a server writes them in JSON: plain, and every kind that leaves the steadiest path.
STEADY_TEXTS = [b"hi", b" there", b"", b"x" * 40, b'say \\"no\\"', b"back\\\\slash", b"line\\nbreak",
                b"caf\xc3\xa9", b"\\u00e9", b"\r"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(STEADY_TEXTS), st.integers(0, 9)), min_size=1, max_size=30))
def test_one_event_per_piece_in_a_steady_shape_counts_as_byte_by_byte(tokens: list[tuple[bytes, int]]) -> None:
    """``feed``'s steadiest path (a whole event of the last events' shape, its text plain) gives
    what the general path gives on the same bytes fed one at a time, whatever comes between:
    texts with escapes or line ends, an event of another shape (one that has the prefix and
    suffix of the steady one around other keys too), a finish event, a CRLF event, a comment,
    an event split in two, the raw line end the path refuses."""
    event = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}],"usage":null}\n\n'
    pieces = []
    for text, twist in tokens:
        piece = event % text
        if twist == 1:
            piece = piece.replace(b'"c"', b'"d"')  # another shape
        elif twist == 2:
            piece = piece.replace(b"null}]", b'"stop"}]')  # a finish event: decoded
        elif twist == 3:
            piece = piece[:-2] + b"\r\n\r\n"
        elif twist == 4:
            pieces.append(b": ping\n\n")
        elif twist == 5:
            pieces.append(piece[:20])
            piece = piece[20:]
        elif twist == 7:  # its prefix and suffix around other keys: another shape
            piece = event % (text + b'","reasoning_content":"' + text)
        elif twist == 6:
            piece = piece.replace(b"%s" % text if text else b'"content":""', b"raw\nline" if text else b'"content":"raw\nline"', 1)
        pieces.append(piece)
    outcome, true_at = run(SSEScanner(), pieces)
    expected, byte_true_at = run(SSEScanner(), [bytes([b]) for b in b"".join(pieces)])
    assert outcome == expected
    # feed() says True once, for the piece that completed the first line with content.
    assert len(true_at) == len(byte_true_at) <= 1
    if true_at:
        assert true_at[0][0] <= byte_true_at[0][0] < true_at[0][1]


def test_the_steadiest_path_is_taken_by_a_stream_of_one_shape() -> None:
    scanner = SSEScanner()
    event = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"%d"},"finish_reason":null}]}\n\n'
    assert scanner.feed(event % 0)  # learns the shape
    scanner.feed(event % 1)  # has it: steady from here
    assert scanner._steady is not None and not scanner.steady_piece  # (that piece took the long path)
    for i in range(2, 10):
        assert not scanner.feed(event % i)
        assert scanner.steady_piece  # (what the relay reads: it skips its own steps for the piece)
    assert scanner._steady is not None and scanner.content_events == 10 and scanner.content_chars == 10
    scanner.feed(b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    assert scanner._steady is None and scanner.finish_reason == "stop" and not scanner.steady_piece
    # A piece one byte longer than max_line_bytes is not steady (the limit is precomputed as a text's
    # end), and the long path takes it: its line is not too long (a line is counted without "\n").
    scanner = SSEScanner(max_line_bytes=len(event % 10))
    for i in range(10, 13):
        scanner.feed(event % i)
    assert scanner.steady_piece
    scanner.feed(event % 100)
    assert not scanner.steady_piece and scanner.content_events == 4 and scanner.statistics().oversize == 0
    # Empty texts first (a server's opening chunks): the first content comes on the steady path,
    # and that feed() says so.
    scanner = SSEScanner()
    empty = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":""},"finish_reason":null}]}\n\n'
    assert not scanner.feed(empty) and not scanner.feed(empty)
    assert scanner._steady is not None
    assert scanner.feed(empty.replace(b'""', b'"hi"')) and scanner.first_content
    assert not scanner.feed(empty.replace(b'""', b'"again"'))
    assert scanner.content_events == 2 and scanner.content_chars == 7


@pytest.mark.parametrize("held", [b": ping", b"event: x", b"x"])
def test_a_whole_event_after_a_held_piece_continues_that_line(held: bytes) -> None:
    # A piece shaped like one whole event, after bytes held from an unfinished line, is
    # the rest of that line, not an event of its own.
    scanner = SSEScanner()
    scanner.feed(held)
    assert not scanner.feed(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
    assert scanner.content_chars == 0 and not scanner.first_content


def test_a_whole_event_ends_an_oversize_line() -> None:
    scanner = SSEScanner(max_line_bytes=80)
    scanner.feed(b"data: " + b"x" * 100)  # too long already: dropped up to its end
    event = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    assert not scanner.feed(event)  # the first line of it ends the oversize one
    assert scanner.content_chars == 0 and scanner.statistics().oversize == 1
    assert scanner.feed(event) and scanner.content_chars == 2

#: Pieces of lines, valid JSON or not, around the keys the scanner looks for.
LINE_FRAGMENTS = [b'"content":"', b'"content" : "', b'"text":"', b'"reasoning":"', b'"refusal":',
                  b'"finish_reason":null', b'"finish_reason":"stop"', b'"finish_reason":', b'"usage":null',
                  b'"usage":{"prompt_tokens":1}', b'"timings":{', b'"timings":null', b'"error":"x"',
                  b'"error":{', b'"error":null', b'"tool_calls":[{', b'"tool_calls":[]', b'"tool_calls":[ ',
                  b'"', b'\\', b'\\"', b'\\\\', b":", b",", b"{", b"}", b"[", b"]", b" ", b"\t", b"x", b"\xc3\xa9",
                  b'"id":"c"', b'"content', b'content"', b'"arguments":"']
line_fragments = st.lists(st.sampled_from(LINE_FRAGMENTS), max_size=8).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(line_fragments, line_fragments, st.lists(st.tuples(line_fragments, st.integers(0, 5), st.booleans(),
                                                              st.booleans()), min_size=1, max_size=8))
def test_scan_line_finds_what_the_regex_finds(prefix: bytes, suffix: bytes,
                                              lines: list[tuple[bytes, int, bool, bool]]) -> None:
    """_scan_line's remembered shape gives what _SSE_KEYS.findall gives, line after line, on any bytes."""
    scanner = SSEScanner()
    for middle, change, finished, used in lines:
        if change == 1:
            prefix += middle  # a new shape, sometimes
        elif change == 2:
            suffix = middle + suffix
        line = b"data: " + prefix + middle + suffix
        # What is known so far changes what some keys are worth (_tally): both see the same.
        scanner.finish_reason = "stop" if finished else None
        scanner._usage = Usage(1, 2) if used else None
        scanner._shape_misses = 0  # (keep the shape path on: it stops after a few misses in a row)
        assert scanner._scan_line(line) == scanner._scan(line), line


def test_lines_that_change_around_their_text_are_scanned_with_the_regex_after_a_few() -> None:
    # OpenAI's "obfuscation" field (or vLLM's continuous usage) differs in every event: a
    # shape learnt from one line never fits the next, so the scanner stops learning.
    scanner = SSEScanner()
    shapes = []
    for i in range(6):
        scanner.feed(b'data: {"choices":[{"index":0,"delta":{"content":"t"}}],"obfuscation":"%d"}\n\n' % i)
        shapes.append(scanner._shape_suffix)
    assert shapes[0] != shapes[1] != shapes[2] == shapes[3] == shapes[4] == shapes[5]  # none after the third miss
    assert scanner.content_chars == 6 and scanner.content_events == 6


@st.composite
def ndjson_lines(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["chat", "chat", "generate", "thinking", "tool", "done", "error"]))
    base: dict[str, Any] = {"model": "llama3.2", "created_at": "2025-10-26T17:21:21.19Z"}
    if kind == "chat":
        return base | {"message": {"role": "assistant", "content": draw(texts)}, "done": False}
    if kind == "generate":
        return base | {"response": draw(texts), "done": False}
    if kind == "thinking":
        return base | {"message": {"role": "assistant", "content": "", "thinking": draw(texts)},
                       "done": False}
    if kind == "tool":
        return base | {"message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": {"done": True, "error": "x"}}}]}, "done": False}
    if kind == "error":
        return {"error": draw(texts)}
    done = base | {"message": {"role": "assistant", "content": ""}, "done": True,
                   "done_reason": draw(reasons), "total_duration": 1}
    for key in ("prompt_eval_count", "eval_count"):
        if draw(st.booleans()):
            done[key] = draw(counts)
    return done


@settings(max_examples=300, deadline=None)
@given(st.lists(ndjson_lines(), max_size=10), st.sampled_from(["\n", "\r\n"]), st.booleans(), st.data())
def test_generated_ndjson_streams_match_the_oracle(lines: list[dict[str, Any]], eol: str,
                                                   ensure_ascii: bool, data: st.DataObject) -> None:
    body = b""
    first_at = None
    content_events = content_chars = 0
    usage = finish_reason = error = None
    done = False
    for line in lines:
        body += (json.dumps(line, ensure_ascii=ensure_ascii) + eol).encode()
        message = line.get("message", {})
        strings = [s for s in (message.get("content"), message.get("thinking"), line.get("response")) if s]
        if strings or message.get("tool_calls"):
            content_events += 1
            content_chars += sum(json_text(s, ensure_ascii) for s in strings)
            first_at = len(body) - 1 if first_at is None else first_at
        if line.get("done"):
            done = True
            finish_reason = finish_reason or line["done_reason"]
            usage = Usage(line.get("prompt_eval_count", 0), line.get("eval_count", 0))
        if "error" in line and error is None:
            error = line["error"]
    outcome, true_at = run(NDJSONScanner(), data.draw(pieces_of(body)))
    assert (outcome.usage, outcome.finish_reason, outcome.error, outcome.done) == (usage, finish_reason, error, done)
    assert (outcome.content_events, outcome.content_chars) == (content_events, content_chars)
    assert outcome.statistics.malformed == outcome.statistics.oversize == 0
    if first_at is None:
        assert true_at == []
    else:
        assert len(true_at) == 1 and true_at[0][0] <= first_at < true_at[0][1]


# -- never raise on garbage; exact line and oversize counts ------------------------------------

FRAGMENTS = [b"data:", b"data: ", b"\n", b"\r\n", b"\r", b": ping", b"{", b"}", b"[", b"]", b'"',
             b'"usage":{', b'"usage": null', b',"usage":null', b'"choices":[]', b'"error":',
             b'"finish_reason":"stop"', b'"content":"', b'"done":true', b'"timings":{', b"[DONE]",
             b"\\", b"\xff\xfe", b"\xc3", b"null", b"1", b'"tool_calls":[', b"data"]
garbage = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=8)), max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(garbage, st.integers(1, 64), st.data())
def test_garbage_never_raises_and_lines_are_counted_exactly(body: bytes, limit: int,
                                                            data: st.DataObject) -> None:
    *complete, tail = body.split(b"\n")
    lines = sum(len(line) <= limit for line in complete)
    oversize = len(complete) - lines + (len(tail) > limit)
    pieces = data.draw(pieces_of(body))
    for cls in (SSEScanner, NDJSONScanner):
        whole, _ = run(cls(max_line_bytes=limit), [body])
        split, true_at = run(cls(max_line_bytes=limit), pieces)
        assert split == whole
        assert len(true_at) == int(whole.first_content)
        assert (whole.statistics.lines, whole.statistics.oversize) == (lines, oversize)
        assert whole.statistics.malformed <= whole.statistics.decoded + whole.statistics.lines
    usage_filter = UsageEventFilter(max_line_bytes=limit)
    forwarded = b"".join(usage_filter.feed(piece) for piece in pieces) + usage_filter.flush()
    assert len(forwarded) <= len(body)
