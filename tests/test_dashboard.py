"""The dashboard at ``/_/``: its files over HTTP, and the page in a real browser (Debian's Chromium).

The browser test drives headless Chromium through ChromeDriver (selenium) from a worker
thread, while the gateway serves in the test's Trio loop: the page loads, its WebSocket
connects, and a request the test sends shows up in its table, with the upstream listed.
``TRIOPROXY_SCREENSHOT=docs/dashboard.png`` keeps the screenshot (how docs/dashboard.png is made).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioproxy.app import ProxyApp
from trioproxy.catalog import DASHBOARD_FILES

from .conftest import StartGateway, StartMock, read_records, stop, upstream_toml

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
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
            missing = await client.get(gw.url + "/_/nothing.js")
            assert missing.status_code == 404 and missing.json()["error"]["message"]
        await stop(gw)
    dashboard = [r for r in read_records(gw) if r["route"].startswith("/_/")]
    assert sorted(r["status"] for r in dashboard) == [200, 200, 200, 200, 404]  # one record each


async def test_the_page_is_for_loopback_clients_or_the_admin_key(start_mock: StartMock, start_gateway: StartGateway) -> None:
    with trio.fail_after(30):
        mock = await start_mock(models=("*",), tokens=2)
        gw = await start_gateway(upstream_toml("m", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        app = ProxyApp(gw.services)

        async def get(client: str) -> int:
            sent: list[dict[str, Any]] = []
            scope = {"type": "http", "method": "GET", "path": "/_/", "query_string": b"", "headers": [],
                     "client": (client, 40000)}

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await app(scope, receive, send)
            status: int = sent[0]["status"]
            return status

        assert await get("127.0.0.1") == 200
        assert await get("192.0.2.7") == 403  # another host, no admin key
        await stop(gw)


@needs_browser
async def test_the_page_shows_a_request_in_a_real_browser(
    start_mock: StartMock, start_gateway: StartGateway, tmp_path: Path
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with trio.fail_after(120):
        mock = await start_mock(models=("*",), tokens=8, token_delay_ms=2)
        gw = await start_gateway(upstream_toml("local-vllm", f"http://127.0.0.1:{mock.port}", extra=NO_PROBES))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = await trio.to_thread.run_sync(
            lambda: webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        )
        try:
            def wait_for(condition: Any) -> Any:
                return WebDriverWait(driver, BROWSER_STEP_S).until(condition)

            await trio.to_thread.run_sync(driver.get, gw.url + "/_/")
            await trio.to_thread.run_sync(
                wait_for, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "connected"
            )
            async with httpx.AsyncClient() as client:
                ids = []
                for i in range(12):  # some streamed, some not: the chart and the table get content
                    body = {"model": "mock-llama", "messages": [{"role": "user", "content": "hi"}], "stream": i % 3 != 0}
                    r = await client.post(gw.url + "/v1/chat/completions", json=body)
                    assert r.status_code == 200
                    ids.append(r.headers["x-request-id"])
            last = ids[-1]
            row = await trio.to_thread.run_sync(
                wait_for, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-request-id="{last}"]')
            )
            cells = await trio.to_thread.run_sync(lambda: [c.text for c in row[0].find_elements(By.TAG_NAME, "td")])
            assert re.fullmatch(r"\d{1,2}:\d{2}:\d{2}( [AP]M)?", cells[0]), cells[0]  # the record's time, read
            assert last in cells and "mock-llama" in cells and "local-vllm" in cells
            assert any(c.startswith("ok") for c in cells)
            upstream = await trio.to_thread.run_sync(
                wait_for, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-upstream="local-vllm"]')
            )
            assert "up" in await trio.to_thread.run_sync(lambda: upstream[0].text)
            total = await trio.to_thread.run_sync(
                wait_for, lambda d: int(d.find_element(By.ID, "total").text) >= len(ids) or None
            )
            assert total is True
            errors = [e for e in await trio.to_thread.run_sync(driver.get_log, "browser") if e["level"] == "SEVERE"]
            assert errors == [], errors
            await trio.to_thread.run_sync(driver.save_screenshot, str(tmp_path / "dashboard.png"))
            if keep := os.environ.get("TRIOPROXY_SCREENSHOT"):
                await trio.to_thread.run_sync(driver.save_screenshot, keep)
        finally:
            await trio.to_thread.run_sync(driver.quit)
        await stop(gw)
