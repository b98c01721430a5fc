"""``loads``: JSON the gateway only reads, never sends on [sans-IO].

orjson first (several times faster than the json module on an answer's few hundred
bytes), the json module for whatever orjson refuses: NaN and Infinity, a lone
surrogate escape, UTF-16 or UTF-32 bytes, a UTF-8 byte-order mark. So it accepts
exactly what ``json.loads`` accepts, and raises ``ValueError`` where it raises one.
One difference, harmless to a reader of token counts and finish reasons: an integer
beyond 64 bits comes back as a float.

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
        return json.loads(data)
