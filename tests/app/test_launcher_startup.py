"""The launcher's start-up path in-process: preflight failures (fake Hub), and engine start failures
with the retry, against tests/standin_vllm.py, a stand-in engine that prints vLLM 0.32's real
messages (a CUDA OOM cannot happen on this machine, and real vLLM takes a minute to reach its KV
check; the real KV retry runs in tests/integration/test_cold_start.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.engines.vllm import build_command
from app.launcher import Launcher
from app.runtime import Phase
from app.settings import Settings
from fake_hub import FakeHub
from inproc import LOGS
from stack import free_port

STANDIN = Path(__file__).resolve().parents[1] / "standin_vllm.py"


def standin(settings, model_path, lora=None):
    return [sys.executable, str(STANDIN), *build_command(settings, model_path, lora=lora)[3:]]


def settings(tmp_path: Path, model: str, **env) -> Settings:
    return Settings(
        MODEL_NAME=model,
        DEVICE="cpu",
        HOST="127.0.0.1",
        PORT=free_port(),
        ENGINE_PORT=free_port(),
        DATA_DIR=str(tmp_path / "data"),
        METRICS_DB_PATH=str(tmp_path / "metrics.db"),
        SCRAPE_INTERVAL=0,
        STARTUP_TIMEOUT=60,
        **env,
    )


async def _life(launcher: Launcher) -> tuple[int, dict | None, str]:
    """Run the launcher until it is ready (then read /info and /metrics and stop it) or exits."""
    launcher.engine = dataclasses.replace(launcher.engine, build_command=standin)
    task = asyncio.ensure_future(launcher.run())
    deadline = time.monotonic() + 60
    while not task.done() and launcher.runtime.phase is not Phase.READY and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    info, text = None, ""
    if launcher.runtime.phase is Phase.READY:
        url = f"http://127.0.0.1:{launcher.settings.PORT}"
        async with httpx.AsyncClient(timeout=5) as client:
            info = (await client.get(url + "/info")).json()
            text = (await client.get(url + "/metrics")).text
        launcher._on_signal(signal.SIGTERM)
    return await asyncio.wait_for(task, 60), info, text


def life(
    s: Settings, monkeypatch, tmp_path, scenario: str = "serve"
) -> tuple[int, dict | None, str, list, list]:
    monkeypatch.setenv("STANDIN_SCENARIO", scenario)
    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "argv.jsonl"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the cache choice exports it: keep it local
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm"))
    before = len(LOGS.records())
    threshold = gc.get_threshold()
    try:
        code, info, text = asyncio.run(_life(Launcher(s)))
    finally:  # the ready path freezes the collector for the process: undo it for the other tests
        gc.unfreeze()
        gc.set_threshold(*threshold)
    argvs = (
        [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]
        if (tmp_path / "argv.jsonl").exists()
        else []
    )
    return code, info, text, LOGS.records()[before:], argvs


def own_errors(records: list) -> list[str]:
    return [r["event"] for r in records if r.get("level") == "error" and r.get("source") is None]


def test_kv_shortfall_is_retried_once_with_the_length_vllm_said_fits(tiny_models, tmp_path, monkeypatch):
    s = settings(tmp_path, str(tiny_models["text"]), MAX_MODEL_LEN=8192)
    code, info, metrics_text, records, argvs = life(s, monkeypatch, tmp_path, "kv")
    assert code == 0 and info is not None
    lengths = [a[a.index("--max-model-len") + 1] for a in argvs]
    assert lengths == ["8192", "768"]
    assert own_errors(records) == [
        "engine exited during start-up",
        "The KV cache for a context of 8192 tokens needs 0.01 GiB and only 0.0 GiB is left after the weights: "
        "vLLM estimates 768 tokens fit: set MAX_MODEL_LEN=768 or less, raise GPU_MEMORY_UTIL, or use more GPUs.",
    ]
    retry = next(r for r in records if r["event"] == "retrying the engine start with a shorter context")
    assert (retry["max_model_len"], retry["was"], retry["failure"]) == (768, 8192, "kv_cache")
    assert info["profile"]["retry"] == {"failure": "kv_cache", "max_model_len": 768, "was": 8192}
    phases = info["startup_s"]
    assert {
        "gpu_check",
        "preflight",
        "download",
        "engine_load",
        "compile",
        "warmup",
        "ready",
        "failed_start",
        "total",
    } <= set(phases)
    assert phases["total"] >= phases["failed_start"] + phases["engine_load"]
    assert 'vllm_api_startup_seconds{phase="failed_start"}' in metrics_text
    ready = next(r for r in records if r["event"] == "ready")
    assert ready["startup_s"] == phases


def test_auto_retry_off_exits_1_with_the_sentence(tiny_models, tmp_path, monkeypatch):
    s = settings(tmp_path, str(tiny_models["text"]), MAX_MODEL_LEN=8192, AUTO_RETRY=False)
    code, info, _, records, argvs = life(s, monkeypatch, tmp_path, "kv")
    assert code == 1 and info is None and len(argvs) == 1
    assert own_errors(records)[1].startswith("The KV cache for a context of 8192 tokens")


def test_oom_after_loading_retries_at_half_the_length_and_oom_loading_does_not_retry(
    tiny_models, tmp_path, monkeypatch
):
    s = settings(tmp_path, str(tiny_models["text"]), MAX_MODEL_LEN=8192)
    code, info, _, records, argvs = life(s, monkeypatch, tmp_path, "oom")
    assert code == 0 and [a[a.index("--max-model-len") + 1] for a in argvs] == ["8192", "4096"]
    assert info["profile"]["retry"]["failure"] == "oom"

    (tmp_path / "argv.jsonl").unlink()
    code, info, _, records, argvs = life(s, monkeypatch, tmp_path, "oom_load")
    assert code == 1 and len(argvs) == 1
    assert own_errors(records)[1].startswith("The GPU ran out of memory loading the weights")


def test_an_unsupported_architecture_is_one_sentence(tiny_models, tmp_path, monkeypatch):
    code, _, _, records, argvs = life(
        settings(tmp_path, str(tiny_models["text"])), monkeypatch, tmp_path, "arch"
    )
    assert code == 1 and len(argvs) == 1
    assert own_errors(records)[1].startswith(
        "This vLLM does not support the model's architecture (FooBarForCausalLM):"
    )


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    with FakeHub(tmp_path / "hub") as fake:
        fake.add_repo("org/gated", {"config.json": "{}", "model.safetensors": b"S" * 64})
        fake.gate("org/gated")
        yield fake


def test_a_preflight_failure_exits_1_in_seconds_before_any_download_or_engine(hub, tmp_path, monkeypatch):
    s = settings(tmp_path, "org/gated", HF_ENDPOINT=hub.url)
    start = time.monotonic()
    code, info, _, records, argvs = life(s, monkeypatch, tmp_path)
    assert code == 1 and time.monotonic() - start < 10
    assert own_errors(records) == [
        "org/gated is gated and no HF_TOKEN is set: accept its license at https://huggingface.co/org/gated and "
        "set HF_TOKEN to a token of that account."
    ]
    assert argvs == [] and hub.downloaded() == []
