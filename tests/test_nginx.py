"""Two gateways behind the shipped nginx config (deploy/nginx/trioproxy.conf), for real.

The test reads the shipped file, substitutes its ``server`` lines (the gateways' ports),
its ``listen`` line (a free loopback port) and its ``access_log`` path, wraps it in a
minimal main config that keeps every path under ``tmp_path``, and runs Debian's nginx
(``nginx-light``, installed by ``make system-deps``) as one foreground process of the user
running the tests. The tests that run nginx are skipped only when it is not installed. Every test is bounded with ``trio.fail_after``; nothing leaves 127.0.0.1
(127.0.0.2, also loopback, plays a client from outside nginx's admin allow list).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from attrs import frozen
from trio_websocket import open_websocket_url

from trioproxy.config import Routing, ServerConfig
from trioproxy.mock import MockUpstream
from trioproxy.server import RunningServer

from .conftest import StartGateway, StartMock, read_records, stop, upstream_toml

SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "trioproxy.conf"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")  # not on a non-root PATH
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (make system-deps installs nginx-light)")

#: The shipped upstream block's instance lines: `server HOST:PORT options;` (not `server {`).
SERVER_LINE = re.compile(r"(?m)^(\s*server\s+)\S+:\d+(?=[\s;])")
LISTEN_LINE = re.compile(r"(?m)^(\s*listen\s+)[^;]*;")
ACCESS_LOG_LINE = re.compile(r"(?m)^(\s*access_log\s+)\S+")
#: The gateway's usual chat request; the mock answers it with fixed token text.
CHAT = {"model": "mock-llama", "messages": [{"role": "user", "content": "hello through nginx"}], "stream": True}
CHAT_ROUTE = "/v1/chat/completions"
NO_PROBES = "[upstreams.health]\nenabled = false\n"
#: Upstream ids name the instance: x-trioproxy-upstream then says which gateway served a request.
INSTANCES = ("via-a", "via-b")
#: A per-request mock setting: after the first token, the next one is this far away (the stream stays open).
STALL = {"x-mock-token-delay-ms": "600000"}
#: A real-time bound for a test: nginx, two gateways and a mock start in well under a second.
TEST_TIMEOUT_S = 60
#: nginx starts in milliseconds; this only bounds a broken start.
NGINX_START_TIMEOUT_S = 10


@frozen
class Nginx:
    port: int
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def read_access_log(self) -> list[str]:
        """nginx's access log lines (read once nginx has exited, so that every line is in)."""
        return self.access_log.read_text().splitlines()


def port_of(gateway: RunningServer) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


def free_port() -> int:
    """A port free a moment ago (nginx cannot bind port 0 and tell us): the kernel's pick."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def render_site(text: str, *, listen_port: int, upstream_ports: Sequence[int], access_log: Path) -> str:
    """The shipped file with our addresses; the instance options (max_fails...) are kept."""
    found = SERVER_LINE.findall(text)
    assert len(found) == len(upstream_ports), f"the shipped upstream block lists {len(found)} instances"
    ports = iter(upstream_ports)
    text = SERVER_LINE.sub(lambda m: f"{m.group(1)}127.0.0.1:{next(ports)}", text)
    text, listens = LISTEN_LINE.subn(rf"\g<1>127.0.0.1:{listen_port};", text)
    text, logs = ACCESS_LOG_LINE.subn(rf"\g<1>{access_log}", text)
    assert (listens, logs) == (1, 1), "the shipped file has one listen line and one access_log line"
    return text


def write_config(directory: Path, *, listen_port: int, upstream_ports: Sequence[int]) -> Path:
    """The runnable pair: the rendered site file and a main config around it, all under ``directory``."""
    directory.mkdir(exist_ok=True)
    site = directory / "trioproxy.conf"
    site.write_text(
        render_site(SHIPPED.read_text(), listen_port=listen_port, upstream_ports=upstream_ports,
                    access_log=directory / "access.log")
    )
    main = directory / "nginx.conf"
    temp = "\n".join(f"    {kind}_temp_path {directory / kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main.write_text(
        # One foreground process, no privilege drop: runs as whoever runs the tests.
        f"daemon off;\nmaster_process off;\npid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n{temp}\n    access_log off;  # the site's own access_log (rendered) is the one used\n"
        f"    include {site};\n}}\n"
    )
    return main


def nginx_command(main: Path, *flags: str) -> list[str]:
    assert NGINX is not None
    # -e: the log nginx writes to before it has read error_log from the config.
    return [NGINX, *flags, "-e", str(main.parent / "error.log"), "-c", str(main), "-p", f"{main.parent}/"]


async def wait_listening(proc: trio.Process, port: int) -> bool:
    """True once nginx accepts on ``port``; False if it exited first (a bind failure, say)."""
    while proc.poll() is None:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            # An external process starting: nothing to wait on but its port. Short backoff,
            # bounded by the caller's fail_after.
            await trio.sleep(0.01)
            continue
        await stream.aclose()
        return True
    return False


@asynccontextmanager
async def open_nginx(tmp_path: Path, upstream_ports: Sequence[int]) -> AsyncIterator[Nginx]:
    """nginx in front of ``upstream_ports``, on a free loopback port; stopped on exit."""
    directory = tmp_path / "nginx"
    errors = directory / "stderr.log"
    proc: trio.Process | None = None
    port = 0
    try:
        for attempt in (1, 2):  # the free port can be taken before nginx binds it: retry once
            port = free_port()
            main = write_config(directory, listen_port=port, upstream_ports=upstream_ports)
            with errors.open("ab") as err:
                proc = await trio.lowlevel.open_process(nginx_command(main), stdout=err, stderr=err)
            with trio.fail_after(NGINX_START_TIMEOUT_S):
                if await wait_listening(proc, port):
                    break
                await proc.wait()
            log = "\n".join(p.read_text() for p in (errors, directory / "error.log") if p.exists())
            if attempt == 2 or "Address already in use" not in log:
                raise RuntimeError(f"nginx did not start (exit {proc.returncode}):\n{log}")
        yield Nginx(port, directory / "access.log")
    finally:
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # fast shutdown: the tests' clients are done
            with trio.move_on_after(5, shield=True):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(5, shield=True):
                    await proc.wait()


async def start_instances(start_mock: StartMock, start_gateway: StartGateway, **mock_settings: Any
                          ) -> tuple[MockUpstream, dict[str, RunningServer]]:
    """One mock upstream, and two gateways in front of it (one per name in INSTANCES)."""
    mock = await start_mock(**mock_settings)
    gateways = {}
    for name in INSTANCES:
        # kind "ollama" relays both the OpenAI routes and Ollama's native /api/* (the mock speaks both).
        profile = upstream_toml(name, f"http://127.0.0.1:{mock.port}", kind="ollama", extra=NO_PROBES)
        gateways[name] = await start_gateway(profile)
    return mock, gateways


def strip_ids(stream: bytes) -> bytes:
    """The mock numbers its answers and stamps them; everything else must be the same bytes."""
    stream = re.sub(rb'"id":"[^"]*"', b'"id":"X"', stream)
    return re.sub(rb'"created":\d+', b'"created":0', stream)


def log_field(line: str, name: str) -> str:
    """A ``name=value`` field of the shipped log_format (values may hold ", ": one per upstream tried)."""
    m = re.search(rf" {name}=(.*?)(?= [a-z]+=|$)", line)
    assert m, f"no {name}= in {line!r}"
    return m.group(1)


async def read_until(chunks: AsyncIterator[bytes], marker: bytes) -> bytes:
    """Read a streamed body until ``marker`` has arrived; returns what was read."""
    seen = b""
    async for chunk in chunks:
        seen += chunk
        if marker in seen:
            return seen
    raise AssertionError(f"the stream ended without {marker!r}: {seen!r}")


@needs_nginx
def test_the_shipped_config_passes_nginx_t(tmp_path: Path) -> None:
    main = write_config(tmp_path / "nginx", listen_port=free_port(), upstream_ports=[free_port(), free_port()])
    result = subprocess.run(nginx_command(main, "-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_the_shipped_limits_agree_with_the_gateway_defaults() -> None:
    """What the config's comments claim about the gateway, checked against trioproxy/config.py."""
    text = SHIPPED.read_text()

    def directive(name: str) -> str:
        m = re.search(rf"(?m)^\s*{name}\s+([^;]+);", text)
        assert m, name
        return m.group(1)

    def size(v: str) -> int:
        return int(v[:-1]) * {"k": 1024, "m": 1024**2}[v[-1]]

    def seconds(v: str) -> int:
        return int(v[:-1]) * {"s": 1, "m": 60, "h": 3600}[v[-1]]

    assert size(directive("client_max_body_size")) == ServerConfig().max_body_bytes
    # nginx closes idle upstream connections before the gateway does (a POST on a
    # connection the gateway is closing would be a 502 nginx may not retry).
    assert seconds(directive("keepalive_timeout")) < ServerConfig().keep_alive_timeout_s
    # The gateway, which answers with an error and records it, times out before nginx does.
    assert seconds(directive("proxy_read_timeout")) > Routing().total_timeout_ms / 1000
    assert directive("proxy_next_upstream_tries") == "2"
    assert "non_idempotent" not in directive("proxy_next_upstream")


@needs_nginx
async def test_streams_through_nginx_are_the_gateways_bytes_and_both_instances_serve(
    start_mock: StartMock, start_gateway: StartGateway, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        mock, gateways = await start_instances(start_mock, start_gateway, tokens=20, token_delay_ms=1, ttft_ms=0)
        direct_gw = gateways["via-a"]
        async with open_nginx(tmp_path, [port_of(g) for g in gateways.values()]) as nginx:
            async with httpx.AsyncClient(timeout=30) as client:
                direct = await client.post(f"{direct_gw.url}/v1/chat/completions", json=CHAT)
                served_by: Counter[str] = Counter()
                bodies, request_ids = [], []
                for _ in range(20):
                    r = await client.post(f"{nginx.url}/v1/chat/completions", json=CHAT)
                    assert r.status_code == 200
                    served_by[r.headers["x-trioproxy-upstream"]] += 1
                    bodies.append(r.content)
                    assert r.headers["content-type"].startswith("text/event-stream")
                    assert re.fullmatch(r"[0-9a-f]{24}", r.headers["x-request-id"])
                    request_ids.append(r.headers["x-request-id"])
        access_log = nginx.read_access_log()  # nginx has exited: every line is written
        for gw in gateways.values():
            await stop(gw)
    assert direct.status_code == 200 and direct.content.endswith(b"data: [DONE]\n\n")
    assert direct.content.count(b'"delta":{"content":') == 20
    assert all(strip_ids(body) == strip_ids(direct.content) for body in bodies)
    # least_conn with one request at a time: every instance is idle, so they take turns.
    assert set(served_by) == set(INSTANCES), served_by
    # The instances' own usage records agree (each writes its own log directory).
    records = [r for gw in gateways.values() for r in read_records(gw) if r["route"] == "/v1/chat/completions"]
    assert Counter(r["upstream"] for r in records) == served_by + Counter({"via-a": 1})
    assert all(r["outcome"] == "ok" and r["completion_tokens"] == 20 for r in records)
    # nginx's access log names the gateway's request id of each, and each stream completed.
    assert [log_field(ln, "rid") for ln in access_log] == request_ids
    assert all(" 200 " in ln and log_field(ln, "done") == "OK" for ln in access_log)


@needs_nginx
async def test_sse_and_ndjson_arrive_through_nginx_while_the_upstream_still_generates(
    start_mock: StartMock, start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The first token reaches the client while the next is minutes away: nothing buffers the stream."""
    with trio.fail_after(TEST_TIMEOUT_S):
        mock, gateways = await start_instances(start_mock, start_gateway, tokens=3, ttft_ms=0)
        async with open_nginx(tmp_path, [port_of(g) for g in gateways.values()]) as nginx:
            async with httpx.AsyncClient(timeout=30) as client:
                sse = client.stream("POST", f"{nginx.url}/v1/chat/completions", json=CHAT, headers=STALL)
                async with sse as r:
                    first = await read_until(r.aiter_raw(), b'"delta":{"content":"Hello"}')
                    assert mock.statistics().in_progress == 1  # the upstream has more to say
                assert r.headers["content-type"].startswith("text/event-stream")
                assert first.startswith(b"data: {") and b"[DONE]" not in first
                await mock.wait_disconnects(1)  # the hang-up reached the mock: one stream in progress again

                ndjson = client.stream("POST", f"{nginx.url}/api/chat", json=CHAT, headers=STALL)
                async with ndjson as r:
                    first = await read_until(r.aiter_raw(), b"\n")
                    assert mock.statistics().in_progress == 1
                assert r.headers["content-type"] == "application/x-ndjson"
                line = json.loads(first.splitlines()[0])
                assert line["message"]["content"] == "Hello" and line["done"] is False


@needs_nginx
async def test_openai_sdk_streams_through_nginx(
    start_mock: StartMock, start_gateway: StartGateway, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        mock, gateways = await start_instances(start_mock, start_gateway, tokens=8, token_delay_ms=1, ttft_ms=0)
        async with open_nginx(tmp_path, [port_of(g) for g in gateways.values()]) as nginx:
            direct = openai.OpenAI(base_url=f"{gateways['via-a'].url}/v1", api_key="unused", max_retries=0)
            through = openai.OpenAI(base_url=f"{nginx.url}/v1", api_key="unused", max_retries=0)

            def chat(client: openai.OpenAI) -> tuple[str, int]:
                stream = client.chat.completions.create(
                    model="mock-llama", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                chunks = [c for c in stream if c.choices]
                return "".join(c.choices[0].delta.content or "" for c in chunks), len(chunks)

            direct_text, _ = await trio.to_thread.run_sync(chat, direct)
            text, n_chunks = await trio.to_thread.run_sync(chat, through)
    assert text and text == direct_text
    assert n_chunks == 10  # the role chunk, 8 tokens, the finish chunk: one event each


@needs_nginx
async def test_a_stopped_instance_is_failed_over_and_its_last_stream_finishes(
    start_mock: StartMock, start_gateway: StartGateway, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        mock, gateways = await start_instances(start_mock, start_gateway, tokens=20, token_delay_ms=1, ttft_ms=0)
        async with open_nginx(tmp_path, [port_of(g) for g in gateways.values()]) as nginx:
            async with httpx.AsyncClient(timeout=30) as client:
                # A stream slow enough to be cut short by a shutdown (20 tokens, 50 ms apart),
                # well within the gateway's shutdown_grace_s (10 s).
                slow = {"x-mock-token-delay-ms": "50"}
                async with client.stream("POST", f"{nginx.url}/v1/chat/completions", json=CHAT, headers=slow) as r:
                    serving_name = r.headers["x-trioproxy-upstream"]
                    serving = gateways[serving_name]
                    chunks = r.aiter_raw()
                    body = await read_until(chunks, b'"delta":{"content":"Hello"}')
                    serving.shutdown.set()  # SIGTERM: stop accepting, let in-flight requests finish
                    async for chunk in chunks:
                        body += chunk
                await serving.stopped.wait()
                survivor = next(name for name, gw in gateways.items() if gw is not serving)
                after = [await client.post(f"{nginx.url}/v1/chat/completions", json=CHAT) for _ in range(20)]
                await stop(gateways[survivor])
                none_left = await client.post(f"{nginx.url}/v1/chat/completions", json=CHAT)
        access_log = nginx.read_access_log()
    assert body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
    assert body.count(b'"delta":{"content":') == 20
    # nginx found the stopped instance refusing and sent each request to the other one.
    assert [(r.status_code, r.headers["x-trioproxy-upstream"]) for r in after] == [(200, survivor)] * 20
    assert all(r.content.endswith(b"data: [DONE]\n\n") for r in after)
    # ...after trying it first: nginx logs both addresses, and the refusal as a 502 attempt.
    stopped_at, survivor_at = f"127.0.0.1:{port_of(serving)}", f"127.0.0.1:{port_of(gateways[survivor])}"
    retried = [ln for ln in access_log if log_field(ln, "upstream") == f"{stopped_at}, {survivor_at}"]
    assert retried and all(log_field(ln, "ust") == "502, 200" and " 200 " in ln for ln in retried)
    # With no instance left, nginx answers itself, in the OpenAI error shape.
    assert none_left.status_code == 502 and none_left.json()["error"]["code"] == "gateway_unavailable"
    # The stopped instance's one request: its stream, finished during the shutdown.
    assert [r["outcome"] for r in read_records(serving) if r["upstream"] == serving_name] == ["ok"]


@needs_nginx
async def test_an_error_a_gateway_answers_to_a_post_is_passed_on_and_not_retried(
    start_mock: StartMock, start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The gateway's 503 (its model server refuses) reaches the client as is: one attempt, no ejection."""
    with trio.fail_after(TEST_TIMEOUT_S):
        mock, gateways = await start_instances(start_mock, start_gateway, refuse=True)
        async with open_nginx(tmp_path, [port_of(g) for g in gateways.values()]) as nginx:
            async with httpx.AsyncClient(timeout=30) as client:
                answers = [await client.post(f"{nginx.url}/v1/chat/completions", json=CHAT) for _ in range(10)]
        access_log = nginx.read_access_log()
    assert {(r.status_code, r.json()["error"]["code"]) for r in answers} == {(503, "no_healthy_upstream")}
    # One instance per request (a retry would list two), and both kept getting requests:
    # a 503 to a POST does not count against an instance (max_fails).
    assert [log_field(ln, "ust") for ln in access_log] == ["503"] * 10
    used = Counter(log_field(ln, "upstream") for ln in access_log)
    assert used == {f"127.0.0.1:{port_of(g)}": 5 for g in gateways.values()}


@needs_nginx
async def test_a_client_hang_up_through_nginx_cancels_the_generation(
    start_mock: StartMock, start_gateway: StartGateway, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        mock, gateways = await start_instances(start_mock, start_gateway, tokens=3, ttft_ms=0)
        async with open_nginx(tmp_path, [port_of(g) for g in gateways.values()]) as nginx:
            async with httpx.AsyncClient(timeout=30) as client:
                async with client.stream("POST", f"{nginx.url}/v1/chat/completions", json=CHAT, headers=STALL) as r:
                    request_id = r.headers["x-request-id"]
                    serving = r.headers["x-trioproxy-upstream"]
                    await read_until(r.aiter_raw(), b'"delta":{"content":"Hello"}')
                # Hung up. nginx closes its connection to the gateway, which cancels the
                # upstream request: the mock sees its client (the gateway) go.
                await mock.wait_disconnects(1)
        access_log = nginx.read_access_log()
        for gw in gateways.values():
            await stop(gw)  # writes every queued usage record
    (record,) = [r for r in read_records(gateways[serving]) if r["request_id"] == request_id]
    assert record["outcome"] == "client_disconnect" and record["upstream"] == serving
    assert record["bytes_out"] > 0
    assert mock.statistics().in_progress == 0
    (line,) = [ln for ln in access_log if log_field(ln, "rid") == request_id]
    # nginx logged it with the gateway's request id (the two logs join on it): status 200 (the
    # head went out), and done= empty: the response never reached its end.
    assert '"POST /v1/chat/completions HTTP/1.1" 200 ' in line and log_field(line, "done") == ""


@needs_nginx
async def test_nginx_refuses_admin_routes_and_oversized_bodies_itself(
    start_mock: StartMock, start_gateway: StartGateway, tmp_path: Path
) -> None:
    """The gateway trusts loopback, and behind nginx every client is nginx's loopback: nginx decides."""
    with trio.fail_after(TEST_TIMEOUT_S):
        mock, gateways = await start_instances(start_mock, start_gateway, tokens=2, token_delay_ms=0, ttft_ms=0)
        async with open_nginx(tmp_path, [port_of(g) for g in gateways.values()]) as nginx:
            # 127.0.0.2 is loopback too, but not in the config's allow list: a client from elsewhere.
            outside = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
            async with httpx.AsyncClient(transport=outside, timeout=30) as client:
                refused = [
                    await client.get(f"{nginx.url}/metrics"),
                    await client.post(f"{nginx.url}/_/reload"),
                    await client.get(f"{nginx.url}/_/live"),
                    await client.get(f"{nginx.url}/_/"),
                ]
                healthz = await client.get(f"{nginx.url}/healthz")
                chat = await client.post(f"{nginx.url}/v1/chat/completions", json=CHAT)
            async with httpx.AsyncClient(timeout=30) as client:  # from 127.0.0.1: allowed
                metrics = await client.get(f"{nginx.url}/metrics")
                # /_/live through nginx (WebSocket upgrade), as the dashboard's page opens it: with its
                # Origin, which names nginx's port (the gateway compares it with the Host nginx passes on).
                origin = [(b"origin", f"http://127.0.0.1:{nginx.port}".encode())]
                async with open_websocket_url(f"ws://127.0.0.1:{nginx.port}/_/live", connect_timeout=10,
                                              extra_headers=origin) as ws:
                    for gw in gateways.values():  # one each: whichever instance nginx chose has one
                        await client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
                    while (event := json.loads(await ws.get_message())).get("record", {}).get("route") != CHAT_ROUTE:
                        pass  # the records of the requests before (/metrics...) may come first
                    live = event["record"]
            too_large = await post_head_only(nginx.port, content_length=ServerConfig().max_body_bytes + 1)
        access_log = nginx.read_access_log()
    for r in refused:
        assert r.status_code == 403
        assert r.json()["error"] == {"message": "admin routes are not served here", "type": "permission_error",
                                     "param": None, "code": "forbidden"}
    # Answered by nginx alone: no instance was asked ($upstream_addr is "-").
    admin_lines = [ln for ln in access_log if '" 403 ' in ln]
    assert len(admin_lines) == len(refused) and all(log_field(ln, "upstream") == "-" for ln in admin_lines)
    assert healthz.status_code == 200 and chat.status_code == 200
    assert metrics.status_code == 200 and "trioproxy_requests_total" in metrics.text
    assert live["route"] == "/v1/chat/completions" and live["outcome"] == "ok"
    status, body = too_large
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


async def post_head_only(port: int, *, content_length: int) -> tuple[int, bytes]:
    """Send a request head announcing a body, and no body; returns nginx's status and body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % content_length
        )
        data = b""
        # Read the answer by its Content-Length: nginx keeps the connection open a while
        # (lingering close) for the body it will discard.
        while chunk := await stream.receive_some(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                return int(head.split(b" ", 2)[1]), body
    raise AssertionError(f"nginx closed before a whole answer: {data!r}")
