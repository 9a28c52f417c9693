"""One LoRA adapter folder, checked the way vLLM checks it before it loads one, so a bad adapter is
one sentence naming it (and, at start, exit 1 before the engine starts) instead of an engine
traceback minutes later.

The rules are vLLM 0.32's, read from its code (tests/app/lora/test_adapter.py replays adapters through
vLLM's own `PEFTHelper` and checks both agree), without importing vLLM (the proxy runs without it):
- `vllm/lora/peft_helper.py`: `adapter_config.json` must hold `r`, `lora_alpha` and
  `target_modules`; `r` and every `rank_pattern` rank positive; the largest of them at most
  `max_lora_rank`; no DoRA, LoRA bias, `bias` other than "none", aLoRA, layer replication, BD-LoRA,
  QALoRA, PiSSA-style inits, or `modules_to_save` other than classifier/score.
- `vllm/lora/lora_model.py`: the weights are `adapter_model.safetensors`, `.bin` or `.pt`.
- `vllm/config/lora.py`: `max_lora_rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# vllm/config/lora.py MaxLoRARanks
ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
CONFIG_FILE = "adapter_config.json"
_REQUIRED = ("r", "lora_alpha", "target_modules")
_SUPPORTED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


class LoraError(Exception):
    """An adapter (or LoRA setting) that cannot be served; the message is the one sentence shown."""


@dataclass(frozen=True)
class AdapterInfo:
    """What the proxy needs to know of a checked adapter folder."""

    path: str
    rank: int
    """The largest rank in it (`r` and `rank_pattern`): what `max_lora_rank` must reach."""
    base_model: str | None
    """`base_model_name_or_path` from adapter_config.json."""
    target_modules: tuple[str, ...]


def rank_needed(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that fits `rank`."""
    for allowed in ALLOWED_RANKS:
        if rank <= allowed:
            return allowed
    raise LoraError(f"rank {rank} is above the largest LoRA rank vLLM supports ({ALLOWED_RANKS[-1]})")


def _features(config: dict[str, Any]) -> list[str]:
    """vLLM's reasons to refuse an adapter's PEFT features (peft_helper.py `_validate_features`)."""
    problems = []
    to_save = config.get("modules_to_save")
    if to_save:
        bad = [m for m in to_save if m not in ("classifier", "score")]
        if bad:
            problems.append(f"modules_to_save {bad} (vLLM takes only classifier and score)")
    if config.get("use_dora"):
        problems.append("DoRA")
    if config.get("lora_bias"):
        problems.append("LoRA bias (lora_bias)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _SUPPORTED_INITS:
        problems.append(f"init_lora_weights={init!r} (it changes the base weights)")
    if config.get("alora_invocation_tokens"):
        problems.append("Activated LoRA (aLoRA)")
    if config.get("layer_replication"):
        problems.append("layer_replication")
    if config.get("use_bdlora"):
        problems.append("block-diagonal LoRA (BD-LoRA)")
    if config.get("use_qalora"):
        problems.append("QALoRA")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r}")
    return problems


def check_folder(path: str | Path, name: str, max_rank: int | None = None) -> AdapterInfo:
    """Check an adapter folder as vLLM would load it; raises LoraError naming the adapter.
    `max_rank`: the engine's `max_lora_rank` (None: not known yet, only vLLM's ceiling applies)."""
    folder = Path(path)
    what = f"LoRA adapter {name!r} ({folder})"
    if not folder.is_dir():
        raise LoraError(f"{what}: no such directory.")
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraError(f"{what} has no {CONFIG_FILE}: it is not a PEFT LoRA adapter folder.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LoraError(f"{what}: {CONFIG_FILE} cannot be read as JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise LoraError(f"{what}: {CONFIG_FILE} is not a JSON object.")
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise LoraError(f"{what} is a {peft_type} adapter, not LoRA.")
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise LoraError(f"{what}: {CONFIG_FILE} lacks {', '.join(missing)}.")
    if not any((folder / weights).is_file() for weights in WEIGHT_FILES):
        raise LoraError(f"{what} has no weights ({', '.join(WEIGHT_FILES)}).")
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise LoraError(f"{what}: its rank must be a positive integer (r={config['r']!r}).")
    rank = max(ranks)
    problems = _features(config)
    if problems:
        raise LoraError(f"{what} uses what vLLM does not support: {'; '.join(problems)}.")
    ceiling = max_rank if max_rank is not None else ALLOWED_RANKS[-1]
    if rank > ceiling:
        if max_rank is None:
            raise LoraError(f"{what} has rank {rank}, above the largest vLLM supports ({ceiling}).")
        raise LoraError(
            f"{what} has rank {rank}, above this server's MAX_LORA_RANK ({max_rank}): "
            f"set MAX_LORA_RANK to {rank_needed(rank)} or more (or leave it unset to fit the adapters)."
        )
    modules = config["target_modules"]
    modules = (modules,) if isinstance(modules, str) else tuple(str(m) for m in modules or ())
    base = config.get("base_model_name_or_path")
    return AdapterInfo(str(folder), rank, str(base) if base else None, modules)


def _last(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def base_matches(adapter_base: str | None, *served: str | None) -> bool:
    """Whether an adapter's recorded base model is the one served: the same id or path, or the
    same last path component (`/models/Llama-3.1-8B` serves `meta-llama/Llama-3.1-8B`'s adapters).
    An adapter that records no base matches anything."""
    if not adapter_base:
        return True
    names = [s for s in served if s]
    return any(adapter_base == s or _last(adapter_base) == _last(s) for s in names)
