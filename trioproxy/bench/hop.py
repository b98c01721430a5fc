"""What one loopback round trip costs on this machine, on one core and across two.

A request through the gateway crosses between the bench's cores twice (client to
gateway, gateway to the upstream and back), Hypercorn alone once, and the direct
path not at all (client and mock share a core). Across cores, each message wakes a
core that went idle. On bare metal that costs a few microseconds; in a virtual
machine whose idle vCPUs halt (guest halt polling off), each wake goes through the
hypervisor and one round trip can cost more than a small request's code. The bench
measures it once per run, so a one-at-a-time latency can be read against it:
plain blocking sockets, a one-byte ping and its echo, ``ROUND_TRIPS`` times.

The echo is a child process that pins itself to a core (``python -c``); the pinger is a
thread of the bench, on the load generator's core. Bounded in count and time. Measured
only when the bench pins its processes (two or more cores, no ``--no-pin``).
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .stats import summarize

__all__ = ["ROUND_TRIPS", "cpuidle", "loopback", "round_trips"]

#: Round trips per measurement: about 0.05-0.5 s here.
ROUND_TRIPS = 2000
#: A measurement stops after this long, however many round trips it made.
BUDGET_S = 3.0
#: Seconds the echo has to say its port, and to accept or wait for a byte.
ECHO_TIMEOUT_S = 10.0
#: The echo: pinned to the core in argv[1] ("-": not pinned), a listening socket on
#: 127.0.0.1, its port on stdout, then one connection echoed until EOF.
ECHO = """\
import os, socket, sys
if sys.argv[1] != "-":
    os.sched_setaffinity(0, {int(sys.argv[1])})
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
print(listener.getsockname()[1], flush=True)
listener.settimeout(10)
conn, _ = listener.accept()
conn.settimeout(10)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := conn.recv(64):
    conn.sendall(data)
"""


def round_trips(echo_cpu: int | None, *, n: int = ROUND_TRIPS, budget_s: float = BUDGET_S) -> list[float]:
    """Microseconds per round trip to an echo process pinned to ``echo_cpu`` (None: not pinned).

    Blocking; the caller's thread keeps its own affinity (the bench pins itself to
    the client's core). Returns at most ``n`` round trips, fewer if ``budget_s`` ran out.
    Bounded: the echo has ``ECHO_TIMEOUT_S`` to say its port and to answer each byte.

    Raises:
      OSError: the echo could not be started or reached.
    """
    # Pinned by itself (no preexec_fn: this runs in a thread, where forking then running
    # Python before exec is unsafe); a core it may not use fails it, and the caller goes on.
    echo = subprocess.Popen(
        [sys.executable, "-c", ECHO, "-" if echo_cpu is None else str(echo_cpu)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert echo.stdout is not None
        ready, _, _ = select.select([echo.stdout], [], [], ECHO_TIMEOUT_S)
        line = echo.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            raise OSError("the echo process did not say its port")
        times: list[float] = []
        with socket.create_connection(("127.0.0.1", int(line)), timeout=ECHO_TIMEOUT_S) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = time.monotonic() + budget_s
            clock = time.perf_counter_ns
            for _ in range(n):
                start = clock()
                conn.sendall(b"x")
                if not conn.recv(64):
                    raise OSError("the echo process closed the connection")
                times.append((clock() - start) / 1000)
                if time.monotonic() > deadline:
                    break
        return times
    except BaseException:
        echo.kill()
        raise
    finally:
        try:
            echo.wait(timeout=ECHO_TIMEOUT_S)  # it exits on the EOF of the closed connection
        except subprocess.TimeoutExpired:
            echo.kill()
            echo.wait()
        if echo.stdout is not None:
            echo.stdout.close()


def cpuidle(root: Path = Path("/sys")) -> str | None:
    """The idle driver, with guest halt polling where it is ``haltpoll`` ("haltpoll, halt polling 0 ns")."""
    try:
        driver = (root / "devices/system/cpu/cpuidle/current_driver").read_text().strip()
    except OSError:
        return None
    if driver == "haltpoll":
        try:
            poll_ns = (root / "module/haltpoll/parameters/guest_halt_poll_ns").read_text().strip()
        except OSError:
            return driver
        return f"{driver}, halt polling {poll_ns} ns"
    return driver


def loopback(client_cpu: int, server_cpu: int) -> dict[str, Any]:
    """Round-trip summaries (µs) on the client's core, and from it to the server's core.

    Called from a thread pinned to ``client_cpu``. ``{"same_core": {...},
    "across_cores": {...}, "cpuidle": ...}``; a side that could not be measured is
    None (the bench runs on without it).
    """
    def measured(echo_cpu: int | None) -> dict[str, float | int] | None:
        try:
            return summarize(round_trips(echo_cpu)).as_dict()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "same_core": measured(client_cpu),
        "across_cores": measured(server_cpu) if server_cpu != client_cpu else None,
        "cpuidle": cpuidle(),
    }
