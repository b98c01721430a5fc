"""End to end: real Hypercorn, real sockets, real clients (openai SDK, ollama, httpx) against the mock."""

from __future__ import annotations

import gc
import json
import re
import socket
from typing import Any

import httpx
import ollama
import openai
import pytest
import trio
import trio.testing

from trioproxy.mock import FaultPlan
from trioproxy.server import GC_GEN0_THRESHOLD

from .conftest import NO_PROBES, StartGateway, StartMock, read_records, stop, upstream_toml

CHAT = {"model": "mock-llama", "messages": [{"role": "user", "content": "say hello to the gateway"}]}


def strip_ids(stream: bytes) -> bytes:
    """Ids and timestamps differ between two answers of the mock; the rest must not."""
    stream = re.sub(rb'"id":"[^"]*"', b'"id":"X"', stream)
    return re.sub(rb'"created":\d+', b'"created":0', stream)


async def test_openai_sdk_streaming_and_not(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(tokens=5, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}"))
        direct = openai.OpenAI(base_url=f"http://127.0.0.1:{mock.port}/v1", api_key="unused", max_retries=0)
        through = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)

        def chat(client: openai.OpenAI) -> tuple[str, Any]:
            stream = client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            whole = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
            return text, whole

        direct_text, direct_whole = await trio.to_thread.run_sync(chat, direct)
        text, whole = await trio.to_thread.run_sync(chat, through)
        assert text and text == direct_text
        assert whole.choices[0].message.content == direct_whole.choices[0].message.content == text
        assert whole.usage is not None and whole.usage.completion_tokens == 5
        assert whole.model == "mock-llama"
        await stop(gw)
    records = read_records(gw)
    assert [r["stream"] for r in records] == [True, False]
    assert all(r["outcome"] == "ok" and r["upstream"] == "m" for r in records)
    assert records[0]["completion_tokens"] == 5 and records[0]["token_source"] == "upstream"
    assert records[0]["ttft_ms"] is not None and records[0]["finish_reason"] == "stop"


async def test_openai_sdk_lists_and_retrieves_models(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """``models.list`` and ``models.retrieve`` (``GET /v1/models/{model}``, a name with a slash too, as
    vLLM serves them); an unknown name is the SDK's NotFoundError with OpenAI's ``model_not_found``."""
    with trio.fail_after(30):
        mock = await start_mock(models=("mock-llama", "Qwen/Qwen2.5-0.5B-Instruct"), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", models='["mock-llama", "Qwen/Qwen2.5-0.5B-Instruct"]'))
        sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)

        def models() -> tuple[list[str], Any, Any, Any]:
            listed = [m.id for m in sdk.models.list()]
            try:
                sdk.models.retrieve("no-such-model")
            except openai.NotFoundError as exc:
                missing: Any = exc
            return listed, sdk.models.retrieve("mock-llama"), sdk.models.retrieve("Qwen/Qwen2.5-0.5B-Instruct"), missing

        listed, llama, qwen, missing = await trio.to_thread.run_sync(models)
        await stop(gw)
    assert listed == ["Qwen/Qwen2.5-0.5B-Instruct", "mock-llama"]
    assert (llama.id, llama.object, llama.owned_by) == ("mock-llama", "model", "m")
    assert qwen.id == "Qwen/Qwen2.5-0.5B-Instruct"
    assert missing.status_code == 404 and missing.code == "model_not_found"
    records = read_records(gw)
    assert [(r["route"], r["status"], r["outcome"]) for r in records] == [
        ("/v1/models", 200, "ok"),
        ("/v1/models/no-such-model", 404, "rejected"),
        ("/v1/models/mock-llama", 200, "ok"),
        ("/v1/models/Qwen/Qwen2.5-0.5B-Instruct", 200, "ok"),
    ]
    assert records[2]["model_requested"] == "mock-llama"


async def test_a_finished_request_ends_on_its_own_while_its_connection_stays_open(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """The app does not cancel its disconnect watcher after a complete answer: it relies on
    Hypercorn answering ``receive()`` with ``http.disconnect`` once the response is sent (the
    ASGI spec). If that ever stopped, requests would finish for the client but their app calls
    (and usage records) would hang until the connection closed: this test would see them."""
    with trio.fail_after(30):
        mock = await start_mock(tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}"))
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            for i, stream in enumerate([False, True, False, True]):
                response = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
                assert response.status_code == 200
                assert (b"data: [DONE]" in response.content) == stream
                # Once every task is blocked, no app call may still be running on the open connection.
                await trio.testing.wait_all_tasks_blocked()
                assert gw.services.active == 0
                assert gw.services.sink.statistics().submitted == i + 1
        await stop(gw)
    records = read_records(gw)
    assert [r["outcome"] for r in records] == ["ok"] * 4


async def test_the_gc_is_settled_while_serving_and_restored_by_the_last_gateway_out(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert before[0] != GC_GEN0_THRESHOLD
    with trio.fail_after(30):
        mock = await start_mock(tokens=1, token_delay_ms=0, ttft_ms=0)
        first = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}"))
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > frozen
        second = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}"))
        await stop(first)
        assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD  # the second still serves
        async with httpx.AsyncClient(base_url=second.url, timeout=10) as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await stop(second)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == frozen


async def test_ollama_client_through_the_gateway(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(kind="ollama", models=("mock-llama",), tokens=4, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("o", f"http://127.0.0.1:{mock.port}", kind="ollama"))
        client = ollama.Client(host=gw.url)

        def use() -> dict[str, Any]:
            streamed = "".join(
                part["message"]["content"]
                for part in client.chat(model="mock-llama", messages=[{"role": "user", "content": "hi"}], stream=True)
            )
            whole = client.chat(model="mock-llama", messages=[{"role": "user", "content": "hi"}])
            generated = client.generate(model="mock-llama", prompt="hi")
            embedded = client.embed(model="mock-llama", input=["a", "b"])
            listed = client.list()
            shown = client.show("mock-llama")
            version = httpx.get(f"{gw.url}/api/version").json()
            return {
                "version": version,
                "streamed": streamed,
                "whole": whole.message.content,
                "generated": generated.response,
                "eval_count": whole.eval_count,
                "embeddings": len(embedded.embeddings),
                "models": [m.model for m in listed.models],
                "shown": shown.details.family if shown.details else None,
            }

        result = await trio.to_thread.run_sync(use)
    assert result["streamed"] and result["streamed"] == result["whole"] == result["generated"]
    assert result["eval_count"] == 4
    assert result["embeddings"] == 2
    assert result["models"] == ["mock-llama:latest"]
    assert result["shown"]
    assert result["version"] == {"version": "0.12.6"}


async def test_usage_injection_is_invisible_to_the_client(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """A client that did not ask for usage gets exactly the upstream's stream without it; the record has tokens."""
    with trio.fail_after(30):
        mock = await start_mock(tokens=6, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}"))
        body = {**CHAT, "stream": True}
        async with httpx.AsyncClient() as client:
            direct = await client.post(f"http://127.0.0.1:{mock.port}/v1/chat/completions", json=body)
            through = await client.post(f"{gw.url}/v1/chat/completions", json=body)
        forwarded = mock.requests[-1]
        assert json.loads(forwarded.body)["stream_options"] == {"include_usage": True}
        assert b'"usage"' not in through.content
        assert strip_ids(through.content) == strip_ids(direct.content)
        assert through.headers["content-type"].startswith("text/event-stream")
        assert through.headers["cache-control"] == "no-cache" and through.headers["x-accel-buffering"] == "no"
        await stop(gw)
    (record,) = read_records(gw)
    assert record["completion_tokens"] == 6 and record["token_source"] == "upstream"
    assert record["request_id"] == through.headers["x-request-id"]


@pytest.mark.parametrize(
    ("kind", "options", "injected"),
    [
        # An object without include_usage: no usage event at OpenAI, Ollama and llama.cpp, so the
        # gateway asks for it and takes it out; vLLM's default there is true: left to vLLM.
        ("openai", {}, True),
        ("ollama", {}, True),
        ("llamacpp", {}, True),
        ("vllm", {}, False),
        ("vllm", {"include_usage": None}, True),  # (null: no usage at vLLM either)
        ("vllm", {"include_usage": False}, True),
        ("openai", {"include_usage": True}, False),  # the client asked: it gets the event
    ],
)
async def test_stream_options_as_each_upstream_kind_reads_them(
    start_mock: StartMock, start_gateway: StartGateway, kind: str, options: dict[str, Any], injected: bool
) -> None:
    """The client gets what the upstream would send it directly; the gateway asks for usage
    where that has no usage event, and the record then has the upstream's count."""
    with trio.fail_after(30):
        mock = await start_mock(tokens=6, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", kind=kind, extra=NO_PROBES))
        body = {**CHAT, "stream": True, "stream_options": options}
        async with httpx.AsyncClient() as client:
            direct = await client.post(f"http://127.0.0.1:{mock.port}/v1/chat/completions", json=body)
            through = await client.post(f"{gw.url}/v1/chat/completions", json=body)
        forwarded = json.loads(mock.requests[-1].body)["stream_options"]
        await stop(gw)
    assert forwarded == ({**options, "include_usage": True} if injected else options)
    assert through.status_code == 200 and strip_ids(through.content) == strip_ids(direct.content)
    (record,) = read_records(gw)
    upstream_counted = injected or options.get("include_usage") is True
    assert record["token_source"] == ("upstream" if upstream_counted else "estimate")
    assert record["completion_tokens"] == 6 or not upstream_counted


@pytest.mark.parametrize(("primary_kind", "fallback_kind"), [("vllm", "openai"), ("openai", "vllm")])
async def test_stream_options_follow_the_upstream_that_answers(
    start_mock: StartMock, start_gateway: StartGateway, primary_kind: str, fallback_kind: str
) -> None:
    """``stream_options: {}`` when the primary refuses (503) and the fallback answers: each is sent
    what its kind reads as the client meant it, and the usage event is taken out only of an answer
    the gateway asked it for."""
    with trio.fail_after(30):
        primary = await start_mock(models=("*",), fault=FaultPlan(kind="status", status=503))
        fallback = await start_mock(tokens=5, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("primary", f"http://127.0.0.1:{primary.port}", kind=primary_kind, extra="priority = 0\n" + NO_PROBES)
            + upstream_toml("fallback", f"http://127.0.0.1:{fallback.port}", kind=fallback_kind, extra="priority = 1\n" + NO_PROBES)
        )
        body = {**CHAT, "stream": True, "stream_options": {}}
        async with httpx.AsyncClient() as client:
            through = await client.post(f"{gw.url}/v1/chat/completions", json=body)
        await stop(gw)
    asked = {"vllm": {}, "openai": {"include_usage": True}}
    assert json.loads(primary.requests[-1].body)["stream_options"] == asked[primary_kind]
    assert json.loads(fallback.requests[-1].body)["stream_options"] == asked[fallback_kind]
    assert through.status_code == 200 and through.headers["x-trioproxy-upstream"] == "fallback"
    assert through.content.endswith(b"data: [DONE]\n\n") and b'"usage"' not in through.content
    (record,) = read_records(gw)
    assert record["token_source"] == ("upstream" if fallback_kind == "openai" else "estimate")


async def test_a_rewritten_body_keeps_every_number_as_the_client_wrote_it(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    # The gateway reads requests with orjson (an integer beyond 64 bits would come back a float);
    # a body it rewrites (here: usage asked for) is decoded again exactly. One it does not
    # rewrite goes out byte for byte.
    with trio.fail_after(30):
        mock = await start_mock(tokens=2, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}"))
        big = b"123456789012345678901234567890"
        streamed = b'{"model":"mock-llama","messages":[{"role":"user","content":"hi"}],"stream":true,"seed":%s}' % big
        whole = b'{"model":"mock-llama","messages":[{"role":"user","content":"hi"}],"seed":%s,  "top_p":0.10}' % big
        async with httpx.AsyncClient() as client:
            first = await client.post(f"{gw.url}/v1/chat/completions", content=streamed,
                                      headers={"content-type": "application/json"})
            rewritten = mock.requests[-1].body
            second = await client.post(f"{gw.url}/v1/chat/completions", content=whole,
                                       headers={"content-type": "application/json"})
            untouched = mock.requests[-1].body
        assert first.status_code == 200 and second.status_code == 200
        assert b'"seed":%s' % big in rewritten
        assert json.loads(rewritten)["stream_options"] == {"include_usage": True}
        assert untouched == whole
        await stop(gw)


async def test_client_disconnect_mid_stream_closes_the_upstream(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    with trio.fail_after(30):
        mock = await start_mock(tokens=10_000, token_delay_ms=5, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}"))
        async with httpx.AsyncClient() as client:
            async with client.stream("POST", f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                async for chunk in r.aiter_bytes():
                    if b"content" in chunk:
                        break
        await mock.wait_disconnects(1)
        await stop(gw)
    (record,) = read_records(gw)
    assert record["outcome"] == "client_disconnect"
    assert 0 < record["bytes_out"]
    assert mock.statistics().in_progress == 0
    # What it had when the client left is counted (the tokens relayed so far, estimated).
    assert record["token_source"] == "estimate" and record["completion_tokens"] >= 1


ERROR_CASES = [
    # (what, request kwargs, status, code)
    ("malformed JSON", {"content": b"{not json"}, 400, None),
    ("not an object", {"json": [1, 2]}, 400, None),
    ("missing model", {"json": {"messages": []}}, 400, None),
    ("model of wrong type", {"json": {"model": 7}}, 400, None),
    ("stream of wrong type", {"json": {"model": "mock-llama", "stream": "yes"}}, 400, None),
    ("unknown model", {"json": {"model": "gpt-9", "messages": []}}, 404, "model_not_found"),
    ("invalid UTF-8", {"content": b'{"model": "\xff\xfe"}'}, 400, None),
    ("deeply nested", {"content": b"[" * 100_000 + b"]" * 100_000}, 400, None),
]


@pytest.mark.parametrize(("what", "kwargs", "status", "code"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
async def test_bad_requests_get_openai_errors(
    start_mock: StartMock, start_gateway: StartGateway, what: str, kwargs: dict[str, Any], status: int, code: str | None
) -> None:
    with trio.fail_after(30):
        mock = await start_mock(models=("mock-llama",))
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", models='["mock-llama"]')
            + "[server]\nmax_body_bytes = 1000000\n"
        )
        async with httpx.AsyncClient() as client:
            r = await client.post(f"{gw.url}/v1/chat/completions", **kwargs)
        await stop(gw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    assert "Traceback" not in r.text
    (record,) = read_records(gw)
    assert record["outcome"] == "rejected" and record["status"] == status
    assert mock.statistics().by_path.get("/v1/chat/completions", 0) == 0


async def test_routes_and_limits(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(kind="ollama")
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", kind="ollama") + "[server]\nmax_body_bytes = 100\n"
        )
        async with httpx.AsyncClient() as client:
            unknown = await client.get(f"{gw.url}/v1/nothing")
            wrong_method = await client.get(f"{gw.url}/v1/chat/completions")
            too_big = await client.post(f"{gw.url}/v1/chat/completions", content=b"x" * 101)
            too_big_chunked = await client.post(
                f"{gw.url}/v1/chat/completions", content=_chunks(b"x" * 60, b"y" * 60)
            )
            ollama_missing = await client.post(f"{gw.url}/api/chat", json={"model": "nope"})
            healthz = await client.get(f"{gw.url}/healthz")
            readyz = await client.get(f"{gw.url}/readyz")
        await stop(gw)
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "Invalid URL (GET /v1/nothing)"
    assert wrong_method.status_code == 405
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    assert "connection" not in ollama_missing.headers  # (its body was read: the connection stays open)
    assert "connection" not in wrong_method.headers  # (no body: kept alive)
    assert too_big_chunked.status_code == 413
    # Native routes answer in Ollama's own error shape.
    assert ollama_missing.status_code == 404 and isinstance(ollama_missing.json()["error"], str)
    assert healthz.json() == {"status": "ok"}
    assert readyz.status_code == 200 and readyz.json()["upstreams"]["m"]["usable"] is True
    assert len(read_records(gw)) == 7


async def test_a_client_keeps_working_after_a_413_on_its_kept_alive_connection(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """The 413 goes out before the body is read, and the server then closes the connection: the answer
    says ``Connection: close``, so the client does not send its next request into that close
    (about 1 in 8 did, and failed with "Server disconnected", the SDKs' retries hiding it)."""
    with trio.fail_after(60):
        mock = await start_mock(models=("*",), tokens=2, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}") + "[server]\nmax_body_bytes = 1000\n")

        def pairs() -> list[tuple[int, str]]:
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
            seen = []
            for _ in range(40):
                try:
                    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 200_000}])
                except openai.APIStatusError as exc:
                    status = exc.status_code
                try:
                    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
                except openai.APIError as exc:
                    seen.append((status, f"{type(exc).__name__}: {exc}"))
                else:
                    seen.append((status, "ok"))
            return seen

        statuses = await trio.to_thread.run_sync(pairs)
        async with httpx.AsyncClient() as client:  # (one look at the header itself)
            refused = await client.post(f"{gw.url}/v1/chat/completions", content=b"x" * 200_000)
        await stop(gw)
    assert statuses == [(413, "ok")] * 40
    assert refused.status_code == 413 and refused.headers["connection"] == "close"
    assert len(read_records(gw)) == 81


async def _chunks(*parts: bytes) -> Any:
    for part in parts:
        yield part


async def test_upstream_failures_map_to_clear_errors(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """Down → 503 + Retry-After; silent → 504; an error status with nowhere to fail over → passed through."""
    with trio.fail_after(30):
        refusing = await start_mock(refuse=True)
        hanging = await start_mock(fault=FaultPlan(kind="hang"))
        failing = await start_mock(fault=FaultPlan(kind="status", status=500))
        fast_timeouts = "[upstreams.timeouts]\nfirst_byte_ms = 300\n"
        gw = await start_gateway(
            upstream_toml("down", f"http://127.0.0.1:{refusing.port}", models='["down-model"]')
            + upstream_toml("silent", f"http://127.0.0.1:{hanging.port}", models='["slow-model"]', extra=fast_timeouts)
            + upstream_toml("broken", f"http://127.0.0.1:{failing.port}", models='["broken-model"]')
        )
        async with httpx.AsyncClient() as client:
            down = await client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "down-model"})
            silent = await client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "slow-model"})
            broken = await client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "broken-model"})
        await hanging.wait_disconnects(1)
        await stop(gw)
    assert down.status_code == 503 and down.headers["retry-after"]
    assert down.json()["error"]["code"] == "no_healthy_upstream"
    assert silent.status_code == 504 and silent.json()["error"]["type"] == "timeout"
    assert broken.status_code == 500 and broken.headers["x-trioproxy-upstream"] == "broken"
    records = {r["model_requested"]: r for r in read_records(gw)}
    assert records["down-model"]["attempts"][0]["outcome"] == "connect_error"
    assert records["slow-model"]["outcome"] == "timeout"
    assert records["broken-model"]["outcome"] == "upstream_error" and records["broken-model"]["status"] == 500


async def test_failover_to_the_next_upstream(start_mock: StartMock, start_gateway: StartGateway) -> None:
    from trioproxy.mock import FaultPlan

    with trio.fail_after(30):
        primary = await start_mock(fault=FaultPlan(kind="status", status=503))
        fallback = await start_mock(tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(  # (no probes: a probe's 503 would take the primary out before the request)
            upstream_toml("primary", f"http://127.0.0.1:{primary.port}", extra="priority = 0\n" + NO_PROBES)
            + upstream_toml("fallback", f"http://127.0.0.1:{fallback.port}", extra="priority = 1\n" + NO_PROBES)
        )
        async with httpx.AsyncClient() as client:
            r = await client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True})
        await stop(gw)
    assert r.status_code == 200 and r.headers["x-trioproxy-upstream"] == "fallback"
    assert r.content.endswith(b"data: [DONE]\n\n")
    (record,) = read_records(gw)
    assert [(a["upstream"], a["outcome"], a["status"]) for a in record["attempts"]] == [
        ("primary", "status", 503),
        ("fallback", "ok", 200),
    ]


async def test_an_upstream_down_at_start_is_down_after_its_first_probe_and_readyz_waits_for_it(
    nursery: trio.Nursery, start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """Healthy is assumed until an upstream's first probe answers (traffic flows meanwhile), but
    /readyz does not count an assumption: it says ready once a probe has seen a usable upstream.
    The first probe's verdict stands at once: a primary down at start is skipped from its first
    failed probe, not after ``fall`` of them."""
    # A server that takes connections (the kernel's backlog) and never answers: its probe hangs.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    down = socket.socket()  # bound, not listening: connections are refused
    down.bind(("127.0.0.1", 0))
    with trio.fail_after(30), silent, down:
        fallback = await start_mock(tokens=3, token_delay_ms=0, ttft_ms=0)
        probes = "[upstreams.health]\ninterval_ms = 60000\ntimeout_ms = 60000\nfall = 3\n"
        gw = await start_gateway(
            upstream_toml("silent", "http://127.0.0.1:%d" % silent.getsockname()[1], extra="priority = 0\n" + probes)
        )
        async with httpx.AsyncClient() as client:
            unknown = await client.get(f"{gw.url}/readyz")  # the probe is still waiting for an answer
        await stop(gw)
        gw = await start_gateway(
            upstream_toml("down", "http://127.0.0.1:%d" % down.getsockname()[1], extra="priority = 0\n" + probes)
            + upstream_toml("fallback", f"http://127.0.0.1:{fallback.port}", extra="priority = 1\n" + probes)
        )
        for runtime in gw.services.runtimes.values():
            await runtime.checked.wait()
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"{gw.url}/readyz")
            r = await client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
        await stop(gw)
    assert unknown.status_code == 503 and unknown.json()["ready"] is False
    assert unknown.json()["upstreams"]["silent"] | {"state_for_s": None} == {
        "usable": True, "healthy": True, "checked": False, "in_flight": 0, "circuit": "closed",
        "state_for_s": None, "reason": ""}
    assert ready.status_code == 200
    assert {uid: (u["healthy"], u["checked"]) for uid, u in ready.json()["upstreams"].items()} == {
        "down": (False, True), "fallback": (True, True)}
    assert r.status_code == 200 and r.headers["x-trioproxy-upstream"] == "fallback"
    (record,) = [rec for rec in read_records(gw) if rec["route"] == "/v1/chat/completions"]
    assert [a["upstream"] for a in record["attempts"]] == ["fallback"]  # the primary was not tried


async def test_every_upstream_down_at_start_is_not_ready(start_gateway: StartGateway) -> None:
    down = socket.socket()  # bound, not listening: connections are refused
    down.bind(("127.0.0.1", 0))
    with trio.fail_after(30), down:
        gw = await start_gateway(upstream_toml("down", "http://127.0.0.1:%d" % down.getsockname()[1]))
        await gw.services.runtimes["down"].checked.wait()
        async with httpx.AsyncClient() as client:
            readyz = await client.get(f"{gw.url}/readyz")
        await stop(gw)
    assert readyz.status_code == 503
    assert readyz.json()["upstreams"]["down"]["healthy"] is False  # at the first probe (fall is 2)


async def test_mid_stream_cut_ends_with_an_error_event(start_mock: StartMock, start_gateway: StartGateway) -> None:
    from trioproxy.mock import FaultPlan

    with trio.fail_after(30):
        mock = await start_mock(tokens=10, token_delay_ms=0, ttft_ms=0, fault=FaultPlan(kind="cut", cut_after_tokens=2))
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}"))

        def consume() -> tuple[str, Exception | None]:
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
            text = ""
            try:
                for chunk in client.chat.completions.create(**CHAT, stream=True):  # type: ignore[call-overload]
                    text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            except openai.APIError as exc:
                return text, exc
            return text, None

        text, error = await trio.to_thread.run_sync(consume)
        await stop(gw)
    assert text, "the tokens sent before the cut reach the client"
    assert error is not None and "incomplete" in str(error)
    (record,) = read_records(gw)
    assert record["outcome"] == "upstream_error" and record["bytes_out"] > 0
    # The attempt won (its first tokens were relayed), then broke: it does not say "ok".
    assert [(x["upstream"], x["outcome"], x["status"]) for x in record["attempts"]] == [("m", "broke", 200)]


async def test_tokens_are_estimated_when_the_upstream_gives_no_usage(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    with trio.fail_after(30):
        mock = await start_mock(tokens=12, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}") + "[telemetry]\nrequest_usage = false\n"
        )
        async with httpx.AsyncClient() as client:
            r = await client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True})
        assert "stream_options" not in json.loads(mock.requests[-1].body)  # the body went through untouched
        await stop(gw)
    assert r.status_code == 200 and b'"usage"' not in r.content
    (record,) = read_records(gw)
    assert record["token_source"] == "estimate"
    assert record["prompt_tokens"] is None and 1 <= record["completion_tokens"] <= 60


@pytest.mark.parametrize("trust", [False, True])
async def test_a_proxys_request_id_is_kept_only_when_trusted_and_well_formed(
    start_mock: StartMock, start_gateway: StartGateway, trust: bool
) -> None:
    with trio.fail_after(30):
        mock = await start_mock(tokens=2)
        server = f"[server]\ntrust_request_id = {'true' if trust else 'false'}\n"
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}") + server)
        given = ["nginx-7f3a9c0e1b2d4f60", "has spaces", "x" * 129]
        answered = []
        async with httpx.AsyncClient() as client:
            for request_id in given:
                r = await client.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"x-request-id": request_id})
                assert r.status_code == 200
                answered.append(r.headers["x-request-id"])
        seen_upstream = [dict(req.headers).get("x-request-id") for req in mock.requests if req.path == "/v1/chat/completions"]
        await stop(gw)
    kept = [a == g for a, g in zip(answered, given)]
    assert kept == [trust, False, False]
    assert all(re.fullmatch(r"[0-9a-f]{24}", a) for a, k in zip(answered, kept) if not k)
    assert seen_upstream[-3:] == answered  # the upstream gets the same id the client sees
    assert [r["request_id"] for r in read_records(gw) if r["route"] == "/v1/chat/completions"] == answered


async def test_a_body_that_stops_arriving_gets_408_and_one_record(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """``server.body_timeout_s`` bounds the body read (the same cancel scope then bounds the relay)."""
    with trio.fail_after(30):
        mock = await start_mock()
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}") + "[server]\nbody_timeout_s = 0.2\n"
        )
        port = int(gw.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n" + b'{"model":"mock-llama",'
            )
            answer = b""
            while b"}}" not in answer:  # the whole error body; the client never sends the rest
                data = await stream.receive_some()
                assert data, answer
                answer += data
        await stop(gw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["error"]["code"] == "request_timeout"
    (record,) = read_records(gw)
    assert record["status"] == 408 and record["outcome"] == "rejected"


@pytest.mark.parametrize("stream", [False, True])
async def test_the_total_timeout_ends_a_slow_answer(
    start_mock: StartMock, start_gateway: StartGateway, stream: bool
) -> None:
    """``routing.total_timeout_ms``: 504 before the head; after it, the stream ends with an error event."""
    with trio.fail_after(30):
        # Non-streamed: the answer comes after 5 s. Streamed: the head and first token at once, then 5 s a token.
        mock = await start_mock(tokens=3, ttft_ms=0 if stream else 5000, token_delay_ms=5000)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}") + "[routing]\ntotal_timeout_ms = 300\n"
        )
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        await stop(gw)
    (record,) = read_records(gw)
    assert record["outcome"] == "timeout" and "longer than 0.3 s" in record["error"]
    if stream:
        assert response.status_code == 200
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert "longer than 0.3 s" in json.loads(events[-1][6:])["error"]["message"]
    else:
        assert response.status_code == 504
        assert "longer than 0.3 s" in response.json()["error"]["message"]


async def test_an_upstream_silent_mid_stream_is_cut_at_idle_ms(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """``timeouts.idle_ms`` through the real server: the watchdog closes the silent upstream
    connection, and the stream ends with an in-band error after what had been relayed."""
    with trio.fail_after(30):
        mock = await start_mock(tokens=3, ttft_ms=0, token_delay_ms=10_000)  # one token, then silence
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra="[upstreams.timeouts]\nidle_ms = 300\n")
        )
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            await mock.wait_disconnects(1)  # the gateway closed its connection to the silent upstream
        await stop(gw)
    assert response.status_code == 200
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["message"] == "upstream 'm': no body data for 0.3s; the answer is incomplete"
    assert any(json.loads(e).get("choices") for e in events[:-1])  # the first token came through
    (record,) = read_records(gw)
    assert record["outcome"] == "upstream_error" and "no body data for 0.3s" in record["error"]
    assert [x["outcome"] for x in record["attempts"]] == ["broke"]


async def test_what_ollama_tools_and_http_clients_expect(start_mock: StartMock, start_gateway: StartGateway) -> None:
    """Details found by a conformance campaign against Ollama's and OpenAI's wire formats."""
    with trio.fail_after(30):
        mock = await start_mock(kind="both", models=("mock-llama",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", kind="ollama", models='["mock-llama"]') + NO_PROBES
        )
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            root, root_head = await client.get("/"), await client.head("/")
            show = await client.post("/api/show", json={"name": "mock-llama"})  # Ollama's older field
            wrong_method = await client.get("/api/chat")
            missing = await client.post("/api/chat", json={"model": "nope", "messages": []})
            version = await client.get("/api/version")
            streamed_404 = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope", "stream": True})
            options = {**CHAT, "model": "mock-llama", "stream": True, "stream_options": {}}
            with_options = await client.post("/v1/chat/completions", json=options)
            sent_upstream = mock.requests[-1].body
            huge = await client.post("/v1/chat/completions", content=b'{"model":"mock-llama","stream":true,'
                                     b'"temperature":1e400,"messages":[{"role":"user","content":"hi"}]}')
        await stop(gw)
    # Ollama answers GET and HEAD / with 200 "Ollama is running": tools check it before they call.
    assert (root.status_code, root.text, root_head.status_code) == (200, "Ollama is running", 200)
    assert show.status_code == 200 and "modelfile" in show.json()
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"  # RFC 9110 §15.5.6
    assert missing.status_code == 404 and missing.json()["error"].startswith("model 'nope' not found (not served here")
    assert missing.headers["content-type"] == "application/json; charset=utf-8"  # as Ollama sends it
    # stream_options without include_usage: no usage event at Ollama, so asked for and taken out.
    assert with_options.status_code == 200 and json.loads(sent_upstream)["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in with_options.content
    # A rewritten body (usage asked for the gateway's count) cannot carry 1e400 back: not JSON as Infinity.
    assert huge.status_code == 400 and "1e400" in huge.json()["error"]["message"]
    records = {r["route"]: r for r in read_records(gw)}
    assert records["/api/version"]["model_served"] is None and version.status_code == 200
    assert streamed_404.status_code == 404
    assert [r["stream"] for r in read_records(gw) if r["status"] == 404 and r["route"] == "/v1/chat/completions"] == [False]


async def test_an_error_before_the_body_was_read_keeps_the_connection_when_the_body_came(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """A 401 (keys on) for a small body that came with the head: the connection stays open, and the
    next requests on it are answered (a Connection: close on every such refusal would cost each
    client a new connection under rate limiting or a wrong key)."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=2, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}") + NO_PROBES
                                 + '[[auth.keys]]\nid = "t"\nkey_sha256 = "%s"\n' % ("0" * 64))
        port = int(gw.url.rsplit(":", 1)[1])
        body = json.dumps(CHAT).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Authorization: Bearer wrong\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        answers = []
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            buffer = b""
            for _ in range(3):
                await stream.send_all(request)
                while buffer.count(b"\r\n\r\n") == 0 or not _whole_answer(buffer):
                    data = await stream.receive_some()
                    assert data, (answers, buffer)  # closed: the next request would have failed
                    buffer += data
                head, _, rest = buffer.partition(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.I)[1])  # type: ignore[index]
                answers.append(head.split(b"\r\n")[0])
                buffer = rest[length:]
        await stop(gw)
    assert len(answers) == 3 and all(a.startswith(b"HTTP/1.1 401") for a in answers), answers


def _whole_answer(buffer: bytes) -> bool:
    head, _, rest = buffer.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: (\d+)", head, re.I)
    return match is not None and len(rest) >= int(match[1])


async def test_100_continue_is_sent_only_when_the_gateway_wants_the_body(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    """A client that sends ``Expect: 100-continue`` waits before it uploads the body. Hypercorn used to
    say 100 at once, so a body the gateway refuses anyway (over ``max_body_bytes`` by its declared
    length) was uploaded for nothing; now the 100 goes out when the gateway first waits for the body,
    and a refusal comes alone."""
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=2, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}") + "[server]\nmax_body_bytes = 1000\n")
        port = int(gw.url.rsplit(":", 1)[1])
        body = json.dumps(CHAT).encode()

        def head(length: int) -> bytes:
            return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % length)

        async def read_head(stream: trio.SocketStream, buffer: bytearray) -> bytes:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some()
                assert data, bytes(buffer)
                buffer += data
            end = buffer.index(b"\r\n\r\n") + 4
            first = bytes(buffer[:end])
            del buffer[:end]
            return first

        too_big = await trio.open_tcp_stream("127.0.0.1", port)
        async with too_big:
            await too_big.send_all(head(5000))
            refused = await read_head(too_big, bytearray())
        wanted = await trio.open_tcp_stream("127.0.0.1", port)
        async with wanted:
            await wanted.send_all(head(len(body)))
            buffer = bytearray()
            go_on = await read_head(wanted, buffer)
            await wanted.send_all(body)
            answered = await read_head(wanted, buffer)
        await stop(gw)
    assert refused.startswith(b"HTTP/1.1 413 "), refused
    assert go_on.startswith(b"HTTP/1.1 100 "), go_on
    assert answered.startswith(b"HTTP/1.1 200 "), answered
