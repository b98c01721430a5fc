"""A client that hangs up: when the gateway looks for it (``server.disconnect_watch_after_ms``).

``ProxyApp`` is driven by a small ASGI client (as Hypercorn calls it) against a real upstream
socket served here, with the gateway's real ``Watchdog`` running, under a ``MockClock`` that
only moves when a test jumps it: so each test can say exactly when the hang-up was noticed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trioproxy import app as app_module
from trioproxy.app import ProxyApp, single_error
from trioproxy.hypercorn_app import DISCONNECT_NOTICE, UNSCHEDULED, DisconnectNotice


#: Virtual time stands still unless a test jumps it; if every task stays blocked this many real
#: seconds (a regression waiting on something that never comes), the clock jumps to the
#: test's fail_after deadline instead of hanging. Far above any loopback round trip.
HANG_GUARD_S = 5.0
#: The streaming tests' upstream waits 5 s in three steps, which the clock jumps: each jump
#: waits this long first (still far above a loopback round trip).
PACE_GUARD_S = 0.5
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
ANSWER = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}]}'
SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/v1/chat/completions",
    "raw_path": b"/v1/chat/completions",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8080),
}


EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
DONE = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'


@attrs.define
class Upstream:
    """One-connection HTTP upstream: reads a request, then answers at once or never.

    ``streamed``: answers with SSE instead, a content event, then the finish event with
    [DONE], 2 s apart, then the end of its chunked body 1 s later.
    """

    answer: bool
    streamed: bool = False
    got_request: trio.Event = attrs.field(factory=trio.Event)
    closed: trio.Event = attrs.field(factory=trio.Event)

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:  # bounded by the client's one request
            data += await stream.receive_some(65536)
        self.got_request.set()
        try:
            if self.streamed:
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                      b"transfer-encoding: chunked\r\n\r\n")
                for piece in (EVENT, DONE):
                    await trio.sleep(2)
                    await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece))
                await trio.sleep(1)
                await stream.send_all(b"0\r\n\r\n")
            elif self.answer:
                head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(ANSWER)
                await stream.send_all(head + ANSWER)
            while await stream.receive_some(65536):  # until the gateway closes (or reuses) the connection
                pass
        except trio.BrokenResourceError:  # the gateway closed it mid-answer
            pass
        self.closed.set()


class RecordingNotice(DisconnectNotice):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def subscribe(self, callback: Callable[[], None]) -> None:
        self.calls.append("subscribe")
        super().subscribe(callback)

    def unsubscribe(self) -> None:
        self.calls.append("unsubscribe")
        super().unsubscribe()


class Client:
    """The ASGI side of one request: the body at once, then connected until ``hang_up()``.

    With ``notice``, its scope offers a ``DisconnectNotice``, as trioproxy's Hypercorn I/O does,
    and a hang-up fires it as well as queueing ``http.disconnect``.
    """

    def __init__(self, notice: bool = False) -> None:
        self.gone = trio.Event()
        self.sent: list[dict[str, Any]] = []
        self.given = False
        #: What the request called on its notice, in order.
        self.notice_calls: list[str] = []
        self.notice = RecordingNotice(self.notice_calls) if notice else None
        self.scope = {**SCOPE, "extensions": {DISCONNECT_NOTICE: self.notice}} if notice else SCOPE
        #: Whether a send's own schedule point (Hypercorn's, after the write) was cancelled.
        self.cancelled_in_send = False

    def hang_up(self) -> None:
        self.gone.set()
        if self.notice is not None:
            self.notice.fire()

    async def receive(self) -> dict[str, Any]:
        if not self.given:
            self.given = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.hang_up()  # as Hypercorn: the stream closes once the response is sent


@pytest.fixture
def watchers(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When each disconnect-watcher task started."""
    started: list[float] = []
    real_watch = app_module._watch_disconnect

    async def counting(*args: Any) -> None:
        started.append(trio.current_time())
        await real_watch(*args)

    monkeypatch.setattr(app_module, "_watch_disconnect", counting)
    return started


@pytest.mark.parametrize("notice", [False, True], ids=["watcher-task", "notice"])
@pytest.mark.parametrize("watch_after_ms", [1_000, 0])
async def test_a_client_gone_mid_request_is_noticed_once_the_request_has_run_watch_after_ms(
    proxy_services: Any, mock_clock: trio.testing.MockClock, watchers: list[float], watch_after_ms: int, notice: bool
) -> None:
    mock_clock.autojump_threshold = HANG_GUARD_S
    upstream = Upstream(answer=False)
    made, records = await proxy_services(upstream, watch_after_ms)
    client = Client(notice)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ProxyApp(made), client.scope, client.receive, client.send)
            await upstream.got_request.wait()
            client.hang_up()  # at t=0, the upstream still thinking
            await trio.testing.wait_all_tasks_blocked()
            if watch_after_ms:
                assert not upstream.closed.is_set() and made.active == 1  # not looked for yet
                mock_clock.jump(watch_after_ms / 1000 - 0.001)
                await trio.testing.wait_all_tasks_blocked()
                assert not upstream.closed.is_set() and made.active == 1
                mock_clock.jump(0.001)
                await trio.testing.wait_all_tasks_blocked()
            assert made.active == 0  # the watcher saw the hang-up and cancelled the request
            assert trio.current_time() == pytest.approx(watch_after_ms / 1000)
            await upstream.closed.wait()  # ...which closed its upstream connection
    assert len(watchers) == (0 if notice else 1)  # with a notice, no task
    (record,) = [records.receive_nowait()]
    with pytest.raises(trio.WouldBlock):
        records.receive_nowait()  # exactly one record
    assert record.outcome == "client_disconnect" and record.status == 0
    assert client.sent == []


@pytest.mark.parametrize("notice", [False, True], ids=["watcher-task", "notice"])
@pytest.mark.parametrize(("watch_after_ms", "watched"), [(1_000, False), (0, True)])
async def test_an_answer_out_before_watch_after_ms_starts_no_watcher(
    proxy_services: Any, mock_clock: trio.testing.MockClock, watchers: list[float], watch_after_ms: int, watched: bool,
    notice: bool,
) -> None:
    mock_clock.autojump_threshold = HANG_GUARD_S
    made, records = await proxy_services(Upstream(answer=True), watch_after_ms)
    client = Client(notice)
    with trio.fail_after(60):
        await ProxyApp(made)(client.scope, client.receive, client.send)
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]
    assert client.sent[1]["body"] == ANSWER
    assert len(watchers) == (1 if watched and not notice else 0)
    if notice:  # subscribed only if watched, and let go by the request either way
        assert client.notice_calls == (["subscribe", "unsubscribe"] if watched else ["unsubscribe"])
    assert made.watchdog is not None and len(made.watchdog) == 0  # the request forgot its entry
    (record,) = [records.receive_nowait()]
    with pytest.raises(trio.WouldBlock):
        records.receive_nowait()
    assert record.outcome == "ok" and record.status == 200


async def test_a_request_and_its_watcher_cancelled_from_outside_raise_one_cancelled() -> None:
    """The shutdown grace over: the request and its watcher both raise ``Cancelled``, in one group;
    ``single_error`` gives one of them (so ``ProxyApp`` records the request as cancelled), and
    the scope that cancelled still absorbs it."""
    seen: list[BaseException] = []
    with trio.CancelScope() as outside:
        try:
            async with trio.open_nursery() as request:
                request.start_soon(trio.sleep_forever)  # the watcher
                outside.cancel()
                await trio.sleep_forever()  # the request
        except BaseExceptionGroup as group:
            assert len(group.exceptions) == 2
            seen.append(single_error(group))
            raise seen[0] from None
    assert outside.cancelled_caught
    assert len(seen) == 1 and isinstance(seen[0], trio.Cancelled)
    error = ValueError("real")
    assert single_error(BaseExceptionGroup("two", [error, KeyError("other")])).exceptions[0] is error  # type: ignore[attr-defined]


class StreamClient(Client):
    """Asks for a stream, and hangs up when a chunk with ``hang_up_on`` in it is sent: from inside
    that ``send``, before its schedule point, as Hypercorn's stream closes then when the client
    read that chunk and closed at once, or when the write itself found the connection gone."""

    def __init__(self, notice: bool, hang_up_on: bytes) -> None:
        super().__init__(notice)
        self.hang_up_on = hang_up_on
        body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
        self.body = body
        self.scope = {**self.scope, "headers": [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]}

    async def receive(self) -> dict[str, Any]:
        if not self.given:
            self.given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if self.hang_up_on in message.get("body", b"") and not self.gone.is_set():
            self.hang_up()
            try:
                await trio.lowlevel.checkpoint()  # (Hypercorn's, after the write)
            except trio.Cancelled:
                self.cancelled_in_send = True
                raise


@pytest.mark.parametrize("notice", [False, True], ids=["watcher-task", "notice"])
async def test_a_client_that_hangs_up_once_it_has_done_is_recorded_ok(
    proxy_services: Any, mock_clock: trio.testing.MockClock, notice: bool
) -> None:
    mock_clock.autojump_threshold = PACE_GUARD_S
    made, records = await proxy_services(Upstream(answer=True, streamed=True), 0)
    client = StreamClient(notice, hang_up_on=b"[DONE]")
    with trio.fail_after(60):
        await ProxyApp(made)(client.scope, client.receive, client.send)
    (record,) = [records.receive_nowait()]
    assert record.outcome == "ok" and record.status == 200
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False, UNSCHEDULED: True}  # finished


@pytest.mark.parametrize("notice", [False, True], ids=["watcher-task", "notice"])
async def test_a_client_gone_while_its_request_writes_ends_the_stream_without_cancelling_the_write(
    proxy_services: Any, mock_clock: trio.testing.MockClock, notice: bool
) -> None:
    mock_clock.autojump_threshold = PACE_GUARD_S
    upstream = Upstream(answer=True, streamed=True)
    made, records = await proxy_services(upstream, 0)
    client = StreamClient(notice, hang_up_on=b'"content":"hi"')
    with trio.fail_after(60):
        await ProxyApp(made)(client.scope, client.receive, client.send)
        assert trio.current_time() == pytest.approx(2.0)  # at the content event, not the upstream's end
        await upstream.closed.wait()  # the gateway closed the upstream connection, unfinished
    (record,) = [records.receive_nowait()]
    assert record.outcome == "client_disconnect"
    assert all(b"[DONE]" not in m.get("body", b"") for m in client.sent)
    if notice:  # told from inside its own send: no cancellation lands in the server's close path
        assert not client.cancelled_in_send
