"""The dashboard's routes on the app itself (no engine: the JSON still answers, from the proxy's
own registry): validation, METRICS_API_KEY, a page with nothing loaded from elsewhere, and that its
polling is neither passed to the engine nor counted as requests."""

import re

import pytest
from starlette.testclient import TestClient

from app import metrics
from app.main import create_app
from app.metrics_store import SERIES
from app.settings import Settings
from stack import free_port


@pytest.fixture
def make_client(tmp_path):
    clients = []

    def make(**settings):
        s = Settings(
            MODEL_NAME="m",
            ENGINE_PORT=free_port(),
            METRICS_DB_PATH=tmp_path / "m.db",
            SCRAPE_INTERVAL=0.05,
            **settings,
        )
        client = TestClient(create_app(s))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def requests_counted() -> float:
    return sum(
        s.value for f in metrics.REGISTRY.collect() if f.name == "vllm_api_requests" for s in f.samples
    )


def test_unknown_metric_or_window_is_400_listing_the_valid_ones(make_client):
    client = make_client()
    r = client.get("/api/v1/historical_metrics/nope", params={"window": "1h"})
    assert r.status_code == 400
    assert r.json()["valid_metrics"] == list(SERIES) and "nope" in r.json()["error"]["message"]
    r = client.get("/api/v1/historical_metrics/ttft_p95", params={"window": "2d"})
    assert r.status_code == 400 and r.json()["valid_windows"] == ["1h", "1d", "1w"]
    catalogue = client.get("/api/v1/historical_metrics").json()
    assert set(catalogue["metrics"]) == set(SERIES) and catalogue["windows"] == ["1h", "1d", "1w"]


def test_history_fills_while_the_app_runs_and_polling_is_not_counted(make_client):
    client = make_client()
    before = requests_counted()
    for _ in range(200):  # the collector reads every 50 ms; poll, do not sleep a fixed time
        body = client.get("/api/v1/historical_metrics/requests_in_flight", params={"window": "1h"}).json()
        if len(body["points"]) >= 2:
            break
    assert len(body["points"]) >= 2 and body["step_s"] == 0.05 and body["unit"] == "requests"
    live = client.get("/api/v1/live_metrics").json()
    assert live["status"] == "ready" and live["history"] is True and live["engine_metrics"] is False
    assert live["requests_running"] is None  # no engine here: unknown, not zero
    assert client.get("/dashboard").status_code == 200
    assert requests_counted() == before  # the dashboard's own requests are not traffic


def test_metrics_api_key_protects_metrics_and_the_dashboard_data(make_client):
    client = make_client(METRICS_API_KEY="s3cret")
    for path in ("/metrics", "/api/v1/live_metrics", "/api/v1/historical_metrics/request_rate"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
    assert client.get("/dashboard").status_code == 200  # the page holds no data: it asks for the key
    assert client.get("/health").status_code in (200, 503)  # never behind the key


def test_the_page_loads_nothing_from_elsewhere(make_client):
    html = make_client().get("/dashboard").text
    assert "<svg" in html or "createElementNS" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"""(import|fetch)\s*\(\s*["'`]https?:""", html)
    urls = set(re.findall(r"https?://[^\s\"'`)]+", html))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # the SVG namespace is a name, not a download
