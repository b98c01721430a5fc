"""What the gateway reads of a client's request, and what it writes down about it.

``Exchange`` collects the facts of one request as it goes (what its usage record
will say); the functions read the body (bounded), decode it once, and take the
two fields routing needs (``model``, ``stream``) [sans-IO but for the body read].
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_from_bytes

from attrs import define, field

from . import jsonread
from .errors import BodyTooLarge, RequestError
from .headers import header_value
from .telemetry import AttemptRecord, Record

Receive = Any  # ASGI receive callable
_WORKER = os.getpid()


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


@define
class Exchange:
    """Everything one request's telemetry record will say, filled in as it goes."""

    request_id: bytes
    route: str
    method: str
    arrival: float  # trio clock
    ts: float  # wall clock, for the record
    model_requested: str | None = None
    model_served: str | None = None
    upstream: str | None = None
    attempts: list[AttemptRecord] = field(factory=list)
    hedged: bool = False
    queue_ms: float = 0.0
    status: int = 0
    outcome: str = "ok"
    stream: bool = False
    ttft_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    token_source: str = "none"
    finish_reason: str | None = None
    error: str | None = None
    key_id: str | None = None
    #: Only with telemetry.log_payloads: the request (keys redacted) and the answer, capped.
    payload: dict[str, Any] | None = None
    #: The relayed bytes kept for the payload (None: not kept).
    captured: bytearray | None = None
    response_started: bool = False
    #: The server writes the last body message whatever the cancellation state
    #: (``hypercorn_app.ATOMIC_END``): ``relay.finish`` need not shield it.
    atomic_end: bool = False
    #: The last body message is being (or has been) sent.
    finished: bool = False
    #: The last body message was sent: the ASGI server now answers ``receive()`` with ``http.disconnect``.
    ended: bool = False
    client_gone: bool = False
    first_content_index: int | None = None
    #: The request's body was read to its end.
    body_read: bool = False

    def to_record(self, now: float) -> Record:
        return Record(
            request_id=self.request_id.decode(),
            ts=self.ts,
            route=self.route,
            method=self.method,
            model_requested=self.model_requested,
            model_served=self.model_served,
            upstream=self.upstream,
            attempts=tuple(self.attempts),
            hedged=self.hedged,
            status=self.status,
            outcome=self.outcome,
            stream=self.stream,
            ttft_ms=None if self.ttft_ms is None else round(self.ttft_ms, 3),
            total_ms=round((now - self.arrival) * 1000, 3),
            queue_ms=self.queue_ms,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            token_source=self.token_source,
            finish_reason=self.finish_reason,
            error=self.error,
            key_id=self.key_id,
            worker=_WORKER,
            payload=self._payload(),
        )


    def _payload(self) -> dict[str, Any] | None:
        if self.payload is None:
            return None
        if self.captured is not None:
            self.payload["response"] = bytes(self.captured[:PAYLOAD_CAP]).decode("utf-8", errors="replace")
        return self.payload


#: Bytes of an answer kept in a record when payloads are logged: enough to read, not a second copy of the traffic.
PAYLOAD_CAP = 64 * 1024
#: Request fields never logged even with log_payloads on (any depth, case-insensitive).
REDACTED_FIELDS = frozenset({"api_key", "apikey", "authorization", "password", "secret", "access_token", "key"})


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "***" if str(k).lower() in REDACTED_FIELDS else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


async def read_body(
    receive: Receive, ex: Exchange, scope: dict[str, Any], limit: int, *, take: Callable[[], Any] | None = None
) -> bytes:
    """The request's body, at most ``limit`` bytes.

    ``take``: the server's ``receive_nowait`` (``hypercorn_app.INBOX``): the messages that
    have come are taken without a schedule point each, ``receive`` awaited only when none
    is there. A request whose body came with its head is then read in the step that starts
    it (a trip through the scheduler is a whole batch of other tasks' steps on a busy core).

    Raises:
      BodyTooLarge: it declares or sends more than ``limit`` bytes.
      ClientGone: the client hung up first.
    """
    declared = header_value(scope["headers"], b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    parts: list[bytes] = []
    while True:
        message = take() if take is not None else None
        if message is None:
            message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        ex.bytes_in += len(chunk)
        if ex.bytes_in > limit:
            raise BodyTooLarge(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            ex.body_read = True
            return b"".join(parts)


def decode_json(body: bytes, *, exact: bool = False) -> dict[str, Any]:
    """The request body as an object.

    To read it, ``jsonread`` (orjson: an integer beyond 64 bits may come back as a float).
    ``exact``: the json module, which keeps every integer exact (orjson may round one beyond 64
    bits) and refuses a number beyond a double's range, for a body
    that is rewritten for an upstream or logged.
    """
    try:
        doc = json.loads(body, parse_float=_finite) if exact else jsonread.loads(body)
    except _OutOfRange as exc:
        raise RequestError(
            f"The number {exc.text[:40]} in the request body is out of range (beyond a 64-bit float)."
        ) from None
    except (ValueError, RecursionError):
        raise RequestError(
            "We could not parse the JSON body of your request: expected a JSON object (UTF-8)."
        ) from None
    if not isinstance(doc, dict):
        raise RequestError(f"The request body must be a JSON object, not {_JSON_KINDS.get(type(doc), 'a number')}.")
    return doc


class _OutOfRange(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _finite(text: str) -> float:
    """A JSON number as a float; one beyond a double's range would be written back as ``Infinity``,
    which is not JSON."""
    value = float(text)
    if math.isinf(value):
        raise _OutOfRange(text)
    return value


#: What a client sent, in JSON's words (not Python's: ``NoneType``, ``list``, ``str``).
_JSON_KINDS = {type(None): "null", list: "an array", str: "a string", bool: "a boolean"}


def upstream_query(query: bytes) -> bytes:
    """The client's query string, with anything not allowed in an HTTP/1.1 request line percent-encoded."""
    if not query:
        return b""
    return b"?" + quote_from_bytes(query, safe="!$&'()*+,;=:@/?%~-._").encode()


def model_of(doc: dict[str, Any]) -> str:
    model = doc.get("model")
    if model is None or model == "":
        raise RequestError("you must provide a model parameter", param="model")
    if not isinstance(model, str):
        raise RequestError("'model' must be a string", param="model")
    if len(model) > MAX_MODEL_NAME:
        raise RequestError(f"'model' is longer than {MAX_MODEL_NAME} characters", param="model")
    return model


#: Longest model name taken: real ones are far shorter, and the name goes into every record.
MAX_MODEL_NAME = 256
