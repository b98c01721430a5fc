"""The routes the gateway answers, and the answers it gives itself.

Relayed routes carry what the app needs to know about them (API family, whether
they name a model, whether they stream and how). Local routes are answered here:
``/healthz`` and ``/readyz``, the model listings (``/v1/models``, ``/api/tags``),
which are the union of what the upstreams serve, by public name, ``/metrics``,
``/_/reload`` and the dashboard's files under ``/_/``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

import httpx
import trio
from attrs import frozen

from .config import Upstream
from .errors import Forbidden, MethodNotAllowed, RateLimited, RequestError, RoutingError
from .relay import Send, ndjson_error_line, send_whole, sse_error_event
from .routing import ApiFamily, eligible

#: The Prometheus text exposition format's content type.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

if TYPE_CHECKING:
    from .config import Config
    from .upstream import UpstreamRuntime
    from .app import Exchange
    from .services import Services

#: How long a model listing fetched from an upstream is reused: listings change rarely, clients poll often.
CATALOG_TTL_S = 5.0
#: An upstream that does not list its models this fast is left out of the listing.
CATALOG_FETCH_TIMEOUT_S = 2.0


#: ``GET /v1/models/{model}`` (the OpenAI SDK's ``models.retrieve``): the one route with a parameter.
MODEL_ROUTE = "/v1/models/{model}"
_MODEL_PREFIX = "/v1/models/"


@frozen
class Route:
    path: str
    method: str
    family: ApiFamily
    needs_model: bool = True
    #: The route can stream (``"stream": true``).
    streams: bool = False
    stream_default: bool = False
    scanner: Literal["sse", "ndjson"] | None = None
    #: Answered by the gateway itself (name of the local handler).
    local: str | None = None

    def error_line(self, message: str) -> bytes:
        """The in-band error that ends a stream of this route."""
        return ndjson_error_line(message) if self.scanner == "ndjson" else sse_error_event(message)


ROUTES: dict[str, Route] = {
    r.path: r
    for r in (
        Route("/v1/chat/completions", "POST", "openai", streams=True, scanner="sse"),
        Route("/v1/completions", "POST", "openai", streams=True, scanner="sse"),
        Route("/v1/embeddings", "POST", "openai"),
        Route("/v1/models", "GET", "openai", needs_model=False, local="models"),
        Route(MODEL_ROUTE, "GET", "openai", needs_model=False, local="model"),
        Route("/api/chat", "POST", "ollama", streams=True, stream_default=True, scanner="ndjson"),
        Route("/api/generate", "POST", "ollama", streams=True, stream_default=True, scanner="ndjson"),
        Route("/api/embed", "POST", "ollama"),
        Route("/api/embeddings", "POST", "ollama"),
        Route("/api/show", "POST", "ollama"),
        Route("/api/tags", "GET", "ollama", needs_model=False, local="tags"),
        # Ollama's liveness answer, which tools check before they call it ("Ollama is running").
        Route("/", "GET", "ollama", needs_model=False, local="root"),
        Route("/api/version", "GET", "ollama", needs_model=False),
        Route("/api/ps", "GET", "ollama", needs_model=False),
        Route("/healthz", "GET", "openai", needs_model=False, local="healthz"),
        Route("/readyz", "GET", "openai", needs_model=False, local="readyz"),
        Route("/metrics", "GET", "openai", needs_model=False, local="metrics"),
        Route("/_/reload", "POST", "openai", needs_model=False, local="reload"),
        Route("/_/", "GET", "openai", needs_model=False, local="dashboard"),
        Route("/_/dashboard.js", "GET", "openai", needs_model=False, local="dashboard"),
        Route("/_/dashboard.css", "GET", "openai", needs_model=False, local="dashboard"),
    )
}

#: The dashboard's files (package data), by route path: (file, content type).
DASHBOARD_FILES = {
    "/_/": ("index.html", b"text/html; charset=utf-8"),
    "/_/dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    "/_/dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
}
#: Only the gateway's own files and its own WebSocket and JSON: no inline code, nothing from elsewhere.
DASHBOARD_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_dashboard_cache: dict[str, bytes] = {}


def dashboard_file(path: str) -> bytes:
    """A dashboard file's bytes (read from the package once, then kept: they never change)."""
    body = _dashboard_cache.get(path)
    if body is None:
        name = DASHBOARD_FILES[path][0]
        body = _dashboard_cache[path] = (resources.files("trioproxy") / "dashboard" / name).read_bytes()
    return body


#: Answered without a client key even when auth is on: probes must work without secrets.
OPEN_ROUTES = frozenset({"healthz", "readyz", "metrics", "reload", "dashboard", "root"})
#: Admin endpoints: loopback clients, or the admin key ([admin] in the profile).
ADMIN_ROUTES = frozenset({"metrics", "reload", "dashboard"})


def lookup_route(method: str, path: str) -> Route:
    """The route for a request line.

    Raises:
        RoutingError: unknown path (404, as OpenAI words it).
        RequestError: known path, wrong method (405).
    """
    route = ROUTES.get(path)
    if route is None and path.startswith(_MODEL_PREFIX) and len(path) > len(_MODEL_PREFIX):
        route = ROUTES[MODEL_ROUTE]  # (the name may hold slashes: Qwen/Qwen2.5-0.5B-Instruct)
    if route is None:
        raise RoutingError(f"Invalid URL ({method} {path})", code=None, param=None)
    if route.method != method and not (method == "HEAD" and route.method == "GET"):
        allow = "GET, HEAD" if route.method == "GET" else route.method
        raise MethodNotAllowed(f"Method {method} is not allowed on {path}; use {route.method}", allow=allow)
    return route


def route_label(path: str) -> str:
    """A metrics label for a path that is not a route's own: the model route's template, else "other"."""
    return MODEL_ROUTE if path.startswith(_MODEL_PREFIX) else "other"


async def serve_local(
    route: Route,
    services: Services,
    ex: Exchange,
    send: Send,
    client: str | None = None,
    authorization: bytes | None = None,
) -> None:
    payload: dict[str, Any]
    if route.local in ADMIN_ROUTES and not services.admin.allows(client, authorization):
        raise Forbidden(f"{route.path} is served to loopback clients, or with the admin key")
    if route.local in ("metrics", "dashboard", "root"):
        if route.local == "metrics":
            body = services.metrics.render() if services.metrics is not None else b""
            headers = [(b"content-type", CONTENT_TYPE)]
        elif route.local == "root":
            body, headers = b"Ollama is running", [(b"content-type", b"text/plain; charset=utf-8")]
        else:
            body = dashboard_file(route.path)
            headers = [(b"content-type", DASHBOARD_FILES[route.path][1]), (b"cache-control", b"no-cache"),
                       (b"content-security-policy", DASHBOARD_CSP), (b"x-content-type-options", b"nosniff")]
        headers += [(b"content-length", str(len(body)).encode()), (b"x-request-id", ex.request_id)]
        await send_whole(ex, send, 200, headers, body)
        return
    if route.local == "reload":
        status, payload = await request_reload(services)
    elif route.local == "healthz":
        status, payload = 200, {"status": "ok"}
    elif route.local == "readyz":
        status, payload = readiness(services)
    elif route.local == "models":
        status, payload = 200, {"object": "list", "data": await list_openai_models(services)}
    elif route.local == "model":
        status, payload = 200, await model_entry(services, ex)
    else:
        status, payload = 200, {"models": await list_ollama_models(services)}
    if status >= 400:
        ex.outcome = "rejected"
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", ex.request_id),
    ]
    await send_whole(ex, send, status, headers, body)


async def request_reload(services: Services) -> tuple[int, dict[str, Any]]:
    """Ask the reloader (a service task) to reload the profiles, and wait for its verdict.

    Raises:
        RequestError: the new profile is refused (400 ``invalid_profile``, one line per problem),
            or this gateway has no profile files to reload from (409).
        RateLimited: reloads are already pending.
    """
    from .reload import ReloadRequest

    if services.reload_send is None:
        raise RequestError("this gateway was not started from profile files", code="reload_unavailable", status_hint=409)
    request = ReloadRequest()
    try:
        services.reload_send.send_nowait(request)
    except trio.WouldBlock:
        raise RateLimited("reloads are already pending; retry shortly") from None
    await request.done.wait()
    if request.errors:
        message = "profile reload refused, the running profile stays: " + "; ".join(request.errors)
        raise RequestError(message, code="invalid_profile")
    payload = {"reloaded": True, **(request.result or {})}
    if services.worker_link is not None:  # the other workers reload too; their verdicts by pid
        payload["workers"] = await services.worker_link.fan_out_reload()
    return 200, payload


def readiness(services: Services) -> tuple[int, dict[str, Any]]:
    upstreams = {}
    now = trio.current_time()
    for uid, rt in services.runtimes.items():
        snapshot = rt.state(now)
        breaker = rt.breaker.snapshot(now)
        state = services.board.describe(uid)
        upstreams[uid] = {
            "usable": snapshot.usable,  # routing's view: healthy is assumed until the first probe answers
            "healthy": state["healthy"],
            # its first probe has answered (or it has none): what it says is seen, not assumed
            "checked": rt.checked.is_set() or not rt.cfg.health.enabled,
            "in_flight": rt.in_flight,
            "circuit": breaker.state,
            # seconds since its last up/down change (None before the first probe)
            "state_for_s": round(now - since, 1) if isinstance(since := state["since"], float) and since else None,
            "reason": state["reason"],
        }
    # Ready: an upstream is usable, and known to be (a start with every upstream down is not ready).
    ready = any(u["usable"] and u["checked"] for u in upstreams.values())
    stats = services.sink.statistics()
    telemetry = {"submitted": stats.submitted, "written": stats.written, "dropped": stats.dropped, "lost": stats.lost}
    return (200 if ready else 503), {"ready": ready, "upstreams": upstreams, "telemetry": telemetry}


async def list_openai_models(services: Services) -> list[dict[str, Any]]:
    """``/v1/models`` entries: every public name, owned by the first upstream serving it."""
    owners: dict[str, str] = {}
    config, runtimes = services.config, services.runtimes  # one snapshot across the awaits (reloads)
    listings = await _listings(services, "openai", config, runtimes)
    for u in config.upstreams:
        discovered = runtimes[u.id].discovered
        for name in _names(u, listings.get(u.id, []), discovered):
            owners.setdefault(name, u.id)
    for route in config.routes:
        if not any(c in route.model for c in "*?["):
            owners.setdefault(route.model, route.targets[0].upstream)
    for alias, target in config.routing.aliases.items():
        owners.setdefault(alias, owners.get(target, "trioproxy"))
    return [{"id": n, "object": "model", "created": 0, "owned_by": owners[n]} for n in sorted(owners)]


async def model_entry(services: Services, ex: Exchange) -> dict[str, Any]:
    """``/v1/models/{model}``: the model's entry in ``/v1/models``.

    Raises:
        RoutingError: not in the listing (404 ``model_not_found``, as OpenAI answers).
    """
    name = ex.route.removeprefix(_MODEL_PREFIX)
    ex.model_requested = name
    for entry in await list_openai_models(services):
        if entry["id"] == name:
            return entry
    raise RoutingError(f"The model `{name}` does not exist or is not served here (GET /v1/models lists those that are).")


async def list_ollama_models(services: Services) -> list[dict[str, Any]]:
    """``/api/tags`` entries: what the Ollama upstreams report, limited to the models routed to them."""
    entries: dict[str, dict[str, Any]] = {}
    config, runtimes = services.config, services.runtimes
    listings = await _listings(services, "ollama", config, runtimes)
    for u in config.upstreams:
        for entry in listings.get(u.id, []):
            discovered = runtimes[u.id].discovered
            if isinstance(entry, dict) and isinstance(entry.get("name"), str) and _serves_tag(u, entry["name"], discovered):
                entries.setdefault(entry["name"], entry)
    return [entries[n] for n in sorted(entries)]


def _serves_tag(u: Upstream, name: str, discovered: frozenset[str] | None) -> bool:
    bare = name.removesuffix(":latest")
    return u.serves(name, discovered) or (name.endswith(":latest") and u.serves(bare, discovered))


def _names(u: Upstream, listing: Iterable[Any], discovered: frozenset[str] | None) -> list[str]:
    reported = [n for n in listing if isinstance(n, str) and u.serves(n)]
    return list(u.exact_models) + reported + sorted(discovered or ())


async def _listings(
    services: Services, family: ApiFamily, config: Config, runtimes: dict[str, UpstreamRuntime]
) -> dict[str, list[Any]]:
    """Each eligible upstream's own model listing, fetched concurrently and cached briefly."""
    results: dict[str, list[Any]] = {}
    now = trio.current_time()

    async def fetch(u: Upstream) -> None:
        key = f"{family}:{u.id}"
        cached = services.catalog_cache.get(key)
        if cached is not None and now - cached[0] < CATALOG_TTL_S:
            results[u.id] = cached[1]
            return
        runtime = runtimes[u.id]
        headers = {k.decode(): v.decode() for k, v in runtime.auth_headers}
        base = runtime.cfg.base_url.rstrip("/")
        ollama = family == "ollama" or u.kind == "ollama"
        try:
            response = await services.http.get(
                base + ("/api/tags" if ollama else "/v1/models"), headers=headers, timeout=CATALOG_FETCH_TIMEOUT_S
            )
            doc = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return
        if family == "ollama":
            listing = list(doc.get("models") or [])
        elif ollama:
            listing = [m.get("name") for m in doc.get("models") or [] if isinstance(m, dict)]
            listing += [n.removesuffix(":latest") for n in listing if isinstance(n, str)]
        else:
            listing = [m.get("id") for m in doc.get("data") or [] if isinstance(m, dict)]
        services.catalog_cache[key] = (now, listing)
        results[u.id] = listing

    async with trio.open_nursery() as fetches:
        for u in config.upstreams:
            globs = not u.discovers and any(c in m for m in u.models for c in "*?[")
            if eligible(u, family) and (family == "ollama" or globs):
                fetches.start_soon(fetch, u)
    return results
