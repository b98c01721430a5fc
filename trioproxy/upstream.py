"""Getting a usable answer from some upstream: attempts, retries, failover and hedging.

``open_winning_response`` walks a ``RoutePlan`` the way trio's ``open_tcp_stream``
walks addresses (happy eyeballs): the next target starts when the running ones
have failed, or, with hedging on, alongside a running one that has not produced
its first content within ``hedge_after_ms`` (bounded by ``max_hedges`` and the
hedge budget). The first attempt with a good answer wins; every other attempt is
cancelled, and a cancelled attempt closes its connection (the pool never reuses a
connection whose response was not read to the end), which is how vLLM and Ollama
learn to stop generating.

What "a good answer" means, per attempt, before any byte reached the client:
- streamed: a 2xx head, then the body read up to its first non-empty content
  (those chunks are kept and relayed first); an in-band error before any content,
  a cut or a stall before it, is a failure;
- not streamed: a 2xx head and the whole body (bounded);
- a final answer: a 4xx that can never succeed elsewhere on the same model
  (400/401/403/404/413/422, content-policy rejections) is relayed as the upstream
  gave it; it ends the race.

Failures (classified per attempt, recorded in the usage record):
- retryable: connect errors, resets before the head, protocol garbage, timeouts
  before the head, and ``routing.failover_statuses`` (408, 429, 5xx). They are
  retried on the same target ``routing.retries_per_target`` times (full-jitter
  backoff; a ``Retry-After`` up to ``max_retry_after_s`` is waited out, a longer one
  moves on at once), then the next target is tried. A server that accepted the
  request and never answered (first-byte timeout) is not retried on the same target.
- a 400 ``context_length_exceeded``: the targets asking for the same model are
  skipped; a target with another model (a route's fallback model) may take it.

The circuit breaker of each upstream hears every verdict; a 429 with
``Retry-After`` cools that upstream down for as long. ``max_attempts`` counts every
attempt (retries and hedges too), and the whole request is bounded by the app's
``total_timeout_ms``. The request body lives in memory, so any attempt can replay it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from functools import partial

import trio
from attrs import define, field, frozen

from .breaker import CircuitBreaker, HedgeBudget, backoff_delay, parse_retry_after
from .config import Routing, Upstream
from .errors import (
    AllSaturated,
    NoHealthyUpstream,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from .headers import Headers, header_value
from .limits import ConcurrencyGate, Saturated
from .pool import ConnectionPool, UpstreamResponse
from .routing import RoutePlan, Target, UpstreamState
from .telemetry import AttemptRecord
from .usage import NDJSONScanner, SSEScanner

Scanner = SSEScanner | NDJSONScanner

#: Error bodies above this are cut when we keep one: they are messages, not answers.
MAX_ERROR_BODY = 64 * 1024
#: A stream that has sent this much without any content is relayed anyway (it is not stalled, just chatty).
MAX_PREFETCH = 1024 * 1024
#: 4xx answers that the same model cannot turn into a success elsewhere: relayed as they are.
FINAL_STATUSES = frozenset({400, 401, 403, 404, 405, 409, 413, 415, 422})
#: Error codes of a 400 that another model may still serve (a route's fallback).
CONTEXT_LENGTH_CODES = frozenset({"context_length_exceeded", "context_window_exceeded"})


#: A key shorter than this is not searched for in upstream text: a placeholder ("ollama", "test")
#: would turn up inside ordinary words and JSON, and is no secret to keep.
MIN_REDACTED_KEY = 8


@define
class UpstreamRuntime:
    """One upstream's live parts: settings, connection pool, health, breaker, concurrency gate."""

    cfg: Upstream
    pool: ConnectionPool
    #: Headers every request to it carries (its own ``authorization``), built once at start.
    auth_headers: Headers
    breaker: CircuitBreaker
    gate: ConcurrencyGate
    healthy: bool = True
    #: Set once its health checker's first probe has answered (``health.run_checker``).
    checked: trio.Event = field(factory=trio.Event)
    #: Model names from its own listing (``models = "discover"``), refreshed by the health checker.
    discovered: frozenset[str] | None = None

    @classmethod
    def create(cls, cfg: Upstream, pool: ConnectionPool, auth_headers: Headers, routing: Routing) -> UpstreamRuntime:
        breaker = CircuitBreaker(
            failure_threshold=routing.breaker_failures,
            base_cooldown_s=routing.breaker_cooldown_ms / 1000,
            max_cooldown_s=routing.breaker_max_cooldown_ms / 1000,
        )
        gate = ConcurrencyGate(
            max_concurrent=cfg.max_concurrent, max_queue=cfg.max_queue, queue_timeout_s=cfg.queue_timeout_ms / 1000
        )
        return cls(cfg=cfg, pool=pool, auth_headers=auth_headers, breaker=breaker, gate=gate)

    def redact(self, text: str) -> str:
        """``text`` (an upstream's own words, for a usage record) without its API key, if it echoed it."""
        for _, value in self.auth_headers:
            key = value.decode(errors="replace").removeprefix("Bearer ").strip()
            if len(key) >= MIN_REDACTED_KEY and key in text:
                text = text.replace(key, "***")
        return text

    def redact_body(self, body: bytes) -> bytes:
        """An error body passed through to a client, without the upstream's API key if it quoted it
        (as in "invalid API key sk-..."): the key is the operator's, not the client's."""
        for _, value in self.auth_headers:
            key = value.removeprefix(b"Bearer ").strip()
            if len(key) >= MIN_REDACTED_KEY and key in body:
                body = body.replace(key, b"***")
        return body

    @property
    def in_flight(self) -> int:
        return self.gate.in_flight

    def state(self, now: float) -> UpstreamState:
        limit = self.cfg.max_concurrent
        return UpstreamState(
            healthy=self.healthy,
            available=self.breaker.available(now),
            in_flight=self.gate.in_flight,
            saturated=limit > 0 and self.gate.in_flight >= limit,
            discovered=self.discovered,
        )


@frozen
class OutgoingRequest:
    method: bytes
    #: Path and query as the client sent them (the pool prepends the base URL's path).
    target: bytes
    #: Client headers already filtered (see ``headers.upstream_request_headers``), without upstream auth.
    headers: Headers
    #: The body to send to a target: the client's bytes, or re-serialized once when it must change.
    body_for: Callable[[Target], bytes]
    #: The client asked for a stream.
    stream: bool
    #: A fresh scanner for a streamed answer on this route (None: the route has none).
    new_scanner: Callable[[], Scanner | None]
    max_response_bytes: int


@define
class Winner:
    """The answer being relayed, and what to give back when done."""

    response: UpstreamResponse
    target: Target
    runtime: UpstreamRuntime
    #: Not streamed (or a final error): the whole body, already read.
    body: bytes | None = None
    #: Streamed: what was read up to and including the first content, to relay first.
    prefetched: list[bytes] = field(factory=list)
    #: Streamed: the scanner that has seen ``prefetched``; the relay keeps feeding it.
    scanner: Scanner | None = None
    #: Index in ``prefetched`` of the chunk holding the first content, if it came.
    first_content_index: int | None = None
    queue_s: float = 0.0
    #: Its attempt's index in the record's attempts (which are in start order).
    attempt_slot: int = -1
    _released: bool = False

    def release(self) -> None:
        """Sync and idempotent, so it is safe in a ``finally`` of a cancelled scope."""
        if not self._released:
            self._released = True
            self.response.release()
            self.runtime.gate.release()


@define
class RaceResult:
    """What the race tells the usage record besides the winner (the caller's: kept when the race fails or is cut)."""

    #: A hedge was started (an attempt alongside a slow one).
    hedged: bool = False


class _Skip(Exception):
    """This target cannot take the request now (circuit open, saturated); not a failure of it."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class _ContextTooLong(UpstreamStatusError):
    """A 400 context-length error: other targets with the same model would say the same."""


@define
class _Race:
    runtimes: dict[str, UpstreamRuntime]
    plan: RoutePlan
    request: OutgoingRequest
    routing: Routing
    attempts: list[AttemptRecord]
    rng: random.Random
    failover_statuses: frozenset[int]
    winner: Winner | None = None
    errors: list[UpstreamError] = field(factory=list)
    skipped: list[str] = field(factory=list)
    started: int = 0
    #: Models that answered "context too long": later targets with the same model are skipped.
    too_long: set[str] = field(factory=set)
    wake: trio.Event = field(factory=trio.Event)
    scope: trio.CancelScope | None = None

    def record(self, target: Target, outcome: str, status: int | None, started: float, slot: int = -1) -> None:
        """The attempt's record: appended, or written in ``slot`` (kept at its start: attempts are in start order)."""
        ms = round((trio.current_time() - started) * 1000, 3)
        attempt = AttemptRecord(upstream=target.upstream, model=target.model, outcome=outcome, status=status, ms=ms)
        if slot < 0:
            self.attempts.append(attempt)
        else:
            self.attempts[slot] = attempt

    async def run_target(self, target: Target, *, last: bool) -> None:
        """Every attempt on one target (the first, then retries), until a win, a skip or give-up."""
        runtime = self.runtimes[target.upstream]
        try:
            for retry in range(self.routing.retries_per_target + 1):
                if self.started >= self.routing.max_attempts or target.model in self.too_long:
                    return
                self.started += 1
                try:
                    winner = await self.attempt(runtime, target, queue=last)
                except UpstreamError as exc:
                    self.errors.append(exc)
                    delay = self._retry_delay(exc, retry)
                    if delay is None or retry == self.routing.retries_per_target:
                        return
                    await trio.sleep(delay)
                    continue
                except _Skip as skip:
                    self.skipped.append(skip.outcome)
                    return
                if self.winner is None:  # no checkpoint since the attempt returned: deciding is atomic
                    self.winner = winner
                    if self.scope is not None:  # racing: the others lose
                        self.scope.cancel()
                else:  # finished in the same tick as the winner
                    winner.release()
                    self.attempts[winner.attempt_slot] = with_outcome(self.attempts[winner.attempt_slot], "lost_race")
                return
        finally:
            self.wake.set()  # whatever happened, the loop may start the next target now

    def _retry_delay(self, exc: UpstreamError, retry: int) -> float | None:
        """Seconds to wait before retrying the same target, or None to move on."""
        if isinstance(exc, _ContextTooLong):
            return None
        if isinstance(exc, UpstreamTimeout) and exc.phase == "first_byte":
            return None  # accepted and never answered: not again on the same target
        backoff = backoff_delay(
            retry, base_s=self.routing.retry_backoff_ms / 1000, cap_s=self.routing.retry_backoff_max_ms / 1000, rng=self.rng
        )
        if isinstance(exc, UpstreamStatusError):
            retry_after = parse_retry_after(header_value(exc.headers, b"retry-after"), now_wall=time.time())
            if retry_after is not None:
                return retry_after if retry_after <= self.routing.max_retry_after_s else None
        return backoff

    async def attempt(self, runtime: UpstreamRuntime, target: Target, *, queue: bool) -> Winner:
        """One request to one upstream, classified. Raises UpstreamError on failure, _Skip when not taken."""
        now = trio.current_time()
        started = now
        breaker = runtime.breaker
        if not breaker.try_acquire(now):
            self.record(target, "circuit_open", None, started)
            raise _Skip("circuit_open")
        verdict: bool | None = None  # True success, False failure, None: no verdict (release the trial)
        queue_s = 0.0
        try:
            if not runtime.gate.try_acquire_nowait():
                if not queue:
                    self.record(target, "saturated", None, started)
                    raise _Skip("saturated")
                try:
                    queue_s = await runtime.gate.acquire()
                except Saturated:
                    self.record(target, "saturated", None, started)
                    raise _Skip("saturated") from None
            acquired = True
            try:
                winner = await self._exchange(runtime, target, started)
                winner.queue_s = queue_s
                verdict = True
                acquired = False  # the winner owns the slot now
                return winner
            except _ContextTooLong:
                verdict = True  # the server is fine; the prompt is too long for this model
                raise
            except UpstreamStatusError as exc:
                if exc.status == 429:
                    retry_after = parse_retry_after(header_value(exc.headers, b"retry-after"), now_wall=time.time())
                    # Capped: a Retry-After of days (or a hostile one) must not remove an upstream for that long.
                    cap = self.routing.breaker_max_cooldown_ms / 1000
                    breaker.cool_down(trio.current_time(), min(cap, retry_after if retry_after is not None else 1.0))
                else:
                    verdict = False
                raise
            except UpstreamError:
                verdict = False
                raise
            finally:
                if acquired:
                    runtime.gate.release()
        finally:
            now = trio.current_time()
            if verdict is True:
                breaker.record_success(now)
            elif verdict is False:
                breaker.record_failure(now)
            else:
                breaker.record_release(now)

    async def _exchange(self, runtime: UpstreamRuntime, target: Target, started: float) -> Winner:
        request = self.request
        timeouts = runtime.cfg.timeouts
        outcome, status = "cancelled", None
        slot = len(self.attempts)  # its place, in start order, whenever it ends
        self.attempts.append(AttemptRecord(upstream=target.upstream, model=target.model, outcome=outcome, status=None, ms=0.0))
        try:
            response = await runtime.pool.open_response(
                request.method,
                request.target,
                request.headers + runtime.auth_headers,
                request.body_for(target),
                first_byte_timeout=timeouts.first_byte_ms / 1000,
                idle_timeout=timeouts.idle_ms / 1000,
            )
            status = response.status
            try:
                winner = await self._read_answer(response, runtime, target)
            except BaseException:
                response.release()
                raise
            # A 4xx, or a 5xx not failed over on, is relayed as the upstream gave it.
            outcome = "ok" if status < 400 else "client_error" if status < 500 else "status"
            winner.attempt_slot = slot
            return winner
        except UpstreamError as exc:
            outcome = "context_length" if isinstance(exc, _ContextTooLong) else exc.kind
            raise
        finally:
            if outcome == "cancelled" and self.winner is not None:
                outcome = "lost_race"  # cancelled because another attempt won
            self.record(target, outcome, status, started, slot)

    async def _read_answer(self, response: UpstreamResponse, runtime: UpstreamRuntime, target: Target) -> Winner:
        status = response.status
        if status in self.failover_statuses:
            body = await _read_error_body(response)
            response.release()
            raise UpstreamStatusError(upstream=target.upstream, status=status, body=body, headers=response.headers)
        if status >= 400:
            body = await _read_error_body(response)
            if status == 400 and _error_code(body) in CONTEXT_LENGTH_CODES:
                response.release()
                self.too_long.add(target.model)
                raise _ContextTooLong(upstream=target.upstream, status=status, body=body, headers=response.headers)
            return Winner(response, target, runtime, body=body)
        if not self.request.stream or response.content_length is not None:
            body = await response.read_all(max_bytes=self.request.max_response_bytes)
            return Winner(response, target, runtime, body=body)
        scanner = self.request.new_scanner()
        winner = Winner(response, target, runtime, scanner=scanner)
        size = 0
        while scanner is not None and size < MAX_PREFETCH:
            data = await response.receive_some()
            if not data:
                break
            winner.prefetched.append(data)
            size += len(data)
            if scanner.feed(data):
                winner.first_content_index = len(winner.prefetched) - 1
                break
            if scanner.error is not None:
                message = runtime.redact(scanner.error)  # (shown to the client and recorded: errors.py)
                raise UpstreamProtocolError(f"reported an error before any content: {message}", upstream=target.upstream)
            if scanner.done or scanner.finish_reason is not None:
                break
        return winner


async def open_winning_response(
    runtimes: dict[str, UpstreamRuntime],
    plan: RoutePlan,
    request: OutgoingRequest,
    *,
    routing: Routing,
    budget: HedgeBudget,
    attempts: list[AttemptRecord],
    rng: random.Random,
    result: RaceResult,
) -> Winner:
    """Race the plan's targets; return the first good answer.

    ``attempts`` gets one record per attempt, in start order, and ``result`` the race's
    other facts, both as they happen (so also when the race fails or is cancelled).

    Returns:
        The winner (the caller owns it and must ``release()`` it).

    Raises:
        UpstreamStatusError: the last failure was an error answer (its status and body are passed through).
        UpstreamTimeout: every attempt timed out.
        UpstreamProtocolError: an upstream answered garbage, and no other answered at all.
        AllSaturated: every candidate was at its concurrency limit (429).
        NoHealthyUpstream: nobody could take the request (503).
    """
    race = _Race(
        runtimes=runtimes,
        plan=plan,
        request=request,
        routing=routing,
        attempts=attempts,
        rng=rng,
        failover_statuses=frozenset(routing.failover_statuses),
    )
    budget.record_request(trio.current_time())
    targets = plan.attempts
    if math.isinf(plan.stagger):
        # No hedging: attempts never overlap, so no race nursery (and no task) is needed.
        for index, target in enumerate(targets):
            if race.started >= routing.max_attempts or race.winner is not None:
                break
            await race.run_target(target, last=index == len(targets) - 1)
        if race.winner is None:
            raise _final_error(race)
        return race.winner
    running_hedges = 0
    try:
        async with trio.open_nursery() as nursery:
            race.scope = nursery.cancel_scope
            for index, target in enumerate(targets):
                if index > 0:
                    with trio.move_on_after(plan.stagger) as timer:
                        await race.wake.wait()
                    if timer.cancelled_caught:
                        # The running attempt is slow: hedge, if allowed; else wait for it to fail.
                        if running_hedges < routing.max_hedges and budget.try_hedge(trio.current_time()):
                            running_hedges += 1
                            result.hedged = True
                        else:
                            await race.wake.wait()
                if race.started >= routing.max_attempts:
                    break
                race.wake = trio.Event()
                nursery.start_soon(partial(race.run_target, target, last=index == len(targets) - 1))
    except BaseException:
        # Cancelled from outside after a winner existed: nobody else will release it.
        if race.winner is not None:
            race.winner.release()
        raise
    if race.winner is None:
        raise _final_error(race)
    return race.winner


def with_outcome(record: AttemptRecord, outcome: str) -> AttemptRecord:
    return AttemptRecord(upstream=record.upstream, model=record.model, outcome=outcome, status=record.status, ms=record.ms)


async def _read_error_body(response: UpstreamResponse) -> bytes:
    try:
        return await response.read_all(max_bytes=MAX_ERROR_BODY)
    except UpstreamError:
        return b""


def _error_code(body: bytes) -> str | None:
    """The ``error.code`` (or ``error.type``) of an OpenAI-style error body."""
    if b"context" not in body:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        for key in ("code", "type"):
            if isinstance(error.get(key), str) and error[key] in CONTEXT_LENGTH_CODES:
                return str(error[key])
        message = error.get("message")
        if isinstance(message, str) and "context length" in message.lower():
            return "context_length_exceeded"
    return None


def _final_error(race: _Race) -> Exception:
    """The one error that speaks for a failed race (an ExceptionGroup would say too little to a client)."""
    errors = race.errors
    statuses = [e for e in errors if isinstance(e, UpstreamStatusError)]
    if statuses:
        return statuses[-1]
    protocol = [e for e in errors if isinstance(e, UpstreamProtocolError)]
    if protocol:
        return protocol[-1]
    if errors and all(isinstance(e, UpstreamTimeout) for e in errors):
        return errors[-1]
    if not errors and race.skipped and all(s == "saturated" for s in race.skipped):
        return AllSaturated("every upstream serving this model is at its concurrency limit; retry shortly")
    tried = ", ".join(dict.fromkeys(t.upstream for t in race.plan.attempts))
    last = f"; last: {errors[-1].message}" if errors else ""  # (safe to show a client: errors.py)
    return NoHealthyUpstream(f"no upstream could take the request (tried: {tried}{last})")
