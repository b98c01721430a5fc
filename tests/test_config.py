"""Profiles: every shipped profile loads; every mistake is named by file, key path and expectation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trioproxy.cli import main as cli_main
from trioproxy.config import Config, load_config, load_profiles, masked, merge_tables, resolve_profile
from trioproxy.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))

MINIMAL = """
[[upstreams]]
id = "a"
base_url = "http://127.0.0.1:11434"
"""


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_profiles_load(path: Path) -> None:
    config = load_config(path.read_text(), source=str(path))
    assert config.upstreams
    assert config.source == str(path)


def test_the_required_profiles_ship() -> None:
    assert {p.stem for p in CONFIGS} >= {"demo", "ollama", "vllm", "failover", "openai-compatible"}


def test_minimal_profile_gets_defaults() -> None:
    config = load_config(MINIMAL)
    assert config.server.port == 8080
    assert config.upstreams[0].kind == "openai"
    assert config.upstreams[0].models == ("*",)
    assert config.routing.failover_statuses == (408, 429, 500, 502, 503, 504)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text, source="bad.toml")
    assert info.value.source == "bad.toml"
    assert "bad.toml" in str(info.value)
    return info.value.errors


def test_unknown_key_names_its_path() -> None:
    errors = problems(MINIMAL + "[server]\nprot = 1\n")
    assert errors == ["$.server: unknown key(s) prot"]


def test_unknown_top_level_key() -> None:
    assert any("unknown key(s) severs" in e for e in problems(MINIMAL + "[severs]\nport = 1\n"))


def test_wrong_types_name_key_path_and_expectation() -> None:
    errors = problems(
        """
[server]
port = "eighty"
[[upstreams]]
id = "a"
base_url = "http://127.0.0.1:1"
[upstreams.timeouts]
connect_ms = true
"""
    )
    assert any(e.startswith("$.server.port:") and "integer" in e for e in errors), errors
    assert any(e.startswith("$.upstreams[0].timeouts.connect_ms:") and "integer" in e for e in errors), errors


def test_bad_kind_lists_the_choices() -> None:
    errors = problems('[[upstreams]]\nid = "a"\nkind = "tgi"\nbase_url = "http://127.0.0.1:1"\n')
    assert len(errors) == 1 and errors[0].startswith("$.upstreams[0].kind:")
    assert "ollama" in errors[0] and "vllm" in errors[0]


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "required"),
        ("ftp://h:1", "http:// or https://"),
        ("http://", "expected a host"),
        ("http://u:p@h:1", "api_key_env"),
        ("http://h:notaport", "not a valid URL"),
        ("http://h:1/v1", "trailing /v1"),
    ],
)
def test_bad_base_urls(url: str, fragment: str) -> None:
    errors = problems(f'[[upstreams]]\nid = "a"\nbase_url = "{url}"\n')
    assert any(e.startswith("$.upstreams[0].base_url:") and fragment in e for e in errors), errors


def test_duplicate_upstream_ids() -> None:
    errors = problems(MINIMAL + MINIMAL)
    assert errors == ["$.upstreams[1].id: duplicate upstream id 'a'"]


def test_missing_upstreams_and_missing_id() -> None:
    assert problems("[server]\nport = 1\n") == ["$.upstreams: required: at least one [[upstreams]] table"]
    errors = problems('[[upstreams]]\nbase_url = "http://127.0.0.1:1"\n')
    assert errors == ["$.upstreams[0].id: required key missing"]


def test_every_problem_is_reported_at_once() -> None:
    errors = problems(
        """
[routing]
max_attempts = 0
failover_statuses = [200]
[[upstreams]]
id = "a b"
base_url = "http://127.0.0.1:1"
weight = 0
"""
    )
    assert len(errors) == 4, errors


@pytest.mark.parametrize("value", ["-1.0", "nan"])
def test_keep_alive_timeout_is_zero_or_more_or_inf(value: str) -> None:
    upstream = '[[upstreams]]\nid = "a"\nkind = "vllm"\nbase_url = "http://127.0.0.1:1"\nmodels = ["m"]\n'
    assert load_config(upstream + "[server]\nkeep_alive_timeout_s = inf\n").server.keep_alive_timeout_s == float("inf")
    errors = problems(upstream + f"[server]\nkeep_alive_timeout_s = {value}\n")
    assert errors == ["$.server.keep_alive_timeout_s: expected 0 or more seconds (inf: no limit)"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("[upstreams.health]\ntimeout_ms = -1\n", "$.upstreams[0].health: interval_ms must be 10 or more"),
        ("[upstreams.health]\ninterval_ms = 0\n", "$.upstreams[0].health: interval_ms must be 10 or more"),
        ("pool_max_idle = -1\n", "$.upstreams[0].pool_max_idle"),
        ("[server]\nshutdown_grace_s = -1\n", "$.server: shutdown_grace_s >= 0"),
        ("[server]\nbacklog = 0\n", "$.server: shutdown_grace_s >= 0"),
        ("[server]\nmax_response_bytes = 0\n", "$.server: shutdown_grace_s >= 0"),
    ],
)
def test_values_that_would_stop_the_gateway_are_refused(extra: str, fragment: str) -> None:
    """Each was accepted, then stopped the gateway at start or on reload (a health check with a negative
    timeout raised in its task), made it spin (interval 0), or crashed its shutdown."""
    upstream = '[[upstreams]]\nid = "a"\nbase_url = "http://127.0.0.1:1"\n'
    errors = problems(upstream + extra)
    assert len(errors) == 1 and errors[0].startswith(fragment), errors


def test_a_profile_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A reload of it killed the gateway (an uncaught UnicodeDecodeError after answering 200)."""
    from trioproxy.config import read_profiles

    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[upstreams]]\nid = "a"\nbase_url = "http://127.0.0.1:1"\n# caf\xe9\n')
    with pytest.raises(ConfigError) as info:
        read_profiles([str(path)])
    assert info.value.errors == ["not UTF-8 (TOML files are): byte 60 cannot be decoded"]
    assert info.value.source == str(path)


def test_disconnect_watch_after_ms_is_zero_or_more() -> None:
    upstream = '[[upstreams]]\nid = "a"\nbase_url = "http://127.0.0.1:1"\n'
    assert load_config(upstream + "[server]\ndisconnect_watch_after_ms = 0\n").server.disconnect_watch_after_ms == 0
    assert load_config(upstream).server.disconnect_watch_after_ms == 1_000
    errors = problems(upstream + "[server]\ndisconnect_watch_after_ms = -1\n")
    assert errors == ["$.server.disconnect_watch_after_ms: expected 0 (watch at once) or more"]


def test_not_toml() -> None:
    assert problems("[server\n")[0].startswith("not valid TOML")


def test_embedded_mock_needs_no_base_url_and_refuses_one() -> None:
    config = load_config('[[upstreams]]\nid = "m"\n[upstreams.mock]\nkind = "ollama"\n')
    assert config.upstreams[0].mock is not None and config.upstreams[0].speaks_ollama
    errors = problems('[[upstreams]]\nid = "m"\nbase_url = "http://127.0.0.1:1"\n[upstreams.mock]\n')
    assert errors[0].startswith("$.upstreams[0].base_url: must be empty")


def test_merge_overrides_tables_and_upstreams_by_id() -> None:
    base = {"server": {"port": 1, "host": "h"}, "upstreams": [{"id": "a", "priority": 0}, {"id": "b"}]}
    over = {"server": {"port": 2}, "upstreams": [{"id": "b", "priority": 5}, {"id": "c"}]}
    merged = merge_tables(base, over)
    assert merged["server"] == {"port": 2, "host": "h"}
    assert merged["upstreams"] == [{"id": "a", "priority": 0}, {"id": "b", "priority": 5}, {"id": "c"}]


def test_profiles_resolve_by_name_and_merge(tmp_path: Path) -> None:
    override = tmp_path / "local.toml"
    override.write_text("[server]\nport = 9999\n")
    config = load_profiles(["demo", str(override)])
    assert config.server.port == 9999
    assert {u.id for u in config.upstreams} == {"mock-vllm", "mock-ollama"}
    assert resolve_profile("demo").name == "demo.toml"


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_profile("nope")
    assert "demo" in info.value.errors[0]


def test_masked_never_shows_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_FOR_TEST", "sk-very-secret")
    config = load_config(MINIMAL + 'api_key_env = "SECRET_FOR_TEST"\n')
    shown = repr(masked(config))
    assert "sk-very-secret" not in shown and "***set***" in shown


def test_check_and_serve_refuse_a_key_variable_that_is_not_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``check`` said "profile OK" and ``serve`` then stopped with a traceback (exit 1): both now list
    every unset variable and exit 2, before anything starts."""
    monkeypatch.delenv("S16_UNSET_KEY", raising=False)
    monkeypatch.delenv("S16_UNSET_ADMIN", raising=False)
    profile = tmp_path / "noenv.toml"
    profile.write_text(MINIMAL + 'api_key_env = "S16_UNSET_KEY"\n[admin]\nkey_env = "S16_UNSET_ADMIN"\n')
    for command in (["check"], ["serve", "--port", "0"]):
        assert cli_main([*command, "--profile", str(profile)]) == 2
        err = capsys.readouterr().err
        assert "environment variable S16_UNSET_KEY (api_key_env) is not set" in err
        assert "environment variable S16_UNSET_ADMIN is not set" in err
        assert "Traceback" not in err


def test_serve_says_in_one_line_why_it_cannot_listen(capsys: pytest.CaptureFixture[str]) -> None:
    """A port in use, a port out of range, a host not of this machine: one line and exit 2 (each was a
    traceback from inside the server, exit 1), with one process or several."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    try:
        for argv, reason in [
            (["--port", port], f"cannot listen on 127.0.0.1:{port}: Address already in use"),
            (["--port", port, "--workers", "2"], "Address already in use"),
            (["--port", "70000"], "--port: expected 0..65535, got 70000"),
            (["--host", "192.0.2.1", "--port", "0"], "cannot listen on 192.0.2.1:0:"),
        ]:
            assert cli_main(["serve", *argv]) == 2, argv
            err = capsys.readouterr().err
            assert reason in err and "Traceback" not in err, err
    finally:
        taken.close()


def test_check_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check", "--profile", "demo"]) == 0
    assert "profile OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'x'\n[[upstreams]]\nid='a'\nbase_url='http://127.0.0.1:1'\n")
    assert cli_main(["check", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "$.server.port" in err
    assert "Traceback" not in err


def test_serve_with_a_bad_profile_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[upstreams]]\nid='a'\nbase_url='gopher://x'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "trioproxy", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "$.upstreams[0].base_url" in proc.stderr and "Traceback" not in proc.stderr


def test_config_is_frozen() -> None:
    config: Config = load_config(MINIMAL)
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]
