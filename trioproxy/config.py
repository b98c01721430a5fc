"""Configuration profiles: TOML → attrs classes, validated in one pass [sans-IO].

A profile is a TOML file in ``configs/`` (``--profile NAME``) or anywhere
(``--config PATH``). Several profiles merge in order, later tables overriding
earlier keys; ``[[upstreams]]`` merge by ``id``. Every problem is reported at
once, one line each, naming the file, the key path and what was expected.

Secrets never live in a profile: an upstream names the environment variable
that holds its key (``api_key_env``) and the key is read at start-up.
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import cattrs
from attrs import field, frozen
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.v import format_exception, transform_error

from .errors import ConfigError

UpstreamKind = Literal["ollama", "vllm", "openai", "llamacpp"]
MockKind = Literal["openai", "vllm", "ollama", "both"]

#: Default health-check path per upstream kind: the cheapest probe each server offers.
DEFAULT_HEALTH_PATH: dict[str, str] = {
    "ollama": "/api/version",
    "vllm": "/health",
    "llamacpp": "/health",
    "openai": "/v1/models",
}


@frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Bodies above this are answered 413 without being read further.
    max_body_bytes: int = 8 * 1024 * 1024
    #: Non-streamed answers above this are refused (502); streams past it are cut with an error event.
    max_response_bytes: int = 64 * 1024 * 1024
    #: Requests being served at once, over every route; beyond it, 429 at once.
    max_concurrent_requests: int = 4096
    #: A client that does not take a chunk for this long is cut off (its upstream released).
    client_write_timeout_s: float = 30.0
    #: A request body must arrive whole within this (else 408): a client stalled mid-body is let go.
    body_timeout_s: float = 30.0
    #: A client that hangs up is looked for once its request has run this long after its body
    #: (then at once). Served with trioproxy's Hypercorn I/O the watch is a callback
    #: (``hypercorn_app.DisconnectNotice``) and costs next to nothing; otherwise a watcher task
    #: per request cost ~5-9 % of a short request's CPU. A generation cut 1 s late costs the
    #: upstream 1 s. An answer complete sooner is recorded ``ok`` even if its client had left
    #: (it is not looked for). 0: from the moment the body is read.
    disconnect_watch_after_ms: int = 1_000
    #: Largest request head (request line and headers): a larger one gets 431 (from Hypercorn
    #: while it is incomplete, else from the gateway, in the API's error format).
    max_header_bytes: int = 16 * 1024
    #: How long in-flight requests may run on after SIGINT/SIGTERM.
    shutdown_grace_s: float = 10.0
    #: Hypercorn's keep-alive idle timeout for client connections.
    keep_alive_timeout_s: float = 75.0
    backlog: int = 1024
    #: Hypercorn access log (off: the usage log is the access log).
    access_log: bool = False
    workers: int = 1
    #: Keep a well-formed ``X-Request-Id`` the client sends (a proxy in front, e.g. nginx's
    #: ``$request_id``) instead of making one: one id across the proxy's log, ours and the upstream's.
    trust_request_id: bool = False
    #: Relay a stream's steady pieces from one hub task (``relayhub``) instead of a task wake-up
    #: per piece: about a quarter less CPU per stream at 512 streams (docs/benchmarks.md).
    relay_hub: bool = True


@frozen
class Timeouts:
    connect_ms: int = 2_000
    #: From request sent to the response head (and, streamed, the first body byte).
    first_byte_ms: int = 60_000
    #: Longest silence allowed between two body reads once the response started.
    idle_ms: int = 60_000


@frozen
class HealthCheck:
    enabled: bool = True
    #: ``None``: the kind's default (``DEFAULT_HEALTH_PATH``).
    path: str | None = None
    interval_ms: int = 5_000
    timeout_ms: int = 2_000
    rise: int = 1
    fall: int = 2


@frozen
class MockConfig:
    """An upstream the gateway starts itself, in its own nursery (the demo profile)."""

    kind: MockKind = "both"
    models: tuple[str, ...] = ("mock-llama",)
    tokens: int = 16
    token_delay_ms: float = 20.0
    ttft_ms: float = 50.0


@frozen
class Upstream:
    id: str
    kind: UpstreamKind = "openai"
    #: Empty only when ``mock`` is set: the embedded mock's address is filled in at start.
    base_url: str = ""
    #: Exact names or globs (``llama3*``); ``["*"]`` serves any model; ``"discover"``: what the
    #: upstream itself lists (``/api/tags`` or ``/v1/models``), refreshed by the health checker.
    models: tuple[str, ...] | Literal["discover"] = ("*",)
    #: Lower is tried first.
    priority: int = 0
    weight: int = 1
    #: Requests in flight to it at once (0: no limit). Over it, the next candidate is tried.
    max_concurrent: int = 0
    #: When every candidate is at its limit, this many may wait for a slot, for at most queue_timeout_ms.
    max_queue: int = 0
    queue_timeout_ms: int = 1_000
    #: Name of the environment variable holding the upstream's API key.
    api_key_env: str | None = None
    #: Idle keep-alive connections kept per upstream.
    pool_max_idle: int = 256
    timeouts: Timeouts = Timeouts()
    health: HealthCheck = HealthCheck()
    mock: MockConfig | None = None

    @property
    def discovers(self) -> bool:
        return self.models == "discover"

    def serves(self, model: str, discovered: frozenset[str] | None = None) -> bool:
        """Whether this upstream serves ``model`` (for ``"discover"``: per its last listing)."""
        if self.models == "discover":
            return discovered is not None and model in discovered
        if "*" in self.models or model in self.models:  # the common cases, without a glob match per request
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    @property
    def exact_models(self) -> tuple[str, ...]:
        if self.models == "discover":
            return ()
        return tuple(m for m in self.models if not any(c in m for c in "*?["))

    @property
    def health_path(self) -> str:
        return self.health.path or DEFAULT_HEALTH_PATH[self.kind]

    @property
    def speaks_ollama(self) -> bool:
        """True when the native ``/api/*`` routes can be relayed to it."""
        return self.kind == "ollama" or (self.mock is not None and self.mock.kind in ("ollama", "both"))


@frozen
class RouteTarget:
    upstream: str
    #: The model name asked of that upstream; ``"{model}"`` keeps the requested name.
    model: str = "{model}"


@frozen
class ModelRoute:
    """A public model name (exact or glob) and the targets that serve it, in order."""

    model: str
    targets: tuple[RouteTarget, ...]


@frozen
class Routing:
    #: 0: no hedging; otherwise start the next candidate when the running one has not
    #: produced its first content this long after it started.
    hedge_after_ms: int = 0
    #: Extra attempts a hedge may run alongside the first.
    max_hedges: int = 1
    #: Hedges add at most this share of extra upstream requests (sliding 10 s window).
    hedge_budget_percent: float = 10.0
    #: Attempts per request, retries and hedges included.
    max_attempts: int = 3
    #: Retries of a retryable failure on the same target before moving on.
    retries_per_target: int = 0
    retry_backoff_ms: int = 100
    retry_backoff_max_ms: int = 2_000
    #: A Retry-After up to this is waited out (with retries on); a longer one moves on.
    max_retry_after_s: float = 2.0
    #: The whole request, every attempt included.
    total_timeout_ms: int = 600_000
    #: Statuses that are retried / failed over (when no byte reached the client).
    failover_statuses: tuple[int, ...] = (408, 429, 500, 502, 503, 504)
    #: Consecutive failed requests that open an upstream's circuit.
    breaker_failures: int = 5
    breaker_cooldown_ms: int = 1_000
    breaker_max_cooldown_ms: int = 60_000
    #: Public model name → the name sent upstream (shorthand for a one-target route per upstream).
    aliases: dict[str, str] = field(factory=dict)


@frozen
class Telemetry:
    enabled: bool = True
    #: Directory of the usage log (``usage-YYYYMMDD[-PID][.N].jsonl``).
    dir: str = "logs"
    #: Records waiting for the writer; beyond it a record is dropped and counted.
    queue_capacity: int = 16_384
    batch_max: int = 1_024
    flush_ms: int = 200
    #: Rotate when a file grows past this (0: never by size).
    rotate_bytes: int = 256 * 1024 * 1024
    rotate_daily: bool = True
    #: Ask streamed OpenAI-style requests for usage and hide the extra event from the client.
    request_usage: bool = True
    #: Opt-in: put prompts and completions in the usage log.
    log_payloads: bool = False


@frozen
class AuthKey:
    """One client key. The key itself is never in a profile: its environment variable, or its SHA-256."""

    id: str
    key_env: str | None = None
    #: Hex SHA-256 of the key (``printf %s "$KEY" | sha256sum``).
    key_sha256: str | None = None
    #: 0: no limit.
    requests_per_minute: int = 0
    max_concurrent: int = 0


@frozen
class Auth:
    """Client authentication: with no keys, the gateway is open (a local service)."""

    keys: tuple[AuthKey, ...] = ()


@frozen
class Admin:
    """Who may use the admin endpoints (/metrics, /_/reload, /_/live) from other hosts."""

    #: Environment variable holding the admin key, or the key's SHA-256; neither: loopback only.
    key_env: str | None = None
    key_sha256: str | None = None


@frozen
class Config:
    upstreams: tuple[Upstream, ...]
    server: ServerConfig = ServerConfig()
    #: Explicit model routes, matched in order (exact names before globs).
    routes: tuple[ModelRoute, ...] = ()
    routing: Routing = Routing()
    telemetry: Telemetry = Telemetry()
    auth: Auth = Auth()
    admin: Admin = Admin()
    #: Where it came from, for messages (not a TOML key).
    source: str = "<config>"

    def upstream(self, upstream_id: str) -> Upstream:
        for u in self.upstreams:
            if u.id == upstream_id:
                return u
        raise KeyError(upstream_id)


def strict_converter() -> cattrs.Converter:
    """A cattrs converter for TOML that forbids unknown keys and never coerces a type.

    tomllib gives ints where a float is fine (taken); bools are ints in Python but not
    in a profile (refused). Also used for the benchmark's scenario files.
    """
    converter = cattrs.Converter(forbid_extra_keys=True)

    def structure_float(value: Any, _: type) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)

    def structure_int(value: Any, _: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    def structure_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value

    def structure_bool(value: Any, _: type) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value

    converter.register_structure_hook(float, structure_float)
    converter.register_structure_hook(int, structure_int)
    converter.register_structure_hook(str, structure_str)
    converter.register_structure_hook(bool, structure_bool)
    return converter


def _make_converter() -> cattrs.Converter:
    converter = strict_converter()

    def structure_models(value: Any, _: type) -> tuple[str, ...] | str:
        if value == "discover":
            return "discover"
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f'expected a list of model names or globs, or "discover", got {value!r}')

    converter.register_structure_hook(tuple[str, ...] | Literal["discover"], structure_models)
    return converter


_CONVERTER = _make_converter()


def merge_tables(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge two parsed profiles: tables recursively, ``upstreams`` by ``id``, the rest replaced."""
    merged = dict(base)
    for key, value in override.items():
        if key == "upstreams" and isinstance(value, list) and isinstance(base.get(key), list):
            by_id = {u.get("id"): dict(u) for u in base[key] if isinstance(u, dict)}
            order = list(by_id)
            for u in value:
                uid = u.get("id") if isinstance(u, dict) else None
                if uid in by_id and isinstance(u, dict):
                    by_id[uid] = merge_tables(by_id[uid], u)
                else:
                    order.append(uid)
                    by_id[uid] = u
            merged[key] = [by_id[uid] for uid in order]
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge_tables(base[key], value)
        else:
            merged[key] = value
    return merged


def parse_toml(text: str, *, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], source=source) from None


def load_config(text: str | dict[str, Any], *, source: str = "<config>") -> Config:
    """Structure and validate one profile (TOML text or an already merged table).

    Raises:
        ConfigError: with every problem found, one line each (``$.upstreams[0].port: ...``).
    """
    raw = parse_toml(text, source=source) if isinstance(text, str) else text
    if "upstreams" not in raw:
        raise ConfigError(["$.upstreams: required: at least one [[upstreams]] table"], source=source)
    try:
        config = _CONVERTER.structure({**raw, "source": source}, Config)
    except ClassValidationError as exc:
        raise ConfigError(_describe(exc), source=source) from None
    except ForbiddenExtraKeysError as exc:  # raised bare at the top level
        raise ConfigError([f"$: unknown key(s) {sorted(exc.extra_fields)}"], source=source) from None
    from .checks import validate  # the cross-field rules live beside, not inside, the schema

    problems = validate(config)
    if problems:
        raise ConfigError(problems, source=source)
    return config


def _format_exception(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, ValueError) and type_ is not None and typing.get_origin(type_) is Literal:
        choices = ", ".join(repr(c) for c in typing.get_args(type_))
        got = str(exc).split(" not in literal ")[0]
        return f"expected one of {choices}, got {got!r}"
    if type(exc) is ValueError and str(exc).startswith("expected"):
        return str(exc)  # our own hooks' words already say what was expected and what came
    return format_exception(exc, type_)


def _describe(exc: ClassValidationError) -> list[str]:
    lines = []
    for message in transform_error(exc, path="$", format_exception=_format_exception):
        # "extra fields found (x) @ $.server" → "$.server: unknown key(s) x"
        text, _, path = message.rpartition(" @ ")
        if text.startswith("extra fields found"):
            text = "unknown key(s) " + text.removeprefix("extra fields found ").strip("()")
        elif text.startswith("required field missing"):
            text = "required key missing"
        lines.append(f"{path}: {text}")
    return lines


# --- finding profiles on disk (thin I/O) -------------------------------------------------

_PACKAGE_DIR = Path(__file__).resolve().parent


def profile_dirs() -> list[Path]:
    """Where ``--profile NAME`` looks, in order: ./configs, the source checkout, the wheel."""
    dirs = [Path.cwd() / "configs", _PACKAGE_DIR.parent / "configs", _PACKAGE_DIR / "configs"]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def resolve_profile(name: str) -> Path:
    """A profile name (``demo``) or a path (``./my.toml``) → an existing file."""
    if name.endswith(".toml") or os.sep in name:
        path = Path(name)
        if path.is_file():
            return path
        raise ConfigError([f"no such profile file: {name}"], source=name)
    for d in profile_dirs():
        candidate = d / f"{name}.toml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.toml")})
    raise ConfigError([f"no profile named {name!r}; known profiles: {', '.join(known) or 'none'}"], source=name)


def load_profiles(names: list[str]) -> Config:
    """Read, merge in order and validate one or more profiles."""
    return load_profile_texts(read_profiles(names))


def read_profiles(names: list[str]) -> list[tuple[str, str]]:
    """Each profile's path and text, in order (what ``load_profile_texts`` takes)."""
    paths = [resolve_profile(name) for name in names]
    return [(str(path), _read_text(path)) for path in paths]


def _read_text(path: Path) -> str:
    """A profile's text (UTF-8, as TOML is). Raises ConfigError, never a decoding traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 (TOML files are): byte {exc.start} cannot be decoded"], source=str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], source=str(path)) from None


def load_profile_texts(profiles: list[tuple[str, str]]) -> Config:
    """Merge in order and validate profiles already read: (path, TOML text) pairs."""
    merged: dict[str, Any] = {}
    for source, text in profiles:
        merged = merge_tables(merged, parse_toml(text, source=source))
    return load_config(merged, source=" + ".join(source for source, _ in profiles))


def masked(config: Config) -> dict[str, Any]:
    """The resolved profile as plain data, secrets masked (for ``trioproxy check``)."""
    data: dict[str, Any] = _CONVERTER.unstructure(config)
    for u in data["upstreams"]:
        env = u.get("api_key_env")
        if env:
            u["api_key"] = "***set***" if os.environ.get(env) else "***missing***"
    return data
