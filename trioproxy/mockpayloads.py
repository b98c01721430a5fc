"""The mock upstream's per-API payloads: request bodies in, replies out [sans-IO].

One handler per route reads the OpenAI or Ollama request body (with
``mockcheck``'s helpers) and returns a ``mockreply`` reply: a :class:`Generation`
to stream, or a :class:`Static` whose JSON payload is built here (embeddings,
model lists, ``/api/show``...).
:func:`error_reply` builds an error body in each API's shape. ``_ROUTES`` maps
each path to its handler; ``mockwire.plan_reply`` looks requests up in it.

Kept apart from ``mockwire`` (the entry points ``mock.py`` calls) because this is
the bulk of the API knowledge and grows with every route the mock imitates.

Determinism (tests rely on it):

- ``prompt_tokens`` (Ollama: ``prompt_eval_count``) is the number of
  whitespace-separated words in the request's text (every message ``content``,
  text parts included; ``prompt``; the ``system`` of ``/api/generate``), at least
  1; a token array counts its length. Embeddings count each input so, at least 1 each.
- An embedding is ``EMBEDDING_DIM`` floats from BLAKE2b of the text, L2-normalised,
  rounded to 6 places.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any

from .mockcheck import (
    ErrorFormat,
    _cap,
    _flag,
    _go_field,
    _inputs,
    _json_object,
    _known,
    _messages_words,
    _model,
    _model_name,
    _ollama_messages,
    _openai_messages,
    _openai_n,
    _Reject,
    _with_tag,
    _words,
)
from .mockhttp import Request
from .mockreply import LOAD_DURATION_NS, Api, Generation, Reply, Static

#: Small on purpose: the mock proves the shape of embeddings, not their meaning.
EMBEDDING_DIM = 8
#: Fixed so /v1/models and /api/tags answers are byte-identical across runs.
MODEL_CREATED = 1_730_000_000
#: Fixed for the same reason as MODEL_CREATED (RFC 3339, as Ollama's Go encoder writes).
MODIFIED_AT = "2024-10-27T03:33:20Z"
#: What each prompt word "costs" in /api/embed timings: small, positive, deterministic.
PROMPT_EVAL_NS_PER_TOKEN = 50_000
#: The Ollama release whose API this mock follows (GET /api/version).
OLLAMA_VERSION = "0.12.6"
#: Realistic numbers for a llama 3.2 3B Q4_K_M, so clients that display them look normal.
MODEL_SIZE = 2_019_393_189
#: Same model's parameter count (model_info); keeps /api/show self-consistent with details.
PARAMETER_COUNT = 3_212_749_888
#: Tokens of all the choices of one answer: n × x-mock-tokens must not make the mock build a gigabyte.
MAX_ANSWER_TOKENS = 1_000_000

_OPENAI_ERROR_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
    404: "NotFoundError", 405: "MethodNotAllowedError", 409: "ConflictError",
    413: "RequestTooLargeError", 422: "UnprocessableEntityError", 429: "RateLimitError",
    500: "InternalServerError", 502: "BadGatewayError", 503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def error_format(path: str) -> ErrorFormat:
    """Which API's error shape answers ``path``: Ollama's for ``/api/*`` and ``/``."""
    return "ollama" if path.startswith("/api/") or path == "/" else "openai"


def error_reply(
    fmt: ErrorFormat, status: int, message: str, *, retry_after_s: int | None = None,
    param: str | None = None, code: str | None = None,
) -> Static:
    """An error in the route's format: vLLM's ``{"error":{...}}`` or Ollama's ``{"error":"..."}``.

    With ``param`` (one of OpenAI's request checks): OpenAI's own shape instead, type
    ``invalid_request_error``, the ``param`` and OpenAI's ``code`` (a string or null).
    ``retry_after_s`` is sent as ``Retry-After`` only with 429 and 503, as servers do.
    """
    if fmt == "ollama":
        body = _dumps({"error": message})
    elif param is not None:
        body = _dumps({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}})
    else:
        kind = _OPENAI_ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
        body = _dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})
    headers = (("retry-after", str(retry_after_s)),) if retry_after_s is not None and status in (429, 503) else ()
    return Static(status, "application/json", body, headers)


@lru_cache(maxsize=1024)
def embedding(text: str) -> tuple[float, ...]:
    """The deterministic unit vector the mock returns for ``text``."""
    digest = hashlib.blake2b(text.encode(), digest_size=EMBEDDING_DIM).digest()
    raw = [(b - 127.5) / 127.5 for b in digest]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return tuple(round(x / norm, 6) for x in raw)


Handler = Callable[[Request, tuple[str, ...], int], Reply]


def _choices(body: dict[str, Any], tokens: int) -> int:
    """``n`` (OpenAI's check), within the mock's bound on one answer's size."""
    n = _openai_n(body)
    if n * tokens > MAX_ANSWER_TOKENS:
        raise _Reject(400, f"n x tokens: at most {MAX_ANSWER_TOKENS} tokens in one mock answer")
    return n


def _usage_asked(body: dict[str, Any], stream: bool, vllm: bool) -> bool:
    """Whether a stream ends with a usage event: ``stream_options.include_usage`` true; at vLLM
    also an object without the key (its default there is true; null is not)."""
    options = body.get("stream_options")
    if not stream or not isinstance(options, dict):
        return False
    return options.get("include_usage", True if vllm else None) is True


def _chat(request: Request, models: tuple[str, ...], tokens: int, *, vllm: bool = False) -> Reply:
    body = _json_object(request.body)
    name = _model_name(body, "openai")
    _openai_messages(body)  # a malformed request is refused (400) before its model is looked up (404)
    n, reason = _cap([body.get("max_completion_tokens"), body.get("max_tokens")], tokens)
    choices = _choices(body, n)
    model = _known(name, models, "openai")
    stream = _flag(body, "stream", False)
    usage = _usage_asked(body, stream, vllm)
    return Generation("chat", model, stream, n, reason, max(1, _messages_words(body)), usage, choices)


def _completion(request: Request, models: tuple[str, ...], tokens: int, *, vllm: bool = False) -> Reply:
    body = _json_object(request.body)
    name = _model_name(body, "openai")
    n, reason = _cap([body.get("max_tokens")], tokens)
    choices = _choices(body, n)
    model = _known(name, models, "openai")
    stream = _flag(body, "stream", False)
    usage = _usage_asked(body, stream, vllm)
    return Generation("completion", model, stream, n, reason, max(1, _words(body.get("prompt"))), usage, choices)


def _ollama(api: Api) -> Handler:
    def handler(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
        body = _json_object(request.body)
        if api == "ollama_chat":  # Go decodes the whole body first: a wrong type is a 400 before any lookup
            _ollama_messages(body)
            empty = not body.get("messages")
        else:
            _go_field(body, "prompt", "GenerateRequest", "string", str)
            empty = not body.get("prompt")
        model = _model(body, models, "ollama")
        stream = _flag(body, "stream", True)
        if empty:  # Ollama loads the model and says so (c.JSON: one object, even when a stream was asked for)
            return Generation(api, model, False, 0, "load", 0)
        options = body.get("options")
        limit = options.get("num_predict") if isinstance(options, dict) else None
        n, reason = _cap([limit if isinstance(limit, int) and limit > 0 else None], tokens)
        if api == "ollama_chat":
            words = _messages_words(body)
        else:
            words = _words(body.get("prompt")) + _words(body.get("system"))
        return Generation(api, model, stream, n, reason, max(1, words))

    return handler


def _embeddings(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    body = _json_object(request.body)
    model = _model(body, models, "openai")
    texts = _inputs(body)
    as_base64 = body.get("encoding_format") == "base64"  # the openai SDK's default
    data = []
    for i, text in enumerate(texts):
        vector = embedding(text)
        value: object = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    used = sum(max(1, _words(t)) for t in texts)
    payload = {"object": "list", "data": data, "model": model,
               "usage": {"prompt_tokens": used, "total_tokens": used}}
    return Static(200, "application/json", _dumps(payload))


def _ollama_embed(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    body = _json_object(request.body)
    model = _model(body, models, "ollama")
    texts = _inputs(body)
    used = sum(max(1, _words(t)) for t in texts)
    payload = {"model": model, "embeddings": [embedding(t) for t in texts],
               "total_duration": LOAD_DURATION_NS + used * PROMPT_EVAL_NS_PER_TOKEN,
               "load_duration": LOAD_DURATION_NS, "prompt_eval_count": used}
    return Static(200, "application/json", _dumps(payload))


def _ollama_embeddings(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    """The legacy ``/api/embeddings``: one ``prompt`` in, ``{"embedding": [...]}`` out, no counters.

    An empty (or missing) prompt only loads the model: ``{"embedding": []}``.
    """
    body = _json_object(request.body)
    _go_field(body, "prompt", "EmbeddingRequest", "string", str)
    name = _model_name(body, "ollama")
    try:
        _known(name, models, "ollama")
    except _Reject:  # this handler's own wording (Ollama's scheduler's), with Go's %q quoting
        raise _Reject(404, f"model {json.dumps(name)} not found, try pulling it first") from None
    prompt = body.get("prompt")
    return Static(200, "application/json", _dumps({"embedding": embedding(prompt) if prompt else []}))


def _listed(models: tuple[str, ...]) -> list[str]:
    return [m for m in models if m != "*"]


def _model_object(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "trioproxy-mock"}


def _models(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    payload = {"object": "list", "data": [_model_object(m) for m in _listed(models)]}
    return Static(200, "application/json", _dumps(payload))


def _model_by_id(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    model = _model({"model": request.path.removeprefix("/v1/models/")}, models, "openai")
    return Static(200, "application/json", _dumps(_model_object(model)))


_DETAILS = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
            "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}


def _tag_entry(name: str) -> dict[str, object]:
    full = _with_tag(name)
    return {"name": full, "model": full, "modified_at": MODIFIED_AT, "size": MODEL_SIZE,
            "digest": hashlib.sha256(full.encode()).hexdigest(), "details": _DETAILS}


def _tags(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    return Static(200, "application/json", _dumps({"models": [_tag_entry(m) for m in _listed(models)]}))


def _ps(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    running = [{**_tag_entry(m), "expires_at": "2099-01-01T00:00:00Z", "size_vram": MODEL_SIZE,
                "context_length": 4096} for m in _listed(models)]
    for entry in running:
        del entry["modified_at"]
    return Static(200, "application/json", _dumps({"models": running}))


_TEMPLATE = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)


def _show(request: Request, models: tuple[str, ...], tokens: int) -> Reply:
    body = _json_object(request.body)
    model = _model(body, models, "ollama", key="model" if "model" in body else "name")
    payload = {
        "modelfile": f'# Modelfile generated by "ollama show"\nFROM {_with_tag(model)}\n'
                     f'TEMPLATE """{_TEMPLATE}"""\nPARAMETER stop <|eot_id|>\n',
        "parameters": 'stop                           "<|eot_id|>"',
        "template": _TEMPLATE,
        "details": _DETAILS,
        "model_info": {"general.architecture": "llama", "general.file_type": 15,
                       "general.parameter_count": PARAMETER_COUNT, "general.quantization_version": 2,
                       "llama.context_length": 131072, "llama.embedding_length": 3072, "llama.block_count": 28},
        "capabilities": ["completion"],
        "modified_at": MODIFIED_AT,
    }
    return Static(200, "application/json", _dumps(payload))


def _fixed(status: int, content_type: str, body: bytes) -> Handler:
    reply = Static(status, content_type, body)
    return lambda request, models, tokens: reply


_OPENAI_KINDS = frozenset({"openai", "vllm", "ollama", "both"})
_OLLAMA_KINDS = frozenset({"ollama", "both"})
_VLLM_KINDS = frozenset({"openai", "vllm", "both"})
#: path → (method, handler, the mock kinds that serve it)
_ROUTES: dict[str, tuple[str, Handler, frozenset[str]]] = {
    "/v1/chat/completions": ("POST", _chat, _OPENAI_KINDS),
    "/v1/completions": ("POST", _completion, _OPENAI_KINDS),
    "/v1/embeddings": ("POST", _embeddings, _OPENAI_KINDS),
    "/v1/models": ("GET", _models, _OPENAI_KINDS),
    "/health": ("GET", _fixed(200, "", b""), _VLLM_KINDS),  # vLLM: 200, no body, no content-type
    "/": ("GET", _fixed(200, "text/plain; charset=utf-8", b"Ollama is running"), _OLLAMA_KINDS),
    "/api/chat": ("POST", _ollama("ollama_chat"), _OLLAMA_KINDS),
    "/api/generate": ("POST", _ollama("ollama_generate"), _OLLAMA_KINDS),
    "/api/embed": ("POST", _ollama_embed, _OLLAMA_KINDS),
    "/api/embeddings": ("POST", _ollama_embeddings, _OLLAMA_KINDS),  # legacy, still served (ollama.embeddings)
    "/api/tags": ("GET", _tags, _OLLAMA_KINDS),
    "/api/show": ("POST", _show, _OLLAMA_KINDS),
    "/api/ps": ("GET", _ps, _OLLAMA_KINDS),
    "/api/version": ("GET", _fixed(200, "application/json", _dumps({"version": OLLAMA_VERSION})), _OLLAMA_KINDS),
}
_MODEL_BY_ID = ("GET", _model_by_id, _OPENAI_KINDS)
#: Where a kind answers otherwise: vLLM's streams end with usage for a ``stream_options``
#: object without ``include_usage``.
_KIND_ROUTES: dict[str, dict[str, tuple[str, Handler, frozenset[str]]]] = {
    "vllm": {
        "/v1/chat/completions": ("POST", partial(_chat, vllm=True), _OPENAI_KINDS),
        "/v1/completions": ("POST", partial(_completion, vllm=True), _OPENAI_KINDS),
    },
}
