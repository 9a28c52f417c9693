"""The Grafana dashboard's queries against real data: Debian's Prometheus scrapes the running CPU
stack, traffic goes through it, then every panel's PromQL is run through Prometheus's HTTP API and
must return data. GPU panels cannot have data on a machine without a GPU: there they must still be
queries Prometheus accepts, and the test says so."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from urllib.parse import urlparse

import httpx
import pytest
from traffic import MODEL, send_traffic

from app import gpu
from stack import ROOT, free_port

pytestmark = pytest.mark.integration

DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "vllm-inference-api.json"
JOB = "vllm-api"
GPU_PANELS = {"GPU memory used", "GPU utilization", "GPU temperature and power"}
"""Panels fed only by the NVML gauges: no data without an NVIDIA GPU."""


class _NotReady(Exception):
    pass


class Prometheus:
    def __init__(self, target: str, workdir) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found: apt-get install -y prometheus (.ci/run does)")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def query(self, expr: str) -> dict:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        if r.status_code == 503:  # "Service Unavailable" (plain text) until its storage is open
            raise _NotReady
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]

    def wait_for(self, expr: str, predicate, timeout: float = 60) -> list:
        deadline = time.monotonic() + timeout
        result: list = []
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited"
            try:
                result = self.query(expr)["result"]
                if predicate(result):
                    return result
            except (httpx.HTTPError, _NotReady):
                pass
            time.sleep(0.5)
        raise AssertionError(f"{expr}: {result}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(text_stack, tmp_path_factory):
    target = urlparse(text_stack.url).netloc
    prom = Prometheus(target, tmp_path_factory.mktemp("prometheus"))
    try:
        prom.wait_for(f'up{{job="{JOB}"}}', lambda r: r and r[0]["value"][1] == "1")
        send_traffic(text_stack.url, rounds=2)
        # Prometheus has scraped the proxy's count as it is after the traffic, and then twice more,
        # so every series born during the traffic has the two points a rate needs.
        answered = proxy_requests(text_stack.url)
        prom.wait_for(
            f'sum(vllm_api_requests_total{{job="{JOB}"}})',
            lambda r: r and float(r[0]["value"][1]) == answered,
        )
        seen = time.time()
        prom.wait_for(f'timestamp(up{{job="{JOB}"}})', lambda r: r and float(r[0]["value"][1]) > seen + 2)
        yield prom, target
    finally:
        prom.stop()


def proxy_requests(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text)
    return sum(s.value for f in families if f.name == "vllm_api_requests" for s in f.samples)


def panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def substitute(expr: str, instance: str, model: str) -> str:
    """What Grafana sends for the dashboard's variables."""
    for name, value in {
        "$__rate_interval": "1m",
        "$job": JOB,
        "$instance": instance.replace(".", "\\\\."),
        "$model": model,
    }.items():
        expr = expr.replace(name, value)
    return expr


def has_data(result: list) -> bool:
    """At least one series whose value is a number (NaN is what a ratio of nothing gives)."""
    return any(not math.isnan(float(series["value"][1])) for series in result)


@pytest.mark.parametrize("model", [".*", MODEL], ids=["all-models", "one-model"])
def test_every_panel_query_returns_data(prometheus, model):
    prom, instance = prometheus
    gpu_queries_checked = []
    empty = []
    for panel in panels():
        for target in panel["targets"]:
            if "vllm_router_" in target["expr"]:
                continue  # the fleet row's router panels: no router here (tests/integration/test_fleet.py)
            expr = substitute(target["expr"], instance, model)
            result = prom.query(expr)["result"]  # status "success": valid PromQL, accepted
            if panel["title"] in GPU_PANELS and not gpu.probe().gpus:
                assert result == [], (panel["title"], result)
                gpu_queries_checked.append(expr)
            elif not has_data(result):
                empty.append(f"{panel['title']}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    gpu_panels_in_dashboard = {
        p["title"] for p in panels() if all("vllm_api_gpu_" in t["expr"] for t in p["targets"])
    }
    assert gpu_panels_in_dashboard == GPU_PANELS
    if gpu_queries_checked:
        # No NVIDIA GPU on this machine: the GPU panels' queries were run and accepted by
        # Prometheus (valid PromQL), and returned nothing, as they must without NVML gauges.
        print(f"no GPU here: {len(gpu_queries_checked)} GPU queries checked as valid PromQL only")


def test_template_variables_have_values(prometheus):
    prom, instance = prometheus
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    expected = {"job": JOB, "instance": instance, "model": MODEL}
    for name, want in expected.items():
        query = substitute(variables[name]["query"]["query"], instance, ".*")
        metric, label = query.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        r = httpx.get(prom.url + f"/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10)
        assert r.status_code == 200 and want in r.json()["data"], (name, r.text)
