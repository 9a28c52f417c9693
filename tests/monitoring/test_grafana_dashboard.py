"""monitoring/: the Grafana dashboard's structure, its provisioning, and Prometheus's config
(checked by Debian's promtool). Every panel's query is run against a real Prometheus by
tests/integration/test_prometheus.py."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from stack import ROOT

MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "vllm-inference-api.json"
PANEL_TYPES = {"row", "stat", "gauge", "timeseries", "heatmap", "table", "bargauge", "text"}
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range", "__all"}

# What operators of vLLM fleets expect to see (the list), by title.
REQUIRED_PANELS = [
    "Healthy instances",
    "Request rate",
    "End-to-end latency p50 / p95 / p99",
    "TTFT distribution",
    "Tokens / s in and out",
    "Running and pending requests",
    "GPU KV cache usage",
    "Prefix cache hit rate",
    "GPU memory used",
    "GPU utilization",
    "Error rate (5xx share)",
]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_has_the_panels_operators_expect():
    titles = [p["title"] for p in panels(load_dashboard())]
    missing = [t for t in REQUIRED_PANELS if t not in titles]
    assert not missing, missing
    assert len(titles) == len(set(titles))


def test_dashboard_structure_is_valid():
    d = load_dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for p in d["panels"]:
        assert p["type"] in PANEL_TYPES, p["type"]
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    for p in panels(d):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["description"], p["title"]
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]
            assert t["expr"].count("(") == t["expr"].count(")"), p["title"]
            assert t["expr"].count("{") == t["expr"].count("}"), p["title"]


def test_every_variable_used_is_defined_and_templating_is_by_instance_and_model():
    d = load_dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert {"datasource", "job", "instance", "model"} <= set(variables)
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for name in ("job", "instance", "model"):
        v = variables[name]
        assert v["includeAll"] and v["allValue"] == ".*" and v["query"]["query"].startswith("label_values(")
    texts = [t["expr"] for p in panels(d) for t in p["targets"]]
    texts += [v["query"]["query"] for v in variables.values() if isinstance(v.get("query"), dict)]
    for text in texts:
        for used in re.findall(r"\$\{?(\w+)", text):
            assert used in variables or used in GRAFANA_VARIABLES, (used, text)
    for p in panels(d):  # every panel filters by instance (the router's panels: see below)
        for t in p["targets"]:
            if "vllm_router_" in t["expr"]:
                continue
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])


def test_grafana_provisioning_points_at_the_dashboard_and_the_datasource():
    ds = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/vllm.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]


def test_prometheus_config_is_valid_and_scrapes_the_service():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: apt-get install -y prometheus (.ci/run does)")
    result = subprocess.run(
        [promtool, "check", "config", str(MONITORING / "prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["vllm-api:8000"]


# --- the fleet row (issue 17) -----------------------------------------------------------------------

FLEET_PANELS = [
    "Healthy replicas (router's view)",
    "Router requests / s",
    "Router retries / s",
    "Retries exhausted / s",
    "Replica health (router's view)",
    "Router decisions per replica",
    "Requests per replica",
    "TTFT p95 per replica",
]


def fleet_row(dashboard: dict) -> list[dict]:
    """The panels below the row titled "Fleet (vllm-router)", in order."""
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    (fleet,) = [r for r in rows if r["title"].startswith("Fleet")]
    below = [r["gridPos"]["y"] for r in rows if r["gridPos"]["y"] > fleet["gridPos"]["y"]]
    end = min(below, default=10**6)
    return [p for p in panels(dashboard) if fleet["gridPos"]["y"] < p["gridPos"]["y"] < end]


def test_fleet_row_has_health_traffic_ttft_per_replica_and_router_decisions():
    d = load_dashboard()
    assert [p["title"] for p in fleet_row(d)] == FLEET_PANELS


def test_router_panels_filter_by_the_router_variable_and_replicas_by_instance():
    """The router's metrics carry the router's own `instance` and the replica as `worker`
    (`http://<the replica's instance>`): the panels follow both selections."""
    d = load_dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    router = variables["router"]
    assert router["includeAll"] and router["allValue"] == ".*"
    assert router["query"]["query"] == "label_values(vllm_router_active_workers, instance)"
    for p in panels(d):
        for t in p["targets"]:
            if "vllm_router_" not in t["expr"]:
                continue
            for selector in re.findall(r"vllm_router_\w+\{([^}]*)\}", t["expr"]):
                assert 'instance=~"$router"' in selector, (p["title"], t["expr"])
                if "worker" in t["legendFormat"] or "worker_health" in t["expr"]:
                    assert 'worker=~"https?://($instance)"' in selector, (p["title"], t["expr"])


def test_fleet_prometheus_config_is_valid_and_scrapes_the_replicas_and_the_router():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: apt-get install -y prometheus (.ci/run does)")
    path = MONITORING / "fleet" / "prometheus.yml"
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"vllm-api", "vllm-router"}
    single = yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"][0]
    assert jobs["vllm-api"]["metrics_path"] == single["metrics_path"]  # the dashboard's job
    for name, job in jobs.items():
        (sd,) = job["file_sd_configs"]
        (file,) = sd["files"]
        assert file == f"targets/{name}.json"
        targets = json.loads((path.parent / file).read_text())
        assert targets and all(group["targets"] for group in targets), name
