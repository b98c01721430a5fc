"""``trioproxy serve --workers 2``, run for real: the CLI as a subprocess, its workers, one socket.

What must hold across workers: every request is answered and recorded once (one usage
file per worker), a scrape of ``/metrics`` on whichever worker counts every worker's
requests, a ``POST /_/reload`` landing on one worker reloads them all before it answers,
a killed worker is replaced, and SIGTERM stops them all gracefully with every record written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.conftest import StartMock, upstream_toml
from trioproxy.metrics import families

#: Bound of the whole test (it starts three Python processes).
TEST_TIMEOUT_S = 60
#: Bursts sent before both workers must have answered one (each is 16 requests on fresh connections).
MAX_BURSTS = 40
BURST = 16


class Gateway:
    """The supervisor process, and what it said on stderr (drained all along: workers share the pipe)."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.log = ""
        self.changed = trio.Event()

    async def drain(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.log += chunk.decode(errors="replace")
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, pattern: str, start: int = 0) -> re.Match[str]:
        while True:
            match = re.compile(pattern).search(self.log, start)
            if match:
                return match
            if self.process.returncode is not None:
                raise AssertionError(f"the gateway exited ({self.process.returncode}):\n{self.log}")
            await self.changed.wait()


class Live:
    """A ``/_/live`` subscriber's chat records."""

    def __init__(self) -> None:
        self.chat: set[str] = set()
        self.changed = trio.Event()


async def _subscribe(url: str, *, task_status: trio.TaskStatus[Live]) -> None:
    live = Live()
    async with open_websocket_url(url.replace("http://", "ws://") + "/_/live") as ws:
        task_status.started(live)
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed:  # the gateway stopped
                return
            event = json.loads(message)
            if event["type"] == "record" and event["record"]["route"] == "/v1/chat/completions":
                record = event["record"]
                live.chat.add(record["request_id"])
                live.changed.set()
                live.changed = trio.Event()


def _profile(mock_url: str, logs: Path, *, extra: str = "") -> str:
    return (
        upstream_toml("m", mock_url)
        + f'[telemetry]\ndir = "{logs}"\nflush_ms = 10\n'
        + "[routing]\n"
        + extra
    )


def _records(logs: Path) -> dict[str, list[dict[str, Any]]]:
    """Usage records by file: one file per worker (``usage-DATE-PID.jsonl``)."""
    out = {}
    for path in sorted(logs.glob("usage-*.jsonl")):
        out[path.name] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


def _chat_counts(logs: Path, model: str = "mock-llama") -> dict[str, int]:
    return {
        name: sum(1 for r in records if r["route"] == "/v1/chat/completions" and r["model_requested"] == model)
        for name, records in _records(logs).items()
    }


async def _burst(client: httpx.AsyncClient, url: str, model: str = "mock-llama") -> None:
    async def one() -> None:
        response = await client.post(
            f"{url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]

    async with trio.open_nursery() as nursery:
        for _ in range(BURST):
            nursery.start_soon(one)


async def _until_every_worker_served(client: httpx.AsyncClient, url: str, logs: Path, model: str) -> int:
    """Send bursts until the records show both workers answered ``model``; the number of requests sent."""
    sent = 0
    for _ in range(MAX_BURSTS):
        await _burst(client, url, model)
        sent += BURST
        counts = _chat_counts(logs, model)
        if len([n for n in counts.values() if n]) >= 2:
            return sent
    raise AssertionError(f"one worker answered every request: {_chat_counts(logs, model)}")


async def _until_written(logs: Path, want: int) -> None:
    """Wait until the usage files hold ``want`` chat records (each worker's writer flushes every 10 ms)."""
    while sum(_chat_counts(logs).values()) + sum(_chat_counts(logs, "fresh").values()) < want:
        await trio.sleep(0.01)  # another process's file: polled, bounded by the test's fail_after


async def _metric_requests(client: httpx.AsyncClient, url: str, want: int) -> float:
    """The chat requests a scrape counts, once it counts ``want`` (records reach metrics within flush_ms)."""
    total = 0.0
    while total < want:
        text = (await client.get(f"{url}/metrics")).text
        total = sum(
            s.value
            for f in families(text)
            if f.name == "trioproxy_requests"
            for s in f.samples
            if s.name == "trioproxy_requests_total" and s.labels["route"] == "/v1/chat/completions"
        )
        if total < want:
            await trio.sleep(0.02)  # the other worker's writer flushes every 10 ms: poll, bounded by the test
    return total


async def test_two_workers_share_one_socket_and_add_up(start_mock: StartMock, tmp_path: Path) -> None:
    mock = await start_mock(tokens=3)
    logs = tmp_path / "logs"
    profile = tmp_path / "profile.toml"
    profile.write_text(_profile(f"http://127.0.0.1:{mock.port}", logs))
    command = [sys.executable, "-m", "trioproxy", "serve", "--config", str(profile)]
    command += ["--workers", "2", "--host", "127.0.0.1", "--port", "0"]
    limits = httpx.Limits(max_keepalive_connections=0)  # a fresh connection per request: any worker may take it
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(limits=limits, timeout=10) as client:
            process = await nursery.start(
                partial(trio.run_process, command, stderr=subprocess.PIPE, check=False)
            )
            gateway = Gateway(process)
            nursery.start_soon(gateway.drain)
            started = await gateway.wait_for(r"listening on (http://\S+) \(2 workers: (\d+), (\d+)\)")
            url, pids = started[1], {started[2], started[3]}
            live = await nursery.start(_subscribe, url)

            # Traffic reaches both workers; each writes its own usage file.
            sent = await _until_every_worker_served(client, url, logs, "mock-llama")
            files = _chat_counts(logs)
            assert {name.rsplit("-", 1)[1].removesuffix(".jsonl") for name in files} == pids

            # The live feed, on whichever worker it connected to, carries both workers' records.
            while len(live.chat) < sent:
                await live.changed.wait()
            assert len(live.chat) == sent

            # A scrape on either worker counts both workers' requests.
            assert await _metric_requests(client, url, sent) == sent
            text = (await client.get(f"{url}/metrics")).text
            healthy = [s for f in families(text) for s in f.samples if s.name == "trioproxy_upstream_healthy"]
            assert {s.labels["pid"] for s in healthy} == pids  # per-worker state, labelled by worker

            # A reload posted to one worker is applied by every worker before the answer comes.
            profile.write_text(_profile(f"http://127.0.0.1:{mock.port}", logs, extra='aliases = { fresh = "mock-llama" }\n'))
            answer = (await client.post(f"{url}/_/reload")).json()
            assert answer["reloaded"] is True
            assert list(answer["workers"].values()) == [[]], answer  # the other worker: no errors
            fresh = await _until_every_worker_served(client, url, logs, "fresh")

            # Two reloads posted at once (on either worker) both complete.
            answers: list[dict[str, Any]] = []

            async def post_reload() -> None:
                answers.append((await client.post(f"{url}/_/reload")).json())

            async with trio.open_nursery() as both:
                both.start_soon(post_reload)
                both.start_soon(post_reload)
            assert [a["reloaded"] for a in answers] == [True, True]
            assert all(list(a["workers"].values()) == [[]] for a in answers), answers

            # An invalid profile is refused and both keep serving the running one.
            profile.write_text("[[upstreams]]\nid = 3\n")
            refused = await client.post(f"{url}/_/reload")
            assert refused.status_code == 400
            assert refused.json()["error"]["code"] == "invalid_profile"
            await _burst(client, url, "fresh")

            # A worker killed outright is replaced; traffic goes on.
            victim = int(sorted(pids)[0])
            mark = len(gateway.log)
            sent += fresh + BURST
            await _until_written(logs, sent)  # a SIGKILL loses what is not on disk yet: not the point here
            os.kill(victim, signal.SIGKILL)
            replaced = await gateway.wait_for(r"worker (\d+) \(slot \d\) ready", mark)
            # It starts from the profile every worker accepted (the file on disk is broken now).
            for _ in range(MAX_BURSTS):
                await _burst(client, url, "fresh")
                sent += BURST
                if any(n for name, n in _chat_counts(logs, "fresh").items() if replaced[1] in name):
                    break
            else:
                raise AssertionError(f"the new worker {replaced[1]} answered nothing")

            # SIGTERM: every worker drains, every record is written, the supervisor exits 0.
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    chat = [r for records in _records(logs).values() for r in records if r["route"] == "/v1/chat/completions"]
    assert len(chat) == sent
    assert all(r["outcome"] == "ok" for r in chat)
    assert len({r["request_id"] for r in chat}) == len(chat)
    assert "stopping 2 workers gracefully" in gateway.log


async def test_a_reload_does_not_wait_for_a_worker_that_exited() -> None:
    from trioproxy.workers import Supervisor

    supervisor = Supervisor(command=lambda fd: [], count=2, env={}, fd=-1, grace_s=1.0, metrics_dir="",
                            names=[], snapshot=[])
    verdicts: dict[str, list[str]] = {"11": []}
    done = trio.Event()
    supervisor.pending["r0"] = (verdicts, {12}, done)
    supervisor._no_answer_from(12)
    assert done.is_set() and verdicts == {"11": [], "12": ["the worker exited before it answered"]}


STREAM_CHAT = {"model": "mock-llama", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def _two_workers(tmp_path: Path, mock_port: int, *, grace_s: float) -> tuple[list[str], Path]:
    """``serve --workers 2`` on a profile for the mock, with its shutdown grace: the command, the usage-log directory."""
    logs = tmp_path / "logs"
    profile = tmp_path / "profile.toml"
    profile.write_text(_profile(f"http://127.0.0.1:{mock_port}", logs) + f"[server]\nshutdown_grace_s = {grace_s}\n")
    command = [sys.executable, "-m", "trioproxy", "serve", "--config", str(profile)]
    return command + ["--workers", "2", "--host", "127.0.0.1", "--port", "0"], logs


async def _start(nursery: trio.Nursery, command: list[str]) -> Gateway:
    process = await nursery.start(partial(trio.run_process, command, stderr=subprocess.PIPE, check=False))
    gateway = Gateway(process)
    nursery.start_soon(gateway.drain)
    return gateway


async def test_stopped_like_systemd_does_the_workers_finish_their_streams_and_new_connections_are_refused(
    start_mock: StartMock, tmp_path: Path
) -> None:
    """systemd's default ``KillMode=control-group`` sends SIGTERM to the supervisor and to every
    worker at once. A worker's one SIGTERM is its graceful shutdown; the supervisor's word to
    stop goes through the control pipe, not a second SIGTERM ("stop now": streams used to be cut).
    And once every process has closed the listening socket, a new connection is refused at once
    (it used to wait in the backlog, served by nobody, and be reset when the last worker exited)."""
    mock = await start_mock(tokens=12, token_delay_ms=100, ttft_ms=0)
    command, logs = _two_workers(tmp_path, mock.port, grace_s=30)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as client:
            gateway = await _start(nursery, command)
            process = gateway.process
            started = await gateway.wait_for(r"listening on (http://\S+) \(2 workers: (\d+), (\d+)\)")
            url, workers = started[1], [int(started[2]), int(started[3])]
            port = int(url.rsplit(":", 1)[1])
            async with client.stream("POST", f"{url}/v1/chat/completions", json=STREAM_CHAT) as response:
                chunks = response.aiter_bytes()
                body = await chunks.__anext__()  # the stream is under way
                mark = len(gateway.log)
                for pid in [process.pid, *workers]:  # as systemd stops the unit's control group
                    os.kill(pid, signal.SIGTERM)
                await gateway.wait_for("stopping 2 workers gracefully", mark)
                for pid in workers:  # each has begun its graceful stop (its own SIGTERM, or the pipe's word first)
                    await gateway.wait_for(rf"\[worker {pid}\] .*shutting down gracefully", mark)
                refused = False
                with trio.move_on_after(10):  # until the workers' serve loops have closed their sockets too
                    while not refused:
                        try:
                            stream = await trio.open_tcp_stream("127.0.0.1", port)
                        except OSError:
                            refused = True
                        else:
                            await stream.aclose()
                assert refused, "new connections are still taken while the workers drain"
                async for chunk in chunks:
                    body += chunk
            assert await process.wait() == 0
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    assert "stopping now" not in gateway.log
    (record,) = [r for records in _records(logs).values() for r in records if r["route"] == "/v1/chat/completions"]
    assert record["outcome"] == "ok" and record["stream"] is True


async def test_a_second_signal_stops_the_workers_now_and_their_records_are_written(
    start_mock: StartMock, tmp_path: Path
) -> None:
    """The supervisor's second SIGTERM reaches each worker as ``{"stop": "now"}`` (a worker's own
    signals count separately): the stream still running is cut, its record is written."""
    mock = await start_mock(tokens=600, token_delay_ms=100, ttft_ms=0)  # a minute of tokens
    command, logs = _two_workers(tmp_path, mock.port, grace_s=120)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as client:
            gateway = await _start(nursery, command)
            process = gateway.process
            url = (await gateway.wait_for(r"listening on (http://\S+) \(2 workers"))[1]
            body = b""
            try:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=STREAM_CHAT) as response:
                    async for chunk in response.aiter_bytes():
                        if not body:
                            process.send_signal(signal.SIGTERM)
                            await gateway.wait_for("stopping 2 workers gracefully")
                            process.send_signal(signal.SIGTERM)
                        body += chunk
            except httpx.HTTPError:
                pass  # cut: that is the point
            assert await process.wait() == 0
    assert not body.endswith(b"data: [DONE]\n\n")
    (record,) = [r for records in _records(logs).values() for r in records if r["route"] == "/v1/chat/completions"]
    assert record["outcome"] == "cancelled"
    # The worker that served it was told "now" (an idle one may have ended before the word came).
    assert f"[worker {record['worker']}] the supervisor says: stopping now" in gateway.log


async def test_a_worker_started_while_the_supervisor_stops_is_told_to_stop_too(tmp_path: Path) -> None:
    """A stop that comes while a worker is being started (its process is spawned in a thread):
    the listening socket stays open until the spawn has handed it over (its fd number would
    otherwise be another file's in the child), and the new worker is told to stop like the others
    (it was not among them yet)."""
    import socket as socket_module

    from trioproxy.workers import Supervisor

    said = tmp_path / "said.txt"
    fake_worker = ("import sys\n"
                   f"with open({str(said)!r}, 'w') as out:\n"
                   "    for line in sys.stdin:\n"
                   "        out.write(line); out.flush()\n"
                   "        if 'stop' in line: break\n")
    listener = socket_module.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    supervisor = Supervisor(command=lambda fd: [sys.executable, "-c", fake_worker], count=1, env=dict(os.environ),
                            fd=listener.fileno(), listener=listener, grace_s=1.0, metrics_dir=str(tmp_path),
                            names=[], snapshot=[])
    with trio.fail_after(30):
        supervisor.spawning += 1  # a spawn in progress (the thread's Popen) when the signal comes
        supervisor.begin_stop()
        assert listener.fileno() != -1  # kept open for it
        supervisor.spawning -= 1
        status = await supervisor._run_one(0, None)  # the spawn, then what follows it
    assert status == 0 and listener.fileno() == -1  # closed once no spawn needs it
    assert [json.loads(line) for line in said.read_text().splitlines()] == [{"start": {"profiles": []}}, {"stop": "graceful"}]
