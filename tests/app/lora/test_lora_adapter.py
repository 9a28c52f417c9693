"""app/lora/adapter.py: an adapter folder checked as vLLM checks it, with vLLM's own PEFTHelper and
LoRAConfig as the reference (the proxy itself never imports vLLM)."""

from __future__ import annotations

import json
import typing

import pytest

from app.lora.adapter import ALLOWED_RANKS, LoraError, base_matches, check_folder, rank_needed
from scripts.tiny_adapters import build_adapter


@pytest.fixture(scope="module")
def r16(tmp_path_factory):
    return build_adapter(tmp_path_factory.mktemp("a") / "r16", 16)


def write_config(folder, config: dict, weights: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    return folder


BASE = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}


def test_a_good_adapter_gives_its_rank_base_and_modules(r16):
    info = check_folder(r16, "math")
    assert (info.rank, info.base_model, info.target_modules) == (16, "tiny-text", ("q_proj", "v_proj"))
    assert check_folder(r16, "math", max_rank=16).rank == 16


@pytest.mark.parametrize(
    ("change", "weights", "expected"),
    [
        ("no-config", True, "has no adapter_config.json"),
        ({}, False, "has no weights"),
        ({"lora_alpha": None}, True, "lacks lora_alpha"),
        ({"r": 0}, True, "rank must be a positive integer"),
        ({"use_dora": True}, True, "DoRA"),
        ({"bias": "all"}, True, "bias='all'"),
        ({"peft_type": "IA3"}, True, "is a IA3 adapter, not LoRA"),
        ("not-json", True, "cannot be read as JSON"),
    ],
)
def test_a_broken_folder_is_one_sentence_naming_the_adapter(tmp_path, change, weights, expected):
    folder = tmp_path / "broken"
    if change == "no-config":
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    elif change == "not-json":
        write_config(folder, {}).joinpath("adapter_config.json").write_text("{")
    else:
        config = {**BASE, **change}
        write_config(folder, {k: v for k, v in config.items() if v is not None}, weights)
    with pytest.raises(LoraError) as err:
        check_folder(folder, "support")
    message = str(err.value)
    assert message.startswith(f"LoRA adapter 'support' ({folder})") and expected in message
    assert "\n" not in message


def test_a_rank_above_max_lora_rank_names_both_and_the_fix(r16):
    with pytest.raises(
        LoraError, match=r"has rank 16, above this server's MAX_LORA_RANK \(8\): set MAX_LORA_RANK to 16"
    ):
        check_folder(r16, "math", max_rank=8)


def test_rank_pattern_counts_towards_the_rank(tmp_path):
    folder = write_config(tmp_path / "p", {**BASE, "rank_pattern": {"q_proj": 32}})
    assert check_folder(folder, "p").rank == 32
    with pytest.raises(LoraError, match="rank 32"):
        check_folder(folder, "p", max_rank=16)


def test_the_ranks_are_vllms_and_the_rank_needed_rounds_up_to_one_of_them():
    pytest.importorskip("vllm", reason="vllm is installed by `make venv`")
    from vllm.config.lora import MaxLoRARanks

    assert typing.get_args(MaxLoRARanks) == ALLOWED_RANKS
    assert [rank_needed(r) for r in (1, 2, 8, 9, 16, 17, 300, 512)] == [1, 8, 8, 16, 16, 32, 320, 512]
    with pytest.raises(LoraError, match="above the largest"):
        rank_needed(513)


CASES = [
    BASE,
    {**BASE, "r": 64},
    {**BASE, "rank_pattern": {"v_proj": 32}},
    {**BASE, "use_dora": True},
    {**BASE, "bias": "lora_only"},
    {**BASE, "lora_bias": True},
    {**BASE, "init_lora_weights": "pissa"},
    {**BASE, "init_lora_weights": "gaussian"},
    {**BASE, "modules_to_save": ["lm_head"]},
    {**BASE, "modules_to_save": ["score"]},
    {**BASE, "layer_replication": [[0, 1]]},
    {**BASE, "use_qalora": True},
    {**BASE, "alora_invocation_tokens": [1, 2]},
    {k: v for k, v in BASE.items() if k != "target_modules"},
    {**BASE, "r": -1},
    {**BASE, "use_rslora": True},
]


@pytest.mark.parametrize("config", CASES)
def test_accepts_and_refuses_what_vllms_peft_helper_does(tmp_path, config):
    """Replayed through vLLM's own PEFTHelper.from_dict + validate_legal at max_lora_rank 32."""
    pytest.importorskip("vllm", reason="vllm is installed by `make venv`")
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    try:
        PEFTHelper.from_dict(dict(config)).validate_legal(LoRAConfig(max_lora_rank=32))
        vllm_ok = True
    except ValueError:
        vllm_ok = False
    folder = write_config(tmp_path / "a", config)
    try:
        check_folder(folder, "a", max_rank=32)
        ours_ok = True
    except LoraError:
        ours_ok = False
    assert ours_ok == vllm_ok


@pytest.mark.parametrize(
    ("adapter_base", "served", "ok"),
    [
        (None, ("org/m",), True),
        ("org/Llama-3.1-8B", ("org/Llama-3.1-8B",), True),
        ("meta-llama/Llama-3.1-8B", ("/models/llama-3.1-8b",), True),
        ("tiny-text", ("/work/.cache/models/tiny-text", "tiny-text"), True),
        ("Qwen/Qwen2.5-7B", ("meta-llama/Llama-3.1-8B", "llama"), False),
    ],
)
def test_base_model_match(adapter_base, served, ok):
    assert base_matches(adapter_base, *served) is ok
