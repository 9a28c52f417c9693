"""What the memory arithmetic needs to know about a model, read without loading it: its
`config.json` (layers, heads, sizes, dtype, quantization, context length) and the size of its
weights (safetensors headers, the safetensors index, or the Hub's file sizes).

The context length is derived the way vLLM derives it (`vllm/config/model.py`
`_get_and_verify_max_len`, `model_arch_config_convertor.derive_max_model_len_and_key`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
    "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}
# vLLM's possible_keys for the context length, in its order (the smallest found wins).
MAX_LEN_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
    "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len",
)  # fmt: skip
# RoPE types whose max_position_embeddings is already scaled (vLLM does not multiply by `factor`).
ROPE_PRESCALED = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")
# Where multimodal and wrapper configs keep their language model's settings.
TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config", "thinker_config")
# LlamaConfig's defaults: LLaVA 1.5's config.json leaves most of its text_config to them.
LLAMA_DEFAULTS = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "max_position_embeddings": 2048, "vocab_size": 32000,
}  # fmt: skip


class ModelFactsError(ValueError):
    """The model's config cannot be read well enough to plan for it; the message says why."""


@dataclass
class ModelFacts:
    architectures: list[str]
    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_model_len: int
    """The longest context the model takes, as vLLM derives it from the config."""
    checkpoint_dtype: str
    quant_method: str | None = None
    weights_bytes: int | None = None
    """Bytes of the weights that will be loaded (one format, the best present)."""
    params: int | None = None
    """Parameter count, where known exactly (safetensors headers, the Hub's metadata) or estimated."""
    weights_source: str = "estimated from config.json"
    kv_lora_rank: int | None = None
    """MLA models (DeepSeek V2/V3): the compressed KV cache's rank; None for ordinary attention."""
    qk_rope_head_dim: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings, falling back to the top level for what the nested one lacks."""
    for key in TEXT_CONFIG_KEYS:
        nested = config.get(key)
        if isinstance(nested, dict) and nested:
            merged = {k: v for k, v in config.items() if k not in TEXT_CONFIG_KEYS}
            if nested.get("model_type") == "llama":
                merged.update({k: v for k, v in LLAMA_DEFAULTS.items() if k not in merged})
            merged.update(nested)
            return merged
    return config


def derived_max_len(text: dict[str, Any]) -> int:
    """The model's own maximum context, as vLLM computes it."""
    found = [text[k] for k in MAX_LEN_KEYS if isinstance(text.get(k), int | float) and text[k] > 0]
    length = min(found) if found else 2048  # vLLM's default when no key is there
    if text.get("model_max_length"):
        length = text["model_max_length"]
    rope = text.get("rope_scaling") or text.get("rope_parameters")
    if isinstance(rope, dict) and "gemma3" not in str(text.get("model_type", "")):
        rope_type = rope.get("rope_type") or rope.get("type")
        factor = rope.get("factor")
        if rope_type and rope_type not in ROPE_PRESCALED and isinstance(factor, int | float):
            length *= factor
    return int(length)


def _dtype(text: dict[str, Any], config: dict[str, Any]) -> str:
    for source in (config, text):
        value = source.get("torch_dtype") or source.get("dtype")
        if isinstance(value, str):
            return value.removeprefix("torch.")
    return "float16"  # transformers' PretrainedConfig default when none is given


def facts_from_config(config: dict[str, Any]) -> ModelFacts:
    """ModelFacts from a parsed config.json; weights estimated from the shapes until measured."""
    text = _text_config(config)
    try:
        hidden = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFactsError(f"config.json has no usable {exc} for its language model") from exc
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    quant = config.get("quantization_config") or text.get("quantization_config")
    facts = ModelFacts(
        architectures=list(config.get("architectures") or text.get("architectures") or []),
        model_type=str(config.get("model_type", "")),
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=int(text.get("intermediate_size") or 4 * hidden),
        vocab_size=int(text.get("vocab_size") or 32000),
        max_model_len=derived_max_len(text),
        checkpoint_dtype=_dtype(text, config),
        quant_method=str(quant.get("quant_method")).lower() if isinstance(quant, dict) else None,
        kv_lora_rank=text.get("kv_lora_rank"),
        qk_rope_head_dim=text.get("qk_rope_head_dim"),
    )
    facts.params = estimate_params(text, facts)
    if facts.quant_method is None:
        facts.weights_bytes = facts.params * DTYPE_BYTES.get(facts.checkpoint_dtype, 2)
    return facts


def estimate_params(text: dict[str, Any], f: ModelFacts) -> int:
    """Parameters of a decoder of this shape (gated MLP, MoE experts counted): an estimate for
    when neither the weights nor their index are at hand. Vision towers are not counted."""
    embed = f.vocab_size * f.hidden_size
    lm_head = 0 if text.get("tie_word_embeddings") else embed
    q_out = f.num_attention_heads * f.head_dim
    attn = f.hidden_size * q_out * 2 + f.hidden_size * f.num_kv_heads * f.head_dim * 2
    experts = text.get("num_local_experts") or text.get("n_routed_experts") or text.get("num_experts") or 0
    moe_inter = text.get("moe_intermediate_size") or f.intermediate_size
    if experts:
        shared = text.get("n_shared_experts") or 0
        mlp = 3 * f.hidden_size * moe_inter * (int(experts) + int(shared)) + f.hidden_size * int(experts)
    else:
        mlp = 3 * f.hidden_size * f.intermediate_size
    return embed + lm_head + f.num_layers * (attn + mlp + 2 * f.hidden_size) + f.hidden_size


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON): tensor
    names, dtypes and shapes, read without touching the tensors."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > 100 * 2**20:
            raise ValueError(f"{path.name}: implausible safetensors header length {length}")
        return json.loads(fh.read(length))


def measure_safetensors(files: list[Path]) -> tuple[int, int]:
    """(bytes, parameters) of the tensors in these files, from their headers."""
    total_bytes = params = 0
    for path in files:
        for name, tensor in safetensors_header(path).items():
            if name == "__metadata__":
                continue
            start, end = tensor["data_offsets"]
            total_bytes += end - start
            params += math.prod(tensor["shape"])
    return total_bytes, params


def read_local(directory: str | Path) -> ModelFacts:
    """ModelFacts of a model directory (a local path or a snapshot in the HF cache). The weights
    are measured from the safetensors headers, or the index's total_size when the shards are not
    there; only the config is needed."""
    directory = Path(directory)
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as exc:
        raise ModelFactsError(f"{directory} has no config.json") from exc
    except (OSError, ValueError) as exc:
        raise ModelFactsError(f"{config_path} cannot be read: {exc}") from exc
    facts = facts_from_config(config)
    shards = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if shards:
        try:
            size, params = measure_safetensors(shards)
        except (OSError, ValueError, KeyError, struct.error):
            size = sum(p.stat().st_size for p in shards)
            params = 0
        facts.weights_bytes, facts.weights_source = size, "safetensors headers"
        if params and facts.quant_method is None:
            facts.params = params
        return facts
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            total = json.loads(index.read_text())["metadata"]["total_size"]
            set_weights_from_size(facts, int(total), "safetensors index")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return facts
    bins = sorted(p for p in directory.glob("*.bin") if p.is_file())
    if bins:
        set_weights_from_size(facts, sum(p.stat().st_size for p in bins), "file sizes")
    return facts


def set_weights_from_size(facts: ModelFacts, size: int, source: str, params: int | None = None) -> None:
    """Record the weights' bytes (and the parameter count they imply for an unquantized model)."""
    facts.weights_bytes, facts.weights_source = size, source
    if facts.quant_method is None:
        facts.params = params or size // DTYPE_BYTES.get(facts.checkpoint_dtype, 2)
