"""``trioproxy top``: a live terminal dashboard of a running gateway.

It subscribes to the gateway's ``/_/live`` feed (trio-websocket) and polls
``/readyz`` for upstream state, folds what it sees into ``TopState`` (sans-IO,
time passed in) and redraws one rich frame in place: requests/s, TTFT p50/p99,
tokens/s over the last ``WINDOW_S`` seconds, per-upstream health, circuit and
in-flight, and the last requests.
"""

from __future__ import annotations

import argparse
import calendar
import json
import sys
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from attrs import define, field
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from .logview import fmt_ms, printable

#: Seconds of records the rates and percentiles are computed over.
WINDOW_S = 10.0
#: Rows of recent requests shown.
RECENT = 12
#: Probe and admin routes (top's own /readyz polls among them): not application traffic.
HIDDEN_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/_/live"})
#: How often /readyz is polled and the frame redrawn.
REFRESH_S = 1.0


@define
class TopState:
    """Everything the dashboard shows, folded from feed events and /readyz answers [sans-IO]."""

    window: deque[tuple[float, dict[str, Any]]] = field(factory=deque)
    recent: deque[dict[str, Any]] = field(factory=lambda: deque(maxlen=RECENT))
    upstreams: dict[str, Any] = field(factory=dict)
    total: int = 0
    connected: bool = False

    def add(self, record: dict[str, Any], now: float) -> None:
        if record.get("route") in HIDDEN_ROUTES:
            return
        self.window.append((now, record))
        self.recent.appendleft(record)
        self.total += 1
        self.expire(now)

    def expire(self, now: float) -> None:
        while self.window and self.window[0][0] < now - WINDOW_S:
            self.window.popleft()

    def summary(self) -> dict[str, float | None]:
        records = [r for _, r in self.window]
        ttfts = sorted(r["ttft_ms"] for r in records if isinstance(r.get("ttft_ms"), (int, float)))
        tokens = sum(r.get("completion_tokens") or 0 for r in records)
        errors = sum(r.get("outcome") != "ok" for r in records)
        return {
            "rps": len(records) / WINDOW_S,
            "ttft_p50": _nearest_rank(ttfts, 50),
            "ttft_p99": _nearest_rank(ttfts, 99),
            "tokens_per_s": tokens / WINDOW_S,
            "errors": float(errors),
        }


def _nearest_rank(values: list[float], p: int) -> float | None:
    if not values:
        return None
    return values[max(0, -(-p * len(values) // 100) - 1)]


def render(state: TopState, *, url: str) -> RenderableType:
    s = state.summary()
    head = Text.assemble(
        ("trioproxy top ", "bold"),
        (url, "cyan"),
        ("  live" if state.connected else "  (reconnecting)", "green" if state.connected else "red"),
        f"   last {WINDOW_S:g} s: {s['rps']:.1f} req/s   TTFT p50 {fmt_ms(s['ttft_p50'])} "
        f"p99 {fmt_ms(s['ttft_p99'])}   {s['tokens_per_s']:.1f} tok/s   errors {s['errors']:.0f}   total {state.total}",
    )
    ups = Table(title="upstreams", title_justify="left", expand=False)
    for name in ("upstream", "healthy", "circuit", "in flight", "usable"):
        ups.add_column(name)
    for uid, u in sorted(state.upstreams.items()):
        ups.add_row(
            uid,
            Text("up", "green") if u.get("healthy") else Text("down", "red"),
            str(u.get("circuit", "?")),
            str(u.get("in_flight", 0)),
            "yes" if u.get("usable") else Text("no", "red"),
        )
    last = Table(title="last requests", title_justify="left", expand=False)
    for name in ("time", "model", "upstream", "outcome", "status", "TTFT", "total", "tokens"):
        last.add_column(name)
    for r in state.recent:
        when = time.strftime("%H:%M:%S", time.localtime(_ts(r)))
        outcome = printable(str(r.get("outcome")))
        last.add_row(  # (Text, not str: Rich would read a client's "[link=...]" as markup)
            when,
            Text(printable(str(r.get("model_served") or r.get("model_requested") or "-"))),
            Text(printable(str(r.get("upstream") or "-"))),
            Text(outcome, "green" if outcome == "ok" else "red"),
            str(r.get("status")),
            fmt_ms(r.get("ttft_ms")),
            fmt_ms(r.get("total_ms")),
            f"{r.get('prompt_tokens') or 0}→{r.get('completion_tokens') or 0}",
        )
    return Group(head, ups, last)


def _ts(record: dict[str, Any]) -> float:
    ts = record.get("ts")
    if isinstance(ts, str):
        return float(calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")))
    return 0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway (default: %(default)s)")


def run_from_args(args: argparse.Namespace) -> int:
    problem = _url_problem(args.url)
    if problem is not None:
        print(f"trioproxy top: --url: {problem}", file=sys.stderr)
        return 2
    try:
        trio.run(run_top, args.url.rstrip("/"))
    except* KeyboardInterrupt:  # Ctrl-C is how a dashboard ends; it may come out of a nursery grouped
        pass
    return 0


def _url_problem(url: str) -> str | None:
    """Why ``url`` is not a gateway's base URL (``http://host:port``), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port out of range or not a number)
    except ValueError as exc:
        return f"not a valid URL ({exc}): {url!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected http://HOST:PORT (the gateway's address), got {url!r}"
    return None


async def run_top(url: str, *, frames: int | None = None) -> TopState:
    """Show the dashboard until Ctrl-C (or ``frames`` redraws, for tests); returns the final state."""
    state = TopState()
    ws_url = url.replace("https://", "wss://").replace("http://", "ws://") + "/_/live"
    with Live(render(state, url=url), refresh_per_second=4, screen=False) as live:
        async with httpx.AsyncClient(timeout=2) as http, trio.open_nursery() as nursery:
            nursery.start_soon(_follow_feed, ws_url, state)
            drawn = 0
            while frames is None or drawn < frames:
                try:
                    state.upstreams = (await http.get(url + "/readyz")).json().get("upstreams", {})
                except (httpx.HTTPError, ValueError):
                    state.upstreams = {}
                state.expire(trio.current_time())
                live.update(render(state, url=url))
                drawn += 1
                await trio.sleep(REFRESH_S)
            nursery.cancel_scope.cancel()
    return state


async def _follow_feed(ws_url: str, state: TopState) -> None:
    while True:
        try:
            async with open_websocket_url(ws_url) as ws:
                state.connected = True
                while True:
                    event = json.loads(await ws.get_message())
                    if event.get("type") == "record":
                        state.add(event["record"], trio.current_time())
        except (ConnectionClosed, HandshakeError, OSError):
            state.connected = False
        await trio.sleep(REFRESH_S)  # the gateway restarted or dropped us: reconnect
