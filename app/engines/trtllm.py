"""TensorRT-LLM's OpenAI-compatible server (`trtllm-serve serve`), bound to loopback behind the proxy.

The flags are those of `tensorrt_llm/commands/serve.py` in TensorRT-LLM 1.2 (the `-trtllm` image's
base, `nvcr.io/nvidia/tensorrt-llm/release:1.2.1`); only long-standing ones are used on the command
line. What trtllm-serve takes only as LLM API options (dtype, chunked prefill, KV-cache block reuse,
metrics) goes into a JSON file passed with `--extra_llm_api_options` (the option is read with
`yaml.safe_load`, and JSON is YAML). The launcher writes that file (`config_files`) before it starts
the engine.

How it differs from vLLM, and what the proxy does about it:
- Health: `GET /health` answers 200 with an empty body (vLLM too): same check.
- Version: `GET /version` answers `{"version": ...}` (vLLM too): `/info` shows it.
- Metrics: trtllm-serve's `/metrics` is JSON iteration stats, not Prometheus. With
  `return_perf_metrics` on (set here), it also serves Prometheus text on `/prometheus/metrics`;
  the proxy's `/metrics` appends those families, all under the `trtllm_` prefix (older releases
  named them without a prefix; `select_metrics` adds it), less the engine's python_/process_/http_
  families, which would clash with the proxy's own. Dashboards keyed on `vllm:*` show nothing for
  this engine; the proxy's `vllm_api_*` metrics are the same on both.
- Model name: there is no `--served-model-name`; `/v1/models` lists the model directory's name.
- GPU_MEMORY_UTIL maps to `--kv_cache_free_gpu_memory_fraction`, which is the fraction of the memory
  left *after* the weights that goes to the KV cache, not vLLM's share of the whole GPU.
- LoRA (app/lora/): the adapters loaded at start go into the options file's `lora_config`
  (`tensorrt_llm/lora_helper.py` LoraConfig: `lora_dir`, `max_lora_rank`, `max_loras`,
  `max_cpu_loras`, `lora_target_modules` in TensorRT-LLM's module names). trtllm-serve has no
  routes to load or unload adapters at run time, and a request picks an adapter with the body's
  `lora_request` (`{"lora_name", "lora_int_id", "lora_path"}`), not by `model`: both are named once
  in the start-up log.
"""

from __future__ import annotations

import json
import re

from app.engines.base import Engine, split_extra_args

EXECUTABLE = "trtllm-serve"

# Settings that map one-to-one onto a trtllm-serve flag. Unset passes no flag: its default stands.
VALUE_FLAGS = {
    "MAX_MODEL_LEN": "--max_seq_len",
    "GPU_MEMORY_UTIL": "--kv_cache_free_gpu_memory_fraction",
    "TENSOR_PARALLEL_SIZE": "--tp_size",
    "MAX_NUM_SEQS": "--max_batch_size",
    "MAX_BATCHED_TOKENS": "--max_num_tokens",
    "PIPELINE_PARALLEL_SIZE": "--pp_size",
}
# Settings that go into the LLM API options file.
OPTION_SETTINGS = ("DTYPE", "ENABLE_CHUNKED_PREFILL", "ENABLE_PREFIX_CACHING")
# Settings trtllm-serve has no equivalent for, with the reason the start-up log gives.
UNMAPPED = {
    "SERVED_MODEL_NAME": "trtllm-serve names the model after its directory",
    "QUANTIZATION": "TensorRT-LLM reads the quantization from the checkpoint",
    "IMAGE_LIMIT": "no per-prompt multimodal limits",
    "VIDEO_LIMIT": "no per-prompt multimodal limits",
    "AUDIO_LIMIT": "no per-prompt multimodal limits",
    "KV_CACHE_DTYPE": "set kv_cache_config.dtype in an options file of your own",
    "LOAD_FORMAT": "trtllm-serve loads checkpoints its own way",
}
OWN_OPTIONS_FLAGS = ("--extra_llm_api_options", "--config")
# Hugging Face (PEFT) module names -> TensorRT-LLM's, the inverse of
# `tensorrt_llm/lora_helper.py` get_default_trtllm_modules_to_hf_modules (dense layers).
LORA_MODULES_TO_TRTLLM = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_dense",
    "gate_proj": "mlp_h_to_4h",
    "down_proj": "mlp_4h_to_h",
    "up_proj": "mlp_gate",
    "gate_up_proj": "mlp_gate_up",
}
# Engine metric families that would clash with the proxy's, or that only describe its HTTP layer.
DROPPED_FAMILIES = (b"python_", b"process_", b"http_")
METRICS_PREFIX = b"trtllm_"
_METRIC_NAME = re.compile(rb"[a-zA-Z_:][a-zA-Z0-9_:]*")


def options_path(settings) -> str:
    return f"/tmp/trtllm-llm-api-options-{settings.ENGINE_PORT}.json"


def _brings_own_options(settings) -> bool:
    """ENGINE_EXTRA_ARGS carries its own options file: it wins, and ours is not passed."""
    for word in split_extra_args(settings.ENGINE_EXTRA_ARGS):
        if word.split("=", 1)[0] in OWN_OPTIONS_FLAGS:
            return True
    return False


def lora_config(plan) -> dict:
    """The LLM API's `lora_config` for the adapters loaded at start."""
    config: dict = {"lora_dir": [spec.path for spec in plan.at_start]}
    for key, value in (
        ("max_lora_rank", plan.max_lora_rank),
        ("max_loras", plan.max_loras),
        ("max_cpu_loras", plan.max_cpu_loras),
    ):
        if value is not None:
            config[key] = value
    modules = {m for spec in plan.at_start if spec.info is not None for m in spec.info.target_modules}
    if modules and modules <= LORA_MODULES_TO_TRTLLM.keys():  # else TensorRT-LLM reads them itself
        config["lora_target_modules"] = sorted(LORA_MODULES_TO_TRTLLM[m] for m in modules)
    return config


def llm_api_options(settings, lora=None) -> dict:
    """The LLM API options trtllm-serve takes only from a file."""
    options: dict = {"return_perf_metrics": True}  # registers /prometheus/metrics
    if settings.TRTLLM_BACKEND == "pytorch":
        options["enable_iter_perf_stats"] = True  # queue and KV-cache gauges (PyTorch backend)
    if settings.DTYPE is not None:
        options["dtype"] = settings.DTYPE
    if settings.ENABLE_CHUNKED_PREFILL is not None:
        options["enable_chunked_prefill"] = settings.ENABLE_CHUNKED_PREFILL
    if settings.ENABLE_PREFIX_CACHING is not None:
        kv_cache: dict = {"enable_block_reuse": settings.ENABLE_PREFIX_CACHING}
        if settings.GPU_MEMORY_UTIL is not None:  # keep the flag's value if the section replaces it
            kv_cache["free_gpu_memory_fraction"] = settings.GPU_MEMORY_UTIL
        options["kv_cache_config"] = kv_cache
    if lora is not None and lora.enabled:
        options["lora_config"] = lora_config(lora)
    return options


def config_files(settings, lora=None) -> dict[str, str]:
    if _brings_own_options(settings):
        return {}
    options = llm_api_options(settings, lora)
    return {options_path(settings): json.dumps(options, indent=2, sort_keys=True) + "\n"}


def build_command(settings, model_path: str, executable: str = EXECUTABLE, lora=None) -> list[str]:
    """`lora` goes into the options file (`config_files`), not onto the command line."""
    argv = [
        executable,
        "serve",
        model_path,
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.ENGINE_PORT),
        "--backend",
        settings.TRTLLM_BACKEND,
    ]
    for field, flag in VALUE_FLAGS.items():
        value = getattr(settings, field)
        if value is not None:
            argv += [flag, str(value)]
    if settings.TRUST_REMOTE_CODE:
        argv.append("--trust_remote_code")
    if not _brings_own_options(settings):
        argv += ["--extra_llm_api_options", options_path(settings)]
    return argv + split_extra_args(settings.ENGINE_EXTRA_ARGS)


def unmapped(settings) -> list[str]:
    """Settings that are set and that trtllm-serve cannot honour, each with the reason."""
    out = [f"{name} ({why})" for name, why in UNMAPPED.items() if getattr(settings, name) is not None]
    if settings.LORA_DYNAMIC:
        out.append("LORA_DYNAMIC (trtllm-serve cannot load or unload LoRA adapters at run time)")
    if settings.LORA_MODULES.strip() or settings.LORA_CONFIG or settings.LORA_DIR:
        out.append(
            "LoRA adapters by `model` (trtllm-serve loads the configured adapters at start; a request "
            "picks one with the body's `lora_request`: lora_name, lora_int_id, lora_path)"
        )
    if _brings_own_options(settings):
        out += [
            f"{name} (ENGINE_EXTRA_ARGS brings its own options file)"
            for name in OPTION_SETTINGS
            if getattr(settings, name) is not None
        ]
    return out


def _metric_name(line: bytes) -> bytes:
    end = len(line)
    for sep in (b"{", b" "):
        i = line.find(sep)
        if i != -1:
            end = min(end, i)
    return line[:end]


class TrtllmEngine(Engine):
    def select_metrics(self, text: bytes) -> bytes:
        """trtllm-serve's Prometheus families, every one under `trtllm_` (added where a release
        did not prefix them), less those that would clash with the proxy's own."""
        keep: list[bytes] = []
        for line in text.splitlines(keepends=True):
            if not line.strip():
                continue
            if line.startswith(b"#"):
                parts = line.split(b" ", 3)
                if len(parts) < 3 or parts[1] not in (b"HELP", b"TYPE"):
                    continue
                if parts[2].startswith(DROPPED_FAMILIES):
                    continue
                if not parts[2].startswith(METRICS_PREFIX):
                    parts[2] = METRICS_PREFIX + parts[2]
                keep.append(b" ".join(parts))
                continue
            name = _metric_name(line)
            if not _METRIC_NAME.fullmatch(name) or name.startswith(DROPPED_FAMILIES):
                continue  # not Prometheus text (a release serving JSON there), or a clashing family
            keep.append(line if name.startswith(METRICS_PREFIX) else METRICS_PREFIX + line)
        out = b"".join(keep)
        return out if not out or out.endswith(b"\n") else out + b"\n"


TRTLLM = TrtllmEngine(
    name="trtllm",
    build_command=build_command,
    health_path="/health",
    metrics_path="/prometheus/metrics",
    version_path="/version",
    metrics_prefix=METRICS_PREFIX,
    config_files=config_files,
    unmapped=unmapped,
)

__all__ = ["TRTLLM", "build_command", "config_files", "llm_api_options", "lora_config", "unmapped"]
