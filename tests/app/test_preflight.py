"""The preflight, before any download: the Hub part against tests/fake_hub.py (the real Hub cannot
be reached from here; the huggingface_hub client is the real one), the disk check (free space is a
stand-in: this machine's disk cannot be filled on cue), and the memory fit."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from app.preflight import PreflightError, already_cached, disk_check, memory_fit, model_facts
from app.profiles.hardware import parse_gpus
from app.profiles.model_facts import facts_from_config
from app.settings import Settings
from fake_hub import FakeHub
from stack import free_port

sys.path.insert(0, str(Path(__file__).parent / "profiles"))
from model_configs import LLAMA_31_8B, LLAMA_31_70B  # noqa: E402

REPO = "org/llama"
FILES = {
    "config.json": json.dumps(LLAMA_31_8B),
    "tokenizer.json": '{"version": "1.0"}',
    "model-00001-of-00002.safetensors": b"S" * 3000,
    "model-00002-of-00002.safetensors": b"S" * 1000,
    "pytorch_model.bin": b"B" * 9000,  # another format of the same weights: not downloaded
}


@pytest.fixture(autouse=True)
def isolated_hf(monkeypatch, tmp_path):
    """No token, offline flag or telemetry from the machine running the tests leaks in."""
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import _detect_agent

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)


@pytest.fixture
def hub(tmp_path):
    with FakeHub(tmp_path / "hub") as fake:
        fake.add_repo(REPO, FILES)
        fake.add_repo("org/gated", FILES)
        fake.gate("org/gated", allowed_token="hf_granted")
        yield fake


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


def check(hub: FakeHub, cache: str, repo: str = REPO, **kwargs):
    return model_facts(repo, endpoint=hub.url, cache_dir=cache, **kwargs)


def test_a_good_repo_gives_size_and_shapes_from_one_metadata_call_and_its_config(hub, cache):
    start = time.monotonic()
    pre = check(hub, cache)
    assert time.monotonic() - start < 5
    assert pre.hub.files == {
        "config.json": len(FILES["config.json"]),
        "tokenizer.json": len(FILES["tokenizer.json"]),
        "model-00001-of-00002.safetensors": 3000,
        "model-00002-of-00002.safetensors": 1000,
    }
    assert pre.hub.sha == hub.commit(REPO)
    assert pre.facts.architectures == ["LlamaForCausalLM"] and pre.facts.max_model_len == 131072
    assert (pre.facts.weights_bytes, pre.facts.weights_source) == (4000, "Hub file sizes")
    assert hub.downloaded() == [f"{REPO}/config.json"]  # nothing else before the download
    infos = [r for r in hub.requests if r.path.startswith("/api/models/")]
    assert len(infos) == 1


def test_a_gated_repo_without_a_token_is_one_sentence_and_nothing_is_fetched(hub, cache):
    with pytest.raises(PreflightError) as err:
        check(hub, cache, "org/gated")
    assert str(err.value) == (
        "org/gated is gated and no HF_TOKEN is set: accept its license at https://huggingface.co/org/gated "
        "and set HF_TOKEN to a token of that account."
    )
    assert hub.downloaded() == []


def test_a_gated_repo_with_a_token_not_granted_says_so(hub, cache):
    with pytest.raises(
        PreflightError, match="the HF_TOKEN given has not been granted access: accept its license"
    ):
        check(hub, cache, "org/gated", token="hf_someone_else")
    assert check(hub, cache, "org/gated", token="hf_granted").facts is not None


def test_a_missing_repo_and_a_missing_revision(hub, cache):
    with pytest.raises(
        PreflightError, match=r"^org/nope was not found on the Hugging Face Hub \(check the id"
    ):
        check(hub, cache, "org/nope")
    with pytest.raises(
        PreflightError, match=r"^revision 'v9' of org/llama does not exist \(MODEL_REVISION\)\.$"
    ):
        check(hub, cache, revision="v9")
    with pytest.raises(PreflightError, match="neither a local directory nor a valid Hugging Face id"):
        check(hub, cache, "org/bad name!")


def test_no_disk_for_the_download_is_one_sentence(hub, cache):
    pre = check(hub, cache)
    problem = disk_check(pre.hub, Path(cache), free_bytes=lambda path: 1000)  # stand-in: 1 kB free
    assert problem == (
        f"Downloading org/llama needs 0.0 GB and {cache} has 0.0 GB free: mount a larger volume at "
        "DATA_DIR (or HF_HOME), or free some space."
    )
    assert disk_check(pre.hub, Path(cache), free_bytes=lambda path: 10**9) is None


def test_what_is_already_in_the_cache_is_not_counted_again(hub, cache):
    from app.model import resolve_model

    pre = check(hub, cache)
    resolve_model(REPO, endpoint=hub.url, cache_dir=cache)
    assert already_cached(pre.hub, Path(cache)) == pre.hub.total_bytes
    assert disk_check(pre.hub, Path(cache), free_bytes=lambda path: 0) is None


def test_local_paths_and_offline_skip_the_hub(hub, cache, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(LLAMA_31_8B))
    before = len(hub.requests)
    assert model_facts(str(local)).facts.num_layers == 32
    pre = model_facts(REPO, offline=True, endpoint=hub.url, cache_dir=cache)
    assert pre.facts is None and pre.notes == [
        "HF_HUB_OFFLINE=1: the Hub checks are skipped; org/llama is not in the cache"
    ]
    check(hub, cache)  # into the cache: offline, the cached config gives the shapes
    before = len(hub.requests)
    pre = model_facts(REPO, offline=True, endpoint=hub.url, cache_dir=cache)
    assert pre.facts.num_layers == 32 and len(hub.requests) == before


def test_an_unreachable_hub_is_skipped_with_a_note_not_an_error(cache):
    pre = model_facts(REPO, endpoint=f"http://127.0.0.1:{free_port()}", cache_dir=cache)
    assert pre.hub is None and "the Hub cannot be reached" in pre.notes[0]


def settings(**env) -> Settings:
    return Settings(MODEL_NAME="meta-llama/Llama-3.1-70B-Instruct", **env)


def test_memory_fit_says_how_many_gpus_it_would_take():
    facts = facts_from_config(LLAMA_31_70B)
    level, problem = memory_fit(facts, parse_gpus("1xH100-80GB"), settings(), "Llama 70B")
    assert level == "error"
    assert problem == (
        "Llama 70B does not fit: its weights take 141.1 GB per GPU at TENSOR_PARALLEL_SIZE=1, more than the "
        "H100's 78.7 GB (GPU_MEMORY_UTIL 0.92): use 2 such GPUs (TENSOR_PARALLEL_SIZE=2), or a quantized model."
    )
    assert memory_fit(facts, parse_gpus("2xH100-80GB"), settings(TENSOR_PARALLEL_SIZE=2), "m") is None
    level, problem = memory_fit(facts, parse_gpus("1xL4"), settings(), "m")
    assert problem.endswith("use 8 such GPUs (TENSOR_PARALLEL_SIZE=8), or a quantized model.")
    assert memory_fit(facts_from_config(LLAMA_31_8B), parse_gpus("1xL4"), settings(), "m") is None


def test_only_the_estimated_allowance_tipping_it_over_is_a_warning():
    # 70B at tp=2 on two 80 GB cards with 86% of the memory: the weights fit, the allowance not.
    facts = facts_from_config(LLAMA_31_70B)
    level, message = memory_fit(
        facts, parse_gpus("2xH100-80GB"), settings(TENSOR_PARALLEL_SIZE=2, GPU_MEMORY_UTIL=0.86), "m"
    )
    assert level == "warning" and message.startswith("m may not fit: its weights take 70.6 GB per GPU")
    assert "vLLM will tell" in message


def test_memory_fit_checks_the_parallel_sizes_and_skips_the_cpu():
    facts = facts_from_config(LLAMA_31_70B)
    assert memory_fit(facts, parse_gpus("1xH100-80GB"), settings(TENSOR_PARALLEL_SIZE=2), "m") == (
        "error",
        "TENSOR_PARALLEL_SIZE=2 x PIPELINE_PARALLEL_SIZE=1 needs 2 GPUs and 1 is visible: start the "
        "container with more GPUs or lower the sizes.",
    )
    assert memory_fit(facts, parse_gpus("4xH100-80GB"), settings(TENSOR_PARALLEL_SIZE=3), "m") == (
        "error",
        "m: tensor parallel size 3 does not divide the 64 attention heads; valid sizes on 4 GPUs: 1, 2, 4 "
        "(TENSOR_PARALLEL_SIZE).",
    )
    assert memory_fit(facts, parse_gpus("1xL4"), settings(DEVICE="cpu"), "m") is None
    assert memory_fit(None, parse_gpus("1xL4"), settings(), "m") is None
