"""profiles/models.yaml against profiles/schema.json (jsonschema, and the check-jsonschema CLI
the deployment checks use), the models it must cover, and every profile's flags through vLLM's own
argument parser."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from app.engines.vllm import build_command
from app.profiles import manifest
from app.profiles.select import profile_settings
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
REQUIRED = {
    "Qwen/Qwen2-VL-7B-Instruct",
    "Qwen/Qwen2.5-VL-72B-Instruct",
    "llava-hf/llava-1.5-7b-hf",
    "microsoft/Phi-3.5-vision-instruct",
    "Qwen/Qwen2-VL-7B-Instruct-AWQ",
    "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Llama-3.1-70B-Instruct",
}


def doc() -> dict:
    return yaml.safe_load(manifest.BUILTIN.read_text())


def test_the_manifest_is_valid_against_its_schema():
    schema = manifest.schema()
    Draft202012Validator.check_schema(schema)
    assert list(Draft202012Validator(schema).iter_errors(doc())) == []


def test_check_jsonschema_accepts_the_manifest_too():
    exe = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [str(exe), "--schemafile", str(manifest.SCHEMA), str(manifest.BUILTIN)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_refuses_what_it_should():
    validator = Draft202012Validator(manifest.schema())
    profile = {"id": "x", "engine": "vllm", "precision": "bf16", "needs": {"gpu_count": 1}}
    good = {"version": 1, "models": [{"ids": ["org/m"], "profiles": [profile]}]}
    assert not list(validator.iter_errors(good))
    for bad in (
        {**profile, "engine": "sglang"},
        {**profile, "tensor_parallel_size": 0},
        {**profile, "gpu_memory_utilization": 1.5},
        {**profile, "max_model_len": "32k"},
        {**profile, "kv_cache_dtype": "int3"},
        {**profile, "needs": {"gpu_count": 1, "compute_capability": "sm90"}},
        {**profile, "unknown_knob": True},
        {k: v for k, v in profile.items() if k != "needs"},
    ):
        assert list(
            validator.iter_errors({"version": 1, "models": [{"ids": ["org/m"], "profiles": [bad]}]})
        ), bad
    both = {"version": 1, "models": [{"ids": ["org/m"], "architectures": ["X"], "profiles": [profile]}]}
    assert list(validator.iter_errors(both))  # an entry matches by ids or by family, not both
    assert list(
        validator.iter_errors({"version": 1, "models": [{"ids": ["not-an-id"], "profiles": [profile]}]})
    )


def test_the_models_the_readme_names_have_profiles_and_ids_are_unique():
    entries = manifest.load()
    ids = {i for e in entries for i in e.ids}
    assert ids >= REQUIRED
    profile_ids = manifest.all_ids(entries)
    assert len(profile_ids) == len(set(profile_ids))
    assert any(p["precision"] == "awq" for e in entries for p in e.profiles)
    families = {a for e in entries for a in e.architectures}
    assert {
        "Qwen2VLForConditionalGeneration",
        "LlavaForConditionalGeneration",
        "Phi3VForCausalLM",
    } <= families


def test_declared_gpu_counts_cover_the_parallel_sizes():
    for e in manifest.load():
        for p in e.profiles:
            tp, pp = p.get("tensor_parallel_size", 1), p.get("pipeline_parallel_size", 1)
            assert p["needs"]["gpu_count"] >= tp * pp, p["id"]
            if e.ids:  # a profile for a given model says how much memory it needs
                assert p.get("tensor_parallel_size") and p["needs"].get("gpu_memory_gb"), p["id"]


def test_every_profiles_flags_are_accepted_by_vllms_own_parser():
    pytest.importorskip("vllm", reason="vllm is installed by `make venv`")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    for e in manifest.load():
        for raw in e.profiles:
            if raw["engine"] != "vllm":
                continue
            profile = manifest.as_profile(raw, "id", e.source)
            s = Settings(MODEL_NAME="org/m").model_copy(update=profile_settings(profile))
            args = parser.parse_args(build_command(s, "/m")[3:])
            if "max_model_len" in raw:
                assert args.max_model_len == raw["max_model_len"], raw["id"]
            if "kv_cache_dtype" in raw:
                assert args.kv_cache_dtype == raw["kv_cache_dtype"], raw["id"]
            if "limits" in raw:
                assert args.limit_mm_per_prompt == raw["limits"], raw["id"]


def test_a_users_file_comes_first_and_replaces_a_builtin_id(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "version: 1\nmodels:\n  - ids: [meta-llama/Llama-3.1-8B-Instruct]\n    profiles:\n"
        "      - id: llama-3.1-8b-bf16-tp1\n        engine: vllm\n        precision: bf16\n"
        "        tensor_parallel_size: 1\n        max_model_len: 65536\n"
        "        needs: {gpu_count: 1, gpu_memory_gb: 24}\n"
    )
    found = manifest.profiles_for(manifest.load(mine), "META-LLAMA/llama-3.1-8b-instruct", None)
    assert found[0].source == str(mine) and found[0].get("max_model_len") == 65536
    assert [p.id for p in found].count("llama-3.1-8b-bf16-tp1") == 1


def test_a_manifest_that_is_not_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodels:\n  - ids: [org/m\n")
    with pytest.raises(manifest.ManifestError, match=r"bad\.yaml: not valid YAML \(line \d+\)"):
        manifest.read(bad)


def test_the_images_copy_the_manifest():
    for dockerfile in ("Dockerfile", "Dockerfile.trtllm"):
        assert "COPY profiles/ profiles/" in (ROOT / dockerfile).read_text(), dockerfile
    assert "!profiles/" in (ROOT / ".dockerignore").read_text()
