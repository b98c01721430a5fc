"""Hot profile swap: an invalid profile leaves the old one serving; a swap under streaming load loses nothing."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import attrs
import pytest
import httpx
import trio
import trio.testing

from trioproxy import server
from trioproxy.config import load_profiles
from trioproxy.mock import MockUpstream
from trioproxy.server import RunningServer

from .conftest import StartMock, read_records, stop, upstream_toml

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
NO_PROBES = "[upstreams.health]\nenabled = false\n"


async def start_from_file(nursery: trio.Nursery, path: Path) -> RunningServer:
    config = load_profiles([str(path)])
    config = attrs.evolve(config, server=attrs.evolve(config.server, host="127.0.0.1", port=0))
    running: RunningServer = await nursery.start(partial(server.main, config, profiles=[str(path)]))
    return running


def profile(tmp_path: Path, uid: str, port: int) -> str:
    return upstream_toml(uid, f"http://127.0.0.1:{port}", extra=NO_PROBES) + f'[telemetry]\ndir = "{tmp_path / "logs"}"\n'


async def test_an_invalid_profile_is_refused_and_the_old_one_keeps_serving(
    nursery: trio.Nursery, start_mock: StartMock, tmp_path: Path
) -> None:
    path = tmp_path / "gw.toml"
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=2, token_delay_ms=0, ttft_ms=0)
        path.write_text(profile(tmp_path, "m", mock.port))
        gw = await start_from_file(nursery, path)
        path.write_text(profile(tmp_path, "m", mock.port).replace("base_url", "base_ur1"))
        async with httpx.AsyncClient(timeout=30) as client:
            refused = await client.post(f"{gw.url}/_/reload")
            served = await client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
        await stop(gw)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["code"] == "invalid_profile"
    assert "$.upstreams[0]" in error["message"] and "base_ur1" in error["message"], error
    assert served.status_code == 200 and served.headers["x-trioproxy-upstream"] == "m"


async def test_a_swap_under_streaming_load_loses_no_stream_and_no_record(
    nursery: trio.Nursery, start_mock: StartMock, tmp_path: Path
) -> None:
    path = tmp_path / "gw.toml"
    streams = 20
    with trio.fail_after(60):
        old = await start_mock(models=("*",), tokens=40, token_delay_ms=10, ttft_ms=0)
        new = await start_mock(models=("*",), tokens=2, token_delay_ms=0, ttft_ms=0)
        path.write_text(profile(tmp_path, "old", old.port))
        gw = await start_from_file(nursery, path)
        url = f"{gw.url}/v1/chat/completions"
        results: list[httpx.Response] = []
        started = trio.Semaphore(0)
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=streams + 5)) as client:

            async def one() -> None:
                async with client.stream("POST", url, json=CHAT) as response:
                    started.release()
                    await response.aread()
                results.append(response)

            async with trio.open_nursery() as load:
                for _ in range(streams):
                    load.start_soon(one)
                for _ in range(streams):
                    await started.acquire()  # every stream is open on the old upstream
                path.write_text(profile(tmp_path, "new", new.port))
                swapped = await client.post(f"{gw.url}/_/reload")
                after = await client.post(url, json=CHAT)
        await stop(gw)
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["started"] == ["new"] and swapped.json()["closed"] == ["old"]
    assert len(results) == streams
    assert all(r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") for r in results)
    assert all(r.headers["x-trioproxy-upstream"] == "old" for r in results)
    assert after.headers["x-trioproxy-upstream"] == "new"
    records = [r for r in read_records(gw) if r["route"] == "/v1/chat/completions"]
    assert len(records) == streams + 1 and all(r["outcome"] == "ok" for r in records)


async def test_watch_asks_for_a_reload_when_a_profile_changes(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    from trioproxy.reload import ReloadRequest, watch_profiles

    path = tmp_path / "p.toml"
    path.write_text("a = 1\n")
    reload_send, reload_recv = trio.open_memory_channel[ReloadRequest](4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_profiles, [path], reload_send)
        await trio.sleep(5.5)  # virtual time: five looks, no change, no reload (and no tie with a look)
        with pytest.raises(trio.WouldBlock):
            reload_recv.receive_nowait()
        path.write_text("a = 22\n")  # a different size: a change whatever the clock's resolution
        await reload_recv.receive()
        assert trio.current_time() == pytest.approx(6.0)
        path.unlink()  # a missing file is a change too (the reload then refuses it)
        await reload_recv.receive()
        nursery.cancel_scope.cancel()


def mock_profile(tmp_path: Path, *, tokens: int, priority: int = 0, auth: str = "") -> str:
    return (
        f'[[upstreams]]\nid = "a"\nkind = "openai"\nmodels = ["*"]\npriority = {priority}\n'
        f'[upstreams.mock]\nkind = "openai"\nmodels = ["*"]\ntokens = {tokens}\ntoken_delay_ms = 0\nttft_ms = 0\n'
        f"{NO_PROBES}{auth}"
        f'[telemetry]\ndir = "{tmp_path / "logs"}"\n'
    )


async def _refuses(url: str) -> bool:
    """Whether nothing listens at ``url`` any more (once every task has settled)."""
    await trio.testing.wait_all_tasks_blocked()
    port = int(url.rsplit(":", 1)[1])
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_a_reload_stops_the_embedded_mocks_no_upstream_names_any_more(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gw.toml"
    monkeypatch.delenv("TRIOPROXY_TEST_UNSET_KEY", raising=False)
    drained: list[int] = []
    drain = MockUpstream.drain

    def drain_and_note(mock: MockUpstream) -> None:
        drained.append(mock.port)
        drain(mock)

    monkeypatch.setattr(MockUpstream, "drain", drain_and_note)
    with trio.fail_after(30):
        path.write_text(mock_profile(tmp_path, tokens=2))
        gw = await start_from_file(nursery, path)
        first = gw.services.runtimes["a"].cfg.base_url
        async with httpx.AsyncClient(timeout=30) as client:
            # Only routing settings change: the upstream is rebuilt on the same running mock.
            path.write_text(mock_profile(tmp_path, tokens=2, priority=5))
            assert (await client.post(f"{gw.url}/_/reload")).status_code == 200
            assert gw.services.runtimes["a"].cfg.base_url == first
            # The mock's own settings change: a new mock, and the old one stops.
            path.write_text(mock_profile(tmp_path, tokens=3))
            assert (await client.post(f"{gw.url}/_/reload")).status_code == 200
            second = gw.services.runtimes["a"].cfg.base_url
            assert second != first
            assert await _refuses(first)
            assert [f"http://127.0.0.1:{port}" for port in drained] == [first]
            answer = await client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": False})
            # A refused reload (a key variable unset) stops the mock it had started for nothing.
            auth = '[[auth.keys]]\nid = "k"\nkey_env = "TRIOPROXY_TEST_UNSET_KEY"\n'
            path.write_text(mock_profile(tmp_path, tokens=4, auth=auth))
            refused = await client.post(f"{gw.url}/_/reload")
            assert refused.status_code == 400, refused.text
            assert gw.services.runtimes["a"].cfg.base_url == second
            assert len(drained) == 2 and f"http://127.0.0.1:{drained[1]}" not in (first, second)
            assert await _refuses(f"http://127.0.0.1:{drained[1]}")
            assert not await _refuses(second)
            # Refused later, while the upstreams are built (their api_key_env unset): the same.
            monkeypatch.delenv("TRIOPROXY_TEST_UNSET_UPSTREAM_KEY", raising=False)
            keyed = mock_profile(tmp_path, tokens=5).replace('priority = 0\n', 'priority = 0\napi_key_env = "TRIOPROXY_TEST_UNSET_UPSTREAM_KEY"\n')
            path.write_text(keyed)
            refused = await client.post(f"{gw.url}/_/reload")
            assert refused.status_code == 400 and "TRIOPROXY_TEST_UNSET_UPSTREAM_KEY" in refused.text, refused.text
            assert gw.services.runtimes["a"].cfg.base_url == second
            assert len(drained) == 3 and await _refuses(f"http://127.0.0.1:{drained[2]}")
            assert not await _refuses(second)
        await stop(gw)
    assert answer.status_code == 200
    assert answer.json()["usage"]["completion_tokens"] == 3


async def test_an_upstream_whose_settings_change_keeps_its_health_unless_its_probes_change(
    nursery: trio.Nursery, start_mock: StartMock, tmp_path: Path
) -> None:
    """A reload that changes a down upstream's settings builds it a new runtime. Its health carries
    over when its probes see the same (same server, probe, key): it used to start healthy, and stay so
    while the board said down (a probe that agreed with the board changed nothing), and /readyz
    would drop to "not checked" for a probe. With another address it is judged afresh."""
    import socket

    path = tmp_path / "gw.toml"
    down = socket.socket()  # bound, not listening: connections are refused
    down.bind(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d" % down.getsockname()[1]
    logs = f'[telemetry]\ndir = "{tmp_path / "logs"}"\n'
    with trio.fail_after(30), down:
        mock = await start_mock(models=("*",), tokens=2, token_delay_ms=0, ttft_ms=0)
        fallback = upstream_toml("fallback", f"http://127.0.0.1:{mock.port}", extra="priority = 1\n" + NO_PROBES)
        path.write_text(upstream_toml("down", url, extra="priority = 0\n") + fallback + logs)
        gw = await start_from_file(nursery, path)
        await gw.services.runtimes["down"].checked.wait()
        assert gw.services.runtimes["down"].healthy is False
        path.write_text(upstream_toml("down", url, extra="priority = 0\nmax_concurrent = 7\n") + fallback + logs)
        async with httpx.AsyncClient(timeout=30) as client:
            reloaded = await client.post(f"{gw.url}/_/reload")
            rebuilt = gw.services.runtimes["down"]
            await rebuilt.checked.wait()
            served = await client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
        await stop(gw)
    assert reloaded.status_code == 200 and reloaded.json()["started"] == ["down"]
    assert rebuilt.healthy is False and rebuilt.cfg.max_concurrent == 7
    assert served.status_code == 200 and served.headers["x-trioproxy-upstream"] == "fallback"
    (record,) = [r for r in read_records(gw) if r["route"] == "/v1/chat/completions"]
    assert [a["upstream"] for a in record["attempts"]] == ["fallback"]


async def test_a_reload_that_changes_no_probe_keeps_readyz_ready(
    nursery: trio.Nursery, start_mock: StartMock, tmp_path: Path
) -> None:
    """Only a limit changes: the rebuilt upstream is known healthy at once, so /readyz stays 200 (its
    server answers its first probe, then never again: a fresh probe would leave it "not checked");
    a new address is probed afresh."""
    probes = 0

    async def answer_the_first_probe_only(stream: trio.SocketStream) -> None:
        nonlocal probes
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                if not (chunk := await stream.receive_some()):
                    return
                data += chunk
            probes += 1
            if probes > 1:
                await trio.sleep_forever()
            body = b'{"object":"list","data":[]}'
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                  b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, answer_the_first_probe_only, listeners)
    url = "http://127.0.0.1:%d" % listeners[0].socket.getsockname()[1]
    path = tmp_path / "gw.toml"
    logs = f'[telemetry]\ndir = "{tmp_path / "logs"}"\n'
    probes_toml = "[upstreams.health]\ninterval_ms = 3600000\ntimeout_ms = 3600000\n"
    with trio.fail_after(30):
        other = await start_mock(models=("*",), tokens=2, token_delay_ms=0, ttft_ms=0)
        path.write_text(upstream_toml("m", url, extra=probes_toml) + logs)
        gw = await start_from_file(nursery, path)
        await gw.services.runtimes["m"].checked.wait()
        async with httpx.AsyncClient(timeout=30) as client:
            path.write_text(upstream_toml("m", url, extra="max_concurrent = 9\n" + probes_toml) + logs)
            assert (await client.post(f"{gw.url}/_/reload")).status_code == 200
            kept = await client.get(f"{gw.url}/readyz")
            path.write_text(upstream_toml("m", f"http://127.0.0.1:{other.port}", extra=probes_toml) + logs)
            assert (await client.post(f"{gw.url}/_/reload")).status_code == 200
            moved = gw.services.runtimes["m"]
            await moved.checked.wait()
        await stop(gw)
    assert kept.status_code == 200 and kept.json()["upstreams"]["m"]["checked"] is True
    assert moved.healthy is True and moved.cfg.base_url.endswith(str(other.port))  # (another server: its own probe)
