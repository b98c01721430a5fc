"""``RelayHub``: one task relays the steady pieces of every open stream, instead of a wake-up per piece.

Without it each relayed event of a stream costs its task a wait for its upstream socket
(trio re-arms the socket in its ``epoll``, one ``epoll_ctl``), a wake-up and a trip through
the run queue, and the resume of the task's coroutine chain: most of what a relayed event
costs beyond the kernel's send and receive (docs/benchmarks.md, stream-512). A stream whose
pieces have become steady (``relay.pump``: one whole event of the last one's shape, after the
first token) parks its task in :meth:`RelayHub.park`; the hub registers its upstream socket
once, level-triggered, in an ``epoll`` of its own, waits for that ``epoll``'s descriptor in
trio, and when sockets have bytes calls each one's stream's ``readable()`` in its own step,
which reads, relays the piece to the client, or hands the stream back to its task
(:meth:`hand_back`) with whatever needs the task (a piece that is not steady, a write the
socket did not take whole, the body's end, an error). One wake-up of the hub serves every
socket that became readable meanwhile.

A parked task's wait is a cancellation point like any other: a cancellation (the client
hung up, the request's deadline) takes the stream out of the hub and raises in the task.
When the hub ends (the gateway's shutdown), it hands every stream back first.

Interface::

    RelayHub()
        .run()                                  # in the service nursery, until cancelled
        .open: bool                             # True while run() runs: park() only then
        .parks: int                             # streams handed to it so far
        await .park(stream: HubStream) -> object  # what hand_back gave
        .hand_back(stream, result: object)      # (sync, from readable() or anyone in trio)

A ``readable()`` that raises hands its stream back with the exception (logged), which its task
then raises: one stream's bug does not end the hub. ``RelayHub.available()``: False where
``select.epoll`` is missing (not Linux): the gateway then relays every piece in its tasks.
"""

from __future__ import annotations

import select
from typing import Protocol

import trio
from loguru import logger
from outcome import Value

__all__ = ["HubStream", "RelayHub"]


class HubStream(Protocol):
    #: The upstream socket's descriptor (fixed while parked).
    fd: int

    def readable(self) -> None:
        """(In the hub's task.) The socket has bytes, or has ended: read, relay, or hand back."""


class RelayHub:
    @staticmethod
    def available() -> bool:
        """Whether this platform has what the hub needs (``epoll``: Linux); else streams relay themselves."""
        return hasattr(select, "epoll")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        #: Parked streams by descriptor, with their tasks.
        self._parked: dict[int, tuple[HubStream, trio.lowlevel.Task]] = {}
        self.open = False
        #: Streams handed to the hub so far (a stream may be parked several times).
        self.parks = 0

    def __len__(self) -> int:
        return len(self._parked)

    async def run(self) -> None:
        """Relay the parked streams' readable sockets, until cancelled; then hand every stream back."""
        self.open = True
        epoll, parked = self._epoll, self._parked
        try:
            while True:  # until cancelled: each pass serves every socket that has bytes
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0):
                    entry = parked.get(fd)
                    if entry is not None:
                        try:
                            entry[0].readable()
                        except Exception as exc:  # one stream's bug must not end every stream's relay
                            logger.exception("relay hub: a stream's read failed")
                            self.hand_back(entry[0], exc)
        finally:
            self.open = False
            for stream, _ in list(parked.values()):
                self.hand_back(stream, None)
            epoll.close()

    async def park(self, stream: HubStream) -> object:
        """Relay ``stream`` from the hub until it is handed back; return what it was handed back with."""
        fd = stream.fd
        self._epoll.register(fd, select.EPOLLIN)  # (first: if it fails, nothing of it is left here)
        self._parked[fd] = (stream, trio.lowlevel.current_task())
        self.parks += 1

        def abort(_: object) -> trio.lowlevel.Abort:
            self._drop(stream)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def hand_back(self, stream: HubStream, result: object) -> None:
        """Take ``stream`` out of the hub and wake its task with ``result`` (once; later calls do nothing)."""
        entry = self._parked.get(stream.fd)
        if entry is None or entry[0] is not stream:
            return
        self._drop(stream)
        trio.lowlevel.reschedule(entry[1], Value(result))

    def _drop(self, stream: HubStream) -> None:
        fd = stream.fd
        entry = self._parked.get(fd)
        if entry is not None and entry[0] is stream:
            del self._parked[fd]
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):  # (closed meanwhile: the kernel dropped it already)
                pass
