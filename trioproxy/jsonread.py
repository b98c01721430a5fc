"""``loads``: JSON the gateway only reads, never sends on [sans-IO].

orjson first (several times faster than the json module on an answer's few hundred
bytes), the json module for whatever orjson refuses: NaN and Infinity, a lone
surrogate escape, UTF-16 or UTF-32 bytes, a UTF-8 byte-order mark. So it accepts
what ``json.loads`` accepts, and raises ``ValueError`` where it raises one. Two
differences: an integer beyond 64 bits comes back as a float (harmless to a reader
of token counts and finish reasons), and nesting is read up to orjson's 1,024 levels,
where the json module gives up somewhat below 1,000 (with ``RecursionError``, which
this turns into ``ValueError``, so a reader need catch only that).

So it is for reading only. A request body is read with it (``exchange.decode_json``), and
decoded again with the json module when it must be rewritten for an upstream or logged
(``app._prepare``): there every number must survive as the client wrote it.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["loads"]


def loads(data: bytes | str) -> Any:
    """Decode one JSON text. Raises ValueError (``json.JSONDecodeError``) if it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except RecursionError:  # deeper than orjson's limit too
        raise ValueError("JSON nested too deeply") from None
