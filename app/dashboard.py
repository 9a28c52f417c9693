"""The built-in metrics dashboard: the page, its JSON, and the collector that feeds its history.

    GET /dashboard                                   one self-contained page (own JS/SVG charts)
    GET /api/v1/live_metrics                         tiles: gauges now, rates over the last minute
    GET /api/v1/historical_metrics                   the series, windows and sources there are
    GET /api/v1/historical_metrics/{name}?window=1h  one series from the SQLite history (1h|1d|1w)

`register()` adds the routes and runs the collector (app/metrics_collector.py) for the app's
lifetime. With METRICS_API_KEY set, the JSON routes (like /metrics) need the key as a bearer
token (checked by the dispatcher, from the route table in app/routes.py); the page itself holds no
data and asks for the key when the JSON answers 401.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import HTMLResponse, JSONResponse

from app import metrics, workers
from app.logs import get_logger
from app.metrics_collector import Collector, families_from_text
from app.metrics_store import SERIES, WINDOWS, MetricsStore
from app.proxy.upstream import UpstreamError
from app.runtime import Phase, Runtime, extend_lifespan
from app.settings import Settings

PAGE = Path(__file__).parent / "static" / "dashboard.html"
ENGINE_TIMEOUT = 5.0

log = get_logger("app.dashboard")


def open_store(settings: Settings) -> MetricsStore | None:
    if settings.SCRAPE_INTERVAL <= 0:
        return None
    try:
        return MetricsStore(settings.METRICS_DB_PATH, settings.METRICS_RETENTION_DAYS)
    except Exception as exc:  # an unwritable data dir costs the history, not the server
        log.warning(
            "metrics history off: cannot open the database",
            path=str(settings.METRICS_DB_PATH),
            error=str(exc),
        )
        return None


def register(api: FastAPI, settings: Settings, runtime: Runtime, engine: Any, proxy: Any) -> Collector:
    """Add the dashboard's routes to `api` and run its collector during the app's lifespan."""
    store = open_store(settings)

    async def engine_metrics() -> bytes | None:
        if runtime.phase not in (Phase.READY, Phase.DRAINING) or proxy.upstream is None:
            return None
        try:
            status, text = await proxy.upstream.get(engine.metrics_path, timeout=ENGINE_TIMEOUT)
        except UpstreamError:
            return None
        return text if status == 200 else None

    def read(text: bytes | None):
        return itertools.chain(metrics.REGISTRY.collect(), families_from_text(text))

    # With several proxy processes (app/workers.py) each keeps its own recent readings of the
    # summed metrics (the live tiles' rates), and worker 0 alone writes the history.
    collector = Collector(
        store if workers.is_first() else None, settings.SCRAPE_INTERVAL, read, engine_metrics, log=log
    )
    extend_lifespan(
        api,
        tasks=lambda: [collector.run()] if store is not None else [],
        stop=store.close if store is not None else None,
    )
    page = PAGE.read_bytes()

    @api.get("/dashboard", include_in_schema=False)
    async def dashboard() -> Response:
        """The dashboard page: no external resources, so it works offline."""
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    @api.get("/api/v1/live_metrics")
    async def live_metrics() -> Response:
        """Tiles: engine and GPU gauges now; rates and percentiles over the last minute."""
        body = await collector.live()
        lora = getattr(proxy, "models", None)  # which rows are LoRA adapters (app/lora/service.py)
        for row in body.get("models", ()):
            row["adapter"] = lora is not None and row["model"] in lora.adapters
        body.update(
            status=runtime.phase.value,
            model=settings.served_model_name,
            uptime_s=round(time.time() - runtime.started_at, 1),
            scrape_interval_s=settings.SCRAPE_INTERVAL,
            history=store is not None,
            collector_cost_ms=None
            if collector.last_cost_s is None
            else round(collector.last_cost_s * 1000, 2),
        )
        return JSONResponse(body, headers={"cache-control": "no-store"})

    def catalogue() -> dict[str, Any]:
        return {
            "metrics": {
                name: {"unit": unit, "description": text} for name, (_, unit, text) in SERIES.items()
            },
            "windows": list(WINDOWS),
        }

    @api.get("/api/v1/historical_metrics")
    async def historical_catalogue() -> Response:
        """The series and windows the history serves, and the sources it holds."""
        body = catalogue()
        body["sources"] = await asyncio.to_thread(store.sources) if store is not None else []
        return JSONResponse(body)

    @api.get("/api/v1/historical_metrics/{metric_name}")
    async def historical_metrics(metric_name: str, window: str = "1h", source: str = "local") -> Response:
        """One series over the last hour, day or week, as `[[unix_ts, value], ...]`."""
        problems = []
        if metric_name not in SERIES:
            problems.append(f"unknown metric {metric_name!r}")
        if window not in WINDOWS:
            problems.append(f"unknown window {window!r}")
        if problems:
            body = {
                "error": {"message": "; ".join(problems) + "."},
                "valid_metrics": list(SERIES),
                "valid_windows": list(WINDOWS),
            }
            return JSONResponse(body, status_code=400)
        if store is None:
            return JSONResponse(
                {"error": {"message": "History is off: SCRAPE_INTERVAL=0 or the database cannot be opened."}},
                status_code=503,
            )
        body = await asyncio.to_thread(store.series, metric_name, window, source)
        if body["step_s"] is None:
            body["step_s"] = settings.SCRAPE_INTERVAL
        return JSONResponse(body, headers={"cache-control": "no-store"})

    return collector
