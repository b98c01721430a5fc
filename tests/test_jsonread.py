"""jsonread.loads: orjson's speed, the json module's verdicts (what it accepts and refuses)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy import jsonread

_INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_values = st.recursive(
    st.none() | st.booleans() | _INT64 | st.floats() | st.text(alphabet=st.characters(codec=None), max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and each float compared bit for bit by value."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=400)
@given(_values, st.booleans())
def test_it_decodes_what_the_json_module_decodes_to_the_same_value(value: Any, ascii_only: bool) -> None:
    # NaN, Infinity and lone surrogates included: orjson refuses those, the json module takes them.
    text = json.dumps(value, ensure_ascii=ascii_only)
    data = text.encode("utf-8", "surrogatepass") if not ascii_only else text.encode()
    try:
        expected = json.loads(data)
    except ValueError:  # a raw lone surrogate is not UTF-8: both must refuse it
        with pytest.raises(ValueError):
            jsonread.loads(data)
        return
    assert _same(jsonread.loads(data), expected)
    assert _same(jsonread.loads(text), expected)


@settings(max_examples=400)
@given(st.binary(max_size=40) | st.sampled_from([b'{"a":1', b"[1,]", b"\xef\xbb\xbf{}", b"{'a':1}", b"01", b"",
                                                  '{"a":1}'.encode("utf-16"), b'{"a":1}{"b":2}']))
def test_it_refuses_exactly_what_the_json_module_refuses(data: bytes) -> None:
    try:
        expected: Any = json.loads(data)
    except ValueError:
        with pytest.raises(ValueError):
            jsonread.loads(data)
        return
    assert _same(jsonread.loads(data), expected)


def test_an_integer_beyond_64_bits_reads_as_a_float() -> None:
    # The one documented difference; callers read token counts, which ``_int`` then ignores.
    assert jsonread.loads(b'{"n": 123456789012345678901234567890}') == {"n": 1.2345678901234568e29}


def test_nesting_is_read_to_orjsons_depth_and_deeper_is_a_value_error() -> None:
    # The json module gives up (RecursionError) somewhat below 1,000 levels; orjson reads 1,024.
    assert jsonread.loads(b"[" * 1_010 + b"]" * 1_010) is not None
    with pytest.raises(ValueError, match="nested too deeply"):
        jsonread.loads(b"[" * 100_000 + b"]" * 100_000)
