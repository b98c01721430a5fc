"""Which upstreams may answer a request, in which order [sans-IO].

``plan_route`` is a pure function of the request's model and API family, the
configured upstreams and an immutable snapshot of their state. The I/O layer
(``upstream.py``) walks the plan; nothing here awaits, reads a clock or keeps state.

Order, most preferred first:
1. usable upstreams before unusable ones (down, or at their concurrency limit);
2. lower ``priority`` first;
3. within a priority, fewest outstanding requests per unit of ``weight``;
4. ties rotated by the caller's counter, each upstream leading in proportion to its
   ``weight``, so equal upstreams share the load.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Literal

from attrs import frozen

from .config import Config, Upstream
from .errors import RoutingError

#: "openai": the /v1/* routes every kind serves; "ollama": the native /api/* routes.
ApiFamily = Literal["openai", "ollama"]


@frozen
class UpstreamState:
    """What routing needs to know about one upstream right now."""

    healthy: bool = True
    in_flight: int = 0


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
    candidates = [u for u in config.upstreams if eligible(u, family) and u.serves(served_name)]
    if not candidates:
        raise RoutingError(_not_found_message(model, family, config))
    default = UpstreamState()

    def key(u: Upstream) -> tuple[bool, int, float]:
        state = states.get(u.id, default)
        saturated = u.max_concurrent > 0 and state.in_flight >= u.max_concurrent
        return (not state.healthy or saturated, u.priority, state.in_flight / u.weight)

    ordered: list[Upstream] = []
    for _, group in itertools.groupby(sorted(candidates, key=key), key=key):
        ordered.extend(_rotate_weighted(list(group), rr))
    attempts = tuple(Target(u.id, served_name) for u in ordered[: config.routing.max_attempts])
    hedge = config.routing.hedge_after_ms
    return RoutePlan(attempts=attempts, stagger=hedge / 1000 if hedge > 0 else float("inf"))


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
    default = UpstreamState()
    ordered = sorted(
        (u for u in config.upstreams if eligible(u, family)),
        key=lambda u: (not states.get(u.id, default).healthy, u.priority),
    )
    if not ordered:
        raise RoutingError(f"no upstream here serves the {family} API", code="not_found", param=None)
    attempts = tuple(Target(u.id, "") for u in ordered[: config.routing.max_attempts])
    return RoutePlan(attempts=attempts, stagger=float("inf"))


def _not_found_message(model: str, family: ApiFamily, config: Config) -> str:
    names = public_models(config.upstreams, family, aliases=config.routing.aliases)
    listing = ", ".join(names) if names else "none configured by name"
    return f"The model `{model}` does not exist or is not served here. Available: {listing}."


def public_models(upstreams: Sequence[Upstream], family: ApiFamily, *, aliases: Mapping[str, str]) -> list[str]:
    """Exact (non-glob) model names the profile serves for a family, aliases included."""
    names: set[str] = set(aliases)
    for u in upstreams:
        if eligible(u, family):
            names.update(m for m in u.models if not any(c in m for c in "*?["))
    return sorted(names)
