"""The ``trioproxy`` command: serve, check, mock, tail, stats."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence

from functools import partial

import attrs
import trio

from . import __version__, log
from .config import Config, load_profile_texts, load_profiles, masked, read_profiles
from .errors import ConfigError

DEFAULT_PROFILE = "demo"


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        "-p",
        action="append",
        metavar="NAME",
        help="profile name in configs/ or a path to a .toml; repeat to merge in order (default: demo)",
    )
    parser.add_argument("--config", "-c", action="append", metavar="PATH", help="a profile file (same as --profile PATH)")


def _load(args: argparse.Namespace) -> Config:
    names = list(args.profile or []) + list(args.config or [])
    return _overrides(args, load_profiles(names or [DEFAULT_PROFILE]))


def _overrides(args: argparse.Namespace, config: Config) -> Config:
    """The profile with the command line's --host, --port and --workers applied."""
    server = config.server
    if getattr(args, "host", None):
        server = attrs.evolve(server, host=args.host)
    if getattr(args, "port", None) is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError([f"--port: expected 0..65535, got {args.port}"])
        server = attrs.evolve(server, port=args.port)
    if getattr(args, "workers", None) is not None:
        if args.workers < 1:
            raise ConfigError(["--workers: expected 1 or more"])
        server = attrs.evolve(server, workers=args.workers)
    return attrs.evolve(config, server=server)


def build_parser() -> argparse.ArgumentParser:
    from . import logstats, logview, mockcli, top
    from .bench import cli as bench_cli

    parser = argparse.ArgumentParser(prog="trioproxy", description="A local gateway for LLM traffic, on Trio.")
    parser.add_argument("--version", action="version", version=f"trioproxy {__version__}")
    parser.add_argument("--log-level", default="INFO", help="operator log level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    _add_profile_arguments(serve)
    serve.add_argument("--host", help="listen address (overrides the profile)")
    serve.add_argument("--port", type=int, help="listen port (overrides the profile; 0: any free port)")
    serve.add_argument("--watch", action="store_true", help="reload the profiles whenever their files change")
    serve.add_argument(
        "--workers", "-w", type=int, metavar="N", help="worker processes on one listening socket (overrides the profile)"
    )
    serve.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)  # a worker: the supervisor's socket

    check = commands.add_parser("check", help="validate a profile and print it resolved, secrets masked")
    _add_profile_arguments(check)

    mockcli.add_arguments(commands.add_parser("mock", help="run a mock upstream (OpenAI and/or Ollama API)"))
    logview.add_tail_arguments(commands.add_parser("tail", help="show the usage log, one line a request"))
    top.add_arguments(commands.add_parser("top", help="live terminal dashboard of a running gateway"))
    bench_cli.add_arguments(commands.add_parser("bench", help="direct-vs-gateway benchmarks (docs/benchmarks.md)"))
    logstats.add_stats_arguments(commands.add_parser("stats", help="summarize the usage log"))
    return parser


def _serve(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from . import server, workers

    names = list(args.profile or []) + list(args.config or []) or [DEFAULT_PROFILE]
    if args.worker_fd is not None:  # one of the supervisor's workers: it starts from the supervisor's profile
        log.setup(args.log_level, tag=f"worker {os.getpid()}")
        config = _overrides(args, load_profile_texts(workers.read_start()))
        link = workers.WorkerLink()
        trio.run(partial(server.main, config, profiles=names, watch=args.watch, listen_fd=args.worker_fd, link=link))
        return 0
    snapshot = read_profiles(names)
    config = _overrides(args, load_profile_texts(snapshot))
    _check_environment(config)
    _check_listen_address(config)
    if config.server.workers > 1:
        worker_argv = list(sys.argv[1:] if argv is None else argv)
        return trio.run(partial(workers.supervise, config, worker_argv, names, snapshot))
    trio.run(partial(server.main, config, profiles=names, watch=args.watch))
    return 0


def _check_environment(config: Config) -> None:
    """Every environment variable the profile names for a key is set (as serving needs).

    Raises:
        ConfigError: one line per variable missing (``serve`` would otherwise stop with a traceback).
    """
    from .auth import AdminGate, KeyTable
    from .server import auth_headers

    problems: list[str] = []
    checks: list[Callable[[], object]] = [partial(auth_headers, u, os.environ) for u in config.upstreams]
    checks += [partial(KeyTable.from_config, config.auth), partial(AdminGate.from_config, config.admin)]
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems += exc.errors
    if problems:
        raise ConfigError(problems, source=config.source)


def _check_listen_address(config: Config) -> None:
    """The address can be listened on (a bind, at once undone), so a port in use or a host not of
    this machine is one line and exit 2, not a traceback from inside the server.

    Raises:
        ConfigError: why not.
    """
    host, port = config.server.host.removeprefix("[").removesuffix("]"), config.server.port  # ([::1], as Hypercorn)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as the server binds)
            probe.bind((host, port))
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"$.server: cannot listen on {host}:{port}: {reason}"], source=config.source) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.setup(args.log_level)
    try:
        if args.command == "serve":
            return _serve(args, argv)
        if args.command == "check":
            config = _load(args)
            json.dump(masked(config), sys.stdout, indent=2)
            print(flush=True)  # (the environment's problems, if any, follow on stderr)
            _check_environment(config)
            print(f"profile OK: {config.source}")
            return 0
        if args.command == "mock":
            from . import mockcli

            return mockcli.run_from_args(args)
        if args.command == "tail":
            from . import logview

            return logview.run_tail(args)
        if args.command == "top":
            from . import top

            return top.run_from_args(args)
        if args.command == "bench":
            from .bench import cli as bench_cli

            return bench_cli.run_from_args(args)
        if args.command == "stats":
            from . import logstats

            return logstats.run_stats(args)
    except ConfigError as exc:
        print(f"trioproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2
