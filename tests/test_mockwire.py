"""Sans-IO tests of the mock's API layers: routing, request bodies, overrides, payload bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trioproxy.mockhttp import LAST_CHUNK, Request
from trioproxy.mockpayloads import embedding, error_reply
from trioproxy.mockreply import TOKENS, Api, Generation, GenerationRenderer, Static, Timings, content_text
from trioproxy.mockwire import Overrides, parse_overrides, plan_reply


#: The smallest chat a real server accepts: one message of one word.
HI = [{"role": "user", "content": "hi"}]


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
        ("/v1/chat/completions", {"model": "gpt-9", "messages": HI}, 404,
         {"error": {"message": "The model `gpt-9` does not exist.", "type": "NotFoundError", "param": None,
                    "code": 404}}),
        ("/api/chat", {"model": "gpt-9"}, 404, {"error": "model 'gpt-9' not found"}),
        ("/api/show", {"name": "gpt-9"}, 404, {"error": "model 'gpt-9' not found"}),
        ("/v1/embeddings", b"{nope", 400, None),
        ("/api/generate", b"\xff\xfe", 400, None),
        ("/api/embed", b"[1]", 400, None),
        ("/v1/completions", {"model": "mock-llama", "max_tokens": -1}, 400, None),
        ("/v1/chat/completions", {"model": "mock-llama", "stream": "yes", "messages": HI}, 400, None),
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


_EMPTY = "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead."


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        ({"model": "m"}, "Missing required parameter: 'messages'.", "missing_required_parameter"),
        ({"model": "m", "messages": None}, "Missing required parameter: 'messages'.", "missing_required_parameter"),
        ({"model": "m", "messages": "hi"},
         "Invalid type for 'messages': expected an array of objects, but got a string instead.", "invalid_type"),
        ({"model": "m", "messages": {"role": "user", "content": "hi"}},
         "Invalid type for 'messages': expected an array of objects, but got an object instead.", "invalid_type"),
        ({"model": "m", "messages": 3},
         "Invalid type for 'messages': expected an array of objects, but got an integer instead.", "invalid_type"),
        ({"model": "m", "messages": []}, _EMPTY, "empty_array"),
        ({"model": "gpt-9", "messages": []}, _EMPTY, "empty_array"),  # the body is refused before the model
    ],
)
def test_chat_messages_are_checked_as_openai_does(body: Any, message: str, code: str) -> None:
    reply = plan_reply(_request("POST", "/v1/chat/completions", body), kind="both", models=("m",), tokens=4)
    assert isinstance(reply, Static) and reply.status == 400
    assert json.loads(reply.body) == {"error": {"message": message, "type": "invalid_request_error",
                                                "param": "messages", "code": code}}


_GO = "json: cannot unmarshal {} into Go struct field {} of type {}"


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/api/chat", {"model": "m", "messages": "hi"}, _GO.format("string", "ChatRequest.messages", "[]api.Message")),
        ("/api/chat", {"model": "m", "messages": {"role": "user"}},
         _GO.format("object", "ChatRequest.messages", "[]api.Message")),
        ("/api/chat", {"model": "m", "messages": 7.5}, _GO.format("number", "ChatRequest.messages", "[]api.Message")),
        ("/api/chat", {"model": "m", "messages": True}, _GO.format("bool", "ChatRequest.messages", "[]api.Message")),
        ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "a"}, "b"]},
         _GO.format("string", "ChatRequest.messages", "api.Message")),
        ("/api/chat", {"model": "nope", "messages": "hi"},  # decoded before the model is looked up
         _GO.format("string", "ChatRequest.messages", "[]api.Message")),
        ("/api/generate", {"model": "m", "prompt": ["a"]}, _GO.format("array", "GenerateRequest.prompt", "string")),
        ("/api/generate", {"model": "m", "prompt": 1}, _GO.format("number", "GenerateRequest.prompt", "string")),
    ],
)
def test_ollama_refuses_fields_of_the_wrong_type_as_go_decodes_them(path: str, body: Any, error: str) -> None:
    reply = plan_reply(_request("POST", path, body), kind="ollama", models=("m",), tokens=4)
    assert isinstance(reply, Static) and reply.status == 400 and json.loads(reply.body) == {"error": error}


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
                                  "stream_options": {"include_usage": True}, "messages": HI},
         Generation("chat", "m", True, 2, "length", 1, True)),
        ("/v1/chat/completions", {"model": "m", "stream": False, "stream_options": {"include_usage": True},
                                  "messages": HI},
         Generation("chat", "m", False, 5, "stop", 1, False)),
        ("/v1/completions", {"model": "m", "prompt": [1, 2, 3], "max_tokens": 5, "stream": True},
         Generation("completion", "m", True, 5, "stop", 3, False)),
        ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi you"}]},
         Generation("ollama_chat", "m", True, 5, "stop", 2, False)),
        ("/api/generate", {"model": "m", "prompt": "x y z", "system": "s", "stream": False,
                           "options": {"num_predict": 3}},
         Generation("ollama_generate", "m", False, 3, "length", 4, False)),
        ("/api/generate", {"model": "m", "prompt": "x", "options": {"num_predict": -1}},
         Generation("ollama_generate", "m", True, 5, "stop", 1, False)),
    ],
)
def test_generation_plans(path: str, body: Any, expected: Generation) -> None:
    assert plan_reply(_request("POST", path, body), kind="both", models=("*",), tokens=5) == expected


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {"model": "m"}), ("/api/chat", {"model": "m", "messages": []}),
        ("/api/chat", {"model": "m", "messages": None, "stream": True}),
        ("/api/chat", {"model": "m", "messages": [], "stream": False, "options": {"num_predict": 3}}),
        ("/api/generate", {"model": "m"}), ("/api/generate", {"model": "m", "prompt": "", "stream": True}),
        ("/api/generate", {"model": "m", "prompt": None, "system": "you are terse"}),
    ],
)
def test_nothing_to_answer_only_loads_the_model(path: str, body: Any) -> None:
    reply = plan_reply(_request("POST", path, body), kind="ollama", models=("m",), tokens=4)
    api: Api = "ollama_chat" if path == "/api/chat" else "ollama_generate"
    assert reply == Generation(api, "m", False, 0, "load", 0)  # never streamed, no tokens
    unknown = plan_reply(_request("POST", path, {**body, "model": "nope"}), kind="ollama", models=("m",), tokens=4)
    assert isinstance(unknown, Static) and unknown.status == 404  # the model is looked up first


def test_load_answers_bytes() -> None:
    chat = GenerationRenderer(Generation("ollama_chat", "m", False, 0, "load", 0), number=1, created=0, chunked=True)
    assert chat.whole(Timings(1, 2, 3), created_at="T") == (
        b'{"model":"m","created_at":"T","message":{"role":"assistant","content":""},"done_reason":"load","done":true}')
    gen = GenerationRenderer(Generation("ollama_generate", "m", False, 0, "load", 0), number=1, created=0,
                             chunked=True)
    assert gen.whole(Timings(), created_at="T") == (
        b'{"model":"m","created_at":"T","response":"","done":true,"done_reason":"load"}')


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


@pytest.mark.parametrize(
    ("n", "message", "code"),
    [
        (0, "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead.",
         "integer_below_min_value"),
        (129, "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 129 instead.",
         "integer_above_max_value"),
        ("2", "Invalid type for 'n': expected an integer, but got a string instead.", "invalid_type"),
        (2.5, "Invalid type for 'n': expected an integer, but got a decimal instead.", "invalid_type"),
        (True, "Invalid type for 'n': expected an integer, but got a boolean instead.", "invalid_type"),
    ],
)
def test_n_is_checked_as_openai_does(n: object, message: str, code: str) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        reply = plan_reply(_request("POST", path, {"model": "m", "messages": HI, "prompt": "hi", "n": n}),
                           kind="both", models=("m",), tokens=4)
        assert isinstance(reply, Static) and reply.status == 400
        assert json.loads(reply.body) == {"error": {"message": message, "type": "invalid_request_error",
                                                    "param": "n", "code": code}}


def test_n_plans_and_the_bound_on_an_answers_size() -> None:
    for n, expected in [(None, 1), (1, 1), (3, 3), (128, 128)]:
        reply = plan_reply(_request("POST", "/v1/chat/completions", {"model": "m", "messages": HI, "n": n}),
                           kind="both", models=("m",), tokens=4)
        assert reply == Generation("chat", "m", False, 4, "stop", 1, False, expected)
    big = {"model": "m", "messages": HI, "n": 101}
    refused = plan_reply(_request("POST", "/v1/chat/completions", big), kind="both", models=("m",), tokens=10_000)
    assert isinstance(refused, Static) and refused.status == 400  # 1,010,000 tokens: past the mock's bound
    capped = plan_reply(_request("POST", "/v1/chat/completions", {**big, "max_tokens": 9_900}), kind="both",
                        models=("m",), tokens=10_000)
    assert isinstance(capped, Generation) and (capped.tokens, capped.choices) == (9_900, 101)


@pytest.mark.parametrize("include_usage", [False, True])
def test_n_choices_stream_interleaved(include_usage: bool) -> None:
    gen = Generation("chat", "m", True, 3, "length", 7, include_usage, choices=3)
    render = GenerationRenderer(gen, number=1, created=5, chunked=True)
    events = _events([render.opening(), *(render.step(i) for i in range(3)), *render.closing(Timings())])
    assert events[-1] == "[DONE]"
    decoded = [json.loads(e) for e in events[:-1]]
    for event in events[:-1]:
        _compact(event)
    choices = [d["choices"][0] for d in decoded if d["choices"]]
    assert [c["index"] for c in choices] == [0, 1, 2] * 5  # role, 3 tokens, finish: each step every choice
    assert all(c["delta"] == {"role": "assistant", "content": ""} for c in choices[:3])
    for index in range(3):
        mine = [c for c in choices if c["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in mine) == content_text(3, index)
        assert [c["finish_reason"] for c in mine] == [None] * 4 + ["length"]
    assert content_text(3, 1) == " from the mock" and len({content_text(3, i) for i in range(3)}) == 3
    if include_usage:
        assert decoded[-1]["choices"] == [] and decoded[-1]["usage"] == {
            "prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
    else:
        assert all("usage" not in d for d in decoded)


def test_n_choices_whole_and_completions() -> None:
    whole = json.loads(GenerationRenderer(Generation("chat", "m", False, 2, "stop", 4, choices=3), number=9,
                                          created=5, chunked=True).whole(Timings()))
    assert whole["choices"] == [
        {"index": i, "message": {"role": "assistant", "content": content_text(2, i)}, "logprobs": None,
         "finish_reason": "stop"} for i in range(3)]
    assert whole["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    text = GenerationRenderer(Generation("completion", "m", True, 2, "stop", 1, choices=2), number=1, created=5,
                              chunked=False)
    raw = text.opening() + text.step(0) + text.step(1) + b"".join(text.closing(Timings()))
    events = [json.loads(e.removeprefix(b"data: ")) for e in raw.split(b"\n\n")[:-2]]
    assert [(e["choices"][0]["index"], e["choices"][0]["text"]) for e in events] == [
        (0, "Hello"), (1, " from"), (0, " from"), (1, " the"), (0, ""), (1, "")]
    whole = json.loads(GenerationRenderer(Generation("completion", "m", False, 2, "stop", 1, choices=2), number=1,
                                          created=5, chunked=True).whole(Timings()))
    assert [c["text"] for c in whole["choices"]] == ["Hello from", " from the"]


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
    ("body", "status", "expected"),
    [
        ({"model": "m", "prompt": "a b"}, 200, {"embedding": list(embedding("a b"))}),
        ({"model": "m:latest", "prompt": "a b", "options": {}, "keep_alive": "5m"}, 200,
         {"embedding": list(embedding("a b"))}),
        ({"model": "m"}, 200, {"embedding": []}),  # no prompt: the model is loaded, nothing embedded
        ({"model": "m", "prompt": ""}, 200, {"embedding": []}),
        ({"model": "m", "prompt": None}, 200, {"embedding": []}),
        ({"model": "m", "prompt": ["a"]}, 400,
         {"error": "json: cannot unmarshal array into Go struct field EmbeddingRequest.prompt of type string"}),
        ({"model": "m", "prompt": 5}, 400,
         {"error": "json: cannot unmarshal number into Go struct field EmbeddingRequest.prompt of type string"}),
        ({"prompt": "a"}, 400, {"error": "model is required"}),
        ({"model": "nope", "prompt": "a"}, 404, {"error": 'model "nope" not found, try pulling it first'}),
    ],
)
def test_legacy_ollama_embeddings(body: Any, status: int, expected: Any) -> None:
    reply = plan_reply(_request("POST", "/api/embeddings", body), kind="ollama", models=("m",), tokens=1)
    assert isinstance(reply, Static) and (reply.status, reply.content_type) == (status, "application/json")
    assert json.loads(reply.body) == expected
    _compact(reply.body.decode())
    openai_only = plan_reply(_request("POST", "/api/embeddings", body), kind="openai", models=("m",), tokens=1)
    assert isinstance(openai_only, Static) and openai_only.status == 404  # an Ollama route


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
