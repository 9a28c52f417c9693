"""Build tiny random LoRA adapters for the tiny text model (scripts/tiny_models.py), by hand.

No `peft` needed: an adapter is `adapter_config.json` (PEFT's keys vLLM reads: `peft_type`, `r`,
`lora_alpha`, `target_modules`, `base_model_name_or_path`) and `adapter_model.safetensors` with, for
each layer and target module, `lora_A` (r x in) and `lora_B` (out x r). vLLM starts B at zero in
training, which would leave the output unchanged: here both are random and non-zero, so greedy
output through an adapter differs from the base model's.

    python scripts/tiny_adapters.py OUT_DIR [--base-model tiny-text]

writes OUT_DIR/tiny-r8 (rank 8) and OUT_DIR/tiny-r16 (rank 16), each its own folder; a folder that
is already there is left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The tiny text model (scripts/tiny_models.py): hidden 128, 2 layers, 2 heads and 1 KV head of 64.
HIDDEN = 128
LAYERS = 2
OUT_FEATURES = {"q_proj": 128, "v_proj": 64}
RANKS = {"tiny-r8": 8, "tiny-r16": 16}


def build_adapter(
    out: Path, rank: int, *, base_model: str = "tiny-text", seed: int = 0, scale: float = 0.5
) -> Path:
    """One adapter folder; returns it. Idempotent: an existing adapter folder is left as it is."""
    if (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file():
        return out
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, out_features in OUT_FEATURES.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=gen) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * scale
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(OUT_FEATURES),
        "base_model_name_or_path": base_model,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def build_all(out_dir: Path, base_model: str = "tiny-text") -> dict[str, Path]:
    """The two tiny adapters (ranks 8 and 16) under out_dir, by name."""
    return {
        name: build_adapter(out_dir / name, rank, base_model=base_model, seed=rank)
        for name, rank in RANKS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--base-model", default="tiny-text", help="base_model_name_or_path to record")
    args = parser.parse_args(argv)
    for name, path in build_all(args.out_dir, args.base_model).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
