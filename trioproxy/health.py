"""Active health checks: a pure state board and the thin async prober around it.

For ``models = "discover"`` upstreams the same task refreshes the upstream's
model listing on every round.

``HealthBoard.observe`` applies the ``rise``/``fall`` thresholds; time is passed
in, never read inside, so the board is tested without sockets or clocks. The
checker task (one per upstream, owned by the service nursery) probes the kind's
cheapest endpoint (Ollama ``/api/version``, vLLM and llama.cpp ``/health``,
OpenAI-compatible ``/v1/models``) and writes the verdict into the upstream's
runtime, where routing reads it.
"""

from __future__ import annotations

import httpx
import trio
from attrs import define, field, frozen
from loguru import logger

from .upstream import UpstreamRuntime


@frozen
class Transition:
    upstream: str
    healthy: bool
    reason: str


@define
class _Track:
    healthy: bool = True
    #: A probe has answered: ``healthy`` is observed, not assumed.
    checked: bool = False
    streak: int = 0  # consecutive observations that disagree with ``healthy``
    last_change: float = 0.0
    last_reason: str = ""


@define
class HealthBoard:
    """Up/down state per upstream with rise/fall hysteresis [sans-IO]."""

    rise: dict[str, int]
    fall: dict[str, int]
    _tracks: dict[str, _Track] = field(factory=dict)

    def observe(self, upstream: str, *, ok: bool, now: float, reason: str = "") -> Transition | None:
        """Record one probe result; return the transition it caused, if any.

        An upstream starts healthy (so traffic flows before the first probe ends), but
        that is assumed, not seen: the first probe's verdict stands at once (a server
        down at start is down after one probe, not ``fall``). After it, ``fall``
        consecutive failures take it down, ``rise`` consecutive successes bring it back.
        """
        track = self._tracks.setdefault(upstream, _Track(last_change=now))
        if not track.checked:
            track.checked = True
            if not ok:
                track.healthy, track.streak, track.last_change, track.last_reason = False, 0, now, reason
                return Transition(upstream, False, reason)
        if ok == track.healthy:
            track.streak = 0
            return None
        track.streak += 1
        needed = self.rise[upstream] if ok else self.fall[upstream]
        if track.streak < needed:
            return None
        track.healthy, track.streak, track.last_change, track.last_reason = ok, 0, now, reason
        return Transition(upstream, ok, reason)

    def healthy(self, upstream: str) -> bool:
        track = self._tracks.get(upstream)
        return track.healthy if track is not None else True

    def checked(self, upstream: str) -> bool:
        """Whether a probe has answered for it (since it started, or since ``forget``)."""
        track = self._tracks.get(upstream)
        return track is not None and track.checked

    def forget(self, upstream: str) -> None:
        """Its settings changed (a reload), or it was removed: the next probe starts afresh."""
        self._tracks.pop(upstream, None)

    def describe(self, upstream: str) -> dict[str, object]:
        track = self._tracks.get(upstream, _Track())
        return {"healthy": track.healthy, "checked": track.checked, "since": track.last_change, "reason": track.last_reason}


def probe_url(runtime: UpstreamRuntime) -> str:
    return runtime.cfg.base_url.rstrip("/") + runtime.cfg.health_path


def listing_url(runtime: UpstreamRuntime) -> str:
    path = "/api/tags" if runtime.cfg.kind == "ollama" else "/v1/models"
    return runtime.cfg.base_url.rstrip("/") + path


def parse_listing(doc: object) -> frozenset[str]:
    """Model names from an Ollama ``/api/tags`` or OpenAI ``/v1/models`` answer.

    Ollama names carry a tag (``llama3.2:latest``); the bare name is added for
    ``:latest`` so that a request for ``llama3.2`` matches, as Ollama itself does.
    """
    names: set[str] = set()
    if isinstance(doc, dict):
        for entry in doc.get("models") or doc.get("data") or []:
            if isinstance(entry, dict):
                name = entry.get("name") or entry.get("model") or entry.get("id")
                if isinstance(name, str):
                    names.add(name)
                    if name.endswith(":latest"):
                        names.add(name.removesuffix(":latest"))
    return frozenset(names)


async def refresh_models(runtime: UpstreamRuntime, http: httpx.AsyncClient, headers: dict[str, str]) -> None:
    """Update ``runtime.discovered`` from the upstream's own listing; keep the last one on failure."""
    try:
        response = await http.get(listing_url(runtime), headers=headers, timeout=runtime.cfg.health.timeout_ms / 1000)
        if response.status_code == 200:
            names = parse_listing(response.json())
            if names != runtime.discovered:
                logger.info("upstream {} serves {} model(s): {}", runtime.cfg.id, len(names), ", ".join(sorted(names)))
            runtime.discovered = names
    except (httpx.HTTPError, ValueError) as exc:
        logger.debug("model listing of {} failed: {}", runtime.cfg.id, type(exc).__name__)


async def run_checker(runtime: UpstreamRuntime, board: HealthBoard, http: httpx.AsyncClient) -> None:
    """Probe one upstream forever (until cancelled), updating ``runtime.healthy`` (and its models).

    With health checks off (``models = "discover"`` only), it refreshes the models and
    probes nothing: the upstream stays healthy, as configured.
    """
    cfg = runtime.cfg.health
    url = probe_url(runtime)
    headers = {k.decode(): v.decode() for k, v in runtime.auth_headers}
    uid = runtime.cfg.id
    while True:
        if runtime.cfg.discovers:
            await refresh_models(runtime, http, headers)
        if cfg.enabled:
            reason = ""
            try:
                response = await http.get(url, headers=headers, timeout=cfg.timeout_ms / 1000)
                ok = response.status_code < 400
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                ok, reason = False, type(exc).__name__
            transition = board.observe(uid, ok=ok, now=trio.current_time(), reason=reason)
            runtime.healthy = board.healthy(uid)  # (the board's word, whatever the runtime was built with)
            if transition is not None:
                logger.info("upstream {} is {} ({})", uid, "up" if transition.healthy else "down", reason)
            runtime.checked.set()
        await trio.sleep(cfg.interval_ms / 1000)
