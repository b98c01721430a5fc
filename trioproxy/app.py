"""``ProxyApp``: the ASGI application Hypercorn serves.

One call per request. Life of a relayed request:

1. read the body, bounded by ``server.max_body_bytes`` (413 beyond it);
2. decode it once to read ``model`` and ``stream`` (400 on bad JSON or types);
3. ``plan_route`` → ``open_winning_response`` (failover/hedging, ``upstream.py``);
4. relay (``relay.py``) inside the request's cancel scope, which the disconnect watch
   cancels the moment the client goes away (a nursery too when the watch is a task);
5. ``finally``: exactly one telemetry record, handed off with ``submit`` (sync,
   never blocks, works inside a cancelled scope).

Errors are answered in the API's own format, in one place (``_send_error``):
OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` everywhere but
the native Ollama routes, which get ``{"error": "..."}``. Once the response head
is out, the status cannot change: the relay ends the stream with an error event.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import trio
from loguru import logger

from .auth import same_origin
from .config import AuthKey
from .catalog import OPEN_ROUTES, Route, lookup_route, serve_local
from .errors import (
    AuthError,
    Forbidden,
    MethodNotAllowed,
    NoHealthyUpstream,
    RateLimited,
    RequestError,
    RoutingError,
    ShuttingDown,
    TrioproxyError,
    error_body,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from .config import Config
from .exchange import ClientGone, Exchange, decode_json, model_of, read_body, redact, upstream_query
from .headers import client_response_headers, header_value, upstream_request_headers
from .hypercorn_app import ATOMIC_END, DISCONNECT_NOTICE, INBOX, REFUSED, DisconnectNotice
from .relay import (
    Send,
    error_in_body,
    facts_from_body,
    finish,
    ndjson_error_line,
    relay_stream,
    relay_whole,
    send_whole,
    say_how_it_ended,
    sse_error_event,
)
from .routing import RoutePlan, Target, plan_any, plan_route
from .services import Services
from .upstream import OutgoingRequest, RaceResult, UpstreamRuntime, Winner, open_winning_response, with_outcome
from .usage import NDJSONScanner, SSEScanner, estimate_tokens
from .usagefilter import UsageEventFilter

Receive = Any  # ASGI receive callable
#: What ends an answer still running when the shutdown's grace has run out (an in-band error, or a 503).
SHUTDOWN_MESSAGE = "the gateway is shutting down and its grace period ran out before this answer was complete; retry"
#: Local routes that change state: refused to a web page of another origin (``auth.same_origin``).
ORIGIN_CHECKED = frozenset({"reload"})
#: What a kept X-Request-Id may look like (``[server] trust_request_id``): safe in a header and a log line.
TRUSTED_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class ProxyApp:
    """The ASGI entry point. Holds no state of its own: everything lives in ``Services``."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """An HTTP request, here in the entry point itself (one coroutine frame fewer per
        request, which a stream holds for its whole life); lifespan and websocket apart."""
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await _lifespan(receive, send)
            elif kind == "websocket":
                await self._websocket(scope, receive, send)
            return
        services = self.services
        ex = Exchange(
            request_id=os.urandom(12).hex().encode(),
            route=scope["path"],
            method=scope["method"],
            arrival=trio.current_time(),
            ts=time.time(),
        )
        if "extensions" in scope and ATOMIC_END in scope["extensions"]:
            ex.atomic_end = True
        if services.config.server.trust_request_id:
            given = header_value(scope["headers"], b"x-request-id")
            if given is not None and TRUSTED_REQUEST_ID.fullmatch(given):
                ex.request_id = given
        route: Route | None = None
        admitted: AuthKey | None = None
        services.active += 1
        try:
            route = lookup_route(scope["method"], scope["path"])
            if _head_size(scope) > services.config.server.max_header_bytes:
                raise RequestError(
                    f"the request's head is larger than the limit of {services.config.server.max_header_bytes} bytes",
                    code="request_header_fields_too_large", param=None, status_hint=431,
                )
            if services.active > services.config.server.max_concurrent_requests:
                raise RateLimited("the gateway is serving as many requests as it is configured to; retry shortly")
            if services.keys.enabled and route.local not in OPEN_ROUTES:
                key = services.keys.identify(header_value(scope["headers"], b"authorization"))
                ex.key_id = key.id
                services.key_limiter.admit(key, trio.current_time())
                admitted = key
            if route.local:
                client = scope.get("client")
                authorization = header_value(scope["headers"], b"authorization")
                if route.local in ORIGIN_CHECKED and not same_origin(
                    header_value(scope["headers"], b"origin"), header_value(scope["headers"], b"host")
                ):
                    raise Forbidden(f"{route.path} is not served to a web page of another origin")
                await serve_local(route, services, ex, send, client[0] if client else None, authorization)
                return
            await self._proxy(route, scope, receive, send, ex)
        except ClientGone:
            ex.outcome, ex.client_gone = "client_disconnect", True
        except trio.Cancelled:
            # Cut from outside: Hypercorn cancels what is still running once the shutdown grace
            # is over. (A client that hung up is caught inside, by the disconnect watcher.)
            if ex.outcome == "ok" and not ex.finished:
                ex.outcome = "cancelled"
            raise
        except TrioproxyError as exc:
            if not ex.response_started:
                await _send_error(send, ex, route, exc, scope)
        except Exception as exc:  # the one broad boundary: log it, answer 500, keep serving
            logger.exception("request {} failed: {}", ex.request_id.decode(), type(exc).__name__)
            ex.outcome, ex.error = "upstream_error", f"internal error: {type(exc).__name__}"
            if not ex.response_started:
                await _send_error(send, ex, route, TrioproxyError("internal gateway error"), scope)
        finally:
            services.active -= 1
            if admitted is not None:
                services.key_limiter.release(admitted)
            if ex.outcome == "ok" and not ex.response_started and ex.status == 0:
                ex.outcome = "cancelled"  # cut by shutdown before it could answer
            refused = scope["extensions"].get(REFUSED) if "extensions" in scope else None
            if refused is not None:
                # Hypercorn answered it (h11 could not read its body) before any answer of ours
                # was framed: the client got that, whatever this call saw (a disconnect, or its
                # own answer refused by h11).
                ex.status, ex.error = refused
                ex.outcome, ex.client_gone = "rejected", False
            services.sink.submit(ex.to_record(trio.current_time()))

    async def _websocket(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """``/_/live``: the live feed of usage records, for loopback clients (STYLE: one record per session)."""
        services = self.services
        ex = Exchange(
            request_id=os.urandom(12).hex().encode(),
            route=scope["path"],
            method="WEBSOCKET",
            arrival=trio.current_time(),
            ts=time.time(),
        )
        client = scope.get("client")
        try:
            if (await receive())["type"] != "websocket.connect":
                return
            if scope["path"] != "/_/live" or services.feed is None:
                ex.outcome = "rejected"
                if "websocket.http.response" in scope.get("extensions", {}):  # (Hypercorn's: a real 404)
                    body = error_body(RoutingError(f"Invalid URL (WEBSOCKET {scope['path']})", code=None, param=None),
                                      ollama=False)
                    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                               (b"x-request-id", ex.request_id)]
                    await send({"type": "websocket.http.response.start", "status": 404, "headers": headers})
                    ex.status, ex.response_started = 404, True
                    await send({"type": "websocket.http.response.body", "body": body})
                    ex.bytes_out += len(body)
                else:  # closing before the accept: the server answers 403 (the ASGI spec)
                    ex.status = 403
                    await send({"type": "websocket.close", "code": 4404})
                return
            authorization = header_value(scope["headers"], b"authorization")
            origin_ok = same_origin(header_value(scope["headers"], b"origin"), header_value(scope["headers"], b"host"))
            if not origin_ok or not services.admin.allows(client[0] if client else None, authorization):
                ex.status, ex.outcome = 403, "rejected"
                await send({"type": "websocket.close", "code": 1008})
                return
            events = services.feed.subscribe()  # before the accept: nothing published meanwhile is missed
            async with events:
                await send({"type": "websocket.accept"})
                ex.status, ex.response_started = 101, True
                async with trio.open_nursery() as session:

                    async def watch_close() -> None:
                        while (await receive())["type"] != "websocket.disconnect":
                            pass
                        ex.client_gone = True
                        session.cancel_scope.cancel()

                    async def watch_shutdown() -> None:
                        # A feed has no end to wait for: it closes when the gateway stops ("going away").
                        await services.shutdown.wait()
                        await send({"type": "websocket.close", "code": 1001})
                        session.cancel_scope.cancel()

                    session.start_soon(watch_close)
                    session.start_soon(watch_shutdown)
                    async for text in events:
                        await send({"type": "websocket.send", "text": text})
                        ex.bytes_out += len(text)
                    # Dropped by the broadcaster (too slow): say so, and let the client reconnect.
                    ex.outcome, ex.error = "client_disconnect", "dropped from the live feed: too slow"
                    await send({"type": "websocket.close", "code": 1013})
                    session.cancel_scope.cancel()
        finally:
            services.sink.submit(ex.to_record(trio.current_time()))

    async def _proxy(self, route: Route, scope: dict[str, Any], receive: Receive, send: Send, ex: Exchange) -> None:
        """Read the body, then relay the answer.

        One cancel scope, the request's (``_RequestScope``), bounds both phases: its deadline is
        ``server.body_timeout_s`` while the body is read, then ``routing.total_timeout_ms``
        (two scopes fewer per request than a ``move_on_after`` each: docs/benchmarks.md).
        """
        services = self.services
        # One snapshot for the whole request: a profile reload swaps both, and this request
        # finishes on the upstreams it started with.
        config, runtimes = services.config, services.runtimes
        total_s = config.routing.total_timeout_ms / 1000
        plan: RoutePlan | None = None
        notice = scope["extensions"].get(DISCONNECT_NOTICE) if "extensions" in scope else None
        try:
            async with _RequestScope(services.open_requests, with_nursery=notice is None) as (limit, request):
                limit.deadline = trio.current_time() + config.server.body_timeout_s
                if services.ending:  # (on a kept-alive connection, after the shutdown grace ran out)
                    limit.cancel()
                inbox = scope["extensions"].get(INBOX) if "extensions" in scope else None
                body = await read_body(receive, ex, scope, config.server.max_body_bytes,
                                       take=inbox.receive_nowait if inbox is not None else None)
                if limit.cancel_called:  # the deadline passed as the last piece came: too late all the same
                    if services.ending:  # (or the shutdown's grace ran out)
                        ex.outcome, ex.error = "cancelled", SHUTDOWN_MESSAGE
                        raise ShuttingDown(SHUTDOWN_MESSAGE)
                    raise RequestError("the request body did not arrive in time", code="request_timeout", status_hint=408)
                plan, outgoing, inject_usage = _prepare(route, scope, ex, body, services, config, runtimes)
                del body  # a stream would hold the prompt (often KBs) for its whole life; the race has its copy
                now = trio.current_time()
                limit.deadline = now + total_s
                # The disconnect watch: only now that the body is read (STYLE.md §2), and only
                # once the request has run server.disconnect_watch_after_ms (the watchdog starts
                # it then): most answers are out before that and need no watch of their own.
                watch = _DisconnectWatch(limit, request, receive, ex, now, config.server.disconnect_watch_after_ms / 1000, notice)
                watchdog = services.watchdog if watch.timeout > 0 else None
                if watchdog is not None:
                    watchdog.watch_once(watch)
                else:  # watched at once (or no watchdog: tests that build Services by hand)
                    watch.expire()
                try:
                    answer = self._answer(plan, outgoing, send, ex, route, inject_usage, config, runtimes)
                    del outgoing  # _answer drops it once the race is won (see there)
                    await answer
                finally:
                    if watchdog is not None:
                        watchdog.forget(watch)  # (no checkpoint since the answer: it cannot start after this)
                    if watch.notice is not None:
                        watch.notice.unsubscribe()
                    # Unlike STYLE.md's "whoever finishes the work cancels the scope", a complete
                    # answer does not cancel a started watcher: Hypercorn (0.17, 0.18; h11 and h2)
                    # queues http.disconnect during the last body send, so the watcher returns by
                    # itself (pinned by test_gateway.py); cancelling it cost ~10-25 µs more per
                    # request (loadtest/bench_app.py). Otherwise the work ended without a complete
                    # response: cancel the watcher, if it started.
                    if not ex.ended:
                        limit.cancel()
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        if limit.cancelled_caught and services.ending and not ex.finished and not ex.client_gone:
            # The shutdown's grace ran out (server.main): the answer ends in its own format,
            # before Hypercorn cuts the connection (SHUTDOWN_CUT_MARGIN_S later).
            ex.outcome, ex.error = "cancelled", SHUTDOWN_MESSAGE
            if ex.response_started:
                await finish(ex, send, route.error_line(ex.error))
                return
            raise ShuttingDown(SHUTDOWN_MESSAGE)
        if plan is None:  # the body's deadline passed (an error while reading raised above)
            raise RequestError("the request body did not arrive in time", code="request_timeout", status_hint=408)
        if ex.client_gone and ex.outcome == "ok":  # an upstream failure seen first stays the outcome
            ex.outcome = "client_disconnect"
        elif limit.cancelled_caught and not ex.finished and trio.current_time() >= limit.deadline:
            # (Once the last body message has begun, the answer stands: a second one would be refused.)
            ex.outcome, ex.error = "timeout", f"the request took longer than {total_s:g} s"
            if ex.response_started:
                await finish(ex, send, route.error_line(ex.error))
            else:
                raise UpstreamTimeout(ex.error, upstream=plan.attempts[0].upstream, phase="total") from None

    async def _answer(
        self,
        plan: RoutePlan,
        outgoing: OutgoingRequest,
        send: Send,
        ex: Exchange,
        route: Route,
        inject_usage: frozenset[str],
        config: Config,
        runtimes: dict[str, UpstreamRuntime],
    ) -> None:
        services = self.services
        race = RaceResult()
        try:
            winner = await open_winning_response(
                runtimes,
                plan,
                outgoing,
                routing=config.routing,
                budget=services.hedge_budget,
                attempts=ex.attempts,
                rng=services.rng,
                result=race,
            )
        except UpstreamStatusError as exc:
            ex.upstream, ex.model_served = exc.upstream, _served(ex, exc.upstream)
            runtime = runtimes.get(exc.upstream)
            if runtime is not None:
                exc.body = runtime.redact_body(exc.body)
            await _pass_through(send, ex, exc)
            return
        finally:
            ex.hedged = race.hedged  # (also when the race failed or was cut: the hedge ran all the same)
        # The race is over: the decoded request it kept for re-sends (~1 KiB) need not live as
        # long as the stream (_proxy no longer holds it either).
        del outgoing
        ex.upstream, ex.model_served = winner.target.upstream, winner.target.model or None  # ("": a route without a model)
        ex.queue_ms = round(winner.queue_s * 1000, 3)
        try:
            if winner.body is not None and ex.stream and _sent_whole_stream(winner):
                await _relay_whole_stream(ex, winner, send, route, winner.target.upstream in inject_usage)
            elif winner.body is not None:
                ex.stream = False  # (asked for or not, this answer is not streamed: the record says what was sent)
                await relay_whole(ex, winner, send, winner.body)
                ex.prompt_tokens, ex.completion_tokens, ex.finish_reason = facts_from_body(winner.body)
                if ex.status < 400 and (message := error_in_body(winner.body)) is not None:
                    ex.outcome, ex.error = "upstream_error", f"upstream answered {ex.status} with an error: {winner.runtime.redact(message)}"
                if ex.prompt_tokens is not None or ex.completion_tokens is not None:
                    ex.token_source = "upstream"
            else:
                await relay_stream(
                    ex,
                    winner,
                    send,
                    usage_filter=UsageEventFilter() if winner.target.upstream in inject_usage else None,
                    error_line=route.error_line,
                    max_bytes=config.server.max_response_bytes,
                    write_timeout=config.server.client_write_timeout_s,
                    watchdog=services.watchdog,
                    hub=services.hub,
                )
            if ex.outcome == "upstream_error" and ex.status < 400 and winner.attempt_slot >= 0:
                # The attempt won, then its answer failed: cut, stalled or an error in it (``ex.error`` says which).
                ex.attempts[winner.attempt_slot] = with_outcome(ex.attempts[winner.attempt_slot], "broke")
            if ex.outcome == "ok" and ex.status >= 500:
                ex.outcome = "upstream_error"
        finally:
            winner.release()
            if winner.body is None and winner.scanner is not None:
                # (Also for a stream cut short from outside, its client gone: what it had so far.)
                _take_usage(ex, winner.scanner)


def _prepare(
    route: Route,
    scope: dict[str, Any],
    ex: Exchange,
    body: bytes,
    services: Services,
    config: Config,
    runtimes: dict[str, UpstreamRuntime],
) -> tuple[RoutePlan, OutgoingRequest, frozenset[str]]:
    """Decode the body once, route it, and build what every attempt sends [sync: no I/O].

    Returns the plan, the outgoing request, and the upstreams the gateway asks for the stream's
    usage itself (the client did not: their usage event is taken out of what it gets).

    Raises:
      RequestError: bad JSON, a bad ``model`` or ``stream``.
      RoutingError: no upstream serves the model.
    """
    doc = decode_json(body) if route.needs_model or body else {}
    if route.path == "/api/show" and "model" not in doc and isinstance(doc.get("name"), str):
        doc["model"] = doc["name"]  # (Ollama still takes its older field; the body goes on as sent)
    model = model_of(doc) if route.needs_model else None
    ex.model_requested = model
    if config.telemetry.log_payloads:  # the operator opted in: keep the prompt, never a key
        try:  # (decoded again, exactly: the record keeps every number as the client wrote it)
            ex.payload, ex.captured = {"request": redact(json.loads(body) if body else {})}, bytearray()
        except RecursionError:  # (the json module gives up below orjson's depth limit)
            ex.payload, ex.captured = {"request": "(not logged: nested too deeply)"}, bytearray()
    stream = doc.get("stream")
    if stream is None:  # absent or null: the route's default, as OpenAI, vLLM and Ollama take it
        stream = route.stream_default
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", param="stream")
    ex.stream = stream and route.streams
    services.rr += 1
    plan = _plan(route, model, services, config, runtimes)
    if ex.stream and route.scanner == "sse" and config.telemetry.request_usage:
        options = doc.get("stream_options")
        inject_usage = frozenset(t.upstream for t in plan.attempts
                                 if _gateway_asks_usage(options, runtimes[t.upstream].cfg.kind))
    else:
        inject_usage = frozenset()
    bodies: dict[tuple[str, bool], bytes] = {}
    # A body rewritten for some target (another model name, or usage asked for) is decoded again
    # by the json module, which keeps every integer exact (a float is written back as the same
    # double, perhaps spelled otherwise: 1E2 as 100.0).
    exact = (
        decode_json(body, exact=True)
        if model is not None and (inject_usage or any(t.model != model for t in plan.attempts))
        else doc
    )

    def body_for(target: Target) -> bytes:
        inject = target.upstream in inject_usage
        if model is None or (target.model == model and not inject):
            return body
        key = (target.model, inject)
        if key not in bodies:
            edited = dict(exact, model=target.model)
            if inject:
                options = exact.get("stream_options")
                edited["stream_options"] = dict(options if isinstance(options, dict) else {}, include_usage=True)
            bodies[key] = json.dumps(edited, separators=(",", ":")).encode()  # ASCII: a lone surrogate stays an escape
        return bodies[key]

    outgoing = OutgoingRequest(
        method=scope["method"].encode(),
        # The route's own path, never the client's raw bytes: only configured base URL + known path go out.
        target=route.path.encode() + upstream_query(scope["query_string"]),
        headers=upstream_request_headers(scope["headers"], request_id=ex.request_id, extra=[], json_body=bool(body)),
        body_for=body_for,
        stream=ex.stream,
        new_scanner=_scanner_factory(route),
        max_response_bytes=config.server.max_response_bytes,
    )
    return plan, outgoing, inject_usage


def _plan(
    route: Route, model: str | None, services: Services, config: Config, runtimes: dict[str, UpstreamRuntime]
) -> RoutePlan:
    now = trio.current_time()
    states = {uid: rt.state(now) for uid, rt in runtimes.items()}
    if model is not None:
        return plan_route(model, route.family, config, states, rr=services.rr)
    return plan_any(route.family, config, states)


def single_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error inside a nursery's group, or the group itself.

    The disconnect watcher raises nothing of its own; cancelled from outside (the shutdown
    grace is over), it and the request both raise ``Cancelled``: one of them stands for both.
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1 or all(isinstance(leaf, trio.Cancelled) for leaf in leaves):
        return leaves[0]
    return group


def _sent_whole_stream(winner: Winner) -> bool:
    """A successful answer to a streamed request that came with its length (read whole), and is not
    JSON: an event stream or NDJSON sent in one piece (a server or proxy that buffers streams)."""
    content_type = header_value(winner.response.headers, b"content-type") or b""
    return winner.response.status < 400 and not content_type.lower().startswith(b"application/json")


async def _relay_whole_stream(ex: Exchange, winner: Winner, send: Send, route: Route, inject_usage: bool) -> None:
    """Such an answer is read as the stream it is: its tokens, its end, an error event in it; the
    usage the gateway asked for is taken out if the client did not ask; and it goes out whole."""
    body = winner.body or b""
    scanner = _scanner_factory(route)()
    if scanner is not None:
        scanner.feed(body)
        scanner.end_of_body()
    if inject_usage:
        usage_filter = UsageEventFilter()
        body = usage_filter.feed(body) + usage_filter.flush()
    await relay_whole(ex, winner, send, body)
    if scanner is None:
        return
    if scanner.first_content:
        ex.ttft_ms = (trio.current_time() - ex.arrival) * 1000  # (all of it at once)
    _take_usage(ex, scanner)
    say_how_it_ended(ex, winner, scanner)


def _take_usage(ex: Exchange, scanner: SSEScanner | NDJSONScanner) -> None:
    ex.finish_reason = scanner.finish_reason
    usage = scanner.usage()
    if usage is not None and (usage.prompt_tokens is not None or usage.completion_tokens is not None):
        ex.prompt_tokens, ex.completion_tokens, ex.token_source = usage.prompt_tokens, usage.completion_tokens, "upstream"
    elif scanner.content_chars:
        ex.completion_tokens, ex.token_source = estimate_tokens(scanner.content_chars), "estimate"


def _scanner_factory(route: Route) -> Callable[[], SSEScanner | NDJSONScanner | None]:
    if route.scanner == "sse":
        return SSEScanner
    if route.scanner == "ndjson":
        return NDJSONScanner
    return lambda: None


def _served(ex: Exchange, upstream: str) -> str | None:
    for a in reversed(ex.attempts):
        if a.upstream == upstream:
            return a.model or None
    return None


def _gateway_asks_usage(options: object, kind: str) -> bool:
    """Whether the gateway asks an upstream of this ``kind`` for a stream's usage (``include_usage:
    true`` put in, and the usage event taken out of what the client gets), given the client's
    ``stream_options``: when the client gets no usage event either way. Not when it asked
    (``include_usage: true``), nor for an object without the key sent to vLLM, whose default
    there is true (the client gets vLLM's usage event, as it would from vLLM); an object
    without the key means no usage event at OpenAI, Ollama and llama.cpp. A value that is not
    a boolean or null goes to the upstream as sent, its to judge."""
    if not isinstance(options, dict):
        return True  # (absent or null; another type is replaced, as before: the upstream would refuse it)
    if "include_usage" not in options:
        return kind != "vllm"
    include = options["include_usage"]
    return include is False or include is None


class _DisconnectWatch:
    """A request not yet watched for a client that hangs up (``Watchdog`` entry).

    Once the request has run ``timeout`` seconds (from the end of its body), the watchdog
    calls :meth:`expire`, which starts watching. Served by trioproxy's Hypercorn I/O
    (``hypercorn_fast``), the request's scope carries a ``DisconnectNotice``: the watch is
    a callback on it, no task. Otherwise (Hypercorn's own I/O, another ASGI server) it
    starts ``_watch_disconnect`` in the request's own nursery (open: the request forgets
    this entry before it leaves that nursery), parked in ``receive()``. A client gone
    before then is noticed then: the notice has fired, or Hypercorn has queued its
    ``http.disconnect``, so the watcher's first ``receive()`` returns it at once. An answer
    complete before then is recorded ``ok`` even if its client had left: Hypercorn drops
    writes to a closed connection silently, so nothing else tells. (The watcher runs in
    the watchdog's context, not the request's: trioproxy keeps no context variables.)
    """

    __slots__ = ("limit", "task", "request", "receive", "ex", "since", "timeout", "notice")

    def __init__(
        self,
        limit: trio.CancelScope,
        request: trio.Nursery | None,
        receive: Receive,
        ex: Exchange,
        since: float,
        timeout: float,
        notice: DisconnectNotice | None,
    ) -> None:
        """``limit``: the request's cancel scope; ``request``: its nursery (needed only without ``notice``)."""
        self.limit, self.request, self.receive, self.ex, self.timeout, self.notice = limit, request, receive, ex, timeout, notice
        #: The request's task (the one that made this watch).
        self.task = trio.lowlevel.current_task()
        #: When the request began to run unwatched (a ``Watched`` wait that ends only by expiring or being forgotten).
        self.since: float | None = since

    def expire(self) -> None:
        if self.notice is not None:
            self.notice.subscribe(self.client_gone)
            return
        assert self.request is not None  # (_RequestScope opens a nursery when there is no notice)
        # A constant name: trio would otherwise format one per task (~0.2 KiB held per stream).
        self.request.start_soon(_watch_disconnect, self.receive, self, name="disconnect watcher")

    def client_gone(self) -> None:
        """The client's stream closed: if the answer is not complete, cut the request.

        Called by the notice from whichever task closed the stream: Hypercorn's reader (the
        client's EOF or reset), or this request's own task, inside its ``send``, when its
        write found the connection gone. Not cancelled then: the cancellation would land in
        Hypercorn's close path, which has more to do; the relay sees ``client_gone`` once
        its ``send`` returns, and stops.
        """
        if self.ex.finished:  # after the last body message it only means the exchange is over
            return
        self.ex.client_gone = True
        if trio.lowlevel.current_task() is not self.task:
            self.limit.cancel()


def _head_size(scope: dict[str, Any]) -> int:
    """The request head's size as sent over HTTP/1.1: its request line and header lines.

    Hypercorn (h11) checks ``max_header_bytes`` only against a head still incomplete after a
    read, so a larger one that arrived whole in one read (up to 64 KiB) got through.
    """
    size = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
    for name, value in scope["headers"]:
        size += len(name) + len(value) + 4
    return size


class _RequestScope:
    """A request's cancel scope, in a nursery of its own only if the disconnect watch may need a task.

    Served by trioproxy's Hypercorn I/O, a request's scope carries a ``DisconnectNotice``:
    its watch is a callback and the request starts no task, so a plain cancel scope bounds
    it, whose exit, unlike a nursery's, is no schedule point (one trip through the scheduler
    fewer per request). Otherwise the watcher task runs in the request's own nursery
    (STYLE.md: request code owns its tasks). Yields ``(cancel scope, nursery or None)``.
    The cancel scope is in ``registry`` while it is open (``Services.open_requests``: what
    the shutdown ends once its grace has run out).
    """

    __slots__ = ("_manager", "_registry", "_scope")

    def __init__(self, registry: set[trio.CancelScope], *, with_nursery: bool) -> None:
        self._manager = trio.open_nursery() if with_nursery else None
        self._registry = registry
        self._scope: trio.CancelScope | None = None

    async def __aenter__(self) -> tuple[trio.CancelScope, trio.Nursery | None]:
        if self._manager is None:
            scope = self._scope = trio.CancelScope()
            self._registry.add(scope)
            return scope.__enter__(), None
        nursery = await self._manager.__aenter__()
        self._scope = nursery.cancel_scope
        self._registry.add(self._scope)
        return nursery.cancel_scope, nursery

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._scope is not None
        self._registry.discard(self._scope)
        if self._manager is None:
            return self._scope.__exit__(*exc)
        return await self._manager.__aexit__(*exc)


async def _watch_disconnect(receive: Receive, watch: _DisconnectWatch) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            watch.client_gone()
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    # Resources belong to server.main, not to the lifespan protocol: answer at once.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _pass_through(send: Send, ex: Exchange, exc: UpstreamStatusError) -> None:
    """Relay an upstream's error answer (nothing left to fail over to) as it gave it."""
    headers = client_response_headers(
        exc.headers, request_id=ex.request_id, upstream_id=exc.upstream.encode(), streamed=False
    )
    headers.append((b"content-length", str(len(exc.body)).encode()))
    ex.outcome, ex.error, ex.stream = "upstream_error", exc.message, False
    await send_whole(ex, send, exc.status, headers, exc.body)


async def _send_error(send: Send, ex: Exchange, route: Route | None, exc: TrioproxyError, scope: dict[str, Any]) -> None:
    status = exc.status_hint
    family = route.family if route is not None else ("ollama" if ex.route.startswith("/api/") else "openai")
    body = error_body(exc, ollama=family == "ollama")
    headers = [
        (b"content-type", b"application/json; charset=utf-8" if family == "ollama" else b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", ex.request_id),
    ]
    if isinstance(exc, (NoHealthyUpstream, RateLimited, ShuttingDown)):
        headers.append((b"retry-after", str(exc.retry_after_s).encode()))
    elif isinstance(exc, MethodNotAllowed):
        headers.append((b"allow", exc.allow.encode()))
    ex.stream = False  # (the record's "stream": the answer was not streamed)
    if not ex.body_read and scope.get("http_version") in ("1.0", "1.1") and not _body_came(scope):
        # Answered before its body came whole (a 413 by its declared length, a 401 while a large
        # body is on its way...): the server closes the connection after this answer. Say so
        # (RFC 9112 §9.6), or the client's next request on it may meet the close.
        headers.append((b"connection", b"close"))
    ex.error = ex.error or exc.message  # an internal error's record keeps its cause
    await send_whole(ex, send, status, headers, body)
    if ex.outcome == "ok":
        rejected = isinstance(exc, (RequestError, RoutingError, RateLimited, AuthError, Forbidden)) and status < 500
        ex.outcome = "rejected" if rejected else "upstream_error"
        if isinstance(exc, UpstreamError) and exc.status_hint == 504:
            ex.outcome = "timeout"


def _body_came(scope: dict[str, Any]) -> bool:
    """Whether the request's whole body has come (none declared, or its last piece is in the inbox).

    What has come is taken from the inbox (the answer does not need it). Without the inbox
    (Hypercorn's own I/O), a declared body counts as not come.
    """
    headers = scope["headers"]
    length = header_value(headers, b"content-length")
    if (length is None or length.strip(b"0 \t") == b"") and header_value(headers, b"transfer-encoding") is None:
        return True  # no body
    inbox = scope["extensions"].get(INBOX) if "extensions" in scope else None
    while inbox is not None and (message := inbox.receive_nowait()) is not None:
        if message["type"] != "http.request" or not message.get("more_body", False):
            return bool(message["type"] == "http.request")
    return False


__all__ = ["ProxyApp", "Exchange", "sse_error_event", "ndjson_error_line"]
