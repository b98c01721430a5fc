"""Which upstreams may answer a request, in which order [sans-IO].

``plan_route`` is a pure function of the request's model and API family, the
configured upstreams and an immutable snapshot of their state. The I/O layer
(``upstream.py``) walks the plan; nothing here awaits, reads a clock or keeps state.

Where a ``[[routes]]`` entry matches the model (exact names first, then globs in
order), its targets are the candidates, in the route's order. Otherwise every
upstream that serves the name (by its ``models`` globs, or by its last listing
with ``models = "discover"``) is a candidate, ordered as below.

Order, most preferred first (a route keeps its own order but for rule 1):
1. usable upstreams before unusable ones (down by health check, circuit open or
   cooling down after a 429, or at their concurrency limit);
2. lower ``priority`` first;
3. within a priority, fewest outstanding requests per unit of ``weight``;
4. ties rotated by the caller's counter, each upstream leading in proportion to its
   ``weight``, so equal upstreams share the load.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Mapping, Sequence
from typing import Literal

from attrs import frozen

from .config import Config, ModelRoute, Upstream
from .errors import RoutingError

#: "openai": the /v1/* routes every kind serves; "ollama": the native /api/* routes.
ApiFamily = Literal["openai", "ollama"]


@frozen
class UpstreamState:
    """What routing needs to know about one upstream right now."""

    healthy: bool = True
    #: Its circuit breaker lets a request through (closed, or a half-open trial is free).
    available: bool = True
    in_flight: int = 0
    saturated: bool = False
    #: The model names it last listed (``models = "discover"``), or None.
    discovered: frozenset[str] | None = None

    @property
    def usable(self) -> bool:
        return self.healthy and self.available and not self.saturated


#: The state of an upstream missing from the snapshot: healthy and idle.
_IDLE = UpstreamState()


@frozen
class Target:
    """One attempt: this upstream, asked for this model name."""

    upstream: str
    model: str


@frozen
class RoutePlan:
    #: Attempts in order; ``upstream.py`` tries them until one answers.
    attempts: tuple[Target, ...]
    #: Seconds after which the next attempt is started alongside a slow one (``inf``: only on failure).
    stagger: float


def eligible(upstream: Upstream, family: ApiFamily) -> bool:
    return family == "openai" or upstream.speaks_ollama


def plan_route(
    model: str,
    family: ApiFamily,
    config: Config,
    states: Mapping[str, UpstreamState],
    *,
    rr: int = 0,
) -> RoutePlan:
    """Order the upstreams that can serve ``model`` for this API family.

    Args:
        model: the public model name the client asked for.
        family: which API the request came in on (only Ollama-speaking upstreams serve ``/api/*``).
        config: the profile in force.
        states: health and load per upstream id (missing ids count as healthy and idle).
        rr: a counter the caller increments per request, to rotate ties.

    Returns:
        The plan, at most ``routing.max_attempts`` attempts long.

    Raises:
        RoutingError: no configured upstream serves ``model`` (404 ``model_not_found``).
    """
    served_name = config.routing.aliases.get(model, model)
    default = _IDLE
    route = match_route(served_name, config.routes) if config.routes else None
    if route is not None:
        targets = [
            Target(t.upstream, served_name if t.model == "{model}" else t.model)
            for t in route.targets
            if eligible(config.upstream(t.upstream), family)
        ]
        if not targets:
            raise RoutingError(_not_found_message(model, family, config))
        # Stable: the route's order, usable targets first.
        targets.sort(key=lambda t: not states.get(t.upstream, default).usable)
        attempts = tuple(targets[: config.routing.max_attempts])
    else:
        # (sort key, configured position, upstream): each key computed once; the position
        # keeps the sort stable and never lets it compare two Upstreams.
        keyed: list[tuple[tuple[bool, int, float], int, Upstream]] = []
        for position, u in enumerate(config.upstreams):
            state = states.get(u.id, default)
            if eligible(u, family) and u.serves(served_name, state.discovered):
                keyed.append(((not state.usable, u.priority, state.in_flight / u.weight), position, u))
        if not keyed:
            raise RoutingError(_not_found_message(model, family, config))
        keyed.sort()
        ordered: list[Upstream] = []
        for _, group in itertools.groupby(keyed, key=_first):
            ordered.extend(_rotate_weighted([u for _, _, u in group], rr))
        attempts = tuple(Target(u.id, served_name) for u in ordered[: config.routing.max_attempts])
    hedge = config.routing.hedge_after_ms
    return RoutePlan(attempts=attempts, stagger=hedge / 1000 if hedge > 0 else float("inf"))


def _first(item: tuple[tuple[bool, int, float], int, Upstream]) -> tuple[bool, int, float]:
    return item[0]


def match_route(model: str, routes: Sequence[ModelRoute]) -> ModelRoute | None:
    """The route for a model name: an exact match first, then the first glob that matches."""
    for route in routes:
        if route.model == model:
            return route
    for route in routes:
        if any(c in route.model for c in "*?[") and fnmatch.fnmatchcase(model, route.model):
            return route
    return None


def _rotate_weighted(group: list[Upstream], rr: int) -> list[Upstream]:
    """Rotate a tie group so that, over successive ``rr``, each leads in proportion to its weight."""
    if len(group) < 2:
        return group
    slot = rr % sum(u.weight for u in group)
    for start, u in enumerate(group):
        slot -= u.weight
        if slot < 0:
            return group[start:] + group[:start]
    return group


def plan_any(family: ApiFamily, config: Config, states: Mapping[str, UpstreamState]) -> RoutePlan:
    """A plan for a request that names no model (``/api/version``): any upstream of the family.

    Raises:
        RoutingError: no upstream speaks that API (404).
    """
    default = _IDLE
    ordered = sorted(
        (u for u in config.upstreams if eligible(u, family)),
        key=lambda u: (not states.get(u.id, default).usable, u.priority),
    )
    if not ordered:
        raise RoutingError(f"no upstream here serves the {family} API", code="not_found", param=None)
    attempts = tuple(Target(u.id, "") for u in ordered[: config.routing.max_attempts])
    return RoutePlan(attempts=attempts, stagger=float("inf"))


def _not_found_message(model: str, family: ApiFamily, config: Config) -> str:
    names = public_models(config.upstreams, family, aliases=config.routing.aliases, routes=config.routes)
    listing = ", ".join(names) if names else "none configured by name"
    if family == "ollama":  # Ollama's own words first (tools look for "not found")
        return f"model '{model}' not found (not served here; available: {listing})"
    return f"The model `{model}` does not exist or is not served here. Available: {listing}."


def public_models(
    upstreams: Sequence[Upstream],
    family: ApiFamily,
    *,
    aliases: Mapping[str, str],
    routes: Sequence[ModelRoute] = (),
    discovered: Mapping[str, frozenset[str] | None] | None = None,
) -> list[str]:
    """Exact (non-glob) model names the profile serves for a family: aliases, routes and listings included."""
    names: set[str] = set(aliases)
    names.update(r.model for r in routes if not any(c in r.model for c in "*?["))
    for u in upstreams:
        if eligible(u, family):
            names.update(u.exact_models)
            listed = (discovered or {}).get(u.id)
            if listed:
                names.update(n for n in listed if u.serves(n, listed))
    return sorted(names)
