"""Cross-field checks of a profile: what types alone cannot say [sans-IO].

``config.load_config`` structures the TOML into the schema (types, unknown keys);
these rules then look across fields (unique ids, URLs, ranges, routes naming
known upstreams). Each problem is one line that starts with its key path.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs

from .config import Config, Timeouts


def validate(config: Config) -> list[str]:
    """Cross-field checks that types alone cannot express."""
    problems: list[str] = []
    seen: set[str] = set()
    if config.server.port < 0 or config.server.port > 65535:
        problems.append(f"$.server.port: expected 0..65535, got {config.server.port}")
    if config.server.max_body_bytes <= 0:
        problems.append("$.server.max_body_bytes: expected a positive number of bytes")
    if config.server.workers < 1:
        problems.append("$.server.workers: expected 1 or more")
    if not config.upstreams:
        problems.append("$.upstreams: expected at least one upstream")
    for i, u in enumerate(config.upstreams):
        where = f"$.upstreams[{i}]"
        if not u.id or not all(c.isalnum() or c in "-_." for c in u.id):
            problems.append(f"{where}.id: expected letters, digits, '-', '_' or '.', got {u.id!r}")
        if u.id in seen:
            problems.append(f"{where}.id: duplicate upstream id {u.id!r}")
        seen.add(u.id)
        if u.mock is None:
            problems.extend(f"{where}.base_url: {p}" for p in check_base_url(u.base_url))
        elif u.base_url:
            problems.append(f"{where}.base_url: must be empty for an embedded mock (its address is chosen at start)")
        if not u.models:
            problems.append(f"{where}.models: expected at least one model name or glob, or \"discover\"")
        if u.max_queue < 0 or u.queue_timeout_ms < 0:
            problems.append(f"{where}: max_queue and queue_timeout_ms must be 0 or more")
        if u.weight < 1:
            problems.append(f"{where}.weight: expected 1 or more, got {u.weight}")
        if u.max_concurrent < 0:
            problems.append(f"{where}.max_concurrent: expected 0 (no limit) or more")
        if u.api_key_env is not None and not u.api_key_env.replace("_", "").isalnum():
            problems.append(f"{where}.api_key_env: expected an environment variable name, got {u.api_key_env!r}")
        for name in attrs.fields_dict(Timeouts):
            if getattr(u.timeouts, name) <= 0:
                problems.append(f"{where}.timeouts.{name}: expected a positive number of milliseconds")
        if u.health.path is not None and not u.health.path.startswith("/"):
            problems.append(f"{where}.health.path: expected a path starting with '/'")
        if u.health.rise < 1 or u.health.fall < 1:
            problems.append(f"{where}.health: rise and fall must be 1 or more")
        if not (u.health.interval_ms >= 10 and u.health.timeout_ms > 0):  # (NaN too; 0 spun a core)
            problems.append(f"{where}.health: interval_ms must be 10 or more and timeout_ms positive")
        if u.pool_max_idle < 0:
            problems.append(f"{where}.pool_max_idle: expected 0 (no idle connections kept) or more")
    r = config.routing
    if r.max_attempts < 1:
        problems.append("$.routing.max_attempts: expected 1 or more")
    if r.max_hedges < 0 or r.retries_per_target < 0:
        problems.append("$.routing: max_hedges and retries_per_target must be 0 or more")
    if not 0 <= r.hedge_budget_percent <= 100:
        problems.append("$.routing.hedge_budget_percent: expected 0..100")
    if r.total_timeout_ms <= 0 or r.breaker_failures < 1 or r.breaker_cooldown_ms <= 0:
        problems.append("$.routing: total_timeout_ms, breaker_failures and breaker_cooldown_ms must be positive")
    for i, route in enumerate(config.routes):
        if not route.targets:
            problems.append(f"$.routes[{i}].targets: expected at least one target")
        for j, target in enumerate(route.targets):
            if target.upstream not in seen:
                known = ", ".join(sorted(seen))
                problems.append(f"$.routes[{i}].targets[{j}].upstream: no upstream {target.upstream!r} (known: {known})")
    if config.routing.hedge_after_ms < 0:
        problems.append("$.routing.hedge_after_ms: expected 0 (off) or more")
    for status in config.routing.failover_statuses:
        if not 400 <= status <= 599:
            problems.append(f"$.routing.failover_statuses: {status} is not an HTTP error status")
    key_ids: set[str] = set()
    for i, key in enumerate(config.auth.keys):
        where = f"$.auth.keys[{i}]"
        if key.id in key_ids:
            problems.append(f"{where}.id: duplicate key id {key.id!r}")
        key_ids.add(key.id)
        if (key.key_env is None) == (key.key_sha256 is None):
            problems.append(f"{where}: expected exactly one of key_env or key_sha256")
        digest = key.key_sha256
        if digest is not None and (len(digest) != 64 or not all(c in "0123456789abcdefABCDEF" for c in digest)):
            problems.append(f"{where}.key_sha256: expected 64 hex digits (the SHA-256 of the key)")
        if key.requests_per_minute < 0 or key.max_concurrent < 0:
            problems.append(f"{where}: requests_per_minute and max_concurrent must be 0 (no limit) or more")
    admin = config.admin
    if admin.key_env is not None and admin.key_sha256 is not None:
        problems.append("$.admin: expected at most one of key_env or key_sha256")
    digest = admin.key_sha256
    if digest is not None and (len(digest) != 64 or not all(c in "0123456789abcdefABCDEF" for c in digest)):
        problems.append("$.admin.key_sha256: expected 64 hex digits (the SHA-256 of the key)")
    server = config.server
    if server.max_concurrent_requests < 1 or server.client_write_timeout_s <= 0 or server.max_header_bytes < 1024:
        problems.append(
            "$.server: max_concurrent_requests >= 1, client_write_timeout_s > 0 and max_header_bytes >= 1024 expected"
        )
    if not server.shutdown_grace_s >= 0 or server.backlog < 1 or server.max_response_bytes < 1:  # (NaN too)
        problems.append("$.server: shutdown_grace_s >= 0, backlog >= 1 and max_response_bytes >= 1 expected")
    if server.disconnect_watch_after_ms < 0:
        problems.append("$.server.disconnect_watch_after_ms: expected 0 (watch at once) or more")
    if not server.keep_alive_timeout_s >= 0:  # (NaN too; inf: idle connections are kept until shutdown)
        problems.append("$.server.keep_alive_timeout_s: expected 0 or more seconds (inf: no limit)")
    t = config.telemetry
    if t.queue_capacity < 1 or t.batch_max < 1 or t.flush_ms < 1:
        problems.append("$.telemetry: queue_capacity, batch_max and flush_ms must be 1 or more")
    if t.rotate_bytes < 0:
        problems.append("$.telemetry.rotate_bytes: expected 0 (off) or more")
    return problems


def check_base_url(url: str) -> list[str]:
    if not url:
        return ["required: an http:// or https:// URL"]
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return [f"not a valid URL ({exc}): {url!r}"]
    problems = []
    if parts.scheme not in ("http", "https"):
        problems.append(f"expected an http:// or https:// URL, got {url!r}")
    if not parts.hostname:
        problems.append(f"expected a host in {url!r}")
    if parts.username or parts.password:
        problems.append("credentials do not belong in base_url: use api_key_env")
    if parts.query or parts.fragment:
        problems.append(f"expected no query or fragment in {url!r}")
    if parts.path.rstrip("/").endswith("/v1"):
        problems.append(
            f"drop the trailing /v1 from {url!r}: requests keep their own /v1/... path "
            "(the base URL is what comes before it)"
        )
    del port
    return problems
