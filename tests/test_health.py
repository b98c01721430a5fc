"""HealthBoard transitions with explicit time, no sockets."""

from __future__ import annotations

from trioproxy.health import HealthBoard, Transition


def board(rise: int = 2, fall: int = 3) -> HealthBoard:
    return HealthBoard(rise={"u": rise}, fall={"u": fall})


def test_starts_healthy_and_falls_after_threshold() -> None:
    b = board()
    assert b.healthy("u")
    assert b.observe("u", ok=False, now=1) is None
    assert b.observe("u", ok=False, now=2) is None
    assert b.observe("u", ok=False, now=3, reason="ConnectError") == Transition("u", False, "ConnectError")
    assert not b.healthy("u")
    assert b.describe("u") == {"healthy": False, "since": 3, "reason": "ConnectError"}


def test_a_success_resets_the_failure_streak() -> None:
    b = board()
    for now in range(2):
        b.observe("u", ok=False, now=now)
    b.observe("u", ok=True, now=3)
    assert b.observe("u", ok=False, now=4) is None
    assert b.healthy("u")


def test_rises_after_threshold() -> None:
    b = board(rise=2, fall=1)
    assert b.observe("u", ok=False, now=0) is not None
    assert b.observe("u", ok=True, now=1) is None
    assert b.observe("u", ok=True, now=2) == Transition("u", True, "")
    assert b.healthy("u")
