"""One connection to an upstream, plain or TLS, for ``pool.py`` (the transport half).

Plain HTTP is the fast path: a stdlib socket in non-blocking mode, where every
operation tries the syscall first and parks in ``trio.lowlevel.wait_readable`` /
``wait_writable`` only on ``BlockingIOError``. HTTPS goes through
``trio.SSLStream`` over a socket made the same way, behind the same four methods
(``send_all``, ``receive``, ``is_alive``, ``close``).

Only OS-level errors leave this module (``OSError``, ``socket.gaierror``,
``trio.BrokenResourceError`` from a TLS handshake): ``pool.py`` turns them into
our error tree, once. Nothing here spawns a task or locks; the one global is the receive
buffer of plain sockets (``_RECV_BUFFER``, used with no await between receive and copy).
"""

from __future__ import annotations

import errno
import math
import os
import socket
import ssl
from typing import Any

import trio

__all__ = [
    "RECV_SIZE",
    "Address",
    "Connection",
    "RawConnection",
    "SockAddr",
    "TLSConnection",
    "connect_socket",
    "literal_addresses",
    "peek_alive",
    "recv_now",
    "resolve",
    "start_tls",
]

# One recv takes up to 64 KiB, trio's own default receive size: a whole small
# answer or many SSE events per syscall.
RECV_SIZE = 65536
# Plain sockets receive into this one buffer and copy out only the bytes that came:
# ``sock.recv(RECV_SIZE)`` would malloc 64 KiB per call and shrink it, which with
# hundreds of slow streams fragments the heap (RSS) for a ~200-byte SSE event.
# Safe to share: the receive and the copy happen with no await in between, and a
# process serves from one thread (docs/benchmarks.md).
_RECV_BUFFER = bytearray(RECV_SIZE)
_RECV_VIEW = memoryview(_RECV_BUFFER)
# connect_ex results meaning "in progress, wait until writable".
_CONNECT_PENDING = frozenset((errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK))

# Hot-path aliases: one global lookup instead of two attribute lookups per call
# (and the seams loadtest/bench_pool.py swaps to measure the alternatives).
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable

# (family, sockaddr) as getaddrinfo gives them; sockaddr is whatever connect() takes.
SockAddr = tuple[Any, ...]
Address = tuple[int, SockAddr]


class RawConnection:
    """A connected non-blocking stdlib socket (plain HTTP, the fast path)."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def send_all(self, data: bytes, stall_timeout: float) -> bool:
        """Send everything; False if the socket stayed unwritable for ``stall_timeout``."""
        sock = self.sock
        await _checkpoint_if_cancelled()
        total = len(data)
        try:
            sent = sock.send(data)  # small requests: this one call is all
        except BlockingIOError:
            sent = 0
        if sent >= total:
            return True
        view = memoryview(data)
        while True:  # bounded: each pass sends bytes or waits under a deadline
            with trio.move_on_after(stall_timeout) as scope:
                await _wait_writable(sock)
            if scope.cancelled_caught:
                return False
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                continue
            if sent >= total:
                return True

    async def receive(self, deadline: float, *, wait_first: bool = False) -> bytes | None:
        """The next bytes (b"" at EOF), or None if nothing came by ``deadline`` (``inf``: no deadline).

        A cancellation point; a schedule point only if it waits. ``wait_first``: wait for the
        socket to be readable before reading, as when the caller expects nothing yet (a
        relay that has just passed on everything); the wait is then always a schedule point.

        Raises:
          trio.ClosedResourceError: the socket was closed (``close``) while this waited.
        """
        sock = self.sock
        if wait_first:
            data = None  # (the wait below is the cancellation point)
        else:
            await _checkpoint_if_cancelled()
            data = recv_now(sock)
        while data is None:  # bounded: each pass waits under the deadline, then reads
            if deadline == math.inf:  # timed out by a watchdog instead (pool.py): no scope
                await _wait_readable(sock)
            else:
                with trio.move_on_at(deadline) as scope:
                    await _wait_readable(sock)
                if scope.cancelled_caught:
                    return None
            data = recv_now(sock)
        return data

    def is_alive(self) -> bool:
        """Peek without blocking: only "would block" means idle and open."""
        return peek_alive(self.sock)

    def close(self) -> None:
        """Close now (sync: safe in a cancelled scope); idempotent."""
        sock = self.sock
        if sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)  # wakes a task parked on it, if any
            sock.close()


class TLSConnection:
    """``trio.SSLStream`` over the same kind of socket (HTTPS, the slower path)."""

    __slots__ = ("sock", "stream")

    def __init__(self, sock: socket.socket, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.sock = sock
        self.stream = stream

    async def send_all(self, data: bytes, stall_timeout: float) -> bool:
        """As :meth:`RawConnection.send_all`; a broken TLS stream raises ConnectionResetError."""
        with trio.move_on_after(stall_timeout) as scope:
            try:
                await self.stream.send_all(data)
            except trio.BrokenResourceError as exc:
                raise ConnectionResetError(errno.ECONNRESET, "TLS stream broken") from exc
        return not scope.cancelled_caught

    async def receive(self, deadline: float, *, wait_first: bool = False) -> bytes | None:
        """As :meth:`RawConnection.receive` (always a checkpoint: trio's stream is; ``wait_first`` changes
        nothing); a broken TLS stream raises ConnectionResetError."""
        with trio.move_on_at(deadline):
            try:
                return bytes(await self.stream.receive_some(RECV_SIZE))  # no copy: it is bytes
            except trio.BrokenResourceError as exc:
                raise ConnectionResetError(errno.ECONNRESET, "TLS stream broken") from exc
        return None

    def is_alive(self) -> bool:
        """As :meth:`RawConnection.is_alive`, on the raw socket under the TLS layer."""
        # Any pending byte (a close_notify, most likely) also means "do not reuse".
        return peek_alive(self.sock)

    def close(self) -> None:
        """Close now, without close_notify; idempotent."""
        # Sync, so no close_notify: the upstream sees a plain EOF, which HTTP framing tolerates.
        self.stream.transport_stream.socket.close()


#: What the pool holds: either kind answers the same four methods.
Connection = RawConnection | TLSConnection


def recv_now(sock: socket.socket) -> bytes | None:
    """What ``sock`` has now (b"" at EOF), or None if nothing yet.

    (Also ``UpstreamResponse.receive_some``'s, for a relay's read.) A plain function, not
    inline in ``receive``: "would block" raises, and an exception
    gives the frame it passes through a frame object for the traceback. In ``receive``
    that object would live as long as the stream (~220 B each, hundreds of streams);
    here it goes when this returns.
    """
    try:
        n = sock.recv_into(_RECV_BUFFER)
    except BlockingIOError:
        return None
    return _RECV_VIEW[:n].tobytes()


def peek_alive(sock: socket.socket) -> bool:
    """True if an idle socket is still open with nothing unread (a non-blocking MSG_PEEK)."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # b"" (closed) or unsolicited bytes: either way not reusable


def literal_addresses(host: str, port: int) -> list[Address]:
    """Addresses for an IP literal or "localhost" (no resolver round trip); [] otherwise."""
    if host == "localhost":
        return [(socket.AF_INET, ("127.0.0.1", port))]
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return [(family, (host, port) if family == socket.AF_INET else (host, port, 0, 0))]
    return []


async def connect_socket(family: int, sockaddr: SockAddr) -> socket.socket:
    """A connected non-blocking TCP socket with TCP_NODELAY. Raises OSError."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    ok = False
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(sockaddr)
        if err in _CONNECT_PENDING:
            await _wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await trio.lowlevel.checkpoint()
        if err:
            raise OSError(err, os.strerror(err))
        ok = True
        return sock
    finally:
        if not ok:
            sock.close()


async def resolve(host: str, port: int) -> list[Address]:
    """Every TCP address of ``host``, in resolver order. Raises socket.gaierror."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(int(family), sockaddr) for family, _, _, _, sockaddr in infos]


async def start_tls(sock: socket.socket, ssl_context: ssl.SSLContext, server_hostname: str) -> TLSConnection:
    """Handshake over a connected socket; on any failure the socket is closed.

    Raises:
      trio.BrokenResourceError: the handshake failed (its ``__cause__`` says why).
    """
    trio_sock = trio.socket.from_stdlib_socket(sock)
    stream = trio.SSLStream(
        trio.SocketStream(trio_sock), ssl_context, server_hostname=server_hostname, https_compatible=True
    )
    ok = False
    try:
        await stream.do_handshake()
        ok = True
    finally:
        if not ok:
            trio_sock.close()
    return TLSConnection(sock, stream)
