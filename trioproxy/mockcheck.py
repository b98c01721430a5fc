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


def _model(body: dict[str, Any], models: tuple[str, ...], fmt: ErrorFormat, *, key: str = "model") -> str:
    model = body.get(key)
    if not isinstance(model, str) or not model:
        raise _Reject(400, "model is required" if fmt == "ollama" else "you must provide a model parameter")
    if "*" in models or model in _known_names(models) or _with_tag(model) in _known_names(models):
        return model
    if fmt == "ollama":
        raise _Reject(404, f"model '{model}' not found")
    raise _Reject(404, f"The model `{model}` does not exist.")


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
