"""The whole trioproxy exception tree, in one place (httpx style).

::

    TrioproxyError(Exception)                     base class; never raised directly
    ├── ConfigError            .errors: list[str]  startup only → exit code 2, one line per problem
    ├── RequestError           status_hint=400     the client's request is unusable
    │   └── BodyTooLarge       status_hint=413
    ├── RoutingError           status_hint=404     unknown model or route
    │   └── NoHealthyUpstream  status_hint=503
    ├── AuthError              status_hint=401     missing or unknown client key
    ├── Forbidden              status_hint=403     an admin endpoint from a non-loopback client
    ├── RateLimited            status_hint=429     a key's limits, the gateway's capacity (.retry_after_s)
    │   └── AllSaturated                           every candidate upstream at its concurrency limit
    ├── ShuttingDown           status_hint=503     the shutdown grace ran out before an answer began (.retry_after_s)
    └── UpstreamError          .upstream, status_hint=502
        ├── UpstreamConnectError                   refused, reset or closed before a response
        ├── UpstreamProtocolError                  bytes that are not HTTP/1.1, bad framing, a body cut short
        ├── UpstreamStatusError                    a final error status (.status, .body, .headers)
        └── UpstreamTimeout    status_hint=504     .phase: connect | first_byte | idle

``status_hint`` follows h11's ``error_status_hint``: ``app.py`` maps any
``TrioproxyError`` to an error response in the API's own format, in one place.
Every message here is safe to show a client: it never carries a secret, a prompt
or a header value.
"""

from __future__ import annotations

import json


class TrioproxyError(Exception):
    """Base of every error trioproxy raises on purpose."""

    status_hint: int = 500
    #: OpenAI-style error ``type`` and ``code`` for ``/v1/*`` answers.
    error_type: str = "server_error"
    error_code: str | None = None

    def __init__(self, message: str, *, status_hint: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_hint is not None:
            self.status_hint = status_hint


def error_body(exc: TrioproxyError, *, ollama: bool) -> bytes:
    """``exc`` as an error body in the API's own format: Ollama's ``{"error": "..."}``, or OpenAI's."""
    payload: dict[str, object]
    if ollama:
        payload = {"error": exc.message}
    else:
        payload = {"error": {"message": exc.message, "type": exc.error_type, "param": getattr(exc, "param", None),
                             "code": exc.error_code}}
    return json.dumps(payload, separators=(",", ":")).encode()


class ConfigError(TrioproxyError):
    """A profile that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str], *, source: str = "<config>") -> None:
        self.errors = list(errors)
        self.source = source
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"invalid configuration {source}:\n{lines}")


class RequestError(TrioproxyError):
    """The client's request cannot be served as sent (bad JSON, missing field...)."""

    status_hint = 400
    error_type = "invalid_request_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status_hint: int | None = None
    ) -> None:
        super().__init__(message, status_hint=status_hint)
        self.param = param
        self.error_code = code


class MethodNotAllowed(RequestError):
    """A known path, another method: 405 with the ``Allow`` header (RFC 9110 §15.5.6)."""

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message, status_hint=405)
        self.allow = allow


class BodyTooLarge(RequestError):
    status_hint = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the limit of {limit} bytes", code="request_too_large")
        self.limit = limit


class RoutingError(TrioproxyError):
    """No route for this request: an unknown model or path."""

    status_hint = 404
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, code: str | None = "model_not_found", param: str | None = "model") -> None:
        super().__init__(message)
        self.error_code = code
        self.param = param


class NoHealthyUpstream(RoutingError):
    """Every upstream that could serve the request is down or failed."""

    status_hint = 503
    error_type = "server_error"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, code="no_healthy_upstream", param=None)
        self.retry_after_s = retry_after_s


class AuthError(TrioproxyError):
    """No key, or a key the gateway does not know (the message never repeats the key)."""

    status_hint = 401
    error_type = "invalid_request_error"
    error_code = "invalid_api_key"


class Forbidden(TrioproxyError):
    """An admin endpoint asked for from where it is not served."""

    status_hint = 403
    error_type = "permission_error"


class RateLimited(TrioproxyError):
    """Over a limit (a key's rate or concurrency, the gateway's capacity): retry after ``retry_after_s``."""

    status_hint = 429
    error_type = "requests"
    error_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, retry_after_s)


class AllSaturated(RateLimited):
    """Every candidate upstream is at its concurrency limit and its wait queue is full."""


class ShuttingDown(TrioproxyError):
    """The gateway's shutdown grace ran out before this request's answer began: retry (another worker, or later)."""

    status_hint = 503
    error_code = "shutting_down"
    retry_after_s = 1


class UpstreamError(TrioproxyError):
    """An attempt on one upstream failed before its response could be relayed."""

    status_hint = 502
    error_type = "upstream_error"
    #: Short machine-readable outcome for telemetry attempts ("connect", "timeout", ...).
    kind = "error"

    def __init__(self, message: str, *, upstream: str) -> None:
        super().__init__(f"upstream {upstream!r}: {message}")
        self.upstream = upstream


class UpstreamConnectError(UpstreamError):
    kind = "connect_error"


class UpstreamProtocolError(UpstreamError):
    kind = "protocol_error"


class UpstreamTimeout(UpstreamError):
    status_hint = 504
    error_type = "timeout"
    kind = "timeout"

    def __init__(self, message: str, *, upstream: str, phase: str = "other") -> None:
        super().__init__(message, upstream=upstream)
        #: "connect", "first_byte" (sent, no answer: never retried on the same target), "idle" or "other".
        self.phase = phase


class UpstreamStatusError(UpstreamError):
    """The upstream answered with a status we fail over on; body already read."""

    kind = "status"

    def __init__(
        self, *, upstream: str, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        super().__init__(f"answered HTTP {status}", upstream=upstream)
        self.status = status
        self.body = body
        self.headers = headers
        self.status_hint = status
