"""plan_route: ordering, eligibility and not-found, without sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.config import Config, Upstream, load_config
from trioproxy.errors import RoutingError
from trioproxy.routing import UpstreamState, plan_any, plan_route, public_models

PROFILE = """
[routing]
max_attempts = 5
aliases = { fast = "llama3.2:1b" }
[[upstreams]]
id = "ollama"
kind = "ollama"
base_url = "http://127.0.0.1:11434"
models = ["llama3*", "qwen2.5"]
priority = 0
[[upstreams]]
id = "vllm-a"
kind = "vllm"
base_url = "http://127.0.0.1:8000"
models = ["llama3.2:1b", "mistral"]
priority = 1
[[upstreams]]
id = "vllm-b"
kind = "vllm"
base_url = "http://127.0.0.1:8001"
models = ["llama3.2:1b", "mistral"]
priority = 1
weight = 3
"""
CONFIG = load_config(PROFILE)


def order(model: str, states: dict[str, UpstreamState] | None = None, *, family: str = "openai", rr: int = 0) -> list[str]:
    plan = plan_route(model, family, CONFIG, states or {}, rr=rr)  # type: ignore[arg-type]
    return [t.upstream for t in plan.attempts]


def test_priority_then_weighted_rotation_among_equals() -> None:
    # vllm-a (weight 1) and vllm-b (weight 3) tie: b leads 3 requests in 4.
    leaders = [order("llama3.2:1b", rr=rr)[1] for rr in range(8)]
    assert leaders == ["vllm-a", "vllm-b", "vllm-b", "vllm-b"] * 2
    assert all(order("llama3.2:1b", rr=rr)[0] == "ollama" for rr in range(8))
    assert order("llama3.2:1b", rr=1) == ["ollama", "vllm-b", "vllm-a"]


def test_globs_and_exact_names() -> None:
    assert order("llama3.1:8b") == ["ollama"]
    assert order("mistral") == ["vllm-a", "vllm-b"]


def test_unhealthy_goes_last() -> None:
    states = {"ollama": UpstreamState(healthy=False)}
    assert order("llama3.2:1b", states) == ["vllm-a", "vllm-b", "ollama"]


def test_least_outstanding_per_weight() -> None:
    # vllm-a: 2 in flight / weight 1 = 2; vllm-b: 3 / 3 = 1 → b first.
    states = {"vllm-a": UpstreamState(in_flight=2), "vllm-b": UpstreamState(in_flight=3)}
    assert order("mistral", states) == ["vllm-b", "vllm-a"]


def test_saturated_goes_last() -> None:
    config = load_config(PROFILE.replace('id = "vllm-a"', 'id = "vllm-a"\nmax_concurrent = 1'))
    plan = plan_route("mistral", "openai", config, {"vllm-a": UpstreamState(in_flight=1)})
    assert [t.upstream for t in plan.attempts] == ["vllm-b", "vllm-a"]


def test_ollama_routes_only_go_to_ollama_speakers() -> None:
    assert order("llama3.2:1b", family="ollama") == ["ollama"]
    with pytest.raises(RoutingError):
        order("mistral", family="ollama")


def test_alias_resolves_to_the_served_name() -> None:
    plan = plan_route("fast", "openai", CONFIG, {})
    assert [(t.upstream, t.model) for t in plan.attempts][:1] == [("ollama", "llama3.2:1b")]


def test_unknown_model_lists_what_is_available() -> None:
    with pytest.raises(RoutingError) as info:
        order("gpt-7")
    assert info.value.status_hint == 404 and info.value.error_code == "model_not_found"
    assert "gpt-7" in info.value.message and "mistral" in info.value.message and "fast" in info.value.message


def test_max_attempts_caps_the_plan() -> None:
    config = load_config(PROFILE.replace("max_attempts = 5", "max_attempts = 2"))
    assert len(plan_route("llama3.2:1b", "openai", config, {}).attempts) == 2


def test_stagger_is_infinite_without_hedging() -> None:
    assert plan_route("mistral", "openai", CONFIG, {}).stagger == float("inf")
    hedged = load_config(PROFILE.replace("max_attempts = 5", "max_attempts = 5\nhedge_after_ms = 250"))
    assert plan_route("mistral", "openai", hedged, {}).stagger == 0.25


def test_plan_any_prefers_healthy() -> None:
    plan = plan_any("openai", CONFIG, {"ollama": UpstreamState(healthy=False)})
    assert [t.upstream for t in plan.attempts] == ["vllm-a", "vllm-b", "ollama"]


def test_public_models() -> None:
    assert public_models(CONFIG.upstreams, "openai", aliases=CONFIG.routing.aliases) == [
        "fast",
        "llama3.2:1b",
        "mistral",
        "qwen2.5",
    ]


# --- the order, against a plain statement of the rules ---------------------------------------

def _reference(config: Config, states: dict[str, UpstreamState], model: str, rr: int) -> list[str]:
    """Rules 1-4 of routing.py as directly as they read: a stable sort, then each tie group rotated."""
    idle = UpstreamState()
    candidates = [u for u in config.upstreams if u.serves(model)]

    def key(u: Upstream) -> tuple[bool, int, float]:
        s = states.get(u.id, idle)
        return (not s.usable, u.priority, s.in_flight / u.weight)

    ordered: list[Upstream] = []
    for _, group in itertools.groupby(sorted(candidates, key=key), key=key):
        members = list(group)
        slot = rr % sum(u.weight for u in members)
        for start, u in enumerate(members):
            slot -= u.weight
            if slot < 0:
                members = members[start:] + members[:start]
                break
        ordered.extend(members)
    return [u.id for u in ordered[: config.routing.max_attempts]]


_upstream = st.tuples(
    st.integers(0, 2),  # priority
    st.integers(1, 3),  # weight
    st.booleans(),  # healthy
    st.integers(0, 4),  # in flight
    st.booleans(),  # serves the model
)


@settings(max_examples=300)
@given(st.lists(_upstream, min_size=1, max_size=6), st.integers(0, 50), st.integers(1, 6))
def test_the_plan_follows_the_rules_for_any_upstreams(ups: list[tuple[int, int, bool, int, bool]], rr: int, attempts: int) -> None:
    blocks = [f"[routing]\nmax_attempts = {attempts}"]
    for i, (priority, weight, _, _, serves) in enumerate(ups):
        blocks.append(
            f'[[upstreams]]\nid = "u{i}"\nkind = "vllm"\nbase_url = "http://127.0.0.1:{8000 + i}"\n'
            f'models = ["{"m" if serves else "other"}"]\npriority = {priority}\nweight = {weight}'
        )
    config = load_config("\n".join(blocks))
    states = {f"u{i}": UpstreamState(healthy=healthy, in_flight=busy) for i, (_, _, healthy, busy, _) in enumerate(ups)}
    expected = _reference(config, states, "m", rr)
    if not expected:
        with pytest.raises(RoutingError):
            plan_route("m", "openai", config, states, rr=rr)
        return
    assert [t.upstream for t in plan_route("m", "openai", config, states, rr=rr).attempts] == expected
