"""Instructions per request of the whole gateway process, Hypercorn included (valgrind).

``bench_app.py --instructions`` counts the gateway's own code, called without Hypercorn.
This script counts everything the process executes for a request: Hypercorn's and
h11's work, the relay, the usage log, metrics. It starts the mock upstream
(natively), then ``trioproxy serve`` on ``loadtest/profiles/bench.toml`` under
``valgrind --tool=callgrind`` with its instrumentation off, sends warm-up requests,
and counts only while it sends the measured ones, one at a time (health checks off:
each probe is an httpx request, ~2.3M instructions, and would land in the count by
the clock).

    .venv/bin/python loadtest/count_process.py                  # 64-token streams, 20 ms apart
    .venv/bin/python loadtest/count_process.py --small -n 200   # small non-streamed answers
    .venv/bin/python loadtest/count_process.py --checkout /tmp/old   # another checkout's trioproxy/

``--checkout DIR`` runs the gateway from ``DIR`` (a ``git worktree add DIR REV``, say)
with this checkout's interpreter and profiles: two builds, counted alike. Tokens are
spaced (20 ms) so that each reaches the gateway alone even 30 times slower under
valgrind: what one relayed event costs, not a batch of them. On the 2-core guest
repeated counts of one build agree within 0.7 % (the usage writer and the watchdog
run by the clock, more or less of them in the window). Not a test; ~30 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH_PROFILE = ROOT / "loadtest" / "profiles" / "bench.toml"
#: How long the gateway under valgrind may take to answer /healthz after its start.
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def override(gateway_port: int, mock_port: int, log_dir: Path) -> str:
    """The profile merged over bench.toml: ports, health checks off, the usage log's directory."""
    upstream = '[[upstreams]]\nid = "{id}"\nbase_url = "http://127.0.0.1:%d"\n[upstreams.health]\nenabled = false\n' % mock_port
    return (f"[server]\nport = {gateway_port}\n" + upstream.format(id="primary") + upstream.format(id="fallback")
            + f'[telemetry]\ndir = "{log_dir}"\n')


def wait_until_serving(what: str, url: str, child: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``url`` answers 200; exits with ``log``'s tail if ``child`` ends or the time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:  # bounded by START_TIMEOUT_S
        if child.poll() is not None:
            sys.exit(f"the {what} exited with {child.returncode} before serving:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # (polling a child process's start: no event to wait on)
    sys.exit(f"the {what} did not serve within {START_TIMEOUT_S:g} s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""


def send(client: httpx.Client, n: int, *, stream: bool) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    for _ in range(n):
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                sys.exit(f"the gateway answered {response.status_code}")
            for _ in response.iter_raw():
                pass


def stop(children: list[subprocess.Popen[bytes]]) -> None:
    """Terminate the children, last started first, and wait for each (killed after 30 s)."""
    for child in reversed(children):
        child.terminate()
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10, help="measured requests (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="requests before counting (default 3)")
    parser.add_argument("--small", action="store_true", help="small non-streamed answers instead of streams")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer (default 64)")
    parser.add_argument("--token-delay-ms", type=float, default=20.0, help="mock token spacing (default 20)")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="run the gateway from this checkout's trioproxy/")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind (Debian: apt-get install valgrind)")
    checkout = args.checkout.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        mock_port, gateway_port = free_port(), free_port()
        (out / "override.toml").write_text(override(gateway_port, mock_port, out / "logs"))
        mock_cmd = [sys.executable, "-m", "trioproxy", "mock", "--port", str(mock_port), "--models", "*",
                    "--tokens", str(args.tokens), "--token-delay-ms", str(args.token_delay_ms), "--ttft-ms", "0"]
        gateway_cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/cg.%p",
                       sys.executable, "-m", "trioproxy", "serve", "-p", str(BENCH_PROFILE), "-p", str(out / "override.toml")]
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        children: list[subprocess.Popen[bytes]] = []
        try:
            with open(out / "mock.log", "wb") as mock_log:
                mock = subprocess.Popen(mock_cmd, stdout=mock_log, stderr=subprocess.STDOUT)
            children.append(mock)
            wait_until_serving("mock", f"http://127.0.0.1:{mock_port}/v1/models", mock, out / "mock.log")
            with open(out / "gateway.log", "wb") as gateway_log:
                gateway = subprocess.Popen(gateway_cmd, cwd=checkout, env=env, stdout=gateway_log,
                                           stderr=subprocess.STDOUT)
            children.append(gateway)
            url = f"http://127.0.0.1:{gateway_port}"
            wait_until_serving("gateway", url + "/healthz", gateway, out / "gateway.log")
            with httpx.Client(base_url=url, timeout=60.0) as client:
                send(client, args.warmup, stream=not args.small)
                callgrind_control("-z", str(gateway.pid))
                callgrind_control("-i", "on", str(gateway.pid))
                send(client, args.n, stream=not args.small)
                callgrind_control("-i", "off", str(gateway.pid))
                callgrind_control("-d", str(gateway.pid))
            total = 0
            for dump in out.glob("cg.*"):
                for line in dump.read_text(errors="replace").splitlines():
                    if line.startswith("totals:"):  # (not summary:, which callgrind may write beside it)
                        total += int(line.split()[1])
        finally:
            stop(children)
    what = "small answer" if args.small else f"{args.tokens}-token stream"
    print(f"{checkout}: {total / args.n:,.0f} instructions per {what} ({args.n} counted, the whole gateway process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
