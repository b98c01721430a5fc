"""Benchmark scenarios: ``loadtest/scenarios/*.toml`` → frozen attrs classes [sans-IO + lookup].

A scenario says what load to offer (``[load]``), how long and how often
(``[run]``), and what to measure it against: the upstream directly, the
gateway (one or more profile variants) and the Hypercorn floor. Structured like
the gateway's profiles: cattrs with unknown keys forbidden, every problem named
by its key path, all problems at once (:class:`~trioproxy.errors.ConfigError`).

Three modes:

- ``ab``: direct and gateway (and the floor, when ``floor = true``) in
  interleaved rounds A B [C], [C] B A, … (the order reversed every other round)
- ``failover``: gateway only, over two mocks; the primary is killed
  ``[failover] kill_at_s`` into each round's measured window.
- ``compare``: two or more gateway variants (``[[gateways]]``) interleaved,
  e.g. the usage log on and off.

A ``[primary]`` table (modes ``ab`` and ``compare``) gives the gateway's primary
upstream (its profile's lowest priority) a mock of its own with a fault (refusing
connections, or a slow first token on a seeded share of requests); every other
upstream and ``direct`` get a second, healthy mock: the fallback. ``direct`` then
measures the fallback, which is what a client of a failed-over gateway would get
at best.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Literal

import cattrs
from attrs import evolve, field, frozen
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.v import transform_error

from ..config import strict_converter
from ..errors import ConfigError

__all__ = [
    "Failover",
    "PrimaryFault",
    "GatewayVariant",
    "Load",
    "Run",
    "Scenario",
    "load_scenario",
    "parse_scenario",
    "resolve_bench_profile",
    "resolve_scenario",
    "scenario_dirs",
    "with_rate",
]

Mode = Literal["ab", "failover", "compare"]
PrimaryFailure = Literal["refuse", "slow"]

#: The load generator keeps every connection open at once; past this it would need more fds than most defaults.
MAX_CONNECTIONS = 4096


@frozen
class Load:
    """What one round offers: ``connections`` clients, each one request at a time.

    Closed loop (``rate = 0``): each sends its next request as soon as its last answer
    is in, so the load is whatever the target can take. Open loop (``rate > 0``): the
    requests are due on a fixed schedule, ``rate`` per second over all connections. A
    request whose connection is still busy when it is due counts its latency from when it
    was due (wrk2's correction), else from when it was sent: a target that falls behind
    shows it in its latency, the load generator's timer does not.
    """

    connections: int
    stream: bool
    #: Content tokens per answer (sent to the mock as ``x-mock-tokens`` too).
    tokens: int = 16
    #: Mock pacing, also sent per request (``x-mock-token-delay-ms``, ``x-mock-ttft-ms``).
    token_delay_ms: float = 0.0
    ttft_ms: float = 0.0
    path: str = "/v1/chat/completions"
    model: str = "mock-llama"
    prompt: str = "Say hello to the benchmark."
    #: Ask for the usage chunk ourselves (``stream_options.include_usage``). Off: the
    #: gateway asks for it and hides it, which is the feature's real cost.
    include_usage: bool = False
    #: Connection i sends its first request ``ramp_s * i / connections`` after the start,
    #: so long streams are spread over time instead of arriving as one herd.
    ramp_s: float = 0.0
    #: Open loop: requests due per second, all connections together (0: closed loop).
    #: Connection i's requests are due at ``(i + k * connections) / rate`` after the start.
    rate: float = 0.0
    #: A request still unanswered after this long is an error of kind ``timeout``.
    request_timeout_s: float = 30.0
    #: Per round and target; 0: bounded by time alone.
    max_requests: int = 0


@frozen
class Run:
    rounds: int = 3
    #: The measured window of each round.
    duration_s: float = 5.0
    #: Load before the window opens (not measured): connections warm, pools full, ramp done.
    warmup_s: float = 1.0


@frozen
class GatewayVariant:
    """One gateway process to measure: a label and the profiles it merges, in order."""

    label: str = "gateway"
    #: Names in ``loadtest/profiles/`` (``bench``) or paths to ``.toml`` files.
    profiles: tuple[str, ...] = ("bench",)
    #: ``serve --workers N``; above 1 the gateway is not pinned (its workers share every core).
    workers: int = 1


@frozen
class Failover:
    #: Seconds into the measured window at which the primary mock is killed (SIGKILL).
    kill_at_s: float = 3.0
    #: After restarting the primary between rounds: time for health checks to see it up.
    recover_s: float = 1.5
    #: Width of the time buckets of the TTFT-over-time series.
    bucket_s: float = 0.25


@frozen
class PrimaryFault:
    """The primary upstream's own mock and its fault (``trioproxy mock --fail ...``)."""

    #: ``refuse``: the port is bound, never listened on (every connect refused at once).
    #: ``slow``: the first token comes after ``slow_ttft_ms``, on the share ``rate`` of requests.
    fail: PrimaryFailure
    #: ``slow`` only: share of requests, drawn from ``random.Random(seed)`` in arrival order
    #: (health-check requests draw too); 0: every request.
    rate: float = 0.0
    seed: int = 0
    slow_ttft_ms: float = 2000.0


@frozen
class Scenario:
    name: str
    load: Load
    description: str = ""
    mode: Mode = "ab"
    run: Run = Run()
    #: Measure the upstream without the gateway (mode ``ab``).
    direct: bool = True
    #: Measure Hypercorn answering by itself with the same settings (``loadtest/floor_app.py``).
    floor: bool = False
    gateways: tuple[GatewayVariant, ...] = (GatewayVariant(),)
    failover: Failover | None = None
    #: Give the primary upstream a mock of its own with this fault (modes ``ab``, ``compare``).
    primary: PrimaryFault | None = None
    #: Where it came from, for messages (not a TOML key).
    source: str = field(default="<scenario>")


def _make_converter() -> cattrs.Converter:
    return strict_converter()  # the profiles' rules: unknown keys and coerced types are errors


_CONVERTER = _make_converter()


def parse_scenario(text: str, *, source: str = "<scenario>") -> Scenario:
    """Structure and check one scenario file's text.

    Raises:
      ConfigError: every problem found, one line each, with its key path.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], source=source) from None
    try:
        scenario = _CONVERTER.structure({**raw, "source": source}, Scenario)
    except ClassValidationError as exc:
        lines = []
        for message in transform_error(exc, path="$"):
            text_, _, path = message.rpartition(" @ ")
            if text_.startswith("extra fields found"):
                text_ = "unknown key(s) " + text_.removeprefix("extra fields found ").strip("()")
            lines.append(f"{path}: {text_}")
        raise ConfigError(lines, source=source) from None
    except ForbiddenExtraKeysError as exc:
        raise ConfigError([f"$: unknown key(s) {sorted(exc.extra_fields)}"], source=source) from None
    problems = validate(scenario)
    if problems:
        raise ConfigError(problems, source=source)
    return scenario


def validate(s: Scenario) -> list[str]:
    """Cross-field checks: positive sizes, finite times, what each mode needs."""
    problems: list[str] = []
    load, run = s.load, s.run
    if not s.name or not all(c.isalnum() or c in "-_." for c in s.name):
        problems.append(f"$.name: expected letters, digits, '-', '_' or '.', got {s.name!r}")
    if not 1 <= load.connections <= MAX_CONNECTIONS:
        problems.append(f"$.load.connections: expected 1..{MAX_CONNECTIONS}, got {load.connections}")
    if load.tokens < 0:
        problems.append("$.load.tokens: expected 0 or more")
    if load.max_requests < 0:
        problems.append("$.load.max_requests: expected 0 (no limit) or more")
    if not load.path.startswith("/"):
        problems.append(f"$.load.path: expected a path starting with '/', got {load.path!r}")
    if load.rate and load.ramp_s:
        problems.append("$.load.ramp_s: not with a rate (the schedule already spreads the connections)")
    for name in ("token_delay_ms", "ttft_ms", "ramp_s", "rate"):
        value = getattr(load, name)
        if not math.isfinite(value) or value < 0:
            problems.append(f"$.load.{name}: expected a finite number >= 0, got {value!r}")
    if not math.isfinite(load.request_timeout_s) or load.request_timeout_s <= 0:
        problems.append("$.load.request_timeout_s: expected a positive number of seconds")
    if run.rounds < 1:
        problems.append("$.run.rounds: expected 1 or more")
    if not math.isfinite(run.duration_s) or run.duration_s <= 0:
        problems.append("$.run.duration_s: expected a positive number of seconds")
    if not math.isfinite(run.warmup_s) or run.warmup_s < 0:
        problems.append("$.run.warmup_s: expected 0 or more seconds")
    labels = [g.label for g in s.gateways]
    if len(set(labels)) != len(labels):
        problems.append(f"$.gateways: labels must differ, got {labels}")
    for i, g in enumerate(s.gateways):
        if g.workers < 1:
            problems.append(f"$.gateways[{i}].workers: expected 1 or more")
        if not g.profiles:
            problems.append(f"$.gateways[{i}].profiles: expected at least one profile")
        if g.label in ("direct", "floor", "floor-stock", "relay-floor"):
            problems.append(f"$.gateways[{i}].label: {g.label!r} is reserved")
    if not s.gateways:
        problems.append("$.gateways: expected at least one gateway")
    if s.mode == "failover":
        if s.failover is None:
            problems.append("$.failover: required by mode 'failover'")
        elif not 0 < s.failover.kill_at_s < run.duration_s:
            problems.append(f"$.failover.kill_at_s: expected within the window (0, {run.duration_s:g}) s")
        if not load.stream:
            problems.append("$.load.stream: mode 'failover' measures streams (TTFT over time)")
    elif s.failover is not None:
        problems.append("$.failover: only for mode 'failover'")
    if s.primary is not None:
        p = s.primary
        if s.mode == "failover":
            problems.append("$.primary: not for mode 'failover' (it kills a healthy primary itself)")
        if not 0.0 <= p.rate <= 1.0:
            problems.append(f"$.primary.rate: expected 0..1, got {p.rate!r}")
        if p.fail == "refuse" and p.rate:
            problems.append("$.primary.rate: a refusing primary refuses every connection; only 'slow' takes a rate")
        if not math.isfinite(p.slow_ttft_ms) or p.slow_ttft_ms < 0:
            problems.append(f"$.primary.slow_ttft_ms: expected a finite number >= 0, got {p.slow_ttft_ms!r}")
    if s.mode == "compare" and len(s.gateways) < 2:
        problems.append("$.gateways: mode 'compare' needs two or more gateway variants")
    return problems


def with_rate(s: Scenario, rate: float) -> Scenario:
    """``s`` run open loop at ``rate`` requests/s (``trioproxy bench --rate``), its ramp dropped.

    Raises:
      ConfigError: ``rate`` is not a positive finite number, or the result is not a valid scenario.
    """
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError([f"--rate: expected a positive number of requests per second, got {rate!r}"],
                          source=s.source)
    changed = evolve(s, load=evolve(s.load, rate=rate, ramp_s=0.0),
                     description=f"{s.description} [--rate: open loop at {rate:g} requests/s]")
    problems = validate(changed)
    if problems:
        raise ConfigError(problems, source=s.source)
    return changed


# --- finding scenarios on disk (thin I/O) ---------------------------------------------

#: The source checkout this package runs from (its loadtest/, and .git when it is a clone).
CHECKOUT = Path(__file__).resolve().parents[2]


def scenario_dirs() -> list[Path]:
    """Where a scenario NAME is looked up: ./loadtest/scenarios, then the source checkout's."""
    dirs = [Path.cwd() / "loadtest" / "scenarios", CHECKOUT / "loadtest" / "scenarios"]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def resolve_scenario(name: str) -> Path:
    """A scenario name (``stream-64``) or a path (``./mine.toml``) → an existing file.

    Raises:
      ConfigError: no such file; the message lists the known names.
    """
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if path.is_file():
            return path
        raise ConfigError([f"no such scenario file: {name}"], source=name)
    for d in scenario_dirs():
        candidate = d / f"{name}.toml"
        if candidate.is_file():
            return candidate
    raise ConfigError([f"no scenario named {name!r}; known: {', '.join(known_scenarios()) or 'none'}"], source=name)


def known_scenarios() -> list[str]:
    """Every scenario name found in :func:`scenario_dirs`, sorted."""
    return sorted({p.stem for d in scenario_dirs() if d.is_dir() for p in d.glob("*.toml")})


def resolve_bench_profile(name: str) -> Path:
    """A gateway profile named by a scenario: ``bench`` → ``loadtest/profiles/bench.toml``, or a path.

    Raises:
      ConfigError: no such file.
    """
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if path.is_file():
            return path.resolve()
        raise ConfigError([f"no such profile file: {name}"], source=name)
    for d in (Path.cwd() / "loadtest" / "profiles", CHECKOUT / "loadtest" / "profiles"):
        candidate = d / f"{name}.toml"
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError([f"no bench profile named {name!r} in loadtest/profiles/"], source=name)


def load_scenario(name: str) -> Scenario:
    """Find and parse a scenario by name or path (see :func:`resolve_scenario`)."""
    path = resolve_scenario(name)
    return parse_scenario(path.read_text(encoding="utf-8"), source=str(path))
