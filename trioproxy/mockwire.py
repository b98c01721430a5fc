"""The mock upstream's API entry points: which reply answers a request [sans-IO].

Nothing here does I/O or reads a clock: ``mock.py`` takes a parsed request from
``mockhttp``, asks :func:`plan_reply` what to answer and :func:`parse_overrides`
for the request's ``x-mock-*`` settings, and writes the ``mockreply`` reply it
gets back. The per-route request handling and payloads live in ``mockpayloads``.

The mock's sans-IO layers, bottom up: ``mockhttp`` (HTTP/1.1), ``mockreply``
(reply types and generation bytes), ``mockcheck`` (request bodies and their
checks), ``mockpayloads`` (per-API handlers and route table), ``mockwire`` (this
module).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from attrs import frozen

from .config import MockKind
from .mockcheck import _Reject
from .mockhttp import Request
from .mockpayloads import _KIND_ROUTES, _MODEL_BY_ID, _ROUTES, error_format, error_reply
from .mockreply import Reply, Static

#: Upper bound of x-mock-tokens: a typo must not make the mock build a gigabyte answer.
MAX_OVERRIDE_TOKENS = 1_000_000


def plan_reply(request: Request, *, kind: MockKind, models: tuple[str, ...], tokens: int) -> Reply:
    """Decide the answer to ``request``: a :class:`Static` reply or a :class:`Generation`.

    Never raises for a bad request: unknown routes (404), wrong methods (405, with
    ``Allow``), bad JSON (400), bodies the real server refuses (400, in its words:
    see ``mockcheck``) and unknown models (404) become error replies in the route's
    format. ``HEAD`` is served like ``GET`` (the caller drops the body).

    Args:
      kind: which API family this mock imitates (``/v1/*`` is served by all four; ``vllm``
        is OpenAI's with vLLM's ``/health`` and its stream-usage default).
      models: model names accepted (``"*"``: any); ``name`` matches ``name:latest``.
      tokens: content tokens to produce before any ``max_tokens`` cap.
    """
    path = request.path
    fmt = error_format(path)
    route = (_KIND_ROUTES.get(kind, {}).get(path) or _ROUTES.get(path)
             or (_MODEL_BY_ID if path.startswith("/v1/models/") else None))
    if route is None or kind not in route[2]:
        return error_reply(fmt, 404, f"no route for {request.method} {path}")
    method, handler, _ = route
    if (request.method if request.method != "HEAD" else "GET") != method:
        reply = error_reply(fmt, 405, f"method {request.method} not allowed on {path}")
        return Static(reply.status, reply.content_type, reply.body, (("allow", method),))
    try:
        return handler(request, models, tokens)
    except _Reject as exc:
        return error_reply(fmt, exc.status, exc.message, param=exc.param, code=exc.code)


@frozen
class Overrides:
    """Per-request settings from ``x-mock-*`` headers; ``None``: use the run's value.

    ``fault`` is ``(kind, argument)``: ``("none", None)`` disables the run's fault,
    ``("status", 429)``, ``("cut", 3)`` (tokens before the cut) or ``(kind, None)``.
    """

    fault: tuple[str, int | None] | None = None
    tokens: int | None = None
    ttft_ms: float | None = None
    token_delay_ms: float | None = None


_FAULT_NAMES = frozenset({"status", "reset", "hang", "cut", "garbage", "none"})


def _non_negative(name: str, text: str, convert: Callable[[str], float]) -> float:
    try:
        value = convert(text)
    except ValueError:
        raise _Reject(400, f"{name}: not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise _Reject(400, f"{name}: must be a finite number >= 0")
    return value


def parse_overrides(request: Request) -> Overrides | Static:
    """Read the ``x-mock-*`` headers; a 400 reply (route format) if one is malformed."""
    fault: tuple[str, int | None] | None = None
    tokens = ttft = delay = None
    try:
        for name, value in request.headers:
            if not name.startswith("x-mock-"):
                continue
            if name == "x-mock-fault":
                kind, _, arg = value.strip().lower().partition("=")
                if kind not in _FAULT_NAMES or (arg and kind not in ("status", "cut")):
                    raise _Reject(400, f"x-mock-fault: unknown fault {value!r}")
                number = int(_non_negative(name, arg, int)) if arg else None
                if kind == "status" and number is not None and not 400 <= number <= 599:
                    raise _Reject(400, "x-mock-fault: status must be 400-599")
                fault = (kind, number)
            elif name == "x-mock-tokens":
                tokens = int(_non_negative(name, value, int))
                if tokens > MAX_OVERRIDE_TOKENS:
                    raise _Reject(400, f"x-mock-tokens: at most {MAX_OVERRIDE_TOKENS}")
            elif name == "x-mock-ttft-ms":
                ttft = _non_negative(name, value, float)
            elif name == "x-mock-token-delay-ms":
                delay = _non_negative(name, value, float)
    except _Reject as exc:
        return error_reply(error_format(request.path), exc.status, exc.message)
    return Overrides(fault, tokens, ttft, delay)
