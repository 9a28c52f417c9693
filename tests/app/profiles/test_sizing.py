"""The memory arithmetic against published figures, from config.json files written here (no
network): weights, KV cache per token, context lengths, valid tensor-parallel sizes."""

import json

import pytest
from model_configs import (
    DEEPSEEK_V3,
    LLAMA_31_8B,
    LLAMA_31_70B,
    LLAVA_15_7B,
    PHI_35_VISION,
    QWEN2_VL_7B,
    box,
    write_model,
)

from app.profiles.hardware import GpuSet, parse_gpus
from app.profiles.model_facts import derived_max_len, facts_from_config, read_local
from app.profiles.sizing import (
    QUANT_MIN_CAPABILITY,
    choose_tp,
    compatibility,
    kv_bytes_per_token,
    plan,
    valid_tp,
    weights_bytes,
)


def test_llama_31_8b_matches_the_published_16_gb_of_bf16_weights_and_128_kib_of_kv_per_token():
    facts = facts_from_config(LLAMA_31_8B)
    assert facts.params == pytest.approx(8.03e9, rel=0.005)  # Meta: 8.03B parameters
    assert weights_bytes(facts) == pytest.approx(16.06e9, rel=0.005)
    assert kv_bytes_per_token(facts) == 128 * 1024  # 32 layers x 8 KV heads x 128 x 2 x 2 bytes
    assert kv_bytes_per_token(facts, kv_cache_dtype="fp8") == 64 * 1024
    assert facts.max_model_len == 131072  # llama3 RoPE: max_position_embeddings is already scaled


def test_llama_31_70b_is_141_gb_and_320_kib_per_token_split_over_the_ranks():
    facts = facts_from_config(LLAMA_31_70B)
    assert weights_bytes(facts) == pytest.approx(141.1e9, rel=0.005)
    assert kv_bytes_per_token(facts) == 320 * 1024
    assert kv_bytes_per_token(facts, tp=8) == 40 * 1024  # 8 KV heads, one per rank
    assert kv_bytes_per_token(facts, tp=2, pp=2) == 80 * 1024  # half the layers, half the heads


def test_kv_heads_are_replicated_when_there_are_more_ranks_than_heads():
    facts = facts_from_config(QWEN2_VL_7B)
    assert kv_bytes_per_token(facts) == 28 * 4 * 128 * 2 * 2  # 56 KiB
    assert kv_bytes_per_token(facts, tp=28) == 28 * 1 * 128 * 2 * 2


def test_llava_takes_the_llama_defaults_its_config_leaves_out():
    facts = facts_from_config(LLAVA_15_7B)
    assert (facts.hidden_size, facts.num_layers, facts.num_kv_heads) == (4096, 32, 32)
    assert facts.max_model_len == 4096 and facts.checkpoint_dtype == "float16"
    assert kv_bytes_per_token(facts) == 512 * 1024  # no GQA: 0.5 MiB per token
    assert weights_bytes(facts) == pytest.approx(
        13.5e9, rel=0.02
    )  # text model; the CLIP tower is not estimated


def test_phi_35_vision_and_mla_deepseek_v3():
    phi = facts_from_config(PHI_35_VISION)
    assert kv_bytes_per_token(phi) == 32 * 32 * 96 * 2 * 2 and phi.max_model_len == 131072
    ds = facts_from_config(DEEPSEEK_V3)
    assert ds.quant_method == "fp8"
    assert kv_bytes_per_token(ds) == 61 * (512 + 64) * 2  # ~70 KB per token (MLA)
    assert kv_bytes_per_token(ds, tp=8) == kv_bytes_per_token(ds)  # the latent is on every rank
    assert ds.max_model_len == 163840  # yarn: not multiplied again, as vLLM does


@pytest.mark.parametrize(
    ("rope", "expected"),
    [
        ({"rope_type": "linear", "factor": 2.0}, 8192),
        ({"type": "dynamic", "factor": 4.0}, 16384),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, 4096),
        ({"rope_type": "default"}, 4096),
    ],
)
def test_context_length_is_derived_as_vllm_derives_it(rope, expected):
    assert derived_max_len({"max_position_embeddings": 4096, "rope_scaling": rope}) == expected


def test_context_length_takes_the_smallest_key_and_defaults_to_2048():
    assert derived_max_len({"max_position_embeddings": 4096, "seq_length": 2048}) == 2048
    assert derived_max_len({}) == 2048


def test_valid_tensor_parallel_sizes_follow_vllms_rules():
    qwen = facts_from_config(QWEN2_VL_7B)  # 28 heads, 4 KV heads
    assert [tp for tp in range(1, 9) if valid_tp(qwen, tp) is None] == [1, 2, 4]
    assert "does not divide the 28 attention heads" in valid_tp(qwen, 3)
    assert "KV heads" in valid_tp(qwen, 7)
    llama = facts_from_config(LLAMA_31_70B)
    assert [tp for tp in range(1, 17) if valid_tp(llama, tp) is None] == [1, 2, 4, 8, 16]


def test_weights_are_measured_from_safetensors_headers_or_the_index(tmp_path):
    import torch
    from safetensors.torch import save_file

    d = write_model(tmp_path / "m", LLAMA_31_8B)
    save_file(
        {"a": torch.zeros(100, 10, dtype=torch.bfloat16), "b": torch.zeros(6, dtype=torch.float32)},
        d / "x.safetensors",
    )
    facts = read_local(d)
    assert facts.weights_source == "safetensors headers"
    assert facts.params == 1006 and facts.weights_bytes == 100 * 10 * 2 + 6 * 4

    d2 = write_model(tmp_path / "sharded", LLAMA_31_8B)  # only the index is there (shards not downloaded)
    (d2 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 16060522496}}))
    facts = read_local(d2)
    assert facts.weights_source == "safetensors index" and facts.params == 8030261248  # Meta's count


def test_plan_arithmetic_adds_up_and_is_in_one_line():
    facts = facts_from_config(LLAMA_31_8B)
    p = plan(facts, box("1xH100"))
    assert p.budget_bytes == int(81559 * 2**20 * 0.92)  # vLLM's default utilisation
    assert p.kv_budget_bytes == p.budget_bytes - p.weights_bytes - p.allowance_bytes
    assert p.fits_tokens == p.kv_budget_bytes // (128 * 1024)
    assert p.max_model_len == 131072 and p.fits
    line = p.arithmetic()
    assert "\n" not in line and "128.0 KiB per token" in line and "model max 131072" in line


def test_an_l4_holds_the_8b_in_bf16_with_a_shorter_context_rounded_down():
    facts = facts_from_config(LLAMA_31_8B)
    p = plan(facts, box("1xL4"))
    assert 16_000 < p.max_model_len < 40_000 and p.max_model_len % 256 == 0
    assert p.fits_tokens >= p.max_model_len


def test_smallest_tp_that_fits_the_whole_context_else_the_longest_context():
    facts70 = facts_from_config(LLAMA_31_70B)
    chosen, tried = choose_tp(facts70, box("8xH100"))
    assert chosen.tensor_parallel_size == 4 and chosen.max_model_len == 131072
    assert [p.tensor_parallel_size for p in tried] == [1, 2, 4, 8]
    assert tried[0].fits_tokens == 0  # 141 GB of weights on one 80 GB GPU
    # Two 24 GB cards cannot hold 70B in bf16 at all.
    assert choose_tp(facts70, box("2xRTX4090"))[0] is None
    # The 8B on two RTX 4090: one card holds it but not its 128k context; two do.
    facts8 = facts_from_config(LLAMA_31_8B)
    chosen, _ = choose_tp(facts8, box("2xRTX4090"))
    assert chosen.tensor_parallel_size == 2 and chosen.max_model_len == 131072
    # A context asked for: the smallest size at which that fits.
    chosen, _ = choose_tp(facts8, box("2xRTX4090"), max_model_len=8192)
    assert chosen.tensor_parallel_size == 1


def test_precision_compatibility_by_compute_capability():
    awq = facts_from_config({**QWEN2_VL_7B, "quantization_config": {"quant_method": "awq", "bits": 4}})
    t4, v100 = parse_gpus("1xT4"), parse_gpus("1xV100-32GB")
    assert compatibility(awq, t4, None, None) is None  # AWQ from 7.5
    assert "awq needs compute capability 7.5" in compatibility(awq, v100, None, None)
    bf16 = facts_from_config(LLAMA_31_8B)
    assert "bfloat16 needs compute capability 8.0" in compatibility(bf16, t4, "bfloat16", None)
    assert compatibility(bf16, t4, None, None) is None  # auto: vLLM falls back to float16
    assert compatibility(bf16, GpuSet(1, "X", 1024), "bfloat16", None) is None  # unknown board: not judged


def test_quantization_capabilities_are_vllms_own():
    pytest.importorskip("vllm", reason="vllm is installed by `make venv`")
    from vllm.model_executor.layers.quantization import get_quantization_config

    for method, cc in QUANT_MIN_CAPABILITY.items():
        major, minor = (int(x) for x in cc.split("."))
        assert get_quantization_config(method).get_min_capability() == major * 10 + minor, method
