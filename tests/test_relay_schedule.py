"""The relay's trips through the scheduler: one per relayed piece, never none.

A streamed answer's writes ask the server to skip their schedule point
(``hypercorn_app.UNSCHEDULED``), because the relay's next await, its read of the
upstream, always makes one: a wait for the socket, or a checkpoint when bytes are
already buffered. These tests drive ``ProxyApp`` against a real upstream socket that
sends each event only once the client has the one before, with an ASGI ``send`` that
honours the key as ``hypercorn_fast`` does, and count the relay task's steps (a trio
instrument): exactly one per paced event, and at least one between any two writes,
also when the upstream has everything buffered at once.
"""

from __future__ import annotations

import json
import math
import socket
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trioproxy.app import ProxyApp
from trioproxy.connection import RawConnection
from trioproxy.hypercorn_app import DISCONNECT_NOTICE, INBOX, UNSCHEDULED, WITH_FIRST_BODY, AppInbox, DisconnectNotice

from .test_disconnect import SCOPE

EVENTS = 12
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
STREAM_SCOPE = {**SCOPE, "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]}


def event(i: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"t%d"},"finish_reason":null}]}\n\n' % i


END = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'


def chunk(piece: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(piece), piece)


@attrs.define
class PacedUpstream:
    """Streams EVENTS events, each once told (``paced``), or all at once in one write."""

    paced: bool
    next_one: trio.MemorySendChannel[None] = attrs.field(init=False)
    _told: trio.MemoryReceiveChannel[None] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.next_one, self._told = trio.open_memory_channel[None](math.inf)

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:  # bounded by the gateway's one request
            data += await stream.receive_some(65536)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        if not self.paced:
            await stream.send_all(head + b"".join(chunk(event(i)) for i in range(EVENTS)) + chunk(END) + b"0\r\n\r\n")
        else:
            await stream.send_all(head)
            for i in range(EVENTS):
                if i:
                    await self._told.receive()  # the client has the event before
                await stream.send_all(chunk(event(i)))
            await self._told.receive()
            await stream.send_all(chunk(END) + b"0\r\n\r\n")
        while await stream.receive_some(65536):  # until the gateway closes or keeps the connection
            pass


class Steps(trio.abc.Instrument):
    """A log of every task step and every body write, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, trio.lowlevel.Task]] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.log.append(("step", task))


class Client:
    """The ASGI side, honouring UNSCHEDULED as hypercorn_fast does: a cancellation point only."""

    def __init__(self, steps: Steps, upstream: PacedUpstream) -> None:
        self.steps, self.upstream = steps, upstream
        self.given = False
        self.done = trio.Event()
        self.body = b""
        self.unscheduled = 0

    async def receive(self) -> dict[str, Any]:
        if not self.given:
            self.given = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            await trio.lowlevel.checkpoint()
            return
        self.steps.log.append(("write", trio.lowlevel.current_task()))
        self.body += message["body"]
        if message.get(UNSCHEDULED):
            self.unscheduled += 1
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            await trio.lowlevel.checkpoint()
        if message.get("more_body"):
            self.upstream.next_one.send_nowait(None)
        else:
            self.done.set()


def steps_between_writes(log: list[tuple[str, trio.lowlevel.Task]]) -> list[int]:
    """For the task that wrote: how many steps it took between each write and the next."""
    writer = next(task for kind, task in log if kind == "write")
    counts: list[int] = []
    for kind, task in log:
        if task is not writer:
            continue
        if kind == "write":
            counts.append(0)
        elif counts:
            counts[-1] += 1
    return counts[:-1]  # (after the last write: the request's own end)


@pytest.mark.parametrize("paced", [True, False], ids=["paced", "all-at-once"])
async def test_each_relayed_piece_takes_one_trip_through_the_scheduler(proxy_services: Any, paced: bool) -> None:
    upstream = PacedUpstream(paced)
    made, records = await proxy_services(upstream, 1_000)
    steps = Steps()
    client = Client(steps, upstream)
    trio.lowlevel.add_instrument(steps)
    try:
        with trio.fail_after(30):
            await ProxyApp(made)(STREAM_SCOPE, client.receive, client.send)
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert client.body == b"".join(event(i) for i in range(EVENTS)) + END  # every byte, in order
    assert records.receive_nowait().outcome == "ok"
    between = steps_between_writes(steps.log)
    assert all(n >= 1 for n in between), between  # never two writes without a schedule point
    if paced:  # the first event came with the attempt (prefetched): its write yields, as any write
        assert client.unscheduled == EVENTS + 1  # (the events after the first, the end event, the last message)
        assert between == [2] + [1] * EVENTS, between  # then one step per event: its wait


async def test_a_read_asked_to_schedule_makes_a_schedule_point_even_with_bytes_at_hand() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        connection = RawConnection(a)
        b.sendall(b"ready")
        with trio.testing.assert_checkpoints():
            assert await connection.receive(math.inf, wait_first=True) == b"ready"
        b.sendall(b"again")
        assert await connection.receive(math.inf) == b"again"  # (no wait needed: read at once)


@attrs.define
class EmptyStreamUpstream:
    """Answers a stream's head, then ends its body at once: no event at all."""

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:  # bounded by the gateway's one request
            data += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                              b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        while await stream.receive_some(65536):
            pass


@pytest.mark.parametrize("empty", [False, True], ids=["events", "no-event"])
async def test_the_head_may_wait_for_the_first_body_message_which_comes_before_any_wait(
    proxy_services: Any, empty: bool,
) -> None:
    # The relay's start asks the server to hold the head for its first body message
    # (WITH_FIRST_BODY); that message must follow before the relay waits on its upstream,
    # an empty one if nothing came with the attempt.
    upstream: Any = EmptyStreamUpstream() if empty else PacedUpstream(True)
    made, records = await proxy_services(upstream, 1_000)
    sent: list[dict[str, Any]] = []
    done = trio.Event()

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "http.request", "body": BODY, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.start" and not empty:
            upstream.next_one.send_nowait(None)  # (the upstream may send its next event from now on)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()
        await trio.lowlevel.checkpoint()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ProxyApp(made), STREAM_SCOPE, receive, send)
            if not empty:  # let the relay through its events; the first came with the attempt
                for _ in range(EVENTS):
                    await trio.testing.wait_all_tasks_blocked()
                    upstream.next_one.send_nowait(None)
    assert sent[0]["type"] == "http.response.start" and sent[0][WITH_FIRST_BODY] is True
    assert sent[1]["type"] == "http.response.body"
    if empty:  # the head's own message, then the stream's error event and its end
        assert sent[1]["body"] == b"" and sent[1]["more_body"] is True
        assert b"ended the stream before it finished" in sent[2]["body"]
        assert records.receive_nowait().outcome == "upstream_error"
    else:
        assert sent[1]["body"] == event(0)
        assert records.receive_nowait().outcome == "ok"


WHOLE = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                 "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
WHOLE_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@attrs.define
class CountingUpstream:
    """Answers each request whole, on one keep-alive connection; notes when each request arrives."""

    arrived: list[int] = attrs.Factory(list)
    #: What to note on a request's arrival (the app task's steps so far, in the test below).
    note: Any = None

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while True:  # bounded: each pass answers a request or ends with the connection
            while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + len(WHOLE_BODY):
                piece = await stream.receive_some(65536)
                if not piece:
                    return
                data += piece
            data = data[data.index(b"\r\n\r\n") + 4 + len(WHOLE_BODY):]
            self.arrived.append(self.note())
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                  b"content-length: %d\r\n\r\n%s" % (len(WHOLE), WHOLE))


@pytest.mark.parametrize("inbox_in_scope", [True, False], ids=["inbox", "receive-only"])
async def test_a_body_that_has_come_is_read_in_the_step_that_starts_the_request(
    proxy_services: Any, inbox_in_scope: bool,
) -> None:
    # Hypercorn queues a body that came with its head as two messages (the bytes, then the
    # end). Through the scope's INBOX the app takes both without a schedule point each, and
    # its upstream request goes out in the step that starts it: on a busy core, each trip
    # through the scheduler is a whole batch of other tasks' steps before the first token.
    upstream = CountingUpstream()
    made, records = await proxy_services(upstream, 1_000)
    app = ProxyApp(made)
    steps = Steps()
    scope = {**SCOPE, "headers": [(b"content-type", b"application/json"),
                                  (b"content-length", b"%d" % len(WHOLE_BODY))]}
    answers: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            answers.append(message["body"])
        await trio.lowlevel.checkpoint()

    async def one() -> None:
        inbox = AppInbox(10)
        await inbox.send({"type": "http.request", "body": WHOLE_BODY, "more_body": True})
        await inbox.send({"type": "http.request", "body": b"", "more_body": False})
        me = trio.lowlevel.current_task()
        upstream.note = lambda: sum(1 for kind, task in steps.log if task is me)
        steps.log.clear()
        await app({**scope, "extensions": {INBOX: inbox}} if inbox_in_scope else scope, inbox.receive, send)

    trio.lowlevel.add_instrument(steps)
    try:
        with trio.fail_after(30):
            for _ in range(2):  # the first request opens the pool's connection (its connect waits)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(one)
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert answers == [WHOLE, WHOLE]
    assert [records.receive_nowait().outcome for _ in range(2)] == ["ok", "ok"]
    # Counted: the app task's steps after its first. With the inbox, that first step sends
    # the request, and the upstream reads it before the app's next step or after it; each
    # message taken with receive() instead makes one step more first.
    if inbox_in_scope:
        assert upstream.arrived[1] in (0, 1), upstream.arrived
    else:
        assert upstream.arrived[1] >= 2, upstream.arrived


@pytest.mark.parametrize("notice", [True, False], ids=["notice", "no-notice"])
async def test_with_a_disconnect_notice_the_request_ends_without_a_trip_through_the_scheduler(
    proxy_services: Any, notice: bool,
) -> None:
    # Its last body message asks for no schedule point (UNSCHEDULED); after it, a request
    # whose disconnect watch is a notice's callback leaves a plain cancel scope and returns.
    # Without a notice, its watch may need a task: it leaves a nursery, one schedule point.
    upstream = CountingUpstream()
    made, records = await proxy_services(upstream, 1_000)
    upstream.note = lambda: 0
    steps = Steps()
    scope = {**SCOPE, "headers": [(b"content-type", b"application/json"),
                                  (b"content-length", b"%d" % len(WHOLE_BODY))]}
    after_last: list[int] = []

    async def one() -> None:
        inbox = AppInbox(10)
        await inbox.send({"type": "http.request", "body": WHOLE_BODY, "more_body": False})
        me = trio.lowlevel.current_task()
        mine = lambda: sum(1 for kind, task in steps.log if task is me)  # noqa: E731
        at_last = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal at_last
            if message["type"] == "http.response.body" and not message.get("more_body"):
                assert message[UNSCHEDULED] is True
                await trio.lowlevel.checkpoint_if_cancelled()  # (as hypercorn_fast honours it)
                at_last = mine()
            else:
                await trio.lowlevel.checkpoint()

        extensions: dict[str, Any] = {INBOX: inbox}
        if notice:
            extensions[DISCONNECT_NOTICE] = DisconnectNotice()
        await ProxyApp(made)({**scope, "extensions": extensions}, inbox.receive, send)
        after_last.append(mine() - at_last)

    trio.lowlevel.add_instrument(steps)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert records.receive_nowait().outcome == "ok"
    assert after_last == [0 if notice else 1]
