"""The mock upstream's request reading: JSON bodies, model names, fields [sans-IO].

``mockpayloads``' handlers read every request body through these helpers; a
request they refuse raises :class:`_Reject` (status and message), which
``mockwire.plan_reply`` turns into an error reply in the route's format.

Requests are checked as the real servers check them, once per request (never per
token), in their words: OpenAI refuses a chat completion whose ``messages`` is
missing, not an array or empty, or whose ``n`` is not an integer 1..128 (400,
OpenAI's ``invalid_request_error`` with its ``param`` and ``code``); Ollama refuses a field of the wrong JSON type with Go's
decoding error (400, before it looks the model up).

Kept apart from ``mockpayloads`` (the replies) because this is the input side
only: what each API accepts, and the prompt-size counts the replies report.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Literal

ErrorFormat = Literal["openai", "ollama"]

#: OpenAI's upper bound of ``n``, the choices of one chat completion.
MAX_CHOICES = 128


class _Reject(Exception):
    """A refused request: ``status`` and ``message``; ``param`` and ``code``: OpenAI's checks."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _Reject(400, f"invalid JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise _Reject(400, "the JSON body must be an object")
    return value


def _with_tag(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


@lru_cache(maxsize=64)
def _known_names(models: tuple[str, ...]) -> frozenset[str]:
    return frozenset(models) | {_with_tag(m) for m in models}


def _model_name(body: dict[str, Any], fmt: ErrorFormat, *, key: str = "model") -> str:
    """The model named by ``body[key]``: 400 if missing or not a string."""
    model = body.get(key)
    if not isinstance(model, str) or not model:
        raise _Reject(400, "model is required" if fmt == "ollama" else "you must provide a model parameter")
    return model


def _known(model: str, models: tuple[str, ...], fmt: ErrorFormat) -> str:
    """``model`` if this mock serves it, else 404 (``models``: as in ``MockSettings``)."""
    if "*" in models or model in _known_names(models) or _with_tag(model) in _known_names(models):
        return model
    if fmt == "ollama":
        raise _Reject(404, f"model '{model}' not found")
    raise _Reject(404, f"The model `{model}` does not exist.")


def _model(body: dict[str, Any], models: tuple[str, ...], fmt: ErrorFormat, *, key: str = "model") -> str:
    return _known(_model_name(body, fmt, key=key), models, fmt)


#: OpenAI's words for a JSON value's type ("expected an integer, but got a string instead").
_OPENAI_TYPES: dict[type, str] = {str: "a string", bool: "a boolean", int: "an integer", float: "a decimal",
                                  list: "an array", dict: "an object"}


def _openai_messages(body: dict[str, Any]) -> list[Any]:
    """``messages`` as OpenAI checks it: present, an array, not empty (400 with its ``code``).

    ``null`` counts as missing. The messages themselves are not checked.
    """
    messages = body.get("messages")
    if messages is None:
        raise _Reject(400, "Missing required parameter: 'messages'.", param="messages",
                      code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _Reject(400, f"Invalid type for 'messages': expected an array of objects, but got "
                           f"{_OPENAI_TYPES[type(messages)]} instead.", param="messages", code="invalid_type")
    if not messages:
        raise _Reject(400, "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
                           "empty array instead.", param="messages", code="empty_array")
    return messages


def _openai_n(body: dict[str, Any]) -> int:
    """``n``, the number of choices, as OpenAI checks it: 1 by default, else an integer 1..MAX_CHOICES."""
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int):
        raise _Reject(400, f"Invalid type for 'n': expected an integer, but got {_OPENAI_TYPES[type(n)]} instead.",
                      param="n", code="invalid_type")
    if n < 1:
        raise _Reject(400, f"Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} instead.",
                      param="n", code="integer_below_min_value")
    if n > MAX_CHOICES:
        raise _Reject(400, f"Invalid 'n': integer above maximum value. Expected a value <= {MAX_CHOICES}, but got "
                           f"{n} instead.", param="n", code="integer_above_max_value")
    return n


#: Go's encoding/json words for a JSON value's type ("json: cannot unmarshal number into ...").
_GO_TYPES: dict[type, str] = {str: "string", bool: "bool", int: "number", float: "number", list: "array",
                              dict: "object"}


def _go_field(body: dict[str, Any], key: str, struct: str, go_type: str, python_type: type) -> None:
    """Refuse ``body[key]`` (400) as Ollama's Go decoder does when it is not a ``python_type``.

    ``null`` is accepted: Go decodes it to the field's zero value.
    """
    value = body.get(key)
    if value is not None and not isinstance(value, python_type):
        raise _Reject(400, f"json: cannot unmarshal {_GO_TYPES[type(value)]} into Go struct field "
                           f"{struct}.{key} of type {go_type}")


def _ollama_messages(body: dict[str, Any]) -> None:
    """``messages`` of ``/api/chat`` as Go decodes it: an array (or null) of objects (or nulls)."""
    _go_field(body, "messages", "ChatRequest", "[]api.Message", list)
    for message in body.get("messages") or ():
        if message is not None and not isinstance(message, dict):
            raise _Reject(400, f"json: cannot unmarshal {_GO_TYPES[type(message)]} into Go struct field "
                               "ChatRequest.messages of type api.Message")


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Reject(400, f"'{key}' must be a boolean")
    return value


def _cap(values: list[object], tokens: int) -> tuple[int, Literal["stop", "length"]]:
    """Tokens to send and why they end: the first integer limit given caps ``tokens``."""
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _Reject(400, "max_tokens must be a non-negative integer")
        if value < tokens:
            return value, "length"
        break
    return tokens, "stop"


def _words(value: object) -> int:
    """Words in a string; in a list: of its strings and text parts; a token array counts its length.

    Not recursive on purpose: a deeply nested body must not raise RecursionError.
    """
    if isinstance(value, str):
        return len(value.split())
    if not isinstance(value, list):
        return 0
    if value and all(isinstance(v, int) for v in value):
        return len(value)
    total = 0
    for item in value:
        if isinstance(item, dict):
            item = item.get("text")
        if isinstance(item, str):
            total += len(item.split())
        elif isinstance(item, list):  # one token array of a batch
            total += len(item)
    return total


def _messages_words(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(_words(m.get("content")) for m in messages if isinstance(m, dict))


def _inputs(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]  # one token array
        if all(isinstance(v, str) or isinstance(v, list) for v in value):
            return [v if isinstance(v, str) else " ".join(map(str, v)) for v in value]
    raise _Reject(400, "'input' must be a string or a list of strings")
