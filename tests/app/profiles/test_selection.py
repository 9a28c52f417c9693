"""Which configuration a model gets on each GPU set of the issue (fake NVML: no GPU here), what
`auto` takes, how a profile becomes settings, and that the user's settings win."""

import pytest
from model_configs import LLAMA_31_8B, LLAMA_31_70B, LLAVA_15_7B, QWEN2_VL_7B, box, write_model

from app.engines.vllm import build_command
from app.profiles import choose, manifest
from app.profiles.model_facts import facts_from_config
from app.profiles.select import INCOMPATIBLE, LOW_MEMORY, RUNNABLE, candidates
from app.settings import Settings

LLAMA_8B_ID = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA_70B_ID = "meta-llama/Llama-3.1-70B-Instruct"
QWEN_ID = "Qwen/Qwen2-VL-7B-Instruct"


def judged(model_id: str, config: dict, gpus: str, **overrides) -> list:
    facts = facts_from_config(config)
    profiles = manifest.profiles_for(manifest.load(), model_id, facts.architectures)
    return candidates(profiles, facts, box(gpus), "vllm", overrides)


def groups(cands: list) -> dict[str | None, str]:
    return {c.profile: c.group for c in cands}


@pytest.mark.parametrize(
    ("gpus", "auto"),
    [
        ("1xL4", "llama-3.1-8b-fp8-tp1"),  # Ada: FP8; bf16 at 128k needs 40 GB
        ("1xA100-40", "llama-3.1-8b-bf16-tp1"),  # Ampere: no FP8 profile (needs 8.9)
        ("1xH100", "llama-3.1-8b-bf16-tp1"),
        ("8xH100", "llama-3.1-8b-bf16-tp1"),
        ("2xRTX4090", "llama-3.1-8b-fp8-tp1"),
    ],
)
def test_llama_8b_on_each_gpu_set(gpus, auto):
    cands = judged(LLAMA_8B_ID, LLAMA_31_8B, gpus)
    assert cands[0].group == RUNNABLE and cands[0].profile == auto
    g = groups(cands)
    assert g["llama-3.1-8b-trtllm-bf16-tp1"] == INCOMPATIBLE  # another engine
    assert g[None] == RUNNABLE  # the computed defaults always fit an 8B on these
    if gpus == "1xL4":
        short = next(c for c in cands if c.profile == "llama-3.1-8b-bf16-tp1")
        assert short.group == LOW_MEMORY
        assert short.reason.startswith(
            "a 131072-token context needs 35.2 GB per GPU at tp=1; the L4 has 24.2 GB:"
        )
        assert 16_000 < short.fits_max_model_len < 40_000  # the context that would fit
        assert short.reason.endswith(f"{short.fits_max_model_len} tokens would fit")
    if gpus == "1xA100-40":
        fp8 = next(c for c in cands if c.profile == "llama-3.1-8b-fp8-tp1")
        assert fp8.group == INCOMPATIBLE and fp8.reason == "needs compute capability 8.9; the A100 has 8.0"


@pytest.mark.parametrize(
    ("gpus", "auto", "computed"),
    [
        ("1xL4", None, None),
        ("1xA100-40", None, None),
        ("1xH100", None, None),
        ("8xH100", "llama-3.1-70b-bf16-tp8", 4),
        ("2xRTX4090", None, None),
    ],
)
def test_llama_70b_on_each_gpu_set(gpus, auto, computed):
    cands = judged(LLAMA_70B_ID, LLAMA_31_70B, gpus)
    if auto is None:
        assert cands[0].group != RUNNABLE
        assert all(c.group == INCOMPATIBLE for c in cands)
        calc = next(c for c in cands if c.profile is None)
        assert "leave no room for a KV cache" in calc.reason
    else:
        assert cands[0].profile == auto
        calc = next(c for c in cands if c.profile is None)
        assert calc.group == RUNNABLE and calc.tensor_parallel_size == computed
        assert calc.max_model_len == 131072
        assert groups(cands)["llama-3.1-70b-fp8-tp2"] == RUNNABLE
    if gpus == "1xH100":
        tp8 = next(c for c in cands if c.profile == "llama-3.1-70b-bf16-tp8")
        assert tp8.reason == "needs 8 GPUs; 1 found"


@pytest.mark.parametrize(
    ("gpus", "auto"),
    [
        ("1xL4", "qwen2-vl-7b-bf16-tp1-24gb"),
        ("1xA100-40", "qwen2-vl-7b-bf16-tp1"),  # the summary card
        ("1xH100", "qwen2-vl-7b-bf16-tp1"),
        ("8xH100", "qwen2-vl-7b-bf16-tp1"),
        ("2xRTX4090", "qwen2-vl-7b-bf16-tp1-24gb"),
    ],
)
def test_qwen2_vl_7b_on_each_gpu_set(gpus, auto):
    cands = judged(QWEN_ID, QWEN2_VL_7B, gpus)
    assert cands[0].profile == auto
    # The family profile applies too (after the model's own), with the arithmetic's size and context.
    if gpus == "1xL4":  # the arithmetic would allow the card's 32k, but the profile asks for 40 GB
        card = next(c for c in cands if c.profile == "qwen2-vl-7b-bf16-tp1")
        assert card.group == LOW_MEMORY
        assert (
            card.reason
            == "needs 40 GB per GPU; the L4 has 24.2 GB (32768 tokens of context would fit by the arithmetic)"
        )
    family = next(c for c in cands if c.profile == "qwen2-vl-family")
    assert family.match == "family" and family.group == RUNNABLE
    assert family.settings["IMAGE_LIMIT"] == 5 and family.settings["MAX_MODEL_LEN"] == 32768


def test_a_fine_tune_without_an_id_entry_gets_its_familys_profile(tmp_path):
    cands = candidates(
        manifest.profiles_for(manifest.load(), "someone/llava-finetune", ["LlavaForConditionalGeneration"]),
        facts_from_config(LLAVA_15_7B),
        box("1xL4"),
    )
    assert cands[0].profile == "llava-family" and cands[0].group == RUNNABLE
    assert cands[0].settings == {
        "IMAGE_LIMIT": 1,
        "VIDEO_LIMIT": 0,
        "TENSOR_PARALLEL_SIZE": 1,
        "MAX_MODEL_LEN": 4096,
    }


def test_a_family_profile_keeps_the_size_it_computed_when_the_user_sets_the_context():
    cands = candidates(
        manifest.profiles_for(manifest.load(), "someone/qwen2-vl-tune", ["Qwen2VLForConditionalGeneration"]),
        facts_from_config(QWEN2_VL_7B),
        box("2xRTX4090"),
        overrides={"MAX_MODEL_LEN": 32768, "GPU_MEMORY_UTIL": 0.5},
    )
    family = next(c for c in cands if c.profile == "qwen2-vl-family")
    assert family.group == RUNNABLE and family.settings["TENSOR_PARALLEL_SIZE"] == 2
    assert "MAX_MODEL_LEN" not in family.settings  # the user's stands


def test_users_settings_enter_the_judgement():
    # TENSOR_PARALLEL_SIZE=2 on 8 H100s: the bf16 profiles cannot hold 128k at tp=2; FP8 can.
    cands = judged(LLAMA_70B_ID, LLAMA_31_70B, "8xH100", TENSOR_PARALLEL_SIZE=2)
    assert cands[0].profile == "llama-3.1-70b-fp8-tp2"
    tp8 = next(c for c in cands if c.profile == "llama-3.1-70b-bf16-tp8")
    assert tp8.group == LOW_MEMORY and "at tp=2" in tp8.reason


def settings(model: str = LLAMA_8B_ID, **env) -> Settings:
    return Settings(MODEL_NAME=model, **env)


def test_auto_applies_the_profile_and_what_the_user_set_wins():
    s = settings(MAX_MODEL_LEN=8192, ENGINE_EXTRA_ARGS="--enforce-eager")
    choice = choose(s, box("1xL4"), facts_from_config(LLAMA_31_8B), set(s.model_fields_set), LLAMA_8B_ID)
    assert choice.error is None and choice.report["id"] == "llama-3.1-8b-fp8-tp1"
    assert choice.report["overridden"] == {"MAX_MODEL_LEN": {"profile": 131072, "set": 8192}}
    new = choice.settings
    assert (new.MAX_MODEL_LEN, new.QUANTIZATION, new.KV_CACHE_DTYPE, new.TENSOR_PARALLEL_SIZE) == (
        8192,
        "fp8",
        "fp8",
        1,
    )
    argv = " ".join(build_command(new, "/m", python="py"))
    for flag in (
        "--max-model-len 8192",
        "--quantization fp8",
        "--kv-cache-dtype fp8",
        "--enable-prefix-caching",
    ):
        assert flag in argv
    assert s.MAX_MODEL_LEN == 8192 and s.QUANTIZATION is None  # the original settings are untouched


def test_profile_extra_args_come_before_the_users_so_the_user_wins_a_flag_given_twice(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "version: 1\nmodels:\n  - ids: [org/m]\n    profiles:\n      - id: m-custom\n        engine: vllm\n"
        "        precision: auto\n        tensor_parallel_size: 1\n        extra_args: [--swap-space, '8']\n"
        "        needs: {gpu_count: 1}\n"
    )
    s = settings("org/m", PROFILES_FILE=str(mine), ENGINE_EXTRA_ARGS="--swap-space 2")
    choice = choose(s, box("1xH100"), None, set(s.model_fields_set), "org/m")
    assert choice.report["id"] == "m-custom"
    assert choice.settings.ENGINE_EXTRA_ARGS == "--swap-space 8 --swap-space 2"


def test_model_profile_none_applies_nothing():
    s = settings(MODEL_PROFILE="none")
    choice = choose(s, box("1xH100"), facts_from_config(LLAMA_31_8B), set(), LLAMA_8B_ID)
    assert choice.settings is s and choice.report["id"] is None


def test_a_forced_profile_that_cannot_run_is_one_sentence_and_a_short_one_a_warning():
    facts = facts_from_config(LLAMA_31_70B)
    s = settings(LLAMA_70B_ID, MODEL_PROFILE="llama-3.1-70b-bf16-tp8")
    choice = choose(s, box("1xH100"), facts, set(), LLAMA_70B_ID)
    assert choice.error == "Profile llama-3.1-70b-bf16-tp8 cannot run here: needs 8 GPUs; 1 found."
    s = settings(LLAMA_8B_ID, MODEL_PROFILE="llama-3.1-8b-bf16-tp1")
    choice = choose(s, box("1xL4"), facts_from_config(LLAMA_31_8B), set(), LLAMA_8B_ID)
    assert choice.error is None and choice.warning.startswith("profile llama-3.1-8b-bf16-tp1 may not fit")
    assert choice.settings.MAX_MODEL_LEN == 131072  # forced: as written; vLLM's KV check and the retry decide
    s = settings(MODEL_PROFILE="no-such-profile")
    choice = choose(s, box("1xH100"), None, set(), LLAMA_8B_ID)
    assert choice.error.startswith(
        "MODEL_PROFILE=no-such-profile is not in the manifest; profiles for this model:"
    )
    assert "llama-3.1-8b-bf16-tp1" in choice.error


def test_no_profiles_on_the_cpu_and_none_runnable_leaves_the_engine_defaults(tmp_path):
    s = settings(DEVICE="cpu")
    choice = choose(s, box("1xH100"), facts_from_config(LLAMA_31_8B), set(), LLAMA_8B_ID)
    assert choice.settings is s and choice.report["reason"].startswith("DEVICE=cpu")
    s = settings(LLAMA_70B_ID)
    choice = choose(s, box("1xL4"), facts_from_config(LLAMA_31_70B), set(), LLAMA_70B_ID)
    assert choice.settings is s and choice.error is None
    assert choice.report["reason"] == "no profile runs here: the engine's own defaults"


def test_a_broken_profiles_file_stops_the_start_with_its_path_and_problem(tmp_path):
    bad = write_model(tmp_path, {}) / "bad.yaml"
    bad.write_text(
        "version: 1\nmodels:\n  - ids: [org/m]\n    profiles:\n      - id: x\n        engine: vllm\n"
    )
    choice = choose(settings(PROFILES_FILE=str(bad)), box("1xH100"), None, set(), "org/m")
    assert choice.error.startswith(f"The profile manifest cannot be used: {bad}: models/0/profiles/0:")
    assert "'precision' is a required property" in choice.error
