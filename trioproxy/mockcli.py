"""``trioproxy mock`` on the command line: its options, and a foreground run until a signal.

``cli.py`` calls :func:`add_arguments` to build the ``mock`` subcommand and
:func:`run_from_args` to run it. Kept apart from ``mock.py`` (the server itself,
which ``server.py`` and the tests embed) because this is argparse and process
glue only: options, their check into :class:`~trioproxy.mock.MockSettings`,
signals, exit codes.
"""

from __future__ import annotations

import argparse
import signal
import sys
from functools import partial

import trio

from .mock import FAULT_KINDS, FaultPlan, MockSettings, serve_mock


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``trioproxy mock`` options to ``parser``."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    add("--port", type=int, default=8081, help="port to bind; 0 picks a free one (default 8081)")
    add("--kind", choices=("openai", "vllm", "ollama", "both"), default="both",
        help="API family to imitate (vllm: OpenAI's, with vLLM's /health and its usage default)")
    add("--models", default="mock-llama", help="comma-separated model names; * accepts any")
    add("--tokens", type=int, default=16, help="content tokens per answer")
    add("--token-delay-ms", type=float, default=20.0, help="delay between streamed tokens")
    add("--ttft-ms", type=float, default=50.0, help="delay before the first token (or the answer)")
    add("--fail", choices=(*FAULT_KINDS, "refuse"), help="inject this fault")
    add("--fail-status", type=int, default=503, help="status of --fail status")
    add("--retry-after", type=int, default=1, help="Retry-After seconds sent with 429 and 503")
    add("--fail-every", type=int, default=0, help="fault requests N, 2N, ... only")
    add("--fail-rate", type=float, default=0.0, help="fault each request with this probability")
    add("--seed", type=int, default=0, help="seed of --fail-rate")
    add("--cut-after", type=int, default=2, help="tokens sent before --fail cut")
    add("--slow-ttft-ms", type=float, default=2000.0, help="first-token delay of --fail slow (default 2000)")


def settings_from_args(args: argparse.Namespace) -> MockSettings:
    """The :class:`MockSettings` that parsed options describe.

    Raises:
      ValueError: an option is out of range.
    """
    if not 0 <= args.port <= 65535:  # (the OS would take 70000 as 4464)
        raise ValueError(f"--port: expected 0..65535, got {args.port}")
    if not 0.0 <= args.fail_rate <= 1.0:
        raise ValueError(f"--fail-rate: expected a probability, 0..1, got {args.fail_rate}")
    fault = None
    if args.fail not in (None, "refuse"):
        fault = FaultPlan(args.fail, status=args.fail_status, retry_after_s=args.retry_after,
                          every=args.fail_every, rate=args.fail_rate, seed=args.seed,
                          cut_after_tokens=args.cut_after, slow_ttft_ms=args.slow_ttft_ms)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if not models:
        raise ValueError("--models: give at least one model name")
    return MockSettings(kind=args.kind, models=models, tokens=args.tokens, token_delay_ms=args.token_delay_ms,
                        ttft_ms=args.ttft_ms, fault=fault, refuse=args.fail == "refuse")


async def _run(settings: MockSettings, host: str, port: int) -> int:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as root:
            try:
                mock = await root.start(partial(serve_mock, settings, host=host, port=port))
            except OSError as exc:
                print(f"trioproxy mock: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
                return 1
            shown = f"[{host}]" if ":" in host else host
            print(f"trioproxy mock ({settings.kind}) listening on http://{shown}:{mock.port}",
                  file=sys.stderr, flush=True)
            async for _ in signals:
                root.cancel_scope.cancel(reason="signal")
                break
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    """Run the mock in the foreground until SIGINT/SIGTERM; returns the exit code (0 on Ctrl-C)."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"trioproxy mock: {exc}", file=sys.stderr)
        return 2
    try:
        return trio.run(_run, settings, args.host, args.port)
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was installed
        return 0
