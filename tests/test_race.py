"""The attempt race in virtual time: hedging, failover, retries, classification, breakers, limits.

The pool is faked at its own interface (``open_response`` → a response whose
head and body pieces arrive after scripted virtual delays), as STYLE.md §7 says;
times are asserted exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import attrs
import pytest
import trio
import trio.testing
from attrs import define, field, frozen

from trioproxy.breaker import HedgeBudget
from trioproxy.config import Routing, Upstream, load_config
from trioproxy.errors import (
    AllSaturated,
    NoHealthyUpstream,
    RoutingError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from trioproxy.routing import RoutePlan, Target
from trioproxy.telemetry import AttemptRecord
from trioproxy.upstream import OutgoingRequest, RaceResult, UpstreamRuntime, Winner, open_winning_response
from trioproxy.usage import SSEScanner


def sse(content: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}\n\n' % content.encode()


ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
DONE = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'


@frozen
class Script:
    """One scripted answer: the head after ``head_s``, then each (delay, bytes) piece."""

    head_s: float = 0.0
    status: int = 200
    pieces: tuple[tuple[float, bytes], ...] = ((0.0, ROLE), (0.0, sse("hi")), (0.0, DONE))
    headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"text/event-stream"),)
    error: UpstreamError | None = None  # raised instead of the head
    content_length: bool = False


@define
class FakeResponse:
    script: Script
    log: list[str]
    name: str
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(factory=list)
    content_length: int | None = None
    _next: int = 0
    _released: bool = False

    def __attrs_post_init__(self) -> None:
        self.status = self.script.status
        self.headers = list(self.script.headers)
        if self.script.content_length:
            self.content_length = sum(len(p) for _, p in self.script.pieces)

    @property
    def complete(self) -> bool:
        return self._next >= len(self.script.pieces)

    async def receive_some(self) -> bytes:
        if self.complete:
            await trio.lowlevel.checkpoint()
            return b""
        delay, data = self.script.pieces[self._next]
        await trio.sleep(delay)
        self._next += 1
        return data

    async def read_all(self, *, max_bytes: int) -> bytes:
        parts = []
        while data := await self.receive_some():
            parts.append(data)
        return b"".join(parts)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.log.append(f"{self.name} {'done' if self.complete else 'closed early'} at {trio.current_time():g}")


@define
class FakePool:
    """Answers attempt i with scripts[i] (the last one repeats)."""

    name: str
    scripts: Sequence[Script]
    log: list[str]
    opened: list[float] = field(factory=list)

    async def open_response(self, *args: object, first_byte_timeout: float, idle_timeout: float) -> FakeResponse:
        script = self.scripts[min(len(self.opened), len(self.scripts) - 1)]
        self.opened.append(trio.current_time())
        self.log.append(f"{self.name} opened at {trio.current_time():g}")
        try:
            await trio.sleep(script.head_s)
        except trio.Cancelled:
            self.log.append(f"{self.name} cancelled at {trio.current_time():g}")
            raise
        if script.error is not None:
            raise script.error
        return FakeResponse(script, self.log, self.name)


def routing(**overrides: object) -> Routing:
    return attrs.evolve(Routing(), **overrides)  # type: ignore[arg-type]


@define
class Rig:
    routing: Routing
    pools: dict[str, FakePool]
    runtimes: dict[str, UpstreamRuntime]
    log: list[str]
    budget: HedgeBudget

    async def race(
        self, *names: str, stagger: float = float("inf"), stream: bool = True, models: Sequence[str] = ()
    ) -> tuple[Winner, list[AttemptRecord], bool]:
        plan = RoutePlan(
            attempts=tuple(Target(n, models[i] if models else "m") for i, n in enumerate(names)), stagger=stagger
        )
        request = OutgoingRequest(
            method=b"POST",
            target=b"/v1/chat/completions",
            headers=[],
            body_for=lambda t: b"{}",
            stream=stream,
            new_scanner=SSEScanner,
            max_response_bytes=1 << 20,
        )
        attempts: list[AttemptRecord] = []
        result = RaceResult()
        winner = await open_winning_response(
            self.runtimes, plan, request, routing=self.routing, budget=self.budget, attempts=attempts,
            rng=random.Random(0), result=result,
        )
        winner.release()
        return winner, attempts, result.hedged


def rig(scripts: dict[str, Sequence[Script]], *, max_concurrent: int = 0, **routing_overrides: object) -> Rig:
    log: list[str] = []
    r = routing(**routing_overrides)
    pools = {name: FakePool(name, s, log) for name, s in scripts.items()}
    runtimes = {
        name: UpstreamRuntime.create(
            Upstream(id=name, base_url="http://127.0.0.1:1", max_concurrent=max_concurrent),
            pool,  # type: ignore[arg-type]
            [],
            r,
        )
        for name, pool in pools.items()
    }
    return Rig(r, pools, runtimes, log, HedgeBudget(percent=r.hedge_budget_percent))


def outcomes(attempts: list[AttemptRecord]) -> list[tuple[str, str, int | None]]:
    return [(a.upstream, a.outcome, a.status) for a in attempts]


async def test_hedge_starts_after_stagger_and_the_fast_one_wins(autojump_clock: trio.testing.MockClock) -> None:
    r = rig({"slow": [Script(head_s=30)], "fast": [Script(head_s=0.1)]}, max_attempts=3)
    winner, attempts, hedged = await r.race("slow", "fast", stagger=0.5)
    assert winner.target.upstream == "fast" and hedged
    assert trio.current_time() == pytest.approx(0.6)
    assert r.log[:3] == ["slow opened at 0", "fast opened at 0.5", "slow cancelled at 0.6"]
    assert outcomes(attempts) == [("slow", "lost_race", None), ("fast", "ok", 200)]  # in start order


async def test_attempts_are_recorded_in_start_order_whatever_ends_first(autojump_clock: trio.testing.MockClock) -> None:
    """The hedge fails at once (at 0.6), before the first attempt answers (at 2): still listed second."""
    refused = Script(head_s=0.1, error=UpstreamConnectError("refused", upstream="b"))
    r = rig({"a": [Script(head_s=2)], "b": [refused]}, max_attempts=3)
    winner, attempts, hedged = await r.race("a", "b", stagger=0.5)
    assert winner.target.upstream == "a" and hedged
    assert outcomes(attempts) == [("a", "ok", 200), ("b", "connect_error", None)]
    assert [a.ms for a in attempts] == [pytest.approx(2000), pytest.approx(100)]


async def test_a_hedged_race_cut_from_outside_still_says_it_hedged(autojump_clock: trio.testing.MockClock) -> None:
    """The client leaves (the caller's scope is cancelled) while both attempts wait: the caller's result
    says a hedge ran, and both attempts are recorded, cancelled, in start order."""
    r = rig({"a": [Script(head_s=60)], "b": [Script(head_s=60)]}, max_attempts=3)
    plan = RoutePlan(attempts=(Target("a", "m"), Target("b", "m")), stagger=0.5)
    request = OutgoingRequest(method=b"POST", target=b"/v1/chat/completions", headers=[], body_for=lambda t: b"{}",
                              stream=True, new_scanner=SSEScanner, max_response_bytes=1 << 20)
    attempts: list[AttemptRecord] = []
    result = RaceResult()
    with trio.move_on_after(1.0):
        await open_winning_response(r.runtimes, plan, request, routing=r.routing, budget=r.budget, attempts=attempts,
                                    rng=random.Random(0), result=result)
    assert result.hedged
    assert outcomes(attempts) == [("a", "cancelled", None), ("b", "cancelled", None)]
    assert [a.ms for a in attempts] == [pytest.approx(1000), pytest.approx(500)]


async def test_a_slow_first_token_is_hedged_too(autojump_clock: trio.testing.MockClock) -> None:
    """Headers came at once, but no content: the race is decided by first content, not by headers."""
    slow = Script(pieces=((0.0, ROLE), (10.0, sse("late")), (0.0, DONE)))
    r = rig({"a": [slow], "b": [Script(pieces=((0.05, ROLE), (0.05, sse("quick")), (0.0, DONE)))]})
    winner, attempts, hedged = await r.race("a", "b", stagger=0.5)
    assert winner.target.upstream == "b" and hedged
    assert trio.current_time() == pytest.approx(0.6)
    assert winner.prefetched == [ROLE, sse("quick")] and winner.first_content_index == 1
    assert "a closed early at 0.6" in r.log  # its connection is closed, so the server stops generating


async def test_without_hedging_the_next_starts_when_the_first_fails(autojump_clock: trio.testing.MockClock) -> None:
    refused = Script(head_s=1.0, error=UpstreamConnectError("refused", upstream="a"))
    r = rig({"a": [refused], "b": [Script()]})
    winner, attempts, hedged = await r.race("a", "b")
    assert winner.target.upstream == "b" and not hedged
    assert r.pools["b"].opened == [pytest.approx(1.0)]
    assert outcomes(attempts) == [("a", "connect_error", None), ("b", "ok", 200)]


async def test_budget_and_max_hedges_bound_hedging(autojump_clock: trio.testing.MockClock) -> None:
    r = rig({"a": [Script(head_s=5)], "b": [Script(head_s=5)], "c": [Script()]}, max_hedges=1)
    r.budget = HedgeBudget(percent=100.0, min_hedges=10)  # only max_hedges limits here
    winner, attempts, hedged = await r.race("a", "b", "c", stagger=0.5)
    # one hedge (b at 0.5); c would be a second hedge: it waits for a failure that never comes.
    assert winner.target.upstream == "a" and hedged
    assert trio.current_time() == pytest.approx(5.0)
    assert r.pools["c"].opened == []
    # An exhausted budget means no hedge at all.
    r = rig({"a": [Script(head_s=5)], "b": [Script()]}, hedge_budget_percent=0.0)
    r.budget = HedgeBudget(percent=0.0, min_hedges=0)
    winner, _, hedged = await r.race("a", "b", stagger=0.5)
    assert winner.target.upstream == "a" and not hedged and r.pools["b"].opened == []


async def test_retry_on_the_same_target_honours_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    busy = Script(status=503, headers=((b"retry-after", b"1"),), pieces=((0.0, b"{}"),))
    r = rig({"a": [busy, Script()], "b": [Script()]}, retries_per_target=1)
    winner, attempts, _ = await r.race("a", "b")
    assert winner.target.upstream == "a"
    assert r.pools["a"].opened == [0, pytest.approx(1.0)]
    assert outcomes(attempts) == [("a", "status", 503), ("a", "ok", 200)]


async def test_a_long_retry_after_moves_on_and_cools_the_upstream(autojump_clock: trio.testing.MockClock) -> None:
    limited = Script(status=429, headers=((b"retry-after", b"30"),), pieces=((0.0, b"{}"),))
    r = rig({"a": [limited], "b": [Script()]}, retries_per_target=2, max_retry_after_s=2.0)
    winner, attempts, _ = await r.race("a", "b")
    assert winner.target.upstream == "b" and trio.current_time() == 0
    assert outcomes(attempts) == [("a", "status", 429), ("b", "ok", 200)]
    assert not r.runtimes["a"].breaker.available(trio.current_time())  # cooled down for 30 s
    assert r.runtimes["a"].breaker.snapshot(0).state == "closed"  # ... without opening the circuit
    await trio.sleep(30)
    assert r.runtimes["a"].breaker.available(trio.current_time())


async def test_a_silent_server_is_not_retried_on_the_same_target(autojump_clock: trio.testing.MockClock) -> None:
    silent = Script(head_s=2.0, error=UpstreamTimeout("no response headers", upstream="a", phase="first_byte"))
    r = rig({"a": [silent, Script()], "b": [Script()]}, retries_per_target=3)
    winner, attempts, _ = await r.race("a", "b")
    assert winner.target.upstream == "b" and len(r.pools["a"].opened) == 1
    assert outcomes(attempts) == [("a", "timeout", None), ("b", "ok", 200)]


async def test_context_length_skips_targets_with_the_same_model(autojump_clock: trio.testing.MockClock) -> None:
    too_long = Script(
        status=400,
        pieces=((0.0, b'{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}'),),
    )
    r = rig({"a": [too_long], "b": [Script()], "c": [Script()]})
    winner, attempts, _ = await r.race("a", "b", "c", models=("big", "big", "small"))
    assert (winner.target.upstream, winner.target.model) == ("c", "small")
    assert r.pools["b"].opened == []
    assert outcomes(attempts) == [("a", "context_length", 400), ("c", "ok", 200)]


async def test_a_client_error_is_final(autojump_clock: trio.testing.MockClock) -> None:
    missing = Script(status=404, pieces=((0.0, b'{"error":"model not found"}'),))
    r = rig({"a": [missing], "b": [Script()]})
    winner, attempts, _ = await r.race("a", "b")
    assert winner.target.upstream == "a" and winner.body == b'{"error":"model not found"}'
    assert r.pools["b"].opened == []
    assert outcomes(attempts) == [("a", "client_error", 404)]


async def test_a_server_error_not_failed_over_on_is_final_and_says_status(autojump_clock: trio.testing.MockClock) -> None:
    unsupported = Script(status=501, pieces=((0.0, b'{"error":"not implemented"}'),))
    r = rig({"a": [unsupported], "b": [Script()]})
    winner, attempts, _ = await r.race("a", "b")
    assert winner.target.upstream == "a" and winner.body == b'{"error":"not implemented"}'
    assert r.pools["b"].opened == []
    assert outcomes(attempts) == [("a", "status", 501)]  # an error status, not the client's error


async def test_the_last_failure_status_is_passed_through(autojump_clock: trio.testing.MockClock) -> None:
    down = Script(status=503, pieces=((0.0, b'{"error":"busy"}'),))
    r = rig({"a": [down], "b": [down]})
    with pytest.raises(UpstreamStatusError) as info:
        await r.race("a", "b")
    assert info.value.status == 503 and info.value.body == b'{"error":"busy"}'


async def test_max_attempts_counts_retries(autojump_clock: trio.testing.MockClock) -> None:
    down = Script(status=500, pieces=((0.0, b"{}"),))
    r = rig({"a": [down], "b": [down], "c": [Script()]}, retries_per_target=1, max_attempts=3)
    with pytest.raises(UpstreamStatusError):
        await r.race("a", "b", "c")
    assert len(r.pools["a"].opened) == 2 and len(r.pools["b"].opened) == 1 and r.pools["c"].opened == []


async def test_an_open_circuit_is_skipped_until_its_cooldown(autojump_clock: trio.testing.MockClock) -> None:
    refused = Script(error=UpstreamConnectError("refused", upstream="a"))
    r = rig({"a": [refused, refused, Script()], "b": [Script()]}, breaker_failures=2, breaker_cooldown_ms=1000)
    for _ in range(2):
        await r.race("a", "b")
    winner, attempts, _ = await r.race("a", "b")
    assert winner.target.upstream == "b"
    assert outcomes(attempts)[0] == ("a", "circuit_open", None) and len(r.pools["a"].opened) == 2
    await trio.sleep(1)
    winner, attempts, _ = await r.race("a", "b")  # the half-open trial succeeds and closes it
    assert winner.target.upstream == "a" and r.runtimes["a"].breaker.snapshot(1).state == "closed"


async def test_all_saturated_is_a_429(autojump_clock: trio.testing.MockClock) -> None:
    r = rig({"a": [Script(head_s=10)], "b": [Script(head_s=10)]}, max_concurrent=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.race, "a")
        nursery.start_soon(r.race, "b")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(AllSaturated):
            await r.race("a", "b")
    assert trio.current_time() == pytest.approx(10)


async def test_nobody_reachable_is_a_503(autojump_clock: trio.testing.MockClock) -> None:
    r = rig({"a": [Script(error=UpstreamConnectError("refused", upstream="a"))],
             "b": [Script(error=UpstreamConnectError("closed before response headers", upstream="b"))]})
    with pytest.raises(NoHealthyUpstream) as failed:
        await r.race("a", "b")
    # What was tried, and why the last one failed (the client's one clue: safe to show, errors.py).
    assert failed.value.message == "no upstream could take the request (tried: a, b; last: upstream 'b': closed before response headers)"


def test_discovery_listing_drives_routing() -> None:
    from trioproxy.health import parse_listing
    from trioproxy.routing import UpstreamState, plan_route

    config = load_config('[[upstreams]]\nid = "o"\nkind = "ollama"\nbase_url = "http://127.0.0.1:1"\nmodels = "discover"\n')
    names = parse_listing({"models": [{"name": "llama3.2:latest"}, {"name": "qwen2.5:7b"}]})
    assert names == {"llama3.2:latest", "llama3.2", "qwen2.5:7b"}
    plan = plan_route("llama3.2", "ollama", config, {"o": UpstreamState(discovered=names)})
    assert [t.upstream for t in plan.attempts] == ["o"]
    with pytest.raises(RoutingError):  # not in its listing
        plan_route("mistral", "ollama", config, {"o": UpstreamState(discovered=names)})
