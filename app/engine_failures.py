"""Why the engine failed to start, read from what it printed, as one sentence that says what to do.

The patterns are vLLM 0.32's own messages (file of each in the comments), and transformers' and
argparse's where vLLM passes theirs through. For a KV cache too small for MAX_MODEL_LEN (vLLM
prints the length that fits) and for running out of GPU memory after the weights loaded, the
failure also says what to retry with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# vllm/v1/core/kv_cache_utils.py _check_enough_kv_cache_memory
_KV_SHORT = re.compile(
    r"To serve at least one request with the model's max seq len \((?P<asked>\d+)\), "
    r"\((?P<needed>[\d.]+) GiB KV cache is needed, which is larger than the available KV cache memory "
    r"\((?P<available>[\d.]+) GiB\)\.(?: Based on the available memory, the estimated maximum model "
    r"length is (?P<fits>\d+)\.)?"
)
_KV_NONE = re.compile(
    r"No available memory for the cache blocks\.|Cannot auto-fit max_model_len: not enough GPU memory"
)
# vllm/v1/worker/gpu_model_runner.py load_model
_OOM_LOAD = re.compile(r"Failed to load model - not enough GPU memory")
# torch's allocator, and vLLM's warm-up wrappers (gpu_model_runner.py _dummy_sampler_run, ...)
_OOM = re.compile(r"CUDA out of memory|torch\.OutOfMemoryError|OutOfMemoryError: CUDA")
# vllm/v1/worker/utils.py request_memory
_GPU_BUSY = re.compile(
    r"Free memory on device \S+ \((?P<free>[\d.]+)/(?P<total>[\d.]+) GiB\) on startup is less than "
    r"desired GPU memory utilization \((?P<util>[\d.]+), (?P<wanted>[\d.]+) GiB\)"
)
# vllm/model_executor/models/registry.py _raise_for_unsupported
_ARCH = re.compile(
    r"Model architectures \[(?P<archs>[^\]]*)\] are not supported for now"
    r"|Model architecture (?P<old>\S+) was supported in vLLM until v(?P<version>\S+), and is not supported anymore"
    r"|Model architecture (?P<oot>\S+) is not supported in-tree anymore\. Please install the plugin at (?P<url>\S+)"
)
# vllm/transformers_utils/config.py and transformers' dynamic_module_utils.resolve_trust_remote_code
_REMOTE_CODE = re.compile(
    r"Error.*(?:`trust_remote_code=True`|contains custom code which must be executed"
    r"|requires you to execute (?:the configuration file|custom code))"
)
# argparse (FlexibleArgumentParser.error)
_UNKNOWN_FLAG = re.compile(r"error: unrecognized arguments: (?P<flags>.+)$")
_BAD_FLAG = re.compile(r"error: argument (?P<flag>--[\w.-]+)(?:/[^:]*)?: (?P<why>.+)$")
# vllm/config/model.py _get_and_verify_max_len
_TOO_LONG = re.compile(
    r"User-specified max_model_len \((?P<asked>\d+)\) is greater than the derived max_model_len "
    r"\((?P<key>\w+)=(?P<derived>[\d.]+)"
)
# vllm/config/vllm.py (quantization) and vllm/platforms/cuda.py (bfloat16)
_QUANT_GPU = re.compile(
    r"The quantization method (?P<method>\S+) is not supported for the current GPU\. Minimum capability: "
    r"(?P<min>\d+)\. Current capability: (?P<cur>\d+)\."
)
_BF16_GPU = re.compile(r"Bfloat16 is only supported on GPUs with compute capability of at least 8\.0")

RETRYABLE = ("kv_cache", "oom")


@dataclass
class Failure:
    kind: str
    message: str
    """One sentence for the user."""
    fits_max_model_len: int | None = None
    """What vLLM said fits (kv_cache), for a retry."""
    line: str = ""

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE


def _cc(value: str) -> str:
    return f"{int(value) // 10}.{int(value) % 10}"


def classify(line: str, max_model_len: int | None = None) -> Failure | None:
    """The failure this line of engine output reports, if it is one of those known."""
    if m := _KV_SHORT.search(line):
        fits = int(m["fits"]) if m["fits"] else None
        asked = m["asked"]
        tail = (
            f"vLLM estimates {fits} tokens fit: set MAX_MODEL_LEN={fits} or less"
            if fits
            else "set a smaller MAX_MODEL_LEN"
        )
        return Failure(
            "kv_cache",
            f"The KV cache for a context of {asked} tokens needs {m['needed']} GiB and only "
            f"{m['available']} GiB is left after the weights: {tail}, raise GPU_MEMORY_UTIL, or use more GPUs.",
            fits,
            line,
        )
    if _KV_NONE.search(line):
        return Failure(
            "kv_cache",
            "No GPU memory is left for the KV cache after the weights: raise GPU_MEMORY_UTIL, use more "
            "GPUs (TENSOR_PARALLEL_SIZE) or a quantized model.",
            None,
            line,
        )
    if _OOM_LOAD.search(line):
        return Failure(
            "oom_load",
            "The GPU ran out of memory loading the weights: use more GPUs (TENSOR_PARALLEL_SIZE), a "
            "quantized model (QUANTIZATION), or stop what else holds GPU memory.",
            None,
            line,
        )
    if m := _GPU_BUSY.search(line):
        return Failure(
            "gpu_busy",
            f"Only {m['free']} of {m['total']} GiB of GPU memory is free at start and GPU_MEMORY_UTIL="
            f"{m['util']} asks for {m['wanted']} GiB: stop what else holds GPU memory, or lower GPU_MEMORY_UTIL.",
            None,
            line,
        )
    if _OOM.search(line):
        return Failure(
            "oom",
            "The GPU ran out of memory after the weights loaded (warm-up, CUDA graphs or the sampler): "
            "lower MAX_MODEL_LEN, MAX_NUM_SEQS or MAX_BATCHED_TOKENS.",
            None,
            line,
        )
    if m := _ARCH.search(line):
        if m["archs"] is not None:
            archs = m["archs"].replace("'", "")
            text = (
                f"This vLLM does not support the model's architecture ({archs}): serve a supported model "
                "(https://docs.vllm.ai/en/latest/models/supported_models.html) or an image with another vLLM."
            )
        elif m["old"]:
            text = f"vLLM dropped {m['old']} after v{m['version']}: use an image with that vLLM version."
        else:
            text = f"{m['oot']} is served by a vLLM plugin ({m['url']}): install it in the image."
        return Failure("architecture", text, None, line)
    if _REMOTE_CODE.search(line):
        return Failure(
            "trust_remote_code",
            "The model needs its own Python code from its repository: set TRUST_REMOTE_CODE=true if you "
            "trust it.",
            None,
            line,
        )
    if m := _UNKNOWN_FLAG.search(line):
        return Failure(
            "flag",
            f"This vLLM does not know {m['flags'].strip()} (removed or renamed): fix ENGINE_EXTRA_ARGS "
            "or the profile's extra_args (vLLM's flags: `vllm serve --help`).",
            None,
            line,
        )
    if m := _BAD_FLAG.search(line):
        return Failure(
            "flag",
            f"vLLM refused the value of {m['flag']}: {m['why'].strip()}.",
            None,
            line,
        )
    if m := _TOO_LONG.search(line):
        derived = int(float(m["derived"]))
        return Failure(
            "max_model_len",
            f"MAX_MODEL_LEN={m['asked']} is longer than the model's {derived} ({m['key']} in its "
            f"config.json): set MAX_MODEL_LEN={derived} or less.",
            None,
            line,
        )
    if m := _QUANT_GPU.search(line):
        return Failure(
            "gpu_too_old",
            f"{m['method']} needs compute capability {_cc(m['min'])} and this GPU has {_cc(m['cur'])}: "
            "use another quantization or a newer GPU.",
            None,
            line,
        )
    if _BF16_GPU.search(line):
        return Failure(
            "gpu_too_old",
            "This GPU has no bfloat16 (compute capability under 8.0): set DTYPE=float16.",
            None,
            line,
        )
    return None


# Which failure explains a start best when several lines match (a traceback repeats the error,
# and an OOM is followed by generic errors).
_PRIORITY = ("kv_cache", "oom_load", "gpu_busy", "oom", "gpu_too_old", "max_model_len", "architecture",
             "trust_remote_code", "flag")  # fmt: skip


class FailureWatcher:
    """Fed every line the engine prints during start-up; keeps the most telling failure."""

    def __init__(self) -> None:
        self.failure: Failure | None = None

    def feed(self, line: str) -> None:
        low = line.lower()
        if "error" not in low and "memory" not in low:
            return  # every message above is on an error line or speaks of memory; most lines are progress
        found = classify(line)
        if found is None:
            return
        if (
            self.failure is None
            or _PRIORITY.index(found.kind) < _PRIORITY.index(self.failure.kind)
            or found.kind == self.failure.kind
            and found.fits_max_model_len
            and not self.failure.fits_max_model_len
        ):
            self.failure = found

    def reset(self) -> None:
        self.failure = None


def retry_length(failure: Failure, current: int | None, computed: int | None) -> int | None:
    """The MAX_MODEL_LEN to retry with, or None when a retry would not help: for a KV shortfall the
    length vLLM said fits; for an OOM after loading, the arithmetic's length if shorter than the
    one that failed, else half of it (the profiling run and the sampler scale with it)."""
    if failure.kind == "kv_cache":
        return failure.fits_max_model_len or None
    if failure.kind == "oom" and current:
        candidate = computed if computed and computed < current else current // 2
        return candidate if candidate >= 256 else None
    return None
