"""`trioproxy top`: the state folded from a recorded feed, and the frame it draws (text snapshot)."""

from __future__ import annotations

import io
import json
import time

import pytest
from rich.console import Console

from trioproxy.feed import parse_event
from trioproxy.top import WINDOW_S, TopState, render

FEED = [
    '{"type":"record","record":{"request_id":"a1","ts":"2026-11-24T06:00:00.123Z","route":"/v1/chat/completions",'
    '"model_served":"llama3","upstream":"ollama","outcome":"ok","status":200,"ttft_ms":120.0,"total_ms":900.0,'
    '"prompt_tokens":10,"completion_tokens":40}}',
    '{"type":"record","record":{"request_id":"a2","ts":"2026-11-24T06:00:01.000Z","route":"/v1/chat/completions",'
    '"model_served":"llama3","upstream":"vllm","outcome":"ok","status":200,"ttft_ms":80.0,"total_ms":500.0,'
    '"prompt_tokens":10,"completion_tokens":20}}',
    '{"type":"record","record":{"request_id":"a3","ts":"2026-11-24T06:00:02.000Z","route":"/v1/chat/completions",'
    '"model_served":null,"model_requested":"gpt-9","upstream":null,"outcome":"rejected","status":404,'
    '"ttft_ms":null,"total_ms":1.0,"prompt_tokens":null,"completion_tokens":null}}',
]
READYZ = {
    "ollama": {"usable": False, "healthy": False, "in_flight": 0, "circuit": "open"},
    "vllm": {"usable": True, "healthy": True, "in_flight": 3, "circuit": "closed"},
}


def folded(now: float = 100.0) -> TopState:
    state = TopState(connected=True)
    for i, text in enumerate(FEED):
        state.add(parse_event(text)["record"], now + i)  # type: ignore[arg-type]
    state.add({"route": "/readyz", "outcome": "ok"}, now)  # top's own polling is not shown
    state.upstreams = json.loads(json.dumps(READYZ))
    return state


def test_summary_over_the_window() -> None:
    state = folded()
    s = state.summary()
    assert s == {"rps": 3 / WINDOW_S, "ttft_p50": 80.0, "ttft_p99": 120.0, "tokens_per_s": 60 / WINDOW_S, "errors": 1.0}
    state.expire(100.0 + WINDOW_S + 1.5)  # the first two have left the window
    assert state.summary()["rps"] == 1 / WINDOW_S and state.total == 3


def test_frame_snapshot() -> None:
    console = Console(record=True, width=120, color_system=None, file=io.StringIO())
    console.print(render(folded(), url="http://127.0.0.1:8080"))
    text = console.export_text()
    local = time.strftime("%H:%M:%S", time.localtime(1795500000 + 2))  # 2026-11-24T06:00:02Z
    lines = [line.rstrip() for line in text.splitlines()]
    header = " ".join(lines[:2])  # the header line wraps at 120 columns
    assert header == (
        "trioproxy top http://127.0.0.1:8080  live   last 10 s: 0.3 req/s   TTFT p50 80ms p99 120ms   6.0 tok/s"
        "   errors 1 total 3"
    )
    assert any(line.startswith("│ ollama   │ down    │ open    │ 0         │ no") for line in lines), text
    assert any(line.startswith("│ vllm     │ up      │ closed  │ 3         │ yes") for line in lines), text
    rows = [line for line in lines if line.startswith("│ ") and ("ok" in line or "rejected" in line)]
    assert rows[0].startswith(f"│ {local} │ gpt-9 ") and "rejected" in rows[0] and "404" in rows[0]
    assert len(rows) == 3


@pytest.mark.parametrize("url", ["not-a-url", "ftp://x", "http://h:70000", "http://h:port"])
def test_a_bad_url_is_one_line_and_exit_2(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each was a ValueError traceback."""
    import argparse

    from trioproxy.top import add_arguments, run_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run_from_args(parser.parse_args(["--url", url])) == 2
    err = capsys.readouterr().err
    assert err.startswith("trioproxy top: --url: ") and err.count("\n") == 1


def test_a_client_s_model_name_is_shown_as_text_not_markup() -> None:
    """``[/bold]`` stopped ``top`` (a MarkupError in its Live view); ``[link=...]`` made a hyperlink."""
    state = TopState()
    for i, model in enumerate(["[/bold]", "[link=https://evil.example/]gpt[/link]", "\x1b[2Jm"]):
        state.add({"ts": "2026-11-24T06:00:00.000Z", "model_requested": model, "outcome": "ok", "status": 200,
                   "request_id": f"r{i}"}, 0.0)
    out = Console(record=True, width=200, color_system=None, file=io.StringIO())
    out.print(render(state, url="http://127.0.0.1:8080"))
    text = out.export_text()
    assert "[/bold]" in text and "[link=https://evil.example/]gpt[/link]" in text and "\\x1b[2Jm" in text
