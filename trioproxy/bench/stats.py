"""Percentiles and latency summaries for the benchmark [sans-IO].

Every number the bench reports about a distribution comes from :func:`summarize`,
so the JSON file, the markdown table and the chart cannot disagree. Percentiles
interpolate linearly between the two nearest ranks (numpy's default, "type 7"),
which is what most load tools (k6, wrk2's HdrHistogram at full precision) print
for samples this size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from attrs import frozen

__all__ = ["Summary", "added", "percentile", "summarize"]

#: The percentiles every summary carries; p90 and p99 are the ones the targets use.
QUANTILES = (0.5, 0.9, 0.99)


@frozen
class Summary:
    """One distribution, in the unit it was recorded in (milliseconds, for latencies)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    min: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "mean": self.mean,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "max": self.max,
            "min": self.min,
        }


#: What an empty distribution summarizes to: NaN everywhere, so a missing number never looks like 0 ms.
EMPTY = Summary(count=0, mean=math.nan, p50=math.nan, p90=math.nan, p99=math.nan, max=math.nan, min=math.nan)


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 ≤ q ≤ 1) of an ascending sequence, interpolated between ranks.

    Returns NaN for an empty sequence.

    Raises:
      ValueError: ``q`` outside [0, 1].
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], not {q!r}")
    n = len(ordered)
    if n == 0:
        return math.nan
    if n == 1:
        return float(ordered[0])
    rank = q * (n - 1)
    low = int(rank)  # floor: rank is never negative
    if low >= n - 1:
        return float(ordered[-1])
    frac = rank - low
    return float(ordered[low]) + (float(ordered[low + 1]) - float(ordered[low])) * frac


def summarize(values: Iterable[float]) -> Summary:
    """Count, mean, p50/p90/p99, max and min of ``values`` (NaNs are skipped)."""
    ordered = sorted(v for v in values if v == v)  # v != v only for NaN
    if not ordered:
        return EMPTY
    return Summary(
        count=len(ordered),
        mean=math.fsum(ordered) / len(ordered),
        p50=percentile(ordered, 0.5),
        p90=percentile(ordered, 0.9),
        p99=percentile(ordered, 0.99),
        max=float(ordered[-1]),
        min=float(ordered[0]),
    )


def added(through: Summary, direct: Summary) -> dict[str, float]:
    """What going through the gateway adds, percentile by percentile (``through - direct``).

    A difference of percentiles, not a percentile of differences: the two runs are
    separate samples, so there is no per-request pairing to subtract.
    """
    return {
        "p50": through.p50 - direct.p50,
        "p90": through.p90 - direct.p90,
        "p99": through.p99 - direct.p99,
        "max": through.max - direct.max,
    }
