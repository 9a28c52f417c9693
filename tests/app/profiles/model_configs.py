"""Published model configs (the config.json fields the arithmetic reads, copied from the models'
Hub repos, so nothing is downloaded) and a fake NVML with the GPU sets of the issue."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from app.gpu import probe
from app.profiles.hardware import GpuSet, from_report

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
LLAMA_31_70B = {
    **LLAMA_31_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
}
QWEN2_VL_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "model_type": "qwen2_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16},
    "vocab_size": 152064,
}
LLAVA_15_7B = {  # most of text_config is left to LlamaConfig's defaults
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "text_config": {
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "torch_dtype": "float16",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "model_type": "clip_vision_model"},
    "vocab_size": 32064,
}
PHI_35_VISION = {
    "architectures": ["Phi3VForCausalLM"],
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "model_type": "phi3_v",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "rope_scaling": {"long_factor": [1.0], "short_factor": [1.0], "type": "su"},
    "torch_dtype": "bfloat16",
    "vocab_size": 32064,
}
DEEPSEEK_V3 = {  # MLA: the KV cache is one 512 + 64 latent per token and layer
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_attention_heads": 128,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
    "rope_scaling": {"factor": 40, "original_max_position_embeddings": 4096, "type": "yarn"},
    "torch_dtype": "bfloat16",
    "vocab_size": 129280,
}


class FakeNVML:
    """Stands in for pynvml (no NVIDIA driver here), as tests/app/test_gpu.py does, with the
    compute capability each board reports."""

    def __init__(self, name: str, mib: int, cc: tuple[int, int], count: int) -> None:
        self.gpus = [{"name": name, "mib": mib, "cc": cc}] * count

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlSystemGetDriverVersion(self):
        return "570.86.15"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12080

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetName(self, h):
        return h["name"].encode()

    def nvmlDeviceGetUUID(self, h):
        return "GPU-0"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=h["mib"] * 2**20, used=512 * 2**20)

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return h["cc"]


# The GPU sets of the issue, as NVML reports them (name, MiB, compute capability).
BOXES = {
    "1xL4": FakeNVML("NVIDIA L4", 23034, (8, 9), 1),
    "1xA100-40": FakeNVML("NVIDIA A100-SXM4-40GB", 40960, (8, 0), 1),
    "1xH100": FakeNVML("NVIDIA H100 80GB HBM3", 81559, (9, 0), 1),
    "8xH100": FakeNVML("NVIDIA H100 80GB HBM3", 81559, (9, 0), 8),
    "2xRTX4090": FakeNVML("NVIDIA GeForce RTX 4090", 24564, (8, 9), 2),
}


def box(name: str) -> GpuSet:
    return from_report(probe(BOXES[name]))


def write_model(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory
