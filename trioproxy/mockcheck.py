"""The mock upstream's request reading: JSON bodies, model names, fields [sans-IO].

``mockpayloads``' handlers read every request body through these helpers; a
request they refuse raises :class:`_Reject` (status and message), which
``mockwire.plan_reply`` turns into an error reply in the route's format.

Kept apart from ``mockpayloads`` (the replies) because this is the input side
only: what each API accepts, and the prompt-size counts the replies report.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Literal

ErrorFormat = Literal["openai", "ollama"]


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
