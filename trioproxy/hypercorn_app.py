"""Hypercorn's side of each ASGI app call, lighter: its message inbox and a disconnect notice.

Hypercorn (0.17, 0.18) on Trio starts each request's app with ``TaskGroup.spawn_app``,
which gives it a trio memory channel for its incoming messages (the body's pieces, then
``http.disconnect``): 1.8 KB per request, held for the request's whole life, for the two to
four messages a request gets (a deque, two ordered dicts, two sets, two channel objects).
``hypercorn_fast.apply`` installs this module's replacements (:func:`install`):

- **AppInbox**: the same queue (first in, first out; ``config.max_app_queue_size``
  messages, then ``send`` waits; a ``receive`` on an empty inbox waits; a cancelled wait
  takes or leaves nothing), as the memory channel's ``send``/``receive`` behave, with one
  object and one list; a ``send`` that need not wait makes no schedule point (Hypercorn's
  reader makes one per read). Hypercorn never closes these channels, so neither closing nor
  ``EndOfChannel`` is needed. ``tests/test_hypercorn_app.py`` checks it against trio's
  memory channel, step by step, over random programs (hypothesis). Each HTTP request's
  scope carries its inbox under ``scope["extensions"][INBOX]``: its ``receive_nowait``
  takes what has come without a checkpoint, so the gateway reads a body that came with
  its head in the step that starts the request (two messages, two trips through the
  scheduler fewer; on a busy core each trip waits for a whole batch of other tasks).
- **DisconnectNotice**: each HTTP request's ASGI scope carries one under
  ``scope["extensions"][DISCONNECT_NOTICE]``, which Hypercorn's stream fires,
  synchronously, when it closes: when the client hangs up, and at the stream's normal end
  (HTTP/1.1 and HTTP/2). An app that must know of a hang-up while it is busy sending (the
  gateway, relaying a stream) subscribes a callback instead of parking a task in
  ``receive()`` for ``http.disconnect`` (a task and a wait in the inbox: ~3 KB per open
  stream). ``http.disconnect`` is still queued for ``receive()`` as before.
- **on_wait**: an inbox's hook, run once when the app first waits for a message that has
  not come: ``hypercorn_fast`` sends the ``100 Continue`` there that Hypercorn would send as
  soon as it has the head (so a request refused before its body is read, a 413 by its
  declared length, a 401, is not uploaded for nothing).
- **ATOMIC_END**: set (True) in an HTTP request's scope when its last message, marked
  ``UNSCHEDULED``, is written whatever the cancellation state (``hypercorn_fast``: h11 on
  plain TCP), so the app need not shield it; absent otherwise (TLS, HTTP/2, Hypercorn's
  own I/O), where the app shields its last message itself (``relay.finish``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio
from outcome import Value
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio.task_group import TaskGroup, _handle

__all__ = [
    "ATOMIC_END", "DISCONNECT_NOTICE", "INBOX", "REFUSED", "UNSCHEDULED", "WITH_FIRST_BODY",
    "AppInbox", "DisconnectNotice", "NowaitChunks", "chunk_nowait", "chunk_sender", "install",
]

#: The ASGI scope extension that holds an HTTP request's :class:`DisconnectNotice`.
DISCONNECT_NOTICE = "trioproxy.disconnect_notice"
#: A key of an ``http.response.body`` message: when true, the server may return from the
#: send without a schedule point (a cancellation point still), and the app promises that
#: its next await is one, or, after its last body message, that it returns soon.
#: ``hypercorn_fast`` honours it over plain TCP for HTTP/1.1 (a whole answer's last message
#: included: its write and h11's empty end of the body); any other server ignores it and
#: yields as usual. The relay sets it: its next await is the upstream read, which waits for
#: readability first; after the last message, it ends.
UNSCHEDULED = "trioproxy.unscheduled"
#: The ASGI scope extension that holds an HTTP request's :class:`AppInbox`, whose
#: ``receive_nowait`` gives the app what has already come without a schedule point.
INBOX = "trioproxy.inbox"
#: In the scope's ``extensions`` (True) when the app's last message cannot be cut short by a
#: cancellation (see the module's docstring).
ATOMIC_END = "trioproxy.atomic_end"
#: Set in the scope's ``extensions`` when Hypercorn refused the request after its app had
#: started (a malformed chunked body, say): ``(status, message)`` of the answer it sent
#: (``hypercorn_fix``). The app then sees ``http.disconnect``; its record says this instead.
REFUSED = "trioproxy.refused"
#: A key of an ``http.response.start`` message: when true, the server may hold the head and
#: write it with the next body message's bytes, and the app promises to send one right
#: away (an empty one if it has nothing yet). ``hypercorn_fast`` honours it for HTTP/1.1;
#: any other server writes the head at once. The relay sets it: its first body message, the
#: first content the attempt already read, follows at once.
WITH_FIRST_BODY = "trioproxy.with_first_body"

_stock_http_stream_handle = HTTPStream.handle
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
_reschedule = trio.lowlevel.reschedule
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_current_task = trio.lowlevel.current_task
_SUCCEEDED = trio.lowlevel.Abort.SUCCEEDED
#: What ``AppInbox._take`` gives when there is no message (a message may be any object, None too).
_NOTHING: Any = object()


class AppInbox:
    """One app call's incoming messages: trio's memory channel ``send``/``receive``, lighter.

    ``send`` hands a message to the longest-waiting ``receive`` if one waits, else buffers it
    if fewer than ``capacity`` are buffered, else waits until a ``receive`` takes one. Each
    is a cancellation point, as the channel's: a cancellation before it takes or leaves
    nothing. ``receive`` is a schedule point too, as the channel's; ``send`` only when it
    waits (see there).
    """

    __slots__ = ("_capacity", "_messages", "_receivers", "_senders", "on_wait")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"an inbox holds 0 or more messages, not {capacity}")
        self._capacity = capacity
        self._messages: list[Any] = []
        #: Run (once) when a ``receive`` first finds nothing and must wait: the server's
        #: ``100 Continue`` to a client that waits for it before it sends the body.
        self.on_wait: Callable[[], Awaitable[None]] | None = None
        #: Tasks waiting in ``receive``, first come first served (None until the first waits).
        self._receivers: list[trio.lowlevel.Task] | None = None
        #: ``[task, message]`` of tasks waiting in ``send`` for room (None until the first waits).
        self._senders: list[list[Any]] | None = None

    @trio.lowlevel.enable_ki_protection
    async def send(self, message: Any) -> None:
        """Hand ``message`` to a waiting ``receive``, or buffer it, or wait for room (Hypercorn's ``app_put``)."""
        await _checkpoint_if_cancelled()
        if self._receivers:
            _reschedule(self._receivers.pop(0), Value(message))
        elif len(self._messages) < self._capacity:
            self._messages.append(message)
        else:
            senders = self._senders
            if senders is None:
                senders = self._senders = []
            waiting = [_current_task(), message]
            senders.append(waiting)

            def abort(_: Any) -> trio.lowlevel.Abort:
                _discard(senders, waiting)
                return _SUCCEEDED

            await _wait_task_rescheduled(abort)
        # Not a schedule point unless it waited: Hypercorn's reader, which puts a request's
        # body here as two messages, makes one at each read of its socket (trio's, or
        # hypercorn_fast._read_data); one more per message was two trips through the
        # scheduler per request for nothing.

    @trio.lowlevel.enable_ki_protection
    async def receive(self) -> Any:
        """The oldest message, waiting for one if there is none (the app's ASGI ``receive``)."""
        await _checkpoint_if_cancelled()
        message = self._take()
        if message is _NOTHING and self.on_wait is not None:
            hook, self.on_wait = self.on_wait, None
            await hook()
            message = self._take()
        if message is not _NOTHING:
            await _cancel_shielded_checkpoint()
            return message
        receivers = self._receivers
        if receivers is None:
            receivers = self._receivers = []
        task = _current_task()
        receivers.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            _discard(receivers, task)
            return _SUCCEEDED

        return await _wait_task_rescheduled(abort)

    def receive_nowait(self) -> Any:
        """The oldest message if there is one, else None: ``receive`` without its checkpoint or wait.

        As trio's ``receive_nowait`` (None for its ``WouldBlock``). Through the scope's
        ``INBOX`` extension, an app takes what has already come (a request's whole body,
        most often) in the same step, without a trip through the scheduler per message.
        """
        message = self._take()
        return None if message is _NOTHING else message

    def _take(self) -> Any:
        """The oldest message, or ``_NOTHING``; a sender waiting for room gets its turn first."""
        senders = self._senders
        if senders:  # (the buffer is full, or there is none): the first waiting sender's turn
            task, message = senders.pop(0)
            _reschedule(task)
            self._messages.append(message)
        if self._messages:
            return self._messages.pop(0)
        return _NOTHING


def _discard(items: list[Any], item: Any) -> None:
    for i, other in enumerate(items):  # (by identity: a message may compare equal to another)
        if other is item:
            del items[i]
            return


class DisconnectNotice:
    """Says, synchronously, that an HTTP request's stream has closed (see the module's docstring).

    Fired once, by Hypercorn's stream when it closes: its client hung up, or its answer is
    done. :meth:`subscribe` a callback (sync; it must not raise); one subscribed after the
    firing is called at once. :meth:`unsubscribe` when the request no longer cares.

    The callback runs in whichever task closed the stream, inside Hypercorn's close path:
    Hypercorn's reader, or the app's own task when its write found the connection gone. It
    must not cancel a scope around the calling task (the cancellation would land in
    Hypercorn's code); ``app._DisconnectWatch.client_gone`` checks. STYLE.md §8 would rather
    have no callbacks: here the alternative is a task parked in ``receive()`` for each
    watched request, ~3 KB each, to learn one fact.
    """

    __slots__ = ("_callback", "closed")

    def __init__(self) -> None:
        self._callback: Callable[[], None] | None = None
        #: Whether the stream has closed.
        self.closed = False

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the stream closes (at once if it has)."""
        if self.closed:
            callback()
        else:
            self._callback = callback

    def unsubscribe(self) -> None:
        """Forget the callback."""
        self._callback = None

    def fire(self) -> None:
        """The stream has closed (Hypercorn's ``HTTPStream``, once): call the callback, if any."""
        self.closed = True
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


async def _spawn_app(self: Any, app: Any, config: Any, scope: dict[str, Any], send: Any) -> Any:
    """``TaskGroup.spawn_app`` with an :class:`AppInbox`, and a notice in an HTTP request's scope."""
    inbox = AppInbox(config.max_app_queue_size)
    if scope["type"] == "http":  # (before the app's task starts: it finds them in its scope)
        extensions = scope.setdefault("extensions", {})
        extensions[DISCONNECT_NOTICE] = DisconnectNotice()
        extensions[INBOX] = inbox
        if _atomic_end(send):
            extensions[ATOMIC_END] = True
        inbox.on_wait = _on_first_wait(send)
    self._nursery.start_soon(
        _handle, app, config, scope, inbox.receive, send, trio.to_thread.run_sync, trio.from_thread.run
    )
    return inbox.send


async def _http_stream_handle(self: Any, event: StreamEvent) -> None:
    if type(event) is StreamClosed and not self.closed and self.app_put is not None:
        notice = self.scope["extensions"].get(DISCONNECT_NOTICE)
        if notice is not None:
            notice.fire()  # (before Hypercorn queues http.disconnect, which may wait for room)
    await _stock_http_stream_handle(self, event)


def _never(send: Any) -> bool:
    return False


def _nothing(send: Any) -> None:
    return None


#: Given an app's ``send``, whether its last message is written atomically (``install`` sets it).
_atomic_end: Callable[[Any], bool] = _never
#: Given an app's ``send``, what to run when the app first waits for its body, if anything.
_on_first_wait: Callable[[Any], Callable[[], Awaitable[None]] | None] = _nothing
#: Given an app's ``send``, its chunk sender (:func:`chunk_sender`), if the server has one.
_chunk_sender: Callable[[Any], Callable[[bytes], Awaitable[None]] | None] = _nothing
#: Given an app's ``send``, its :class:`NowaitChunks`, if the server has them.
_chunk_nowait: Callable[[Any], NowaitChunks | None] = _nothing


class NowaitChunks(Protocol):
    """What :func:`chunk_nowait` gives: a chunk written in the caller's step, or not at all."""

    def try_send(self, body: bytes) -> bytes | None:
        """Write one more chunk of ``body`` (non-empty) now, without waiting: None if the
        socket took it whole; else the framed bytes it did not take, which :meth:`finish` must
        write before anything else is sent; b"" if nothing was written (another write is under
        way, the answer's state changed, the connection broke): send it the usual way."""

    async def finish(self, rest: bytes) -> None:
        """Write what :meth:`try_send` left, as the server writes a chunk the socket did not take."""


def chunk_nowait(send: Any) -> NowaitChunks | None:
    """Given an app's ``send`` in the middle of a chunked answer (after its first body message),
    its :class:`NowaitChunks`: for a relay hub, which writes from a task that is not the app's
    and must not wait. None where the server has none."""
    return _chunk_nowait(send)


def chunk_sender(send: Any) -> Callable[[bytes], Awaitable[None]] | None:
    """Given an app's ``send`` in the middle of a chunked answer (after its first body message),
    a coroutine function ``sender(body)`` that does what ``send`` does with
    ``{"type": "http.response.body", "body": body, "more_body": True, UNSCHEDULED: True}``
    (``body``: non-empty bytes), without the message: for an app that relays many small
    pieces (``hypercorn_fast``: h11 on plain TCP). None where the server has none (TLS,
    HTTP/2, Hypercorn's own I/O): send the message.
    """
    return _chunk_sender(send)


def install(
    atomic_end: Callable[[Any], bool] = _never,
    on_first_wait: Callable[[Any], Callable[[], Awaitable[None]] | None] = _nothing,
    chunks: Callable[[Any], Callable[[bytes], Awaitable[None]] | None] = _nothing,
    nowait_chunks: Callable[[Any], NowaitChunks | None] = _nothing,
) -> None:
    """Install both on Hypercorn's Trio ``TaskGroup`` and ``HTTPStream`` (``hypercorn_fast.apply`` calls it).

    ``atomic_end``: given an app's ``send``, whether its last message is written whatever the
    cancellation state (``ATOMIC_END``). ``on_first_wait``: given an app's ``send``, a coroutine
    function for its inbox's ``on_wait`` (the deferred ``100 Continue``), or None. ``chunks``:
    given an app's ``send``, its :func:`chunk_sender`, or None; ``nowait_chunks``: its
    :func:`chunk_nowait`, or None.
    """
    global _atomic_end, _on_first_wait, _chunk_sender, _chunk_nowait
    _atomic_end, _on_first_wait, _chunk_sender, _chunk_nowait = atomic_end, on_first_wait, chunks, nowait_chunks
    TaskGroup.spawn_app = _spawn_app  # type: ignore[method-assign,assignment]
    HTTPStream.handle = _http_stream_handle  # type: ignore[method-assign]
