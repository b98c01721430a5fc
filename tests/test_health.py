"""HealthBoard transitions with explicit time, no sockets."""

from __future__ import annotations

from trioproxy.health import HealthBoard, Transition


def board(rise: int = 2, fall: int = 3) -> HealthBoard:
    return HealthBoard(rise={"u": rise}, fall={"u": fall})


def test_starts_healthy_and_the_first_verdict_stands_at_once() -> None:
    # Healthy is assumed before any probe (traffic flows); the first probe's answer is seen, not assumed.
    b = board()
    assert b.healthy("u") and not b.checked("u")
    assert b.observe("u", ok=False, now=1, reason="ConnectError") == Transition("u", False, "ConnectError")
    assert not b.healthy("u") and b.checked("u")
    assert b.describe("u") == {"healthy": False, "checked": True, "since": 1, "reason": "ConnectError"}
    up = board()
    assert up.observe("u", ok=True, now=1) is None
    assert up.healthy("u") and up.checked("u")


def test_after_the_first_verdict_it_falls_after_threshold() -> None:
    b = board()
    b.observe("u", ok=True, now=0)
    assert b.observe("u", ok=False, now=1) is None
    assert b.observe("u", ok=False, now=2) is None
    assert b.observe("u", ok=False, now=3, reason="ConnectError") == Transition("u", False, "ConnectError")
    assert not b.healthy("u")
    assert b.describe("u") == {"healthy": False, "checked": True, "since": 3, "reason": "ConnectError"}


def test_a_success_resets_the_failure_streak() -> None:
    b = board()
    b.observe("u", ok=True, now=0)
    for now in range(1, 3):
        b.observe("u", ok=False, now=now)
    b.observe("u", ok=True, now=3)
    assert b.observe("u", ok=False, now=4) is None
    assert b.healthy("u")


def test_forget_starts_afresh() -> None:
    b = board(fall=3)
    b.observe("u", ok=False, now=0)
    assert not b.healthy("u")
    b.forget("u")
    assert b.healthy("u") and not b.checked("u")  # assumed again, until the next probe answers
    assert b.observe("u", ok=True, now=1) is None and b.healthy("u")


def test_rises_after_threshold() -> None:
    b = board(rise=2, fall=1)
    assert b.observe("u", ok=False, now=0) is not None
    assert b.observe("u", ok=True, now=1) is None
    assert b.observe("u", ok=True, now=2) == Transition("u", True, "")
    assert b.healthy("u")


async def test_the_checker_probes_nothing_when_health_checks_are_off() -> None:
    """``models = "discover"`` with health checks off: the checker refreshes the listing and does
    not probe (a failing probe used to take the upstream down all the same). Real httpx with its own
    mock transport; the first round is over when every task is blocked (the checker in its sleep)."""
    import httpx
    import trio
    import trio.testing

    from trioproxy.config import load_config
    from trioproxy.health import run_checker
    from trioproxy.server import build_runtime

    async def run(enabled: str) -> tuple[list[str], bool, bool]:
        config = load_config('[[upstreams]]\nid = "o"\nkind = "ollama"\nbase_url = "http://127.0.0.1:1"\n'
                             f'models = "discover"\n[upstreams.health]\nenabled = {enabled}\nfall = 1\n')
        runtime = build_runtime(config, config.upstreams[0])
        asked: list[str] = []

        def answer(request: httpx.Request) -> httpx.Response:
            asked.append(request.url.path)
            if request.url.path == "/api/tags":
                return httpx.Response(200, json={"models": [{"name": "llama3.2:latest"}]})
            return httpx.Response(500)  # the probe fails

        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http, trio.open_nursery() as nursery:
            nursery.start_soon(run_checker, runtime, HealthBoard(rise={"o": 1}, fall={"o": 1}), http)
            await trio.testing.wait_all_tasks_blocked()  # the first round done: it sleeps its interval
            nursery.cancel_scope.cancel()
        assert runtime.discovered == {"llama3.2:latest", "llama3.2"}
        return asked, runtime.healthy, runtime.checked.is_set()

    with trio.fail_after(10):
        assert await run("false") == (["/api/tags"], True, False)
        assert await run("true") == (["/api/tags", "/api/version"], False, True)
