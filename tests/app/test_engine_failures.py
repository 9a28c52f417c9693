"""Engine start failures, recognised from what vLLM prints. Where vLLM's own code can produce the
message here (the KV cache check, the architecture registry, its argument parser, transformers'
remote-code check), it does; the GPU-only messages (CUDA out of memory, compute capability) are
vLLM's and PyTorch's texts copied from their source, since no GPU is here to raise them."""

from __future__ import annotations

import pytest

from app.engine_failures import FailureWatcher, classify, retry_length

vllm = pytest.importorskip("vllm", reason="vllm is installed by `make venv`")

# Copied from vLLM 0.32 (v1/worker/gpu_model_runner.py load_model) and PyTorch's allocator.
OOM_AT_LOAD = (
    "(EngineCore pid=91) ERROR 11-29 10:04:47 [gpu_model_runner.py:5147] Failed to load model - not enough GPU "
    "memory. Try lowering --gpu-memory-utilization to free memory for weights, increasing "
    "--tensor-parallel-size, or using --quantization. See https://docs.vllm.ai/en/latest/configuration/"
    "conserving_memory/ for more tips. (original error: CUDA out of memory. Tried to allocate 896.00 MiB. "
    "GPU 0 has a total capacity of 22.05 GiB of which 512.00 MiB is free.)"
)
OOM_IN_WARMUP = (
    "RuntimeError: CUDA out of memory occurred when warming up sampler with 256 dummy requests. Please try "
    "lowering `max_num_seqs` or `gpu_memory_utilization` when initializing the engine."
)
GPU_BUSY = (
    "ValueError: Free memory on device cuda:0 (10.5/79.19 GiB) on startup is less than desired GPU memory "
    "utilization (0.92, 72.85 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes."
)
QUANT_TOO_OLD = (
    "ValueError: The quantization method fp8_e4m3 is not supported for the current GPU. Minimum capability: "
    "89. Current capability: 80."
)
NO_BF16 = (
    "ValueError: Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your Tesla T4 GPU "
    "has compute capability 7.5. You can use float16 instead by explicitly setting the `dtype` flag in CLI, "
    "for example: --dtype=half."
)
TOO_LONG = (
    "ValueError: User-specified max_model_len (65536) is greater than the derived max_model_len "
    "(max_position_embeddings=32768.0 or model_max_length=None in model's config.json). To allow overriding "
    "this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."
)


def _raised(fn, *args) -> str:
    with pytest.raises(Exception) as err:  # noqa: PT011 - whatever vLLM raises, its text is the point
        fn(*args)
    return f"{type(err.value).__name__}: {err.value}"


def test_kv_cache_shortfall_from_vllms_own_check_carries_the_length_that_fits():
    from vllm.v1.core.kv_cache_utils import _check_enough_kv_cache_memory

    line = _raised(_check_enough_kv_cache_memory, 1_000_000, lambda: 8_388_608, 8192, lambda available: 768)
    failure = classify(f"(EngineCore pid=1) ERROR 11-29 10:04:47 [core.py:1510] {line}")
    assert failure.kind == "kv_cache" and failure.fits_max_model_len == 768 and failure.retryable
    assert failure.message == (
        "The KV cache for a context of 8192 tokens needs 0.01 GiB and only 0.0 GiB is left after the "
        "weights: vLLM estimates 768 tokens fit: set MAX_MODEL_LEN=768 or less, raise GPU_MEMORY_UTIL, "
        "or use more GPUs."
    )
    # No estimate (not even one token fits): a sentence, nothing to retry with.
    none_fits = classify(_raised(_check_enough_kv_cache_memory, 1000, lambda: 8_388_608, 8192, lambda a: 0))
    assert none_fits.kind == "kv_cache" and none_fits.fits_max_model_len is None
    empty = classify(_raised(_check_enough_kv_cache_memory, 0, lambda: 1, 8192, lambda a: 0))
    assert empty.kind == "kv_cache" and empty.message.startswith("No GPU memory is left for the KV cache")


def test_an_unsupported_architecture_from_vllms_registry():
    from vllm.model_executor.models.registry import ModelRegistry

    line = _raised(ModelRegistry._raise_for_unsupported, ["FooBarForCausalLM"])
    failure = classify(line)
    assert failure.kind == "architecture"
    assert failure.message.startswith(
        "This vLLM does not support the model's architecture (FooBarForCausalLM):"
    )


def test_an_unknown_flag_from_vllms_own_parser(capsys):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    with pytest.raises(SystemExit):
        make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", "--disable-log-requests"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    failure = classify(line)
    assert failure.kind == "flag"
    assert failure.message.startswith("This vLLM does not know --disable-log-requests (removed or renamed):")
    with pytest.raises(SystemExit):
        make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", "--max-model-len", "lots"])
    bad_value = classify(capsys.readouterr().err.strip().splitlines()[-1])
    assert bad_value.kind == "flag" and bad_value.message.startswith(
        "vLLM refused the value of --max-model-len"
    )


def test_remote_code_needed_from_transformers_own_check():
    from transformers.dynamic_module_utils import resolve_trust_remote_code

    line = _raised(resolve_trust_remote_code, False, "org/custom", False, True).splitlines()[0]
    failure = classify(line)
    assert failure.kind == "trust_remote_code" and "TRUST_REMOTE_CODE=true" in failure.message
    # vLLM's own wording when the config needs the code (vllm/transformers_utils/config.py).
    wrapped = classify(
        "RuntimeError: Failed to load the model config. If the model is a custom model not yet available in "
        "the HuggingFace transformers library, consider setting `trust_remote_code=True` in LLM or using the "
        "`--trust-remote-code` flag in the CLI."
    )
    assert wrapped.kind == "trust_remote_code"
    assert classify("INFO the profile sets trust_remote_code=True for this model") is None


@pytest.mark.parametrize(
    ("line", "kind", "says"),
    [
        (OOM_AT_LOAD, "oom_load", "The GPU ran out of memory loading the weights"),
        (OOM_IN_WARMUP, "oom", "The GPU ran out of memory after the weights loaded"),
        (GPU_BUSY, "gpu_busy", "Only 10.5 of 79.19 GiB of GPU memory is free at start"),
        (QUANT_TOO_OLD, "gpu_too_old", "fp8_e4m3 needs compute capability 8.9 and this GPU has 8.0"),
        (NO_BF16, "gpu_too_old", "set DTYPE=float16"),
        (TOO_LONG, "max_model_len", "MAX_MODEL_LEN=65536 is longer than the model's 32768"),
    ],
)
def test_gpu_side_messages(line, kind, says):
    failure = classify(line)
    assert failure.kind == kind and says in failure.message
    assert "\n" not in failure.message and failure.message.endswith(".")


def test_the_watcher_keeps_the_root_cause_over_what_follows_it():
    watcher = FailureWatcher()
    for line in (
        "(EngineCore pid=1) INFO 11-29 10:04:45 [default_loader.py:501] Loading weights took 0.01 seconds",
        OOM_AT_LOAD,
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 896.00 MiB.",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ):
        watcher.feed(line)
    assert watcher.failure.kind == "oom_load" and not watcher.failure.retryable
    watcher.reset()
    watcher.feed("INFO nothing to see")
    assert watcher.failure is None


def test_what_a_retry_uses():
    kv = classify("ValueError: To serve at least one request with the model's max seq len (8192), (0.01 GiB KV "
                  "cache is needed, which is larger than the available KV cache memory (0.0 GiB). Based on the "
                  "available memory, the estimated maximum model length is 768. Try increasing ...")  # fmt: skip
    assert retry_length(kv, 8192, None) == 768
    oom = classify(OOM_IN_WARMUP)
    assert retry_length(oom, 32768, 20480) == 20480  # the arithmetic's, when shorter
    assert retry_length(oom, 32768, None) == 16384  # else half
    assert retry_length(oom, 300, None) is None  # nothing sensible left
    assert (
        retry_length(classify(OOM_AT_LOAD), 32768, 20480) is None
    )  # a shorter context cannot help the weights
