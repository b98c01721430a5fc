"""Where the gateway's CPU goes: py-spy's collapsed stacks → top functions [sans-IO].

``py-spy record --format raw`` writes one line per distinct stack,
``frame;frame;...;leaf COUNT``, each frame ``function (file:line)``. Line numbers
are dropped here so a function is one row however many lines of it were sampled.

- *self* share: samples whose leaf (innermost frame) is the function: the time
  spent in its own code (and in C functions it calls, which py-spy does not show
  unless ``--native``).
- *inclusive* share: samples with the function anywhere on the stack (counted
  once per sample, however deep the recursion).
"""

from __future__ import annotations

import re
from collections import Counter

from attrs import frozen

from .scenarios import CHECKOUT

__all__ = ["Hotspot", "parse_collapsed", "top_functions"]

# "name (path/to/file.py:123)" → "name (path/to/file.py)"; frames without a location stay as they are.
_LINE = re.compile(r"^(.*) \((.*?):\d+\)$")
#: Paths are shortened to what follows the last of these (site-packages/trio/_core/... → trio/_core/...).
_ROOTS = ("site-packages/", "lib/python3.", f"{CHECKOUT}/")
#: A ``--baseline`` gateway's unpacked source (``<run dir>/baseline-<commit>/trioproxy/...``).
_BASELINE_ROOT = re.compile(r"/baseline-[0-9a-f]{12}/")


@frozen
class Hotspot:
    function: str
    self_share: float
    inclusive_share: float
    self_samples: int
    inclusive_samples: int


def _short(frame: str) -> str:
    match = _LINE.match(frame)
    if not match:
        return frame
    name, path = match[1], match[2]
    baseline = _BASELINE_ROOT.search(path)
    if baseline:
        return f"{name} ({path[baseline.end():]})"
    for root in _ROOTS:
        i = path.rfind(root)
        if i >= 0:
            path = path[i + len(root) :]
            if root == "lib/python3.":  # "11/asyncio/x.py" → "asyncio/x.py"
                path = path.partition("/")[2]
            break
    return f"{name} ({path})"


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """``[(frames outermost first, samples), ...]`` from py-spy's raw output; bad lines skipped."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append(([_short(f) for f in stack.split(";")], int(count)))
    return stacks


def top_functions(stacks: list[tuple[list[str], int]], *, limit: int = 20, by: str = "self") -> list[Hotspot]:
    """The ``limit`` functions with the largest ``by`` ("self" or "inclusive") share of samples."""
    total = sum(n for _, n in stacks)
    if not total:
        return []
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, n in stacks:
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    ranked = own if by == "self" else incl
    return [
        Hotspot(function=f, self_share=own[f] / total, inclusive_share=incl[f] / total,
                self_samples=own[f], inclusive_samples=incl[f])
        for f, _ in ranked.most_common(limit)
    ]


def group_shares(stacks: list[tuple[list[str], int]], groups: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Self-time share per component, a leaf going to the first group whose marker its frame contains.

    ``groups`` maps a label (``"hypercorn"``) to substrings of a frame (``"hypercorn/"``);
    leaves matching none are ``"other"``.
    """
    total = sum(n for _, n in stacks)
    shares: Counter[str] = Counter()
    for frames, n in stacks:
        leaf = frames[-1]
        label = next((g for g, markers in groups.items() if any(m in leaf for m in markers)), "other")
        shares[label] += n
    return {k: v / total for k, v in shares.most_common()} if total else {}
