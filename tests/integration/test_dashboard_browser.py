"""The built-in dashboard in a real browser (Debian's Chromium driven by Playwright) against the
running CPU stack: tiles show the stack's numbers and move with traffic, windows and refresh
intervals switch, the charts fill from the history; any console error fails the test."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from traffic import send_traffic

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def tile(page, metric: str) -> tuple[str, str]:
    """(shown text, raw value) of a tile."""
    el = page.locator(f'.tile[data-metric="{metric}"]')
    return el.locator(".value").inner_text(), el.get_attribute("data-raw") or ""


def test_dashboard_in_a_real_browser(text_stack, stack_logs):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    live_requests: list[float] = []
    history_windows: set[str] = set()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on(
                "console",
                lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))

            def on_response(r):
                if r.status >= 400:
                    problems.append(f"{r.status} {r.url}")
                if "/api/v1/historical_metrics/" in r.url:
                    history_windows.add(r.url.rsplit("window=", 1)[-1])

            page.on("response", on_response)
            page.on(
                "request",
                lambda r: live_requests.append(time.monotonic()) if "/live_metrics" in r.url else None,
            )
            page.goto(text_stack.url + "/dashboard")

            # Tiles show the stack's real numbers: the engine's gauges, the proxy's rates.
            page.wait_for_function(
                "['requests_running','requests_waiting','kv_cache_usage','request_rate']"
                ".every(m => document.querySelector(`.tile[data-metric=${m}]`).dataset.raw !== '')",
                timeout=20_000,
            )
            assert page.locator("#status").inner_text().lower() == "ready"
            assert page.locator("#model").inner_text() == "tiny-text"
            assert tile(page, "gpu_memory_used_bytes")[0] == "—"  # no GPU here: shown as unknown
            live = httpx.get(text_stack.url + "/api/v1/live_metrics").json()
            assert float(tile(page, "kv_cache_usage")[1]) == pytest.approx(live["kv_cache_usage"], abs=0.05)

            # A short refresh interval: the page asks for live values every 2 s.
            page.select_option("#refresh", "2")
            assert page.locator("body").get_attribute("data-refresh") == "2"
            before_text, _ = tile(page, "request_rate")
            count = len(live_requests)
            sender = threading.Thread(target=send_traffic, args=(text_stack.url,), kwargs={"rounds": 3})
            sender.start()
            page.wait_for_function("() => true")  # let the page's handlers run
            deadline = time.monotonic() + 20
            while len(live_requests) < count + 3:
                assert time.monotonic() < deadline, "the page did not refresh every 2 s"
                page.wait_for_event("response", timeout=5_000)
            gaps = [b - a for a, b in zip(live_requests[count:], live_requests[count + 1 :], strict=False)]
            assert min(gaps) > 1.0 and sorted(gaps)[len(gaps) // 2] < 4.0, gaps
            sender.join(120)
            # The traffic moves the tiles: 16 requests within the last minute, tokens, TTFT.
            page.wait_for_function(
                "(before) => {"
                " const raw = m => document.querySelector(`.tile[data-metric=${m}]`).dataset.raw;"
                " const text = document.querySelector('.tile[data-metric=request_rate] .value').textContent;"
                " return Number(raw('request_rate')) >= 16 / 70 && text !== before"
                "   && Number(raw('completion_tokens_per_s')) > 0 && raw('ttft_p50') !== ''; }",
                arg=before_text,
                timeout=30_000,
            )
            assert tile(page, "ttft_p50")[0].endswith(("ms", " s"))
            # The per-key table (app/usage.py): this stack has no API keys, so its traffic is
            # counted under `anonymous`.
            page.wait_for_function(
                "Number((document.querySelector('#keys-rows tr[data-key=anonymous] td:nth-child(2)')"
                " || {textContent: '0'}).textContent.replace(/[^0-9]/g, '')) >= 16",
                timeout=30_000,
            )
            assert "admission control off" in page.locator("#keys-note").inner_text()

            # History: the hour's charts fill from the SQLite history (a reading every 2 s).
            page.wait_for_function(
                "['latency','ttft','tokens'].every(c =>"
                " Number(document.querySelector(`[data-chart=${c}]`).dataset.points) > 0)",
                timeout=30_000,
            )
            # Switching windows re-reads the history for that window and redraws every chart.
            for window in ("1d", "1w", "1h"):
                page.click(f'#windows button[data-window="{window}"]')
                page.wait_for_function(
                    "(w) => [...document.querySelectorAll('[data-chart]')].every(c => c.dataset.window === w)",
                    arg=window,
                    timeout=10_000,
                )
                assert (
                    page.locator(f'#windows button[data-window="{window}"]').get_attribute("aria-pressed")
                    == "true"
                )
            assert history_windows >= {"1h", "1d", "1w"}
            page.wait_for_function(
                "Number(document.querySelector('[data-chart=latency]').dataset.points) > 0", timeout=10_000
            )
            screenshot = stack_logs / "dashboard.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"dashboard screenshot: {screenshot}")

            # Refresh off: no more live requests, however long one waits for one.
            page.select_option("#refresh", "0")
            assert page.locator("body").get_attribute("data-refresh") == "0"
            count = len(live_requests)
            with pytest.raises(PlaywrightTimeout):
                page.wait_for_event("request", lambda r: "/api/v1/live_metrics" in r.url, timeout=5_000)
            assert len(live_requests) == count
        finally:
            browser.close()
    assert not problems, problems
