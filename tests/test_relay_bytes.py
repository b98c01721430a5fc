"""The bytes a client receives are, byte for byte, the bytes the upstream sent.

A scripted upstream (raw trio sockets, not the mock) sends a stream with every
awkward feature in odd-sized, chunk-encoded pieces; the client must get the
exact concatenation, whatever the framing on either side.
"""

from __future__ import annotations

import random
import socket

import httpx
import trio

from .conftest import StartGateway, read_records, stop, upstream_toml

STREAM = (
    b": keep-alive comment\r\n\r\n"
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\r\n\r\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"H\xc3\xa9llo \\"w\\""},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",\ndata: "choices":[{"index":0,"delta":{"content":" \xe2\x9c\x93"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)


async def scripted_upstream(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answers every request with STREAM, chunk-encoded in random piece sizes, one write per piece."""
    rng = random.Random(7)

    async def handle(stream: trio.SocketStream) -> None:
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some()
            if not data:
                return
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
        length = lengths[0] if lengths else 0  # the health probe's GET has no body
        while len(rest) < length:
            rest += await stream.receive_some()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\nx-request-id: upstream-id\r\n\r\n"
        )
        offset = 0
        while offset < len(STREAM):
            size = rng.randint(1, 40)
            piece = STREAM[offset : offset + size]
            offset += size
            await stream.send_all(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        await stream.send_all(b"0\r\n\r\n")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(port)


async def test_streamed_bytes_are_relayed_exactly(nursery: trio.Nursery, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        port = await nursery.start(scripted_upstream)
        gw = await start_gateway(upstream_toml("scripted", f"http://127.0.0.1:{port}"))
        received = b""
        request = {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "messages": []}
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                async with client.stream("POST", f"{gw.url}/v1/chat/completions", json=request) as response:
                    received = b"".join([chunk async for chunk in response.aiter_raw()])
                assert received == STREAM
                assert response.headers["x-upstream-request-id"] == "upstream-id"
        await stop(gw)
    records = read_records(gw)
    assert len(records) == 3
    assert all(r["bytes_out"] == len(STREAM) for r in records)
    assert all((r["prompt_tokens"], r["completion_tokens"], r["finish_reason"]) == (3, 2, "stop") for r in records)


async def test_an_upstreams_own_usage_event_reaches_the_client_as_its_kind_sends_it(
    nursery: trio.Nursery, start_gateway: StartGateway
) -> None:
    """``stream_options: {}``: vLLM sends its usage event (its default there), and the client gets
    it; to an OpenAI-kind upstream the gateway asks for usage itself, and takes the event out.
    The scripted upstream sends it either way, as vLLM does here."""
    usage_event = STREAM[STREAM.index(b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage"'):]
    usage_event = usage_event[: usage_event.index(b"\n\n") + 2]
    with trio.fail_after(30):
        port = await nursery.start(scripted_upstream)
        with socket.socket() as closed:  # a port nothing listens on: the primary below refuses
            closed.bind(("127.0.0.1", 0))
            refused = closed.getsockname()[1]
        no_probes = "[upstreams.health]\nenabled = false\n"
        received = {}
        for kind in ("vllm", "openai", "vllm after an openai primary"):
            profile = upstream_toml("scripted", f"http://127.0.0.1:{port}", kind=kind.split()[0], extra="priority = 1\n" + no_probes)
            if kind.endswith("primary"):  # asked for usage, it fails; the vLLM fallback's own event stays
                profile += upstream_toml("down", f"http://127.0.0.1:{refused}", kind="openai", extra="priority = 0\n" + no_probes)
            gw = await start_gateway(profile)
            request = {"model": "m", "stream": True, "stream_options": {}, "messages": []}
            async with httpx.AsyncClient() as client:
                async with client.stream("POST", f"{gw.url}/v1/chat/completions", json=request) as response:
                    received[kind] = b"".join([chunk async for chunk in response.aiter_raw()])
            await stop(gw)
            (record,) = read_records(gw)
            assert (record["prompt_tokens"], record["completion_tokens"], record["token_source"]) == (3, 2, "upstream")
    assert received["vllm"] == received["vllm after an openai primary"] == STREAM
    assert received["openai"] == STREAM.replace(usage_event, b"") and usage_event in STREAM
