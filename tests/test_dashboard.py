"""The dashboard at ``/_/``: its files over HTTP, and the page in a real browser (Debian's Chromium).

The browser test drives headless Chromium through ChromeDriver (selenium) from a worker
thread, while the gateway serves in the test's Trio loop: the page loads, its WebSocket
connects, and a request the test sends shows up in its table, with the upstream listed.
``TRIOPROXY_SCREENSHOT=docs/dashboard.png`` keeps the screenshot (how docs/dashboard.png is made).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioproxy.app import ProxyApp
from trioproxy.auth import AdminGate
from trioproxy.catalog import DASHBOARD_FILES

from .conftest import StartGateway, StartMock, read_records, stop, upstream_toml

#: Debian's packages (scripts/system-deps): fixed paths, so Selenium Manager never looks for (or downloads) a browser.
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
needs_browser = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Chromium and ChromeDriver are not installed (make system-deps installs them)",
)
#: Seconds the browser may take for one step (a page load, a WebSocket connect, a row to appear).
BROWSER_STEP_S = 20
NO_PROBES = "[upstreams.health]\nenabled = false\n"


async def test_the_page_and_its_files_are_served_with_their_types_and_a_strict_policy(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=2)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        async with httpx.AsyncClient() as client:
            for path, (name, content_type) in DASHBOARD_FILES.items():
                r = await client.get(gw.url + path)
                assert r.status_code == 200
                assert r.headers["content-type"] == content_type.decode()
                assert r.headers["cache-control"] == "no-cache"
                assert "script-src 'self'" in r.headers["content-security-policy"]
                assert r.content == (Path(__file__).parents[1] / "trioproxy" / "dashboard" / name).read_bytes()
            page = (await client.get(gw.url + "/_/")).text
            assert "http://" not in page and "https://" not in page  # nothing from a CDN
            for path in ("/_/nothing.js", "/_"):  # only the three files; `/_` is not the page
                missing = await client.get(gw.url + path)
                assert missing.status_code == 404 and missing.json()["error"]["message"]
        await stop(gw)
    dashboard = [r for r in read_records(gw) if r["route"].startswith("/_")]
    assert sorted(r["status"] for r in dashboard) == [200, 200, 200, 200, 404, 404]  # one record each


async def test_the_page_is_for_loopback_clients_or_the_admin_key(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=2)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        app = ProxyApp(gw.services)

        gw.services.admin = AdminGate(digest=hashlib.sha256(b"admin-key").hexdigest())

        async def get(client: str, key: bytes | None = None) -> int:
            sent: list[dict[str, Any]] = []
            headers = [(b"authorization", b"Bearer " + key)] if key else []
            scope = {"type": "http", "method": "GET", "path": "/_/", "raw_path": b"/_/", "query_string": b"",
                     "headers": headers, "client": (client, 40000)}

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await app(scope, receive, send)
            status: int = sent[0]["status"]
            return status

        assert await get("127.0.0.1") == 200
        assert await get("192.0.2.7") == 403  # another host, no admin key
        assert await get("192.0.2.7", b"wrong") == 403
        assert await get("192.0.2.7", b"admin-key") == 200
        await stop(gw)
    assert [r["status"] for r in read_records(gw) if r["route"] == "/_/"] == [200, 403, 403, 200]  # one record each


@needs_browser
async def test_the_page_shows_a_request_in_a_real_browser(
    start_mock: StartMock, start_gateway: StartGateway, tmp_path: Path
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with trio.fail_after(120):
        # Two upstreams with different first-token times, each serving its own models: the chart has some
        # shape, and which upstream served a request is known from its model.
        fast = await start_mock(models=("*",), tokens=8, ttft_ms=40, token_delay_ms=2)
        slow = await start_mock(models=("*",), tokens=24, ttft_ms=110, token_delay_ms=2)
        gw = await start_gateway(
            upstream_toml("local-vllm", f"http://127.0.0.1:{fast.port}", models='["llama-*"]', extra=NO_PROBES)
            + upstream_toml("gpu-box", f"http://127.0.0.1:{slow.port}", models='["qwen*"]', extra=NO_PROBES)
        )
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium'}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = await trio.to_thread.run_sync(
            lambda: webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        )
        try:
            def wait_for(condition: Any) -> Any:
                # The page redraws its tables: find and read within one condition, and look again if
                # the element was replaced in between.
                wait = WebDriverWait(driver, BROWSER_STEP_S, ignored_exceptions=(StaleElementReferenceException,))
                return wait.until(condition)

            await trio.to_thread.run_sync(driver.get, gw.url + "/_/")
            await trio.to_thread.run_sync(
                wait_for, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "connected"
            )
            async with httpx.AsyncClient() as client:
                ids = []
                for i in range(15):  # streamed and not, two upstreams, one unknown model: every part has content
                    model = "no-such-model" if i == 9 else ("qwen2.5-32b" if i % 3 == 1 else "llama-3.1-8b")
                    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": i % 4 != 0}
                    r = await client.post(gw.url + "/v1/chat/completions", json=body)
                    assert r.status_code == (404 if model == "no-such-model" else 200)
                    ids.append(r.headers["x-request-id"])
            last = ids[-1]  # llama-3.1-8b, streamed: local-vllm
            cells = await trio.to_thread.run_sync(wait_for, lambda d: [
                c.text for c in d.find_element(By.CSS_SELECTOR, f'tr[data-request-id="{last}"]').find_elements(By.TAG_NAME, "td")
            ])
            assert re.fullmatch(r"\d{1,2}:\d{2}:\d{2}( [AP]M)?", cells[0]), cells[0]  # the record's time, read
            assert cells[1:6] == [last, "/v1/chat/completions", "llama-3.1-8b", "local-vllm", "ok (200)"], cells
            assert float(cells[6]) >= 40 and float(cells[7]) >= float(cells[6])  # TTFT, total ms
            assert cells[8].endswith("/ 8")  # completion tokens, as the mock counts them
            for uid in ("local-vllm", "gpu-box"):
                upstream = await trio.to_thread.run_sync(
                    wait_for, lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-upstream="{uid}"]').text
                )
                assert upstream.split()[:3] == [uid, "up", "closed"], upstream
            # Every request counted, and none of the page's own (its files, its /readyz polls): hidden.
            await trio.to_thread.run_sync(wait_for, lambda d: int(d.find_element(By.ID, "total").text) >= len(ids))
            assert await trio.to_thread.run_sync(lambda: driver.find_element(By.ID, "total").text) == str(len(ids))
            # ChromeDriver returns the page's console with goog:loggingPrefs; an error there fails the test.
            errors = [e for e in await trio.to_thread.run_sync(driver.get_log, "browser") if e["level"] == "SEVERE"]
            assert errors == [], errors
            await trio.to_thread.run_sync(save_full_page, driver, tmp_path / "dashboard.png")
            if keep := os.environ.get("TRIOPROXY_SCREENSHOT"):
                await trio.to_thread.run_sync(save_full_page, driver, Path(keep))
        finally:
            with trio.CancelScope(shield=True):  # even when fail_after fired: no browser is left behind
                await trio.to_thread.run_sync(driver.quit)
        await stop(gw)


def save_full_page(driver: Any, path: Path) -> None:
    """A screenshot of the whole page: the window made as tall as the document, once the chart has redrawn."""
    from selenium.webdriver.support.ui import WebDriverWait

    chrome, height = driver.execute_script(
        "return [window.outerHeight - window.innerHeight, document.documentElement.scrollHeight]"
    )
    driver.set_window_size(1280, chrome + height)
    # The canvas follows its new size on the page's next tick (no scrollbar any more): wait for it.
    WebDriverWait(driver, BROWSER_STEP_S).until(lambda d: d.execute_script(
        "const c = document.getElementById('ttft-chart');"
        "return c.width === Math.round(c.clientWidth * (window.devicePixelRatio || 1));"
    ))
    driver.save_screenshot(str(path))
