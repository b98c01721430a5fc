"""Hypercorn alone, answering itself: the "floor" row of ``trioproxy bench``.

The gateway is an ASGI app served by Hypercorn on Trio; whatever Hypercorn and
Trio cost to serve a client is a cost no gateway built on them can go below. This
app measures that floor in the same run: the same Hypercorn settings as the
gateway (``trioproxy.server.hypercorn_config`` over the same profiles) and the
same GC settings (``settle_gc``), no upstream, no routing, no telemetry: it reads
the request body and answers from memory.

- Non-streamed (``"stream": true`` absent): one fixed JSON body the size of the
  mock's small answer, with its Content-Length, in one ASGI message.
- Streamed: the same SSE events the mock sends (a role chunk with the head, then
  ``x-mock-tokens`` content events ``x-mock-token-delay-ms`` apart, then the
  finish event and ``[DONE]``): one ASGI send per event, as the gateway relays them.
  One ``_Clock`` task wakes each stream when its next event is due (a park and a
  wake-up per event), as the gateway wakes once per upstream read; a ``trio.sleep_until``
  per event would add a cancel scope and a deadline in the run loop (about 19 µs per
  event on the 2-core guest) that are not Hypercorn's cost.

    python loadtest/floor_app.py --config loadtest/profiles/bench.toml --port 0

It prints ``floor listening on http://127.0.0.1:PORT`` once it listens and stops on
SIGINT/SIGTERM. ``trioproxy bench`` starts it pinned to the gateway's core.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import signal
import sys
from functools import partial
from typing import Any

import attrs
import trio
from hypercorn.trio import serve

from trioproxy.config import load_profiles
from trioproxy.server import hypercorn_config, settle_gc

# The shape and size of the mock's 16-token chat completion (~290 bytes).
BODY = (
    b'{"id":"chatcmpl-floor-1","object":"chat.completion","created":1730000000,"model":"mock-llama",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the mock upstream. '
    b'The quick brown fox jumps over the lazy dog."},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":16,"total_tokens":21}}'
)
_PREFIX = b'data: {"id":"chatcmpl-floor-1","object":"chat.completion.chunk","created":1730000000,"model":"mock-llama","choices":'
ROLE_EVENT = _PREFIX + b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
TOKEN_EVENT = _PREFIX + b'[{"index":0,"delta":{"content":" tok"},"logprobs":null,"finish_reason":null}]}\n\n'
CLOSING = (
    _PREFIX + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n' + b"data: [DONE]\n\n"
)
JSON_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
#: Upper bound of x-mock-tokens here, as in the mock: a typo must not stream for hours.
MAX_TOKENS = 100_000


class _Clock:
    """Wakes each waiting stream at its due time, from one task (``run``)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list[trio.lowlevel.Task | None]]] = []
        self._order = itertools.count()
        self._sleep: trio.CancelScope | None = None

    async def wait_until(self, due: float) -> None:
        holder: list[trio.lowlevel.Task | None] = [trio.lowlevel.current_task()]
        heapq.heappush(self._heap, (due, next(self._order), holder))
        if self._sleep is not None and due < self._sleep.deadline:
            self._sleep.deadline = due

        def abort(_: object) -> trio.lowlevel.Abort:
            holder[0] = None  # cancelled (the client left): the clock skips it
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self) -> None:
        heap = self._heap
        while True:  # until cancelled: each pass sleeps until the earliest due time
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                task = heapq.heappop(heap)[2][0]
                if task is not None:
                    trio.lowlevel.reschedule(task)


CLOCK = _Clock()


def _number(headers: list[tuple[bytes, bytes]], name: bytes, default: float) -> float:
    for key, value in headers:
        if key == name:
            try:
                number = float(value)
            except ValueError:
                return default
            return number if 0 <= number < 1e9 else default
    return default


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    parts = []
    while True:  # bounded by the client's body; Hypercorn caps it
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(parts)
    if b'"stream":true' not in body:
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": BODY, "more_body": False})
        return
    headers = scope["headers"]
    tokens = int(min(_number(headers, b"x-mock-tokens", 16), MAX_TOKENS))
    ttft = _number(headers, b"x-mock-ttft-ms", 0) / 1000
    delay = _number(headers, b"x-mock-token-delay-ms", 0) / 1000
    due = trio.current_time() + ttft
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    await send({"type": "http.response.body", "body": ROLE_EVENT, "more_body": True})
    for i in range(tokens):
        await CLOCK.wait_until(due + i * delay)
        await send({"type": "http.response.body", "body": TOKEN_EVENT, "more_body": True})
    await send({"type": "http.response.body", "body": CLOSING, "more_body": False})


async def main(profiles: list[str], port: int) -> None:
    config = load_profiles(profiles)
    config = attrs.evolve(config, server=attrs.evolve(config.server, port=port))
    shutdown = trio.Event()
    async with trio.open_nursery() as clock:
        clock.start_soon(CLOCK.run)
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        shutdown.set()
                        return

            nursery.start_soon(watch_signals)
            # (Hypercorn types the app with its own ASGI TypedDicts; ours takes plain dicts, as server.py's.)
            binds = await nursery.start(
                partial(serve, app, hypercorn_config(config), shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
            )
            settle_gc()  # the gateway's GC settings too, so the floor stays the floor
            print(f"floor listening on {binds[0]}", file=sys.stderr, flush=True)
            await shutdown.wait()
            # serve returns once shutdown is set; the signal watcher has already returned.
        clock.cancel_scope.cancel()  # every stream has ended: nothing is left to wake


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", action="append", metavar="PATH", help="profile(s) whose [server] settings to use")
    parser.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    args = parser.parse_args()
    trio.run(main, args.config or ["loadtest/profiles/bench.toml"], args.port)
