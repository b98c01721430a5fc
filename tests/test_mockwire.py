"""Sans-IO tests of the mock's wire layer: parser splits, chunked bodies, payload bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.mockwire import (
    LAST_CHUNK,
    TOKENS,
    Generation,
    GenerationRenderer,
    Overrides,
    ParseError,
    Request,
    RequestParser,
    Static,
    Timings,
    content_text,
    embedding,
    error_reply,
    frame_chunk,
    parse_overrides,
    plan_reply,
    response_head,
)

PIPELINE = (
    b"\r\nGET /api/version?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nX-Odd:  spaced \t\r\n\r\nhello"
    b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: yes\r\n\r\n"
    b"GET / HTTP/1.0\nConnection: keep-alive\n\n"
)


def _drain(parser: RequestParser) -> list[Request]:
    out = []
    for _ in range(10):  # bounded: PIPELINE holds 4 requests
        request = parser.next_request()
        if request is None:
            break
        out.append(request)
    return out


def _check_pipeline(requests: list[Request]) -> None:
    assert [(r.method, r.path, r.query, r.body) for r in requests] == [
        ("GET", "/api/version", "x=1", b""),
        ("POST", "/v1/chat/completions", "", b"hello"),
        ("POST", "/api/chat", "", b"abc0123456789"),
        ("GET", "/", "", b""),
    ]
    assert requests[1].headers == [("content-length", "5"), ("x-odd", "spaced")]
    assert [(r.http10, r.keep_alive) for r in requests] == [(False, True)] * 3 + [(True, True)]


@pytest.mark.parametrize("cut", range(len(PIPELINE) + 1))
def test_parser_is_independent_of_the_split(cut: int) -> None:
    parser = RequestParser()
    parser.feed(PIPELINE[:cut])
    requests = _drain(parser)
    parser.feed(PIPELINE[cut:])
    requests += _drain(parser)
    _check_pipeline(requests)
    assert parser.buffered == 0


def test_parser_byte_by_byte() -> None:
    parser = RequestParser()
    requests: list[Request] = []
    for i in range(len(PIPELINE)):
        parser.feed(PIPELINE[i : i + 1])
        requests += _drain(parser)
    _check_pipeline(requests)


@given(
    body=st.binary(max_size=300),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=20),
    splits=st.lists(st.integers(0, 400), max_size=6),
)
def test_chunked_bodies_any_chunking_any_split(body: bytes, sizes: list[int], splits: list[int]) -> None:
    chunks, i, k = [], 0, 0
    while i < len(body):
        size = sizes[k % len(sizes)]
        chunks.append(b"%x\r\n%b\r\n" % (size if i + size <= len(body) else len(body) - i, body[i : i + size]))
        i, k = i + size, k + 1
    wire = b"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n" + b"".join(chunks) + b"0\r\n\r\n"
    parser = RequestParser()
    got: list[Request] = []
    last = 0
    for cut in sorted({min(s, len(wire)) for s in splits} | {len(wire)}):
        parser.feed(wire[last:cut])
        last = cut
        got += _drain(parser)
    assert [r.body for r in got] == [body]


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nname : v\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: \x00\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET nope HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / FTP/1.1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: " + b"x" * 70_000, 431),
    ],
)
def test_malformed_requests(wire: bytes, status: int) -> None:
    parser = RequestParser()
    parser.feed(wire)
    with pytest.raises(ParseError) as info:
        parser.next_request()
    assert info.value.status == status


def test_chunked_body_limit() -> None:
    parser = RequestParser(max_body_bytes=10)
    parser.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n")
    with pytest.raises(ParseError) as info:
        parser.next_request()
    assert info.value.status == 413


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"GET / HTTP/1.1\r\nConnection: Close\r\n", False),
        (b"GET / HTTP/1.1\r\nConnection: upgrade, close\r\n", False),
        (b"GET / HTTP/1.0\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n", True),
    ],
)
def test_keep_alive_rules(head: bytes, keep_alive: bool) -> None:
    parser = RequestParser()
    parser.feed(head + b"\r\n")
    request = parser.next_request()
    assert request is not None and request.keep_alive is keep_alive


def test_expect_continue_is_offered_once_and_only_while_the_body_is_missing() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert parser.next_request() is None
    assert parser.take_continue() is True
    assert parser.take_continue() is False
    parser.feed(b"hi")
    request = parser.next_request()
    assert request is not None and request.body == b"hi"
    parser.feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")
    assert parser.next_request() is not None
    assert parser.take_continue() is False


def test_absolute_form_target() -> None:
    parser = RequestParser()
    parser.feed(b"GET http://h:1/api/tags?a=b HTTP/1.1\r\n\r\n")
    request = parser.next_request()
    assert request is not None and (request.path, request.query) == ("/api/tags", "a=b")


def test_response_framing() -> None:
    head = response_head(200, "text/event-stream", date=b"D", content_length=None, keep_alive=True, http10=False)
    assert head == (b"HTTP/1.1 200 OK\r\ndate: D\r\nserver: trioproxy-mock\r\ncontent-type: text/event-stream\r\n"
                    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
    head10 = response_head(200, "x/y", date=b"D", content_length=None, keep_alive=True, http10=True)
    assert b"transfer-encoding" not in head10 and head10.endswith(b"connection: close\r\n\r\n")
    assert frame_chunk(b"hello") == b"5\r\nhello\r\n"
    static = Static(404, "application/json", b"{}", (("retry-after", "1"),))
    assert static.render(date=b"D", keep_alive=False, http10=False) == (
        b"HTTP/1.1 404 Not Found\r\ndate: D\r\nserver: trioproxy-mock\r\ncontent-type: application/json\r\n"
        b"content-length: 2\r\nretry-after: 1\r\nconnection: close\r\n\r\n{}")


def _request(method: str, path: str, body: Any = None, headers: list[tuple[str, str]] | None = None) -> Request:
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    return Request(method, path, path, "", False, headers or [], raw, True)


@pytest.mark.parametrize(
    ("kind", "method", "path", "status"),
    [
        ("openai", "GET", "/health", 200), ("ollama", "GET", "/health", 404), ("both", "GET", "/health", 200),
        ("openai", "GET", "/", 404), ("ollama", "GET", "/", 200), ("both", "HEAD", "/", 200),
        ("openai", "GET", "/api/tags", 404), ("ollama", "GET", "/api/tags", 200),
        ("ollama", "GET", "/v1/models", 200), ("openai", "GET", "/v1/models/mock-llama", 200),
        ("openai", "GET", "/v1/models/other", 404), ("both", "GET", "/api/version", 200),
        ("both", "GET", "/api/ps", 200), ("both", "GET", "/nope", 404), ("both", "GET", "/v1/chat/completions", 405),
    ],
)
def test_routes_by_kind(kind: Any, method: str, path: str, status: int) -> None:
    reply = plan_reply(_request(method, path), kind=kind, models=("mock-llama",), tokens=4)
    assert isinstance(reply, Static) and reply.status == status
    if status == 404:
        body = json.loads(reply.body)
        assert isinstance(body["error"], str if path.startswith("/api/") or path == "/" else dict)
    if status == 405:
        assert reply.headers == (("allow", "POST"),)


@pytest.mark.parametrize(
    ("path", "body", "status", "expected"),
    [
        ("/v1/chat/completions", {"model": "gpt-9"}, 404,
         {"error": {"message": "The model `gpt-9` does not exist.", "type": "NotFoundError", "param": None,
                    "code": 404}}),
        ("/api/chat", {"model": "gpt-9"}, 404, {"error": "model 'gpt-9' not found"}),
        ("/api/show", {"name": "gpt-9"}, 404, {"error": "model 'gpt-9' not found"}),
        ("/v1/embeddings", b"{nope", 400, None),
        ("/api/generate", b"\xff\xfe", 400, None),
        ("/api/embed", b"[1]", 400, None),
        ("/v1/completions", {"model": "mock-llama", "max_tokens": -1}, 400, None),
        ("/v1/chat/completions", {"model": "mock-llama", "stream": "yes"}, 400, None),
        ("/v1/chat/completions", {"messages": []}, 400, None),
    ],
)
def test_request_errors_in_the_route_format(path: str, body: Any, status: int, expected: Any) -> None:
    reply = plan_reply(_request("POST", path, body), kind="both", models=("mock-llama",), tokens=4)
    assert isinstance(reply, Static) and reply.status == status
    decoded = json.loads(reply.body)
    if expected is not None:
        assert decoded == expected
    elif path.startswith("/api/"):
        assert isinstance(decoded["error"], str)
    else:
        assert decoded["error"]["code"] == status and decoded["error"]["type"] == "BadRequestError"


def test_model_names_match_with_and_without_tag_and_star_accepts_all() -> None:
    for model, models in [("mock-llama:latest", ("mock-llama",)), ("m", ("m:latest",)), ("any", ("*",))]:
        reply = plan_reply(_request("POST", "/api/chat", {"model": model}), kind="both", models=models, tokens=1)
        assert isinstance(reply, Generation) and reply.model == model


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "a b  c"},
                                                             {"content": [{"type": "text", "text": "d e"}]}]},
         Generation("chat", "m", False, 5, "stop", 5, False)),
        ("/v1/chat/completions", {"model": "m", "stream": True, "max_tokens": 9, "max_completion_tokens": 2,
                                  "stream_options": {"include_usage": True}},
         Generation("chat", "m", True, 2, "length", 1, True)),
        ("/v1/chat/completions", {"model": "m", "stream": False, "stream_options": {"include_usage": True}},
         Generation("chat", "m", False, 5, "stop", 1, False)),
        ("/v1/completions", {"model": "m", "prompt": [1, 2, 3], "max_tokens": 5, "stream": True},
         Generation("completion", "m", True, 5, "stop", 3, False)),
        ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi you"}]},
         Generation("ollama_chat", "m", True, 5, "stop", 2, False)),
        ("/api/generate", {"model": "m", "prompt": "x y z", "system": "s", "stream": False,
                           "options": {"num_predict": 3}},
         Generation("ollama_generate", "m", False, 3, "length", 4, False)),
        ("/api/generate", {"model": "m", "options": {"num_predict": -1}},
         Generation("ollama_generate", "m", True, 5, "stop", 1, False)),
    ],
)
def test_generation_plans(path: str, body: Any, expected: Generation) -> None:
    assert plan_reply(_request("POST", path, body), kind="both", models=("*",), tokens=5) == expected


def _events(pieces: list[bytes]) -> list[str]:
    """Undo chunk framing and split SSE events; checks every chunk's size line."""
    text = b""
    for piece in pieces:
        rest = piece
        for _ in range(10):  # bounded: a piece holds at most 2 chunks
            if not rest:
                break
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            text, rest = text + rest[:size], rest[size + 2 :]
    assert text.endswith(b"\n\n")
    return [e.removeprefix(b"data: ").decode() for e in text.split(b"\n\n")[:-1]]


def _compact(event: str) -> None:
    assert json.dumps(json.loads(event), separators=(",", ":")) == event  # compact, key order kept


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_bytes(include_usage: bool) -> None:
    gen = Generation("chat", 'we"ird', True, 3, "length", 7, include_usage)
    render = GenerationRenderer(gen, number=42, created=1700, chunked=True)
    closing = render.closing(Timings())
    assert closing[-1].endswith(LAST_CHUNK)
    events = _events([render.opening(), *(render.token(i) for i in range(3)), *closing])
    assert events[-1] == "[DONE]"
    decoded = []
    for event in events[:-1]:
        _compact(event)
        decoded.append(json.loads(event))
    assert list(decoded[0]) == ["id", "object", "created", "model", "choices"] + (["usage"] if include_usage else [])
    assert decoded[0]["id"] == "chatcmpl-mock-42" and decoded[0]["model"] == 'we"ird'
    assert decoded[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [d["choices"][0]["delta"]["content"] for d in decoded[1:4]] == list(TOKENS[:3])
    assert decoded[4]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    if include_usage:
        assert all(d["usage"] is None for d in decoded[:5])
        assert decoded[5]["choices"] == [] and decoded[5]["usage"] == {
            "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        assert len(decoded) == 6
    else:
        assert len(decoded) == 5 and all("usage" not in d for d in decoded)


def test_completion_stream_and_whole() -> None:
    gen = Generation("completion", "m", True, 2, "stop", 1)
    render = GenerationRenderer(gen, number=1, created=5, chunked=False)
    assert render.opening() == b""
    raw = render.token(0) + render.token(1) + b"".join(render.closing(Timings()))
    events = [e.removeprefix(b"data: ").decode() for e in raw.split(b"\n\n")[:-1]]
    assert [json.loads(e)["choices"][0]["text"] for e in events[:3]] == ["Hello", " from", ""]
    assert json.loads(events[2])["choices"][0]["finish_reason"] == "stop" and events[3] == "[DONE]"
    whole = json.loads(GenerationRenderer(Generation("completion", "m", False, 2, "stop", 4), number=1, created=5,
                                          chunked=True).whole(Timings()))
    assert whole == {"id": "cmpl-mock-1", "object": "text_completion", "created": 5, "model": "m",
                     "choices": [{"index": 0, "text": "Hello from", "logprobs": None, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}


def test_ollama_lines() -> None:
    timings = Timings(total_ns=1000, prompt_eval_ns=100, eval_ns=800)
    chat = GenerationRenderer(Generation("ollama_chat", "m", True, 2, "stop", 3), number=1, created=0, chunked=False)
    lines = [chat.token(0, created_at="T0"), *chat.closing(timings, created_at="T1")]
    assert lines[0] == b'{"model":"m","created_at":"T0","message":{"role":"assistant","content":"Hello"},"done":false}\n'
    assert lines[1] == (b'{"model":"m","created_at":"T1","message":{"role":"assistant","content":""},'
                        b'"done_reason":"stop","done":true,"total_duration":251000,"load_duration":250000,'
                        b'"prompt_eval_count":3,"prompt_eval_duration":100,"eval_count":2,"eval_duration":800}\n')
    gen = GenerationRenderer(Generation("ollama_generate", "m", False, 2, "length", 1), number=1, created=0,
                             chunked=True)
    assert json.loads(gen.token(1, created_at="T").split(b"\r\n")[1]) == {
        "model": "m", "created_at": "T", "response": " from", "done": False}
    whole = gen.whole(timings, created_at="T")
    _compact(whole.decode())
    assert list(json.loads(whole))[:6] == ["model", "created_at", "response", "done", "done_reason", "total_duration"]
    assert json.loads(whole)["response"] == content_text(2) == "Hello from"


def test_embeddings_are_deterministic_unit_vectors() -> None:
    vector = embedding("hello")
    assert len(vector) == 8 and vector == embedding("hello") != embedding("hellO")
    assert sum(x * x for x in vector) == pytest.approx(1.0, abs=1e-5)
    reply = plan_reply(_request("POST", "/v1/embeddings", {"model": "m", "input": ["a b", "c"]}), kind="both",
                       models=("m",), tokens=1)
    assert isinstance(reply, Static)
    body = json.loads(reply.body)
    assert [d["embedding"] for d in body["data"]] == [list(embedding("a b")), list(embedding("c"))]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3} and body["object"] == "list"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("x-mock-fault", "status=429"), ("x-mock-tokens", "3")], Overrides(("status", 429), 3)),
        ([("x-mock-fault", "None"), ("x-mock-ttft-ms", "1.5"), ("x-mock-token-delay-ms", "0")],
         Overrides(("none", None), None, 1.5, 0.0)),
        ([("x-mock-fault", "cut=4")], Overrides(("cut", 4))),
        ([("x-mock-fault", "hang")], Overrides(("hang", None))),
        ([("x-mock-fault", "explode")], None),
        ([("x-mock-fault", "status=200")], None),
        ([("x-mock-fault", "reset=1")], None),
        ([("x-mock-tokens", "-1")], None),
        ([("x-mock-tokens", "1000001")], None),
        ([("x-mock-ttft-ms", "nan")], None),
    ],
)
def test_overrides(headers: list[tuple[str, str]], expected: Overrides | None) -> None:
    got = parse_overrides(_request("GET", "/api/tags", headers=headers))
    if expected is None:
        assert isinstance(got, Static) and got.status == 400 and isinstance(json.loads(got.body)["error"], str)
    else:
        assert got == expected


def test_retry_after_only_with_429_and_503() -> None:
    assert error_reply("openai", 429, "x", retry_after_s=2).headers == (("retry-after", "2"),)
    assert error_reply("ollama", 503, "x", retry_after_s=2).headers == (("retry-after", "2"),)
    assert error_reply("openai", 500, "x", retry_after_s=2).headers == ()


@pytest.mark.parametrize("depth", [10, 900, 5000])
def test_deeply_nested_bodies_are_answered_not_raised(depth: int) -> None:
    content = "[" * depth + "]" * depth
    for path, key in [("/v1/chat/completions", "messages"), ("/v1/embeddings", "input")]:
        raw = b'{"model":"m","%s":[{"content":%s}]}' % (key.encode(), content.encode())
        reply = plan_reply(_request("POST", path, raw), kind="both", models=("m",), tokens=1)
        assert isinstance(reply, (Static, Generation))  # 200 or 400, never an exception
