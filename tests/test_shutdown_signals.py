"""Signals that come while a stopping gateway writes its last usage records are taken, not fatal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Run in a process of its own: the signals it sends itself would end pytest's, were they not taken.
SCRIPT = r"""
import os, signal, sys
import attrs, httpx, trio
from loguru import logger
from trioproxy import server, usagelog
from trioproxy.config import load_config
from trioproxy.mock import MockSettings, serve_mock

REQUESTS = 40
stopped_serving = trio.Event()
logger.add(lambda message: stopped_serving.set() if "stopped serving" in message else None)
original = usagelog._offload
sent = []

HUNG = sys.argv[2] == "hung"

async def offload(fn, *args):
    # Every record waits for the end of serving (queued); then, as the writer starts on them:
    # a SIGTERM and a SIGINT, as an impatient operator would send.
    await stopped_serving.wait()
    if not sent:
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
        if not HUNG:
            os.kill(os.getpid(), signal.SIGINT)
    if HUNG:  # a disk that does not answer; the operator's second signal stops waiting for it
        if len(sent) == 1:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        await trio.sleep_forever()
    return await original(fn, *args)

usagelog._offload = offload

async def run(logs):
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock, MockSettings(models=("*",), tokens=2, token_delay_ms=0, ttft_ms=0))
        config = load_config(
            f'[[upstreams]]\nid = "m"\nkind = "openai"\nbase_url = "http://127.0.0.1:{mock.port}"\nmodels = ["*"]\n'
            '[upstreams.health]\nenabled = false\n'
            f'[telemetry]\ndir = "{logs}"\n')
        config = attrs.evolve(config, server=attrs.evolve(config.server, host="127.0.0.1", port=0))
        running = await nursery.start(server.main, config)
        async with httpx.AsyncClient() as client:
            for _ in range(REQUESTS):
                r = await client.post(running.binds[0] + "/v1/chat/completions",
                                      json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
        running.shutdown.set()
        await running.stopped.wait()
        nursery.cancel_scope.cancel()
    print(json.dumps({"signals_sent": bool(sent)}))

import json
trio.run(run, sys.argv[1])
"""


def test_a_signal_during_the_last_write_of_the_records_loses_none(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(logs), "ok"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"signals_sent": True}
    records = [json.loads(line) for path in logs.glob("usage-*.jsonl") for line in path.read_text().splitlines()]
    assert len(records) == 40 and {r["outcome"] for r in records} == {"ok"}
    assert "usage records: 40 submitted, 40 written, 0 dropped, 0 lost" in done.stderr


def test_a_second_signal_stops_waiting_for_a_disk_that_does_not_answer(tmp_path: Path) -> None:
    """The first signal once serving has stopped is taken; the second stops the writer, which counts
    what it could not write as lost, and the process ends (it used to wait for the disk forever)."""
    logs = tmp_path / "logs"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(logs), "hung"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no longer waiting for the usage records" in done.stderr
    assert "usage records: 40 submitted, 0 written, 0 dropped, 40 lost" in done.stderr, done.stderr[-2000:]
