"""/metrics on the real stack: one valid exposition (the proxy's families, the engine's vllm:*),
checked by prometheus_client's parser and by Debian's promtool; METRICS_API_KEY; the standalone
collector scraping it."""

import shutil
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from traffic import send_traffic

from app import gpu
from app.metrics_store import MetricsStore
from inproc import InProcessProxy
from stack import ROOT

pytestmark = pytest.mark.integration

PROXY_FAMILIES = {
    "vllm_api_requests": "counter",
    "vllm_api_request_duration_seconds": "histogram",
    "vllm_api_time_to_first_token_seconds": "histogram",
    "vllm_api_prompt_tokens": "counter",
    "vllm_api_completion_tokens": "counter",
    "vllm_api_tokens_per_second": "histogram",
    "vllm_api_requests_in_flight": "gauge",
    "vllm_api_request_parts": "counter",
    "vllm_api_upstream_errors": "counter",
}
ENGINE_FAMILIES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_hits",
    "vllm:prefix_cache_queries",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
]


@pytest.fixture(scope="module")
def exposition(text_stack) -> str:
    send_traffic(text_stack.url)
    return httpx.get(text_stack.url + "/metrics", timeout=10).text


def test_metrics_hold_the_proxys_and_the_engines_families(exposition):
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    for name, kind in PROXY_FAMILIES.items():
        assert families[name].type == kind, name
    for name in ENGINE_FAMILIES:
        assert name in families, name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert (
        samples[("vllm_api_requests_total", (("model", ""), ("route", "/v1/completions"), ("status", "404")))]
        >= 1
    )
    assert any(
        name == "vllm_api_request_parts_total" and ("modality", "text") in labels for name, labels in samples
    )
    kinds = {dict(labels)["kind"] for name, labels in samples if name == "vllm_api_upstream_errors_total"}
    assert kinds == {"connect", "timeout", "protocol"}  # exported at zero: "no errors" is data
    bounds = {
        float(dict(labels)["le"])
        for name, labels in samples
        if name == "vllm_api_request_duration_seconds_bucket" and dict(labels)["route"] == "/v1/completions"
    }
    assert {0.01, 0.1, 1.0, 10.0, 60.0} <= bounds  # resolves 10 ms to 60 s


def test_metrics_are_one_valid_exposition_without_duplicate_help_or_type(exposition):
    for kind in ("HELP", "TYPE"):
        names = [line.split(" ")[2] for line in exposition.splitlines() if line.startswith(f"# {kind} ")]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        assert not duplicates, f"{kind} repeated for {duplicates}"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: apt-get install -y prometheus (.ci/run does)")
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
    # promtool's parser rejects what Prometheus would (exit 1); lint remarks (exit 3) are about
    # style, such as the colons vLLM puts in its names.
    assert result.returncode in (0, 3), result.stdout + result.stderr
    assert "error" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr


def test_gpu_gauges_are_absent_without_a_gpu(exposition):
    report = gpu.probe()
    if report.gpus:
        assert "vllm_api_gpu_memory_used_bytes" in exposition
    else:  # this machine: no NVIDIA driver, so no GPU series rather than zeros
        assert "vllm_api_gpu_" not in exposition, report.error


def test_metrics_api_key_protects_metrics(text_stack):
    with InProcessProxy(text_stack.engine_url, METRICS_API_KEY="m-key") as proxy:
        assert httpx.get(proxy.url + "/metrics").status_code == 401
        assert httpx.get(proxy.url + "/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = httpx.get(proxy.url + "/metrics", headers={"Authorization": "Bearer m-key"})
        assert r.status_code == 200 and "vllm:num_requests_running" in r.text
        assert httpx.get(proxy.url + "/health").status_code == 200  # probes stay open


@pytest.mark.parametrize("target", ["proxy", "engine"])
def test_standalone_collector_scrapes_any_metrics_url_into_the_database(text_stack, tmp_path, target):
    url = (text_stack.url if target == "proxy" else text_stack.engine_url) + "/metrics"
    db = tmp_path / "standalone.db"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.metrics_collector",
            url,
            "--db",
            str(db),
            "--interval",
            "0.5",
            "--count",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    store = MetricsStore(db)
    assert store.sources() == [url]
    running = store.series("requests_running", "1h", source=url)["points"]
    kv = store.series("kv_cache_usage", "1h", source=url)["points"]
    assert len(running) == 2 and all(v is not None for _, v in running + kv)  # 3 readings, 2 intervals
