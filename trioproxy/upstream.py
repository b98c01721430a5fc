"""Opening the upstream response that will be relayed: the attempt race.

``open_winning_response`` walks a ``RoutePlan`` the way trio's ``open_tcp_stream``
walks addresses (happy eyeballs): an attempt starts when the previous one fails,
or, with hedging on, once the previous one has been slow for ``stagger`` seconds.
The first attempt to return a usable response head wins; every other attempt is
cancelled, and a cancelled attempt closes its connection (the pool never reuses
a connection whose response was not read to the end).

Failure policy (per attempt, before any byte reached the client):
- connect errors, resets and closes before the head, timeouts before the head,
  and protocol garbage: the next candidate is tried;
- a status in ``routing.failover_statuses`` (429, 5xx...): its (small) body is
  read and kept, and the next candidate is tried; if none is left, that answer
  is passed through to the client as the upstream gave it;
- any other status (200, 400, 404...): a real answer; it wins and is relayed.

The request body lives in memory, so it can be replayed to every candidate.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from attrs import define, frozen

from .config import Upstream
from .errors import NoHealthyUpstream, UpstreamError, UpstreamProtocolError, UpstreamStatusError, UpstreamTimeout
from .headers import Headers
from .pool import ConnectionPool, UpstreamResponse
from .routing import RoutePlan, Target, UpstreamState
from .telemetry import AttemptRecord

#: Error bodies above this are cut when we keep one for pass-through: they are messages, not answers.
MAX_ERROR_BODY = 64 * 1024


@define
class UpstreamRuntime:
    """One upstream's live parts: its settings, connection pool and load."""

    cfg: Upstream
    pool: ConnectionPool
    #: Headers every request to it carries (its own ``authorization``), built once at start.
    auth_headers: Headers
    healthy: bool = True
    in_flight: int = 0

    def state(self) -> UpstreamState:
        return UpstreamState(healthy=self.healthy, in_flight=self.in_flight)


@frozen
class OutgoingRequest:
    method: bytes
    #: Path and query as the client sent them (the pool prepends the base URL's path).
    target: bytes
    #: Client headers already filtered (see ``headers.upstream_request_headers``), without upstream auth.
    headers: Headers
    #: The body to send to a target: the client's bytes, or re-serialized once when the model name differs.
    body_for: Callable[[Target], bytes]


@define
class Winner:
    """The response being relayed, and what to give back when done."""

    response: UpstreamResponse
    target: Target
    runtime: UpstreamRuntime
    _released: bool = False

    def release(self) -> None:
        """Sync and idempotent, so it is safe in a ``finally`` of a cancelled scope."""
        if not self._released:
            self._released = True
            self.response.release()
            self.runtime.in_flight -= 1


async def open_winning_response(
    runtimes: dict[str, UpstreamRuntime],
    plan: RoutePlan,
    request: OutgoingRequest,
    *,
    failover_statuses: frozenset[int],
    attempts: list[AttemptRecord],
) -> Winner:
    """Race the plan's attempts; return the first usable response.

    Args:
        runtimes: live upstreams by id.
        plan: the ordered attempts and the hedging stagger.
        request: what to send.
        failover_statuses: statuses after which the next candidate is tried.
        attempts: filled with one record per attempt, for telemetry.

    Returns:
        The winner; the caller owns it and must call ``release()``.

    The last candidate's answer wins whatever its status, so a 503 with nothing
    left to fail over to reaches the client as the upstream gave it.

    Raises:
        UpstreamStatusError: an earlier candidate answered a failover status and the
            later ones failed without an answer (its status and body are passed through).
        UpstreamTimeout: every attempt timed out before its head.
        UpstreamProtocolError: an upstream answered bytes that are not HTTP, and no other answered.
        NoHealthyUpstream: every attempt failed to connect.
    """
    winner: Winner | None = None
    errors: list[UpstreamError] = []
    wake = trio.Event()
    last = len(plan.attempts) - 1

    async def attempt(index: int, target: Target) -> None:
        nonlocal winner
        runtime = runtimes[target.upstream]
        timeouts = runtime.cfg.timeouts
        started = trio.current_time()
        runtime.in_flight += 1
        outcome, status = "cancelled", None
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
            if response.status in failover_statuses and index < last:
                outcome = "status"
                try:
                    body = await _read_error_body(response)
                finally:
                    response.release()
                raise UpstreamStatusError(
                    upstream=target.upstream, status=response.status, body=body, headers=response.headers
                )
        except UpstreamError as exc:
            runtime.in_flight -= 1
            outcome = exc.kind
            errors.append(exc)
            wake.set()  # lets the next attempt start at once
            return
        except BaseException:
            runtime.in_flight -= 1
            raise
        finally:
            attempts.append(
                AttemptRecord(
                    upstream=target.upstream,
                    model=target.model,
                    outcome=outcome,
                    status=status,
                    ms=round((trio.current_time() - started) * 1000, 3),
                )
            )
        # No checkpoint since open_response returned: deciding the winner is atomic.
        if winner is None:
            winner = Winner(response, target, runtime)
            attempts[-1] = _with_outcome(attempts[-1], "status" if status in failover_statuses else "ok")
            race.cancel_scope.cancel()
        else:  # finished in the same tick as the winner
            response.release()
            runtime.in_flight -= 1
            attempts[-1] = _with_outcome(attempts[-1], "lost_race")

    try:
        async with trio.open_nursery() as race:
            for index, target in enumerate(plan.attempts):
                wake = trio.Event()
                race.start_soon(attempt, index, target)
                if index < last:
                    with trio.move_on_after(plan.stagger):
                        await wake.wait()
    except BaseException:
        # Cancelled from outside after a winner existed: nobody else will release it.
        if winner is not None:
            winner.release()
        raise
    if winner is None:
        raise _final_error(errors, plan)
    return winner


def _with_outcome(record: AttemptRecord, outcome: str) -> AttemptRecord:
    return AttemptRecord(
        upstream=record.upstream, model=record.model, outcome=outcome, status=record.status, ms=record.ms
    )


async def _read_error_body(response: UpstreamResponse) -> bytes:
    try:
        return await response.read_all(max_bytes=MAX_ERROR_BODY)
    except UpstreamError:
        return b""


def _final_error(errors: list[UpstreamError], plan: RoutePlan) -> UpstreamError | NoHealthyUpstream:
    """The one error that speaks for a failed race (the ExceptionGroup would say too little to a client)."""
    statuses = [e for e in errors if isinstance(e, UpstreamStatusError)]
    if statuses:
        return statuses[-1]
    protocol = [e for e in errors if isinstance(e, UpstreamProtocolError)]
    if protocol:
        return protocol[-1]
    if errors and all(isinstance(e, UpstreamTimeout) for e in errors):
        return errors[-1]
    tried = ", ".join(sorted({t.upstream for t in plan.attempts}))
    return NoHealthyUpstream(f"no upstream could take the request (tried: {tried})")
