"""Cold start on the real stack (scripts/start.sh, vLLM on the CPU, the tiny text model), two starts
on one DATA_DIR: the first, cold, reports its phases (the ready record, /info, the metric) and
leaves vLLM's cache on the volume; the second reuses it (vLLM's own debug line and timing of the
step the cache skips), and is made to hit vLLM's real KV cache check (a KV cache of 1 MB for an
8192-token context) so the launcher retries once with the length vLLM printed and serves."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stack import CPU_ENV, Stack

pytestmark = pytest.mark.integration

PHASES = {"gpu_check", "preflight", "download", "engine_load", "warmup", "ready", "total"}
INSPECT = re.compile(r"Registry inspect model class: Elapsed time ([\d.]+) secs")


def _stack(stack_logs, name, data_dir, model, **env) -> Stack:
    settings = {
        "MODEL_NAME": str(model),
        "SERVED_MODEL_NAME": "tiny",
        "MAX_MODEL_LEN": "2048",
        "DATA_DIR": str(data_dir),
        # vLLM says (at debug) whether its model-info cache was hit, and how long the step took.
        "VLLM_LOGGING_LEVEL": "DEBUG",
        "LOG_LEVEL": "DEBUG",
    }
    stack = Stack(stack_logs, name, **{**settings, **env})
    stack.env.pop("VLLM_CACHE_ROOT")  # the cache goes where DATA_DIR puts it
    return stack


def _inspect_seconds(stack: Stack) -> list[float]:
    return [float(m[1]) for r in stack.records() if (m := INSPECT.search(str(r.get("event", ""))))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def cold(stack_logs, tiny_models, data_dir):
    stack = _stack(stack_logs, "cold-start-1", data_dir, tiny_models["text"]).start(timeout=600)
    try:
        info = httpx.get(stack.url + "/info", timeout=5).json()
        text = httpx.get(stack.url + "/metrics", timeout=5).text
    finally:
        stack.stop()
    return stack, info, text


def test_a_cold_start_reports_its_phases_and_keeps_vllms_cache_on_the_volume(cold, data_dir):
    stack, info, text = cold
    phases = info["startup_s"]
    assert set(phases) >= PHASES, phases
    assert phases["total"] >= sum(v for k, v in phases.items() if k != "total") - 0.1
    ready = next(r for r in stack.records() if r.get("event") == "ready")
    assert ready["startup_s"] == phases
    metric = {
        s.labels["phase"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "vllm_api_startup_seconds"
        for s in f.samples
    }
    assert metric == phases
    assert info["caches"] == {
        "hf_home": str(data_dir / "huggingface"),
        "vllm_cache_root": str(data_dir / "vllm-cache"),
    }
    assert any((data_dir / "vllm-cache" / "modelinfos").iterdir())
    assert info["profile"]["reason"].startswith("DEVICE=cpu")


def test_a_second_start_reuses_the_cache_and_a_kv_shortfall_is_retried_at_vllms_length(
    cold, stack_logs, tiny_models, data_dir
):
    first, first_info, _ = cold
    stack = _stack(
        stack_logs,
        "cold-start-2",
        data_dir,
        tiny_models["text"],
        MAX_MODEL_LEN="8192",
        ENGINE_EXTRA_ARGS=CPU_ENV["ENGINE_EXTRA_ARGS"] + " --kv-cache-memory-bytes 1000000",
    )
    stack.env.pop("VLLM_CPU_KVCACHE_SPACE")  # it would override --kv-cache-memory-bytes
    stack.start(timeout=600)
    try:
        info = httpx.get(stack.url + "/info", timeout=5).json()
        answer = httpx.post(
            stack.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4}, timeout=30
        )
    finally:
        stack.stop()
    records = stack.records()

    # Warm: vLLM read the model's info from the cache the first start left (no inspection subprocess).
    engine_lines = [str(r["event"]) for r in records if r.get("source") == "vllm"]
    assert any("from cache" in line and "Loaded model info" in line for line in engine_lines)
    cold_s, warm_s = max(_inspect_seconds(first)), max(_inspect_seconds(stack))
    print(
        f"registry inspection: cold {cold_s:.2f} s, warm {warm_s:.4f} s; cold start: {first_info['startup_s']}"
    )
    assert warm_s < cold_s / 10

    # Real vLLM refused 8192 tokens of context with a 1 MB KV cache and said 768 fit.
    retry = next(r for r in records if r.get("event") == "retrying the engine start with a shorter context")
    assert (retry["failure"], retry["max_model_len"], retry["was"]) == ("kv_cache", 768, 8192)
    sentence = next(r for r in records if r.get("failure") == "kv_cache" and r.get("level") == "error")
    assert "vLLM estimates 768 tokens fit" in sentence["event"]
    commands = [r["command"] for r in records if r.get("event") == "starting engine"]
    assert [c[c.index("--max-model-len") + 1] for c in commands] == ["8192", "768"]
    assert info["profile"]["retry"] == {"failure": "kv_cache", "max_model_len": 768, "was": 8192}
    assert info["startup_s"]["failed_start"] > 0
    assert answer.status_code == 200, answer.text
