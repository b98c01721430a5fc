"""Who gets in, what goes out, and what is never written down."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import trio
from loguru import logger

from trioproxy.auth import KeyLimiter, KeyTable
from trioproxy.config import Auth, AuthKey
from trioproxy.errors import AuthError, ConfigError, RateLimited

from .conftest import StartGateway, StartMock, read_records, stop, upstream_toml

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
CLIENT_KEY = "sk-client-7f3a9c-DO-NOT-LEAK"
HASHED_KEY = "sk-hashed-1b2c3d-DO-NOT-LEAK"
UPSTREAM_KEY = "sk-upstream-5e6f7a-DO-NOT-LEAK"
PROMPT = "PROMPT-TEXT-8d9e0f-PRIVATE"


def auth_profile(rpm: int = 0, concurrent: int = 0) -> str:
    return (
        "[[auth.keys]]\nid = \"team-a\"\nkey_env = \"TRIOPROXY_TEST_CLIENT_KEY\"\n"
        f"requests_per_minute = {rpm}\nmax_concurrent = {concurrent}\n"
        f"[[auth.keys]]\nid = \"ci\"\nkey_sha256 = \"{hashlib.sha256(HASHED_KEY.encode()).hexdigest()}\"\n"
    )


@pytest.fixture(autouse=True)
def keys_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIOPROXY_TEST_CLIENT_KEY", CLIENT_KEY)
    monkeypatch.setenv("TRIOPROXY_TEST_UPSTREAM_KEY", UPSTREAM_KEY)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# --- sans-IO -----------------------------------------------------------------------------


def test_key_table() -> None:
    table = KeyTable.from_config(Auth(keys=(AuthKey(id="a", key_env="K"),)), {"K": "secret"})
    assert table.identify(b"Bearer secret").id == "a"
    assert table.identify(b"bearer   secret").id == "a"
    for bad in (None, b"", b"Basic c2VjcmV0", b"Bearer wrong", b"Bearer"):
        with pytest.raises(AuthError) as info:
            table.identify(bad)
        assert "secret" not in info.value.message
    with pytest.raises(ConfigError):
        KeyTable.from_config(Auth(keys=(AuthKey(id="a", key_env="UNSET"),)), {})
    assert not KeyTable.from_config(Auth()).enabled


def test_key_limiter_rate_and_concurrency() -> None:
    limiter = KeyLimiter()
    key = AuthKey(id="a", key_env="K", requests_per_minute=2, max_concurrent=5)
    limiter.admit(key, now=0)
    limiter.admit(key, now=0)
    with pytest.raises(RateLimited) as info:
        limiter.admit(key, now=0)
    assert info.value.retry_after_s == 30  # one token every 30 s
    limiter.admit(key, now=30)  # refilled
    busy = AuthKey(id="b", key_env="K", max_concurrent=1)
    limiter.admit(busy, now=0)
    with pytest.raises(RateLimited):
        limiter.admit(busy, now=0)
    limiter.release(busy)
    limiter.admit(busy, now=0)


# --- over real sockets -------------------------------------------------------------------


async def test_auth_and_upstream_key_separation(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=2, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml(
                "m", f"http://127.0.0.1:{mock.port}", kind="ollama", extra='api_key_env = "TRIOPROXY_TEST_UPSTREAM_KEY"'
            )
            + auth_profile()
        )
        url = f"{gw.url}/v1/chat/completions"
        async with httpx.AsyncClient() as client:
            missing = await client.post(url, json=CHAT)
            wrong = await client.post(url, json=CHAT, headers=bearer("sk-wrong"))
            ollama_missing = await client.post(f"{gw.url}/api/chat", json={**CHAT, "stream": False})
            good = await client.post(url, json=CHAT, headers=bearer(CLIENT_KEY))
            hashed = await client.post(url, json=CHAT, headers=bearer(HASHED_KEY))
            models = await client.get(f"{gw.url}/v1/models")
            probe = await client.get(f"{gw.url}/healthz")
        forwarded = [dict(r.headers) for r in mock.requests if r.path == "/v1/chat/completions"]
        await stop(gw)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert wrong.status_code == 401 and "sk-wrong" not in wrong.text
    assert ollama_missing.status_code == 401 and isinstance(ollama_missing.json()["error"], str)
    assert good.status_code == 200 and hashed.status_code == 200
    assert models.status_code == 401 and probe.status_code == 200
    # The upstream got its own key, never the client's.
    assert [h["authorization"] for h in forwarded] == [f"Bearer {UPSTREAM_KEY}"] * 2
    records = read_records(gw)
    assert [r["key_id"] for r in records if r["status"] == 200 and r["route"] != "/healthz"] == ["team-a", "ci"]
    assert sum(r["status"] == 401 for r in records) == 4


async def test_per_key_limits_answer_429(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=1000, token_delay_ms=5, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}") + auth_profile(rpm=3, concurrent=1))
        url = f"{gw.url}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", url, json={**CHAT, "stream": True}, headers=bearer(CLIENT_KEY)) as first:
                assert first.status_code == 200
                concurrent = await client.post(url, json=CHAT, headers=bearer(CLIENT_KEY))
            await mock.wait_disconnects(1)
            second = await client.post(url, json={**CHAT}, headers=bearer(CLIENT_KEY) | {"x-mock-tokens": "1"})
            third = await client.post(url, json={**CHAT}, headers=bearer(CLIENT_KEY) | {"x-mock-tokens": "1"})
            fourth = await client.post(url, json={**CHAT}, headers=bearer(CLIENT_KEY) | {"x-mock-tokens": "1"})
            other_key = await client.post(url, json=CHAT, headers=bearer(HASHED_KEY) | {"x-mock-tokens": "1"})
        await stop(gw)
    assert concurrent.status_code == 429 and concurrent.headers["retry-after"]
    assert concurrent.json()["error"]["code"] == "rate_limit_exceeded"
    # 3 per minute: the streamed one, the second and the third use the burst (a refused request costs nothing).
    assert second.status_code == 200 and third.status_code == 200
    assert fourth.status_code == 429 and int(fourth.headers["retry-after"]) >= 1
    assert other_key.status_code == 200


async def test_gateway_wide_request_limit(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=1000, token_delay_ms=5, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}") + "[server]\nmax_concurrent_requests = 1\n")
        url = f"{gw.url}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", url, json={**CHAT, "stream": True}) as first:
                assert first.status_code == 200
                refused = await client.post(url, json=CHAT)
        await stop(gw)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"


async def raw_request(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        response = b""
        while data := await stream.receive_some():
            response += data
    return response


@pytest.mark.parametrize(
    "target",
    [
        b"http://169.254.169.254/v1/chat/completions",  # absolute form naming another host
        b"/v1/chat%2Fcompletions",  # encoded slash
        b"/v1/./chat/completions",
    ],
)
async def test_no_request_reaches_anything_but_a_configured_upstream_path(
    start_mock: StartMock, start_gateway: StartGateway, target: bytes
) -> None:
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=1, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        port = int(gw.url.rsplit(":", 1)[1])
        body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
        response = await raw_request(
            port,
            b"POST %s HTTP/1.1\r\nHost: evil.example:80\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (target, len(body), body),
        )
        await stop(gw)
    status = int(response.split(b" ", 2)[1])
    assert status in (200, 400, 404)
    # Whatever the gateway made of it, the only thing that ever left was a known path on the configured upstream.
    assert all(r.path in ("/v1/chat/completions",) for r in mock.requests)
    assert all(dict(r.headers)["host"] == f"127.0.0.1:{mock.port}" for r in mock.requests)


NO_PROBES = "[upstreams.health]\nenabled = false\n"


async def test_a_client_that_stops_reading_is_cut_and_the_upstream_released(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    with trio.fail_after(60):
        mock = await start_mock(models=("*",), tokens=200_000, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES)
            + "[server]\nclient_write_timeout_s = 0.5\n"
        )
        port = int(gw.url.rsplit(":", 1)[1])
        body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await stream.receive_some(100)  # the head arrived; now this client reads nothing more
            await mock.wait_disconnects(1)  # the gateway gave up on the client and closed the upstream
        await stop(gw)
    (record,) = read_records(gw)
    assert record["outcome"] == "client_disconnect" and "took no data" in record["error"]


async def test_an_endless_stream_is_cut_at_max_response_bytes(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=1_000_000, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES) + "[server]\nmax_response_bytes = 50000\n"
        )
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True})
        await mock.wait_disconnects(1)
        await stop(gw)
    # (a little under the limit: the usage members the gateway asked for are removed from what the client sees)
    assert r.status_code == 200 and 40_000 < len(r.content) < 60_000
    assert b"max_response_bytes" in r.content.rsplit(b"data: ", 1)[-1]
    (record,) = read_records(gw)
    assert record["outcome"] == "upstream_error"


async def test_no_secret_or_prompt_is_ever_written(
    start_mock: StartMock, start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Everything the gateway wrote (operator log at DEBUG, usage files) is searched for the secrets and prompt."""
    log_lines: list[str] = []
    sink_id = logger.add(log_lines.append, level="DEBUG", format="{message} {extra} {exception}")
    try:
        with trio.fail_after(30):
            good = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
            failing = await start_mock(models=("*",), fault=__import__("trioproxy.mock").mock.FaultPlan(kind="garbage"))
            gw = await start_gateway(
                upstream_toml("good", f"http://127.0.0.1:{good.port}", models='["ok"]', extra='api_key_env = "TRIOPROXY_TEST_UPSTREAM_KEY"')
                + upstream_toml("bad", f"http://127.0.0.1:{failing.port}", models='["bad"]', extra='api_key_env = "TRIOPROXY_TEST_UPSTREAM_KEY"')
                + auth_profile()
            )
            url = f"{gw.url}/v1/chat/completions"
            messages = [{"role": "user", "content": PROMPT}]
            async with httpx.AsyncClient() as client:
                for model in ("ok", "bad", "nope"):
                    for stream in (True, False):
                        await client.post(url, json={"model": model, "stream": stream, "messages": messages}, headers=bearer(CLIENT_KEY))
                await client.post(url, json={"model": "ok", "messages": messages}, headers=bearer(CLIENT_KEY + "x"))
                await client.post(url, content=PROMPT.encode(), headers=bearer(CLIENT_KEY))
            await stop(gw)
    finally:
        logger.remove(sink_id)
    written = "\n".join(log_lines) + "\n".join(p.read_text() for p in Path(gw.services.config.telemetry.dir).glob("*"))
    assert len(read_records(gw)) == 8 and log_lines
    for secret in (CLIENT_KEY, HASHED_KEY, UPSTREAM_KEY, PROMPT):
        assert secret not in written


async def test_payloads_are_logged_only_when_opted_in_and_keys_stay_redacted(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES) + "[telemetry]\nlog_payloads = true\n"
        )
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": PROMPT}], "api_key": UPSTREAM_KEY}
        async with httpx.AsyncClient() as client:
            streamed = await client.post(f"{gw.url}/v1/chat/completions", json=body)
            whole = await client.post(f"{gw.url}/v1/chat/completions", json={**body, "stream": False})
        await stop(gw)
    records = read_records(gw)
    for record, response in zip(records, (streamed, whole), strict=True):
        payload = record["payload"]
        assert payload["request"]["messages"][0]["content"] == PROMPT
        assert payload["request"]["api_key"] == "***" and UPSTREAM_KEY not in str(record)
        assert payload["response"] == response.text


async def test_a_request_too_deep_to_log_is_still_relayed_and_its_record_says_why(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    # Requests are read with orjson (1,024 levels); the logged copy is decoded by the json
    # module, which gives up below that: the request goes on, its payload is not logged.
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=3, token_delay_ms=0, ttft_ms=0)
        gw = await start_gateway(
            upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES) + "[telemetry]\nlog_payloads = true\n"
        )
        depth = 1_010
        body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x":' + b"[" * depth + b"]" * depth + b"}"
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{gw.url}/v1/chat/completions", content=body,
                                         headers={"content-type": "application/json"})
        await stop(gw)
    assert mock.requests[-1].body == body  # relayed as sent (the mock itself refuses it)
    (record,) = read_records(gw)
    assert record["payload"]["request"] == "(not logged: nested too deeply)"
    assert record["status"] == response.status_code


def test_admin_gate() -> None:
    from trioproxy.auth import AdminGate
    from trioproxy.config import Admin

    closed = AdminGate.from_config(Admin())
    assert closed.allows("127.0.0.1", None) and closed.allows("::1", None)
    assert not closed.allows("10.0.0.7", b"Bearer anything")
    gate = AdminGate.from_config(Admin(key_env="ADMIN_KEY_FOR_TEST"), {"ADMIN_KEY_FOR_TEST": "adm-1"})
    assert gate.allows("10.0.0.7", b"Bearer adm-1")
    assert not gate.allows("10.0.0.7", b"Bearer adm-2") and not gate.allows("10.0.0.7", None)
    hashed = AdminGate.from_config(Admin(key_sha256=hashlib.sha256(b"adm-1").hexdigest()))
    assert hashed.allows("192.0.2.1", b"bearer adm-1")
    with pytest.raises(ConfigError):
        AdminGate.from_config(Admin(key_env="UNSET_ADMIN_KEY"), {})
