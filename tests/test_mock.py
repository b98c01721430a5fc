"""The mock upstream over real sockets (127.0.0.1, port 0): clients, faults, timing, CLI."""

from __future__ import annotations

import argparse
import json
import random
import select
import signal
import socket
import subprocess
import sys
from functools import partial
from typing import Any

import httpx
import ollama
import openai
import pytest
import trio
import trio.testing

from trioproxy.config import MockConfig
from trioproxy.mock import GARBAGE, FaultPlan, MockSettings, MockUpstream, serve_mock
from trioproxy.mockcli import add_arguments, run_from_args, settings_from_args
from trioproxy.mockpayloads import embedding
from trioproxy.mockreply import content_text

from .conftest import StartGateway, StartMock, upstream_toml

#: No waiting anywhere unless a test asks for it.
FAST = MockSettings(ttft_ms=0, token_delay_ms=0, tokens=4)
CHAT = {"model": "mock-llama", "messages": [{"role": "user", "content": "say hello to me"}]}


@pytest.fixture
def steerable_clock() -> trio.testing.MockClock:
    """Real time (so fail_after still bounds a deadlock) plus jumps we control: socket-safe."""
    return trio.testing.MockClock(rate=1.0)


async def start(nursery: trio.Nursery, settings: MockSettings = FAST) -> MockUpstream:
    mock: MockUpstream = await nursery.start(partial(serve_mock, settings))
    return mock


def client(mock: MockUpstream) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{mock.port}", trust_env=False)


async def connect(mock: MockUpstream) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", mock.port))
    return sock


def post(path: str, body: object, headers: bytes = b"", version: bytes = b"1.1") -> bytes:
    data = json.dumps(body).encode()
    return b"POST %s HTTP/%s\r\ncontent-length: %d\r\n%s\r\n%s" % (path.encode(), version, len(data), headers, data)


async def read_all(sock: trio.socket.SocketType) -> bytes:
    """Everything until the server closes (bounded by the test's fail_after)."""
    data = b""
    while chunk := await sock.recv(65536):
        data += chunk
    return data


async def read_until(sock: trio.socket.SocketType, marker: bytes, data: bytes = b"") -> bytes:
    while marker not in data:
        chunk = await sock.recv(65536)
        assert chunk, f"closed before {marker!r}: {data!r}"
        data += chunk
    return data


def readable(sock: trio.socket.SocketType) -> bool:
    return bool(select.select([sock.fileno()], [], [], 0)[0])


async def arrived(sock: trio.socket.SocketType) -> bytes:
    """What is already in the socket's receive buffer, without waiting for more.

    Call it after ``wait_all_tasks_blocked()``: loopback delivery is synchronous, so
    everything the mock sent before blocking is there.
    """
    data = b""
    for _ in range(100):  # bounded
        if not readable(sock):
            break
        chunk = await sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def split_responses(data: bytes) -> list[tuple[bytes, dict[str, str], bytes]]:
    """Content-Length responses back to back → (status line, headers, body)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        n = int(headers["content-length"])
        out.append((lines[0].encode(), headers, rest[:n]))
        data = rest[n:]
    return out


def sse_events(text: str) -> list[Any]:
    assert text.endswith("\n\n")
    events = [e.removeprefix("data: ") for e in text.split("\n\n")[:-1]]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# --- OpenAI-style routes -------------------------------------------------------------


async def test_chat_non_streamed(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery)
        async with client(mock) as http:
            r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = r.json()
        assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
        assert body["object"] == "chat.completion" and body["model"] == "mock-llama"
        assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": content_text(4)},
                                    "logprobs": None, "finish_reason": "stop"}]
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_streamed(nursery: trio.Nursery, include_usage: bool) -> None:
    with trio.fail_after(10):
        mock = await start(nursery)
        request = {**CHAT, "stream": True, "max_tokens": 3, "stream_options": {"include_usage": include_usage}}
        async with client(mock) as http:
            r = await http.post("/v1/chat/completions", json=request)
        assert r.headers["content-type"] == "text/event-stream" and r.headers["transfer-encoding"] == "chunked"
        events = sse_events(r.text)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:4]) == content_text(3)
        assert events[4]["choices"][0]["finish_reason"] == "length"  # max_tokens 3 < 4 tokens
        if include_usage:
            assert [("usage" in e and e["usage"] is None) for e in events[:5]] == [True] * 5
            assert events[5]["choices"] == [] and events[5]["usage"]["completion_tokens"] == 3
        else:
            assert len(events) == 5 and not any("usage" in e for e in events)


@pytest.mark.parametrize(
    ("kind", "options", "usage"),
    [
        # vLLM: a stream_options object without include_usage means true there (null does not);
        # OpenAI: no usage unless include_usage is true.
        ("vllm", {}, True),
        ("vllm", {"continuous_usage_stats": False}, True),
        ("vllm", {"include_usage": None}, False),
        ("vllm", {"include_usage": False}, False),
        ("vllm", None, False),
        ("openai", {}, False),
        ("both", {}, False),
        ("openai", {"include_usage": True}, True),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_a_stream_ends_with_usage_as_each_kind_defaults(
    nursery: trio.Nursery, kind: Any, options: dict[str, Any] | None, usage: bool, path: str
) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(kind=kind, ttft_ms=0, token_delay_ms=0, tokens=3))
        request: dict[str, Any] = {**CHAT, "stream": True}
        if path == "/v1/completions":
            request = {"model": CHAT["model"], "prompt": "hi", "stream": True}
        if options is not None:
            request["stream_options"] = options
        async with client(mock) as http:
            r = await http.post(path, json=request)
        events = sse_events(r.text)
        assert r.status_code == 200 and events
        assert (events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3) is usage
        assert any("usage" in e for e in events) is usage


async def test_openai_sdk(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        mock = await start(nursery, MockSettings(ttft_ms=0, token_delay_ms=0, tokens=5, models=("a", "b")))
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{mock.port}/v1", api_key="k", max_retries=0,
                            http_client=openai.DefaultHttpxClient(trust_env=False))  # never a proxy

        def run() -> dict[str, Any]:
            out: dict[str, Any] = {}
            out["chat"] = sdk.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
            chunks = list(sdk.chat.completions.create(
                model="b", messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True}))
            out["stream"] = chunks
            out["completion"] = sdk.completions.create(model="a", prompt="one two", max_tokens=2)
            out["embeddings"] = sdk.embeddings.create(model="a", input=["x y", "z"])  # SDK asks for base64
            out["models"] = [m.id for m in sdk.models.list()]
            with pytest.raises(openai.NotFoundError):
                sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.BadRequestError) as refused:
                sdk.chat.completions.create(model="a", messages=[])
            out["refused"] = refused.value
            with pytest.raises(openai.RateLimitError):
                sdk.chat.completions.create(model="a", messages=[], extra_headers={"x-mock-fault": "status=429"})
            return out

        out = await trio.to_thread.run_sync(run)
        assert out["chat"].choices[0].message.content == content_text(5)
        assert out["chat"].usage.prompt_tokens == 1
        text = "".join(c.choices[0].delta.content or "" for c in out["stream"] if c.choices)
        assert text == content_text(5) and out["stream"][-1].usage.total_tokens == 6
        assert out["completion"].choices[0].text == "Hello from"
        assert out["completion"].choices[0].finish_reason == "length"
        vectors = [d.embedding for d in out["embeddings"].data]
        assert vectors == [pytest.approx(list(embedding("x y")), abs=1e-6), pytest.approx(list(embedding("z")),
                                                                                          abs=1e-6)]
        assert out["models"] == ["a", "b"]
        assert (out["refused"].code, out["refused"].param, out["refused"].type) == (
            "empty_array", "messages", "invalid_request_error")


async def test_openai_sdk_n_choices(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        mock = await start(nursery, MockSettings(ttft_ms=0, token_delay_ms=0, tokens=4))
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{mock.port}/v1", api_key="k", max_retries=0,
                            http_client=openai.DefaultHttpxClient(trust_env=False))

        def run() -> tuple[Any, list[Any], Any]:
            whole = sdk.chat.completions.create(model="mock-llama", messages=[{"role": "user", "content": "hi there"}],
                                                n=3, max_tokens=3)
            chunks = list(sdk.chat.completions.create(
                model="mock-llama", messages=[{"role": "user", "content": "hi there"}], n=2, stream=True,
                stream_options={"include_usage": True}))
            return whole, chunks, sdk.completions.create(model="mock-llama", prompt="hi", n=2)

        whole, chunks, completion = await trio.to_thread.run_sync(run)
    assert [(c.index, c.message.content, c.finish_reason) for c in whole.choices] == [
        (i, content_text(3, i), "length") for i in range(3)]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (2, 9)
    indices = [c.choices[0].index for c in chunks if c.choices]
    assert indices == [0, 1] * 6  # role, 4 tokens, finish: interleaved, a step at a time
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == content_text(4, i)
        assert [c.finish_reason for c in mine][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.total_tokens == 10
    assert [c.text for c in completion.choices] == [content_text(4), content_text(4, 1)]


async def test_embeddings_and_models_shapes(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(models=("m1", "*")))
        async with client(mock) as http:
            emb = (await http.post("/v1/embeddings", json={"model": "anything", "input": "a b c"})).json()
            models = (await http.get("/v1/models")).json()
            health = await http.get("/health")
        assert emb == {"object": "list", "data": [{"object": "embedding", "index": 0,
                                                    "embedding": list(embedding("a b c"))}],
                       "model": "anything", "usage": {"prompt_tokens": 3, "total_tokens": 3}}
        assert models == {"object": "list", "data": [{"id": "m1", "object": "model", "created": 1_730_000_000,
                                                       "owned_by": "trioproxy-mock"}]}
        assert health.status_code == 200 and health.content == b""


# --- Ollama routes ----------------------------------------------------------------------


async def test_ollama_ndjson_stream(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery)
        async with client(mock) as http:
            r = await http.post("/api/chat", json={**CHAT, "options": {"num_predict": 2}})
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert [x["message"]["content"] for x in lines] == ["Hello", " from", ""]
        assert all(x["created_at"].endswith("Z") for x in lines)
        final = lines[-1]
        assert final["done"] is True and final["done_reason"] == "length"
        assert (final["prompt_eval_count"], final["eval_count"]) == (4, 2)
        for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
            assert isinstance(final[key], int)


async def test_ollama_client(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        mock = await start(nursery, MockSettings(ttft_ms=0, token_delay_ms=0, tokens=3))
        api = ollama.Client(host=f"http://127.0.0.1:{mock.port}", trust_env=False)

        def run() -> dict[str, Any]:
            out: dict[str, Any] = {}
            out["stream"] = list(api.chat(model="mock-llama", messages=[{"role": "user", "content": "a b"}],
                                          stream=True))
            out["chat"] = api.chat(model="mock-llama:latest", messages=[{"role": "user", "content": "a"}])
            out["generate"] = api.generate(model="mock-llama", prompt="why")
            out["embed"] = api.embed(model="mock-llama", input=["p", "q r"])
            out["embeddings"] = api.embeddings(model="mock-llama", prompt="q r")  # the legacy /api/embeddings
            out["list"] = api.list()
            out["show"] = api.show("mock-llama")
            out["ps"] = api.ps()
            with pytest.raises(ollama.ResponseError) as info:
                api.chat(model="nope", messages=[])
            out["error"] = info.value
            return out

        out = await trio.to_thread.run_sync(run)
        assert "".join(p.message.content for p in out["stream"]) == content_text(3)
        assert out["stream"][-1].done and out["stream"][-1].eval_count == 3
        assert out["stream"][-1].prompt_eval_count == 2
        assert out["chat"].message.content == content_text(3) and out["chat"].done_reason == "stop"
        assert out["generate"].response == content_text(3)
        assert [list(v) for v in out["embed"].embeddings] == [list(embedding("p")), list(embedding("q r"))]
        assert list(out["embeddings"].embedding) == list(embedding("q r"))
        assert [m.model for m in out["list"].models] == ["mock-llama:latest"]
        assert out["show"].details.family == "llama" and out["show"].capabilities == ["completion"]
        assert out["show"].modelinfo["general.architecture"] == "llama"
        assert out["ps"].models[0].name == "mock-llama:latest"
        assert out["error"].status_code == 404 and out["error"].error == "model 'nope' not found"


@pytest.mark.parametrize("stream", [True, False, None])
@pytest.mark.parametrize(("path", "body"), [("/api/chat", {"messages": []}), ("/api/generate", {"prompt": ""})])
async def test_ollama_with_nothing_to_answer_loads_the_model(
    nursery: trio.Nursery, path: str, body: dict[str, Any], stream: bool | None
) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(ttft_ms=60_000, token_delay_ms=60_000))  # a load does not wait
        sock = await connect(mock)
        request = {"model": "mock-llama", **body} | ({} if stream is None else {"stream": stream})
        await sock.send(post(path, request, b"connection: close\r\n"))
        [(status, headers, raw)] = split_responses(await read_all(sock))
        assert status == b"HTTP/1.1 200 OK" and headers["content-type"] == "application/json"  # one object, not NDJSON
        answer = json.loads(raw)
        assert answer["created_at"].endswith("Z")
        del answer["created_at"]
        if path == "/api/chat":
            assert list(answer) == ["model", "message", "done_reason", "done"]
            assert answer == {"model": "mock-llama", "message": {"role": "assistant", "content": ""},
                              "done_reason": "load", "done": True}
        else:
            assert answer == {"model": "mock-llama", "response": "", "done": True, "done_reason": "load"}


async def test_ollama_client_loads_a_model(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        mock = await start(nursery)
        api = ollama.Client(host=f"http://127.0.0.1:{mock.port}", trust_env=False)

        def run() -> list[Any]:
            return [api.chat(model="mock-llama"), *api.chat(model="mock-llama", messages=[], stream=True),
                    api.generate(model="mock-llama"), *api.generate(model="mock-llama", stream=True)]

        answers = await trio.to_thread.run_sync(run)
    assert [(a.done, a.done_reason, a.eval_count) for a in answers] == [(True, "load", None)] * 4
    assert answers[0].message.content == answers[1].message.content == ""
    assert answers[2].response == answers[3].response == ""


@pytest.mark.parametrize(
    ("kind", "path", "status", "body"),
    [
        ("ollama", "/", 200, b"Ollama is running"),
        ("ollama", "/api/version", 200, b'{"version":"0.12.6"}'),
        ("ollama", "/health", 404, None),
        ("openai", "/api/tags", 404, b'{"error":"no route for GET /api/tags"}'),
        ("openai", "/health", 200, b""),
        ("vllm", "/health", 200, b""),
        ("vllm", "/api/tags", 404, b'{"error":"no route for GET /api/tags"}'),
        ("vllm", "/v1/models", 200, None),
        ("both", "/api/ps", 200, None),
        ("both", "/v1/chat/completions", 405, None),
    ],
)
async def test_routes_by_kind(nursery: trio.Nursery, kind: Any, path: str, status: int, body: bytes | None) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(kind=kind))
        async with client(mock) as http:
            r = await http.get(path)
        assert r.status_code == status
        if body is not None:
            assert r.content == body


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/v1/completions", {"model": "x"}, 404,
         {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": None, "code": 404}),
        ("/api/generate", {"model": "x"}, 404, "model 'x' not found"),
        ("/v1/chat/completions", "{", 400, None),
        ("/api/embed", "{", 400, None),
        ("/v1/chat/completions", {"model": "x", "messages": "hi"}, 400,
         {"message": "Invalid type for 'messages': expected an array of objects, but got a string instead.",
          "type": "invalid_request_error", "param": "messages", "code": "invalid_type"}),
        ("/api/chat", {"model": "x", "messages": {}}, 400,
         "json: cannot unmarshal object into Go struct field ChatRequest.messages of type []api.Message"),
    ],
)
async def test_errors_in_route_format(nursery: trio.Nursery, path: str, body: Any, status: int, error: Any) -> None:
    with trio.fail_after(10):
        mock = await start(nursery)
        async with client(mock) as http:
            r = await http.post(path, content=body if isinstance(body, str) else json.dumps(body))
        assert r.status_code == status
        got = r.json()["error"]
        if error is not None:
            assert got == error
        else:
            assert isinstance(got, str if path.startswith("/api/") else dict)


# --- through the gateway -----------------------------------------------------------------


async def test_legacy_ollama_embeddings_through_the_gateway(start_mock: StartMock,
                                                             start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(kind="ollama", models=("mock-llama",), ttft_ms=0, token_delay_ms=0)
        gw = await start_gateway(upstream_toml("o", f"http://127.0.0.1:{mock.port}", kind="ollama"))
        api = ollama.Client(host=gw.url, trust_env=False)

        def run() -> Any:
            return api.embeddings(model="mock-llama", prompt="why is the sky blue"), api.embeddings(model="mock-llama")

        vector, loaded = await trio.to_thread.run_sync(run)
    assert list(vector.embedding) == list(embedding("why is the sky blue"))
    assert list(loaded.embedding) == []  # no prompt: the model is loaded, nothing embedded
    assert mock.statistics().by_path["/api/embeddings"] == 2  # (and the health probe's /api/version)


async def test_ollama_model_loads_through_the_gateway(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(kind="ollama", models=("mock-llama",), ttft_ms=0, token_delay_ms=0)
        gw = await start_gateway(upstream_toml("o", f"http://127.0.0.1:{mock.port}", kind="ollama"))
        api = ollama.Client(host=gw.url, trust_env=False)

        def run() -> list[Any]:
            return [api.chat(model="mock-llama", messages=[]), *api.chat(model="mock-llama", stream=True),
                    api.generate(model="mock-llama"), *api.generate(model="mock-llama", prompt="", stream=True)]

        answers = await trio.to_thread.run_sync(run)
    assert [(a.done, a.done_reason) for a in answers] == [(True, "load")] * 4


async def test_n_choices_through_the_gateway(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(models=("mock-llama",), tokens=3, ttft_ms=0, token_delay_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}"))
        sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0,
                            http_client=openai.DefaultHttpxClient(trust_env=False))

        def run() -> tuple[Any, list[Any]]:
            whole = sdk.chat.completions.create(model="mock-llama", messages=[{"role": "user", "content": "hi"}], n=2)
            return whole, list(sdk.chat.completions.create(
                model="mock-llama", messages=[{"role": "user", "content": "hi"}], n=2, stream=True,
                stream_options={"include_usage": True}))

        whole, chunks = await trio.to_thread.run_sync(run)
    assert [c.message.content for c in whole.choices] == [content_text(3), content_text(3, 1)]
    assert whole.usage.completion_tokens == 6
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices and c.choices[0].index == i) == content_text(3, i)
    assert chunks[-1].usage.completion_tokens == 6


# --- faults ---------------------------------------------------------------------------------


async def test_status_fault_with_retry_after(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(ttft_ms=0, fault=FaultPlan("status", status=429, retry_after_s=7)))
        async with client(mock) as http:
            v1 = await http.post("/v1/chat/completions", json=CHAT)
            api = await http.post("/api/chat", json=CHAT)
            passed = await http.post("/api/chat", json=CHAT, headers={"x-mock-fault": "none"})
        assert v1.status_code == api.status_code == 429
        assert v1.headers["retry-after"] == api.headers["retry-after"] == "7"
        assert v1.json()["error"]["type"] == "RateLimitError" and isinstance(api.json()["error"], str)
        assert passed.status_code == 200
        stats = mock.statistics()
        assert stats.faults == {"status": 2} and stats.connections == 1  # the connection survived the 429s


async def test_reset_fault(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(fault=FaultPlan("reset")))
        sock = await connect(mock)
        await sock.send(post("/v1/chat/completions", CHAT))
        with pytest.raises(ConnectionResetError):
            await sock.recv(1024)  # a RST before any byte
        sock.close()
        async with client(mock) as http:
            with pytest.raises(httpx.ReadError):
                await http.get("/api/tags")
        assert mock.statistics().faults == {"reset": 2}


async def test_hang_fault_sends_nothing_and_counts_the_disconnect(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery)
        sock = await connect(mock)
        await sock.send(post("/v1/chat/completions", CHAT, b"x-mock-fault: hang\r\n"))
        await trio.testing.wait_all_tasks_blocked()
        stats = mock.statistics()
        assert (stats.requests, stats.in_progress, stats.faults) == (1, 1, {"hang": 1})
        assert not readable(sock)
        sock.close()
        await mock.wait_disconnects(1)
        await trio.testing.wait_all_tasks_blocked()
        assert mock.statistics().in_progress == 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/generate"])
async def test_cut_fault_truncates_the_stream(nursery: trio.Nursery, path: str) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(ttft_ms=0, token_delay_ms=0, fault=FaultPlan("cut")))
        received = b""
        body = {**CHAT, "prompt": "say hello", "stream": True}  # (each route reads its own field)
        async with client(mock) as http, http.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in r.aiter_bytes():
                    received += chunk
        text = received.decode()
        assert "[DONE]" not in text and '"done":true' not in text
        assert text.count("Hello") == 1 and text.count(" from") == 1 and " the" not in text  # 2 tokens


async def test_cut_fault_on_a_sized_body_and_by_header(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery)
        async with client(mock) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post("/v1/chat/completions", json=CHAT, headers={"x-mock-fault": "cut"})
            sock = await connect(mock)
            await sock.send(post("/v1/completions", {**CHAT, "stream": True}, b"x-mock-fault: cut=1\r\n"))
            data = await read_all(sock)
        assert data.count(b"data: ") == 1 and not data.endswith(b"0\r\n\r\n")


async def test_garbage_fault(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(fault=FaultPlan("garbage")))
        sock = await connect(mock)
        await sock.send(b"GET /api/version HTTP/1.1\r\n\r\n")
        assert await read_all(sock) == GARBAGE
        async with client(mock) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/api/version")


async def test_refuse(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(refuse=True))
        assert mock.port != 0
        with pytest.raises(ConnectionRefusedError):
            await connect(mock)
        async with client(mock) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get("/api/version")
        probe = socket.socket()
        with pytest.raises(OSError):  # the port is still ours
            probe.bind(("127.0.0.1", mock.port))
        probe.close()


async def _statuses(plan: FaultPlan, n: int, nursery: trio.Nursery) -> list[int]:
    mock = await start(nursery, MockSettings(fault=plan))
    async with client(mock) as http:
        return [(await http.get("/api/version")).status_code for _ in range(n)]


async def test_every_n_selection(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        assert await _statuses(FaultPlan("status", every=3), 9, nursery) == [200, 200, 503] * 3


async def test_seeded_rate_selection_is_deterministic(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        plan = FaultPlan("status", rate=0.4, seed=11)
        rng = random.Random(11)
        expected = [503 if rng.random() < 0.4 else 200 for _ in range(30)]
        assert 0 < expected.count(503) < 30
        assert await _statuses(plan, 30, nursery) == expected
        assert await _statuses(plan, 30, nursery) == expected


async def test_header_overrides(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(ttft_ms=0, token_delay_ms=0, fault=FaultPlan("reset", every=1)))
        async with client(mock) as http:
            few = await http.post("/v1/chat/completions", json=CHAT,
                                  headers={"x-mock-tokens": "2", "x-mock-fault": "none"})
            bad = await http.post("/api/chat", json=CHAT, headers={"x-mock-tokens": "many", "x-mock-fault": "none"})
            limited = await http.post("/api/chat", json=CHAT, headers={"x-mock-fault": "status=503"})
        assert few.json()["choices"][0]["message"]["content"] == "Hello from"
        assert bad.status_code == 400 and "x-mock-tokens" in bad.json()["error"]
        assert limited.status_code == 503 and limited.headers["retry-after"] == "1"


async def test_slow_fault_delays_the_first_token_of_selected_requests(
    nursery: trio.Nursery, steerable_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(120):
        plan = FaultPlan("slow", every=2, slow_ttft_ms=30_000)
        mock = await start(nursery, MockSettings(ttft_ms=0, token_delay_ms=0, tokens=2, fault=plan))
        sock = await connect(mock)
        request = post("/v1/chat/completions", {**CHAT, "stream": True}, b"x-mock-ttft-ms: 0\r\n")
        await sock.send(request)  # request 1: not selected, answered at once
        data = await read_until(sock, b"data: [DONE]")
        assert data.count(b'"content":"') == 3  # the role chunk and two tokens
        await sock.send(request)  # request 2: slow, whatever its header says
        data = await read_until(sock, b'"role":"assistant"')  # headers and role chunk at once
        steerable_clock.jump(29)
        await trio.testing.wait_all_tasks_blocked()
        assert not readable(sock)
        steerable_clock.jump(2)
        await trio.testing.wait_all_tasks_blocked()
        data += await arrived(sock)
        assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        assert mock.statistics().faults == {"slow": 1}


# --- timing and disconnects ------------------------------------------------------------


async def test_stream_schedule(nursery: trio.Nursery, steerable_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(120):
        mock = await start(nursery, MockSettings(ttft_ms=20_000, token_delay_ms=10_000, tokens=2))
        sock = await connect(mock)
        await sock.send(post("/v1/chat/completions", {**CHAT, "stream": True}))
        data = await read_until(sock, b'"role":"assistant"')  # headers and role chunk at once
        assert data.count(b"data: ") == 1
        # virtual t=19: nothing new; 21: token 1 (due at 20); 29: nothing; 31: token 2 (due at 30), finish, [DONE]
        for jump, events in [(19, 1), (2, 2), (8, 2), (2, 5)]:
            steerable_clock.jump(jump)
            await trio.testing.wait_all_tasks_blocked()
            data += await arrived(sock)
            assert data.count(b"data: ") == events
        assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


async def test_ttft_applies_to_non_streamed_and_header_overrides_it(
    nursery: trio.Nursery, steerable_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(120):
        mock = await start(nursery, MockSettings(ttft_ms=30_000, token_delay_ms=10_000))
        sock = await connect(mock)
        await sock.send(post("/api/generate", {"model": "mock-llama", "prompt": "hi", "stream": False},
                             b"x-mock-ttft-ms: 5000\r\n"))
        await trio.testing.wait_all_tasks_blocked()
        assert mock.statistics().in_progress == 1  # the request is in: its clock has started
        steerable_clock.jump(4)
        await trio.testing.wait_all_tasks_blocked()
        assert not readable(sock)
        steerable_clock.jump(2)
        await trio.testing.wait_all_tasks_blocked()
        data = await arrived(sock)
        body = json.loads(split_responses(data)[0][2])
        assert body["response"] == content_text(16)
        assert 5e9 <= body["prompt_eval_duration"] and body["total_duration"] >= body["prompt_eval_duration"]


async def test_ollama_durations_follow_the_schedule(
    nursery: trio.Nursery, steerable_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(120):
        mock = await start(nursery, MockSettings(ttft_ms=10_000, token_delay_ms=5_000, tokens=3))
        sock = await connect(mock)
        await sock.send(post("/api/chat", CHAT))
        data = await read_until(sock, b"\r\n\r\n")  # headers at once
        for _ in range(3):  # tokens due at t=10, 15, 20 (virtual s)
            steerable_clock.jump(5 if b"Hello" in data else 10.5)
            await trio.testing.wait_all_tasks_blocked()
            data += await arrived(sock)
        assert data.endswith(b"\n\r\n0\r\n\r\n")
        final = json.loads(data[data.rindex(b'{"model"') :].split(b"\n", 1)[0])
        assert final["done"] is True and final["eval_count"] == 3
        assert final["prompt_eval_duration"] == pytest.approx(10.5e9, abs=0.4e9)
        assert final["eval_duration"] == pytest.approx(10e9, abs=0.4e9)
        assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]


async def test_disconnect_mid_stream_is_counted_and_stops_generation(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(ttft_ms=0, token_delay_ms=60_000, tokens=100))
        sock = await connect(mock)
        await sock.send(post("/v1/chat/completions", {**CHAT, "stream": True}))
        await read_until(sock, b'"content":"Hello"')
        assert mock.statistics().in_progress == 1
        sock.close()
        await mock.wait_disconnects(1)
        await trio.testing.wait_all_tasks_blocked()
        stats = mock.statistics()
        assert (stats.disconnects, stats.in_progress) == (1, 0)


async def test_disconnect_while_waiting_for_ttft(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, MockSettings(ttft_ms=60_000))
        async with client(mock) as http:
            async with trio.open_nursery() as request:
                request.start_soon(partial(http.post, "/v1/chat/completions", json=CHAT))
                await trio.testing.wait_all_tasks_blocked()
                assert mock.statistics().in_progress == 1
                request.cancel_scope.cancel()  # httpx closes the connection
        await mock.wait_disconnects(1)


# --- HTTP/1.1 connection handling -----------------------------------------------------------


async def test_keep_alive_reuse_and_recording(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery)
        async with client(mock) as http:
            for i in range(5):
                r = await http.post(f"/api/embed?i={i}", json={"model": "mock-llama", "input": "x"},
                                    headers={"X-Trace": str(i)})
                assert r.status_code == 200
        stats = mock.statistics()
        assert (stats.connections, stats.requests, stats.by_path) == (1, 5, {"/api/embed": 5})
        last = mock.requests[-1]
        assert (last.method, last.path, last.query) == ("POST", "/api/embed", "i=4")
        assert ("x-trace", "4") in last.headers and json.loads(last.body)["input"] == "x"


async def test_pipelining_and_the_recording_limit(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        mock = await start(nursery)
        sock = await connect(mock)
        wire = b"".join(b"GET /api/version?n=%d HTTP/1.1\r\n\r\n" % i for i in range(1002))
        await sock.send(wire + b"GET /api/version?n=1002 HTTP/1.1\r\nConnection: close\r\n\r\n")
        responses = split_responses(await read_all(sock))
        assert len(responses) == 1003 and all(r[2] == b'{"version":"0.12.6"}' for r in responses)
        assert responses[-1][1]["connection"] == "close"
        assert [r.query for r in mock.requests] == [f"n={i}" for i in range(3, 1003)]


async def test_http10_and_connection_close(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery)
        sock = await connect(mock)
        await sock.send(b"GET /api/tags HTTP/1.0\r\n\r\n")
        [(status, headers, _)] = split_responses(await read_all(sock))
        assert status == b"HTTP/1.1 200 OK" and headers["connection"] == "close"
        sock = await connect(mock)  # a 1.0 stream: no chunks, the body ends at close
        await sock.send(post("/api/chat", CHAT, b"Connection: keep-alive\r\n", version=b"1.0"))
        head, _, body = (await read_all(sock)).partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head and b"connection: close" in head
        assert [json.loads(line)["done"] for line in body.splitlines()] == [False] * 4 + [True]
        sock = await connect(mock)
        await sock.send(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert split_responses(await read_all(sock))[0][2] == b"Ollama is running"


async def test_expect_continue_and_chunked_request_body(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery)
        sock = await connect(mock)
        body = json.dumps(CHAT).encode()
        await sock.send(b"POST /v1/chat/completions HTTP/1.1\r\nExpect: 100-continue\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n")
        assert await read_until(sock, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        await sock.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        data = await read_until(sock, b'"usage"')
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert mock.requests[0].body == body


async def test_malformed_request_gets_400_and_close(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery)
        sock = await connect(mock)
        await sock.send(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
        [(status, headers, body)] = split_responses(await read_all(sock))
        assert status == b"HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == 400
        assert mock.statistics().requests == 0


async def test_cancelling_serve_mock_ends_every_connection(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as owner:
            mock = await start(owner, MockSettings(ttft_ms=0, token_delay_ms=60_000))
            sock = await connect(mock)
            await sock.send(post("/v1/chat/completions", {**CHAT, "stream": True}))
            await read_until(sock, b"Hello")
            owner.cancel_scope.cancel()
        assert await read_all(sock) == b""  # closed mid-stream: EOF, no hang


# --- settings and CLI -----------------------------------------------------------------------


def test_settings_validation_and_from_config() -> None:
    assert MockSettings.from_config(MockConfig(kind="ollama", models=("a",), tokens=3)) == MockSettings(
        kind="ollama", models=("a",), tokens=3)
    bad_settings: list[dict[str, Any]] = [dict(tokens=-1), dict(ttft_ms=float("nan")), dict(kind="grpc")]
    for bad in bad_settings:
        with pytest.raises(ValueError):
            MockSettings(**bad)
    bad_plans: list[dict[str, Any]] = [dict(kind="boom"), dict(kind="status", status=200),
                                       dict(kind="cut", every=2, rate=0.5), dict(kind="hang", rate=1.5),
                                       dict(kind="slow", slow_ttft_ms=-1.0)]
    for bad_plan in bad_plans:
        with pytest.raises(ValueError):
            FaultPlan(**bad_plan)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_parser() -> None:
    args = _parse()
    assert (args.host, args.port) == ("127.0.0.1", 8081)
    assert settings_from_args(args) == MockSettings()
    args = _parse("--kind", "openai", "--models", "a, b", "--tokens", "3", "--token-delay-ms", "1",
                  "--ttft-ms", "2", "--fail", "status", "--fail-status", "429", "--retry-after", "5",
                  "--fail-rate", "0.25", "--seed", "9", "--cut-after", "4", "--port", "0")
    assert settings_from_args(args) == MockSettings(
        kind="openai", models=("a", "b"), tokens=3, token_delay_ms=1.0, ttft_ms=2.0,
        fault=FaultPlan("status", status=429, retry_after_s=5, rate=0.25, seed=9, cut_after_tokens=4))
    assert settings_from_args(_parse("--fail", "refuse")).refuse is True
    assert settings_from_args(_parse("--fail", "cut", "--fail-every", "2")).fault == FaultPlan("cut", every=2)
    assert settings_from_args(_parse("--fail", "slow", "--fail-rate", "0.1", "--seed", "3", "--slow-ttft-ms", "900")
                              ).fault == FaultPlan("slow", rate=0.1, seed=3, slow_ttft_ms=900.0)
    with pytest.raises(SystemExit):
        _parse("--fail", "explode")


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_from_args(_parse("--models", ",")) == 2
    assert run_from_args(_parse("--port", "70000")) == 2  # (the OS would have taken it as 4464)
    assert run_from_args(_parse("--fail-rate", "2")) == 2
    assert "--port: expected 0..65535" in capsys.readouterr().err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        assert run_from_args(_parse("--port", str(taken.getsockname()[1]))) == 1
    finally:
        taken.close()
    assert "cannot listen" in capsys.readouterr().err


async def test_cli_runs_until_sigint() -> None:
    with trio.fail_after(60):
        code = ("import argparse, sys; from trioproxy.mockcli import add_arguments, run_from_args; "
                "p = argparse.ArgumentParser(); add_arguments(p); sys.exit(run_from_args(p.parse_args()))")
        proc = await trio.lowlevel.open_process([sys.executable, "-c", code, "--port", "0", "--kind", "ollama"],
                                                stderr=subprocess.PIPE)
        assert proc.stderr is not None
        try:
            banner = b""
            while b"\n" not in banner:
                chunk = await proc.stderr.receive_some()
                assert chunk, "exited before the banner"
                banner += chunk
            line = banner.decode().splitlines()[0]
            assert line.startswith("trioproxy mock (ollama) listening on http://127.0.0.1:")
            async with httpx.AsyncClient(base_url=line.rsplit(" ", 1)[1], trust_env=False) as http:
                assert (await http.get("/api/version")).status_code == 200
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
        finally:
            proc.kill()


async def test_drain_lets_a_paced_stream_finish_then_serve_mock_returns() -> None:
    """``drain()``: no new connections, the stream in flight ends with [DONE], then
    ``serve_mock`` returns (its token clock included): what a reload relies on to stop a mock."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            stopped = trio.Event()

            async def serve(task_status: trio.TaskStatus[MockUpstream]) -> None:
                await serve_mock(MockSettings(tokens=20, token_delay_ms=5, ttft_ms=0), task_status=task_status)
                stopped.set()

            mock: MockUpstream = await nursery.start(serve)
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", mock.port))
            body = json.dumps({**CHAT, "stream": True}).encode()
            await sock.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%s" % (len(body), body))
            data = await read_until(sock, b'"content":"Hello"')  # the first token is out: the stream is paced now
            mock.drain()
            data += await read_all(sock)  # the mock closes once the stream has ended
            sock.close()
            await stopped.wait()
    assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the last event, then the last chunk
    assert data.count(b'"content":') == 1 + 20  # the role chunk's empty content, then 20 tokens
