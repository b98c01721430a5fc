"""The PNG of a scenario: latency distributions per target; TTFT over time for failover.

Drawn from ``report.analyze``'s result alone (the curves saved in the JSON), so a
chart can be redrawn from any results file. matplotlib is optional: without it the
bench writes the JSON and the table and says the chart was skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_chart"]

#: Points of the saved distribution curves (report.py samples them; enough to redraw the chart).
CDF_QUANTILES = [i / 100 for i in range(100)] + [0.995, 0.999, 1.0]
#: Zero-length gaps (tokens that arrived in one read) are drawn here on the log axis.
LOG_AXIS_FLOOR_MS = 0.01


def write_chart(result: dict[str, Any], path: Path) -> bool:
    """Latency distributions per target (and TTFT over time for failover) as a PNG.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogFormatterSciNotation, NullFormatter
    except ImportError:
        return False
    s = result["scenario"]
    stream = s["load"]["stream"]
    main_key, main_label = ("ttft", "TTFT (ms)") if stream else ("total", "total latency (ms)")
    side_key, side_label = ("gaps", "gap between tokens (ms)") if stream else ("headers", "time to headers (ms)")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, xlabel in ((axes[0], main_key, main_label), (axes[1], side_key, side_label)):
        drawn = 0
        for label, t in result["targets"].items():
            points = t["cdf"].get(key) or []
            if points:
                xs = [max(p, LOG_AXIS_FLOOR_MS) for p in points]
                ax.plot(xs, [q * 100 for q in CDF_QUANTILES[: len(points)]], label=label, linewidth=1.6)
                drawn += 1
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=True))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel + (" (0 drawn at 0.01)" if key == "gaps" else ""))
        ax.set_ylabel("percentile")
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend(loc="lower right")
        else:  # e.g. no gaps: every stream's tokens came in one read
            ax.text(0.5, 0.5, "no samples", transform=ax.transAxes, ha="center", va="center", alpha=0.6)
    if "failover" in result:
        f = result["failover"]
        ax = axes[1]
        ax.clear()
        xs = [b["t_s"] for b in f["series"]]
        ax.plot(xs, [b["ttft_p50_ms"] for b in f["series"]], label="TTFT p50", marker=".")
        ax.plot(xs, [b["ttft_max_ms"] for b in f["series"]], label="TTFT max", marker=".", alpha=0.6)
        errs = [(b["t_s"], b["errors"]) for b in f["series"] if b["errors"]]
        if errs:
            ax2 = ax.twinx()
            ax2.bar([e[0] for e in errs], [e[1] for e in errs], width=f["bucket_s"] * 0.8, color="red", alpha=0.4,
                    align="edge", label="errors")
            ax2.set_ylabel("errors per bucket", color="red")
        for k in f["kill_at_s"]:
            if k is not None:
                ax.axvline(k, color="red", linestyle="--", linewidth=1)
        ax.set_xlabel("request start, s into the window (dashed: primary killed)")
        ax.set_ylabel("TTFT (ms)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=True))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left")
    m = result["machine"]
    fig.suptitle(f"{s['name']}: {s['description']}\n{m['cores']} cores, {m['cpu_model']}, Python {m['python']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
