"""The memory arithmetic: what a model needs per GPU at a tensor-parallel size, and the longest
context that fits.

Per GPU, vLLM's budget is `memory x gpu_memory_utilization`. Out of it come the weights (split over
the tensor- and pipeline-parallel ranks), an allowance (CUDA context and other non-torch memory,
the peak activations of one engine step, the sampler's logits for a full batch, CUDA graphs, NCCL
buffers on several GPUs), and what is left holds the KV cache: `layers x KV heads x head size x 2
(K and V) x dtype bytes` per token, the KV heads split over the tensor-parallel ranks (replicated
where there are fewer heads than ranks). The rules for valid sizes and vLLM's defaults are read
from vLLM 0.32 (`config/model.py`, `model_executor/layers/linear.py`, `engine/arg_utils.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from app.profiles.hardware import GIB, GpuSet
from app.profiles.model_facts import DTYPE_BYTES, ModelFacts

DEFAULT_GPU_MEMORY_UTILIZATION = 0.92  # vLLM 0.32's CacheConfig default
CONTEXT_STEP = 256  # computed context lengths are rounded down to a multiple of this
MIN_CONTEXT = 512  # below this a configuration is not worth serving
NON_TORCH_BYTES = GIB  # CUDA context, allocator slack: counted inside vLLM's budget
MULTI_GPU_BYTES = GIB // 2  # NCCL and custom all-reduce buffers when tp x pp > 1
CUDA_GRAPH_BYTES = GIB // 2  # captured graphs (none with --enforce-eager)
ACTIVATION_BYTES = 2  # bf16/fp16 activations
# Quantization methods (config.json's quant_method or QUANTIZATION) and the lowest compute
# capability vLLM 0.32 serves them on (`get_min_capability()` of each method, x10 there).
QUANT_MIN_CAPABILITY = {
    "awq": "7.5", "awq_marlin": "7.5", "gptq": "6.0", "gptq_marlin": "6.0", "fp8": "7.5",
    "fbgemm_fp8": "8.0", "compressed-tensors": "7.0", "modelopt": "8.0", "mxfp4": "8.0",
}  # fmt: skip
BF16_MIN_CAPABILITY = "8.0"  # Ampere: torch's bf16 support on CUDA


@dataclass(frozen=True)
class BatchDefaults:
    max_num_seqs: int
    max_num_batched_tokens: int


def vllm_batch_defaults(gpus: GpuSet) -> BatchDefaults:
    """vLLM's own defaults for its OpenAI server on these GPUs (`get_batch_defaults`)."""
    if gpus.memory_bytes >= 160 * GIB:
        return BatchDefaults(1024, 16384)
    if gpus.memory_bytes >= 70 * GIB and "A100" not in gpus.name.upper():
        return BatchDefaults(1024, 8192)
    return BatchDefaults(256, 2048)


def serve_dtype(facts: ModelFacts, dtype: str | None) -> str:
    """The dtype vLLM runs in: DTYPE, else the checkpoint's with float32 brought down to 16 bits
    (`_resolve_auto_dtype`)."""
    if dtype and dtype != "auto":
        return dtype
    return "bfloat16" if facts.checkpoint_dtype in ("float32", "float", "float64") else facts.checkpoint_dtype


def weights_bytes(facts: ModelFacts, dtype: str | None = None, quantization: str | None = None) -> int:
    """Bytes of the weights on the GPUs, all ranks together."""
    if facts.quant_method:  # a quantized checkpoint loads as it is stored
        return int(facts.weights_bytes or 0)
    params = facts.params or 0
    if quantization and quantization.startswith("fp8"):  # online FP8: one byte per weight
        return params
    return params * DTYPE_BYTES.get(serve_dtype(facts, dtype), 2)


def kv_dtype_bytes(facts: ModelFacts, kv_cache_dtype: str | None, dtype: str | None) -> int:
    if kv_cache_dtype and kv_cache_dtype.startswith("fp8"):
        return 1
    return DTYPE_BYTES.get(serve_dtype(facts, dtype), 2)


def kv_bytes_per_token(
    facts: ModelFacts, tp: int = 1, pp: int = 1, kv_cache_dtype: str | None = None, dtype: str | None = None
) -> int:
    """KV cache bytes one token takes on one GPU (tp = pp = 1: the whole model's)."""
    per_elem = kv_dtype_bytes(facts, kv_cache_dtype, dtype)
    layers = -(-facts.num_layers // pp)
    if facts.kv_lora_rank:  # MLA: one compressed latent per token and layer, on every rank
        return layers * (facts.kv_lora_rank + (facts.qk_rope_head_dim or 0)) * per_elem
    kv_heads = max(1, facts.num_kv_heads // tp)
    return layers * kv_heads * facts.head_dim * 2 * per_elem


def valid_tp(facts: ModelFacts, tp: int) -> str | None:
    """None if vLLM accepts this tensor-parallel size for the model, else why not."""
    if facts.num_attention_heads % tp:
        return f"tensor parallel size {tp} does not divide the {facts.num_attention_heads} attention heads"
    kv = facts.num_kv_heads
    if not facts.kv_lora_rank and (tp % kv if tp >= kv else kv % tp):
        return f"tensor parallel size {tp} and the {kv} KV heads do not divide one another"
    return None


def compatibility(facts: ModelFacts, gpus: GpuSet, dtype: str | None, quantization: str | None) -> str | None:
    """None if the GPUs can run the model's precision at all, else why not."""
    method = quantization or facts.quant_method
    if method:
        needed = QUANT_MIN_CAPABILITY.get(method)
        if needed and gpus.capability_at_least(needed) is False:
            return (
                f"{method} needs compute capability {needed}; the {gpus.name} has {gpus.compute_capability}"
            )
    if dtype == "bfloat16" and gpus.capability_at_least(BF16_MIN_CAPABILITY) is False:
        return f"bfloat16 needs compute capability {BF16_MIN_CAPABILITY}; the {gpus.name} has {gpus.compute_capability}"
    return None


@dataclass
class Plan:
    """The arithmetic of one configuration, per GPU."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    gpu_memory_utilization: float
    budget_bytes: int
    weights_bytes: int
    allowance_bytes: int
    kv_bytes_per_token: int
    kv_budget_bytes: int
    fits_tokens: int
    """The longest sequence whose KV cache fits in what is left (0: the weights do not fit)."""
    model_max_len: int
    max_model_len: int
    """The context to serve: the one asked for, else the longest that fits up to the model's."""

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + self.allowance_bytes + self.kv_bytes_per_token * self.max_model_len

    @property
    def gb_per_gpu(self) -> float:
        return round(self.needed_bytes / 1e9, 1)

    @property
    def fits(self) -> bool:
        return self.fits_tokens >= self.max_model_len and self.max_model_len >= 1

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gb_per_gpu"] = self.gb_per_gpu
        return out

    def arithmetic(self) -> str:
        """One line a person can check by hand."""
        gib = GIB
        return (
            f"tp={self.tensor_parallel_size} pp={self.pipeline_parallel_size}: budget "
            f"{self.budget_bytes / gib:.2f} GiB/GPU (x{self.gpu_memory_utilization}) - weights "
            f"{self.weights_bytes / gib:.2f} - allowance {self.allowance_bytes / gib:.2f} = KV "
            f"{self.kv_budget_bytes / gib:.2f} GiB / {self.kv_bytes_per_token / 1024:.1f} KiB per token = "
            f"{self.fits_tokens} tokens; model max {self.model_max_len}"
        )


def allowance_bytes(
    facts: ModelFacts,
    gpus: GpuSet,
    tp: int,
    pp: int,
    max_num_seqs: int | None = None,
    max_batched_tokens: int | None = None,
    enforce_eager: bool = False,
) -> int:
    """Memory per GPU besides weights and KV cache."""
    defaults = vllm_batch_defaults(gpus)
    tokens = max_batched_tokens or defaults.max_num_batched_tokens
    seqs = max_num_seqs or defaults.max_num_seqs
    activations = tokens * (4 * facts.hidden_size + 2 * facts.intermediate_size // tp) * ACTIVATION_BYTES
    logits = seqs * facts.vocab_size * 4  # float32 logits of a full batch in the sampler's warm-up
    extra = (MULTI_GPU_BYTES if tp * pp > 1 else 0) + (0 if enforce_eager else CUDA_GRAPH_BYTES)
    return NON_TORCH_BYTES + activations + logits + extra


def plan(
    facts: ModelFacts,
    gpus: GpuSet,
    tp: int = 1,
    pp: int = 1,
    *,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
    max_num_seqs: int | None = None,
    max_batched_tokens: int | None = None,
    enforce_eager: bool = False,
) -> Plan:
    """The arithmetic for this model on these GPUs at tp x pp. With max_model_len, the plan is
    for that context; without, for the longest that fits (up to the model's own maximum)."""
    util = gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    budget = int(gpus.memory_bytes * util)
    weights = -(-weights_bytes(facts, dtype, quantization) // (tp * pp))
    extra = allowance_bytes(facts, gpus, tp, pp, max_num_seqs, max_batched_tokens, enforce_eager)
    per_token = kv_bytes_per_token(facts, tp, pp, kv_cache_dtype, dtype)
    kv_budget = budget - weights - extra
    fits_tokens = max(0, kv_budget // per_token) if per_token else 0
    if max_model_len is None:
        best = min(fits_tokens, facts.max_model_len)
        max_model_len = best if best == facts.max_model_len else best // CONTEXT_STEP * CONTEXT_STEP
    return Plan(
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        gpu_memory_utilization=util,
        budget_bytes=budget,
        weights_bytes=weights,
        allowance_bytes=extra,
        kv_bytes_per_token=per_token,
        kv_budget_bytes=kv_budget,
        fits_tokens=int(fits_tokens),
        model_max_len=facts.max_model_len,
        max_model_len=int(max_model_len),
    )


def choose_tp(
    facts: ModelFacts, gpus: GpuSet, *, max_model_len: int | None = None, pp: int = 1, **kwargs: Any
) -> tuple[Plan | None, list[Plan]]:
    """The smallest valid tensor-parallel size at which the context fits: `max_model_len` when
    given, else the model's whole context; failing that (and no length asked for), the size that
    fits the longest context, if that is at least MIN_CONTEXT (or the model's max, if shorter).
    Returns (the chosen plan or None, every plan tried)."""
    target = max_model_len or facts.max_model_len
    plans = [
        plan(facts, gpus, tp, pp, max_model_len=max_model_len, **kwargs)
        for tp in range(1, gpus.count // pp + 1)
        if valid_tp(facts, tp) is None
    ]
    for p in plans:
        if p.fits_tokens >= target:
            return p, plans
    if max_model_len is not None:
        return None, plans
    floor = min(MIN_CONTEXT, facts.max_model_len)
    usable = [p for p in plans if p.max_model_len >= floor]
    if not usable:
        return None, plans
    return max(usable, key=lambda p: (p.max_model_len, -p.tensor_parallel_size)), plans
