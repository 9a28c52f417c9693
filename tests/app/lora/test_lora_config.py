"""app/lora/config.py: LORA_MODULES, LORA_CONFIG and LORA_DIR parsed, and the start plan: every
adapter resolved (local, from the Hugging Face Hub with HF_TOKEN into the model's cache, from S3)
and checked, the engine's max_lora_rank derived from the adapters.

The Hub is unreachable here: downloads go to tests/fake_hub.py (a local server answering the Hub's
endpoints) through the real huggingface_hub client. S3 is a real endpoint (moto_server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.lora.adapter import LoraError
from app.lora.config import CONFIG, DIR, STATIC, build_plan, parse_config, parse_modules, scan_dir
from app.settings import Settings
from fake_hub import FakeHub
from moto_s3 import MotoS3
from scripts.tiny_adapters import build_adapter


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    build_adapter(root / "r8", 8, seed=1)
    build_adapter(root / "r16", 16, seed=2)
    build_adapter(root / "dir" / "alpha", 8, seed=3)
    build_adapter(root / "dir" / "beta", 16, seed=4)
    (root / "dir" / ".hidden").mkdir()
    return root


def settings(**env) -> Settings:
    return Settings(MODEL_NAME="/models/tiny-text", SERVED_MODEL_NAME="tiny-text", **env)


# --- LORA_MODULES --------------------------------------------------------------------------------


def test_modules_as_pairs_and_as_vllms_json():
    pairs = parse_modules("sql=/a/sql, chat=org/chat-lora@v2")
    assert [(m.name, m.source, m.origin) for m in pairs] == [
        ("sql", "/a/sql", STATIC),
        ("chat", "org/chat-lora@v2", STATIC),
    ]
    js = parse_modules('[{"name": "sql", "path": "/a/s,q=l", "base_model_name": "llama"}]')
    assert (js[0].name, js[0].source, js[0].base_model_name) == ("sql", "/a/s,q=l", "llama")
    assert parse_modules("  ") == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sql", "is not name=path"),
        ("=/a", "non-empty name"),
        ("a b=/x", "may not hold spaces"),
        ('[{"name": "x"}]', "needs a path"),
        ('[{"name": "x", "path": "/p", "rank": 8}]', "unknown fields"),
        ("[nope", "not valid JSON"),
    ],
)
def test_a_bad_lora_modules_is_an_invalid_setting(value, message):
    with pytest.raises(ValueError, match=message):
        settings(LORA_MODULES=value)


# --- LORA_CONFIG ---------------------------------------------------------------------------------


def write_yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "lora.yaml"
    path.write_text(text)
    return path


def test_the_vllm_mxext_config_shape(tmp_path):
    path = write_yaml(
        tmp_path,
        """
base_model: {model_path: "/models/llama", model_name: "llama"}
lora_adapters:
  - {name: math, path: /adapters/math, format: huggingface, description: "math reasoning"}
  - {name: code, path: org/code-lora}
lora_settings: {max_lora_rank: 64, max_loras: 8, enable_dynamic_loading: true, cache_size: 4}
auto_load: [math]
""",
    )
    config = parse_config(path)
    assert [(a.name, a.source, a.origin, a.at_start, a.description) for a in config.adapters] == [
        ("math", "/adapters/math", CONFIG, True, "math reasoning"),
        ("code", "org/code-lora", CONFIG, False, None),
    ]
    assert config.settings == {
        "max_lora_rank": 64,
        "max_loras": 8,
        "enable_dynamic_loading": True,
        "cache_size": 4,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora_adapter: []", "unknown keys"),
        ("lora_adapters: [{name: a, path: /x, rank: 8}]", "unknown keys"),
        ("lora_adapters: [{name: a}]", "needs a path"),
        ("lora_adapters: [{name: a, path: /x, format: nemo}]", "only huggingface"),
        ("lora_settings: {max_loras: 0}", "positive integer"),
        ("lora_settings: {max_rank: 8}", "lora_settings takes only"),
        ("lora_adapters: [{name: a, path: /x}]\nauto_load: [b]", "auto_load names 'b'"),
        ("lora_adapters: [", "not valid YAML"),
    ],
)
def test_a_bad_config_file_is_one_sentence_naming_it(tmp_path, text, message):
    path = write_yaml(tmp_path, text)
    with pytest.raises(LoraError, match=message) as err:
        parse_config(path)
    assert str(path) in str(err.value)


# --- LORA_DIR and the plan -----------------------------------------------------------------------


def test_every_visible_subfolder_of_lora_dir_is_an_adapter(adapters):
    assert [(s.name, s.origin) for s in scan_dir(adapters / "dir")] == [("alpha", DIR), ("beta", DIR)]


def test_the_plan_resolves_checks_and_derives_the_rank_from_the_adapters(adapters, tmp_path):
    config = write_yaml(
        tmp_path,
        f"""
base_model: {{model_path: /models/tiny-text, model_name: tiny-text}}
lora_adapters:
  - {{name: math, path: {adapters}/r16, description: sums}}
  - {{name: lazy, path: {adapters}/r8}}
lora_settings: {{max_loras: 2, enable_dynamic_loading: true, cache_size: 4}}
auto_load: [math]
""",
    )
    plan = build_plan(
        settings(LORA_MODULES=f"sql={adapters}/r8", LORA_CONFIG=str(config), LORA_DIR=str(adapters / "dir"))
    )
    assert plan.enabled and plan.dynamic
    assert [(a.name, a.origin, a.at_start, a.info.rank) for a in plan.adapters] == [
        ("sql", STATIC, True, 8),
        ("math", CONFIG, True, 16),
        ("lazy", CONFIG, False, 8),
        ("alpha", DIR, True, 8),
        ("beta", DIR, True, 16),
    ]
    assert plan.max_lora_rank == 16  # the largest adapter's rank, not vLLM's default
    assert (plan.max_loras, plan.max_cpu_loras) == (2, 4)
    assert plan.engine_env() == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
    assert plan.warnings == []
    # The settings win over the file's, and without runtime loading every adapter loads at start.
    plan = build_plan(
        settings(LORA_CONFIG=str(config), LORA_DYNAMIC=False, MAX_LORA_RANK=32, MAX_LORAS=3, MAX_CPU_LORAS=3)
    )
    assert not plan.dynamic and all(a.at_start for a in plan.adapters) and plan.engine_env() == {}
    assert (plan.max_lora_rank, plan.max_loras, plan.max_cpu_loras) == (32, 3, 3)


def test_lora_is_off_unless_asked_and_dynamic_alone_turns_it_on():
    assert not build_plan(settings()).enabled
    plan = build_plan(settings(LORA_DYNAMIC=True))
    assert plan.enabled and plan.dynamic and plan.adapters == [] and plan.max_lora_rank is None


def test_a_rank_above_max_lora_rank_fails_the_plan_naming_the_adapter(adapters):
    with pytest.raises(LoraError, match=r"'big' .* has rank 16, above this server's MAX_LORA_RANK \(8\)"):
        build_plan(settings(LORA_MODULES=f"small={adapters}/r8,big={adapters}/r16", MAX_LORA_RANK=8))


def test_names_must_be_unique_and_not_the_base_models(adapters):
    with pytest.raises(LoraError, match="'alpha' is used twice"):
        build_plan(settings(LORA_MODULES=f"alpha={adapters}/r8", LORA_DIR=str(adapters / "dir")))
    with pytest.raises(LoraError, match="is the served model's name"):
        build_plan(settings(LORA_MODULES=f"tiny-text={adapters}/r8"))


def test_a_missing_local_folder_and_a_base_model_mismatch(adapters, tmp_path):
    with pytest.raises(LoraError, match="'gone': /nowhere/gone is not a directory"):
        build_plan(settings(LORA_MODULES="gone=/nowhere/gone"))
    other = build_adapter(tmp_path / "other", 8, base_model="Qwen/Qwen2.5-7B")
    plan = build_plan(settings(LORA_MODULES=f"other={other}"))
    assert plan.warnings == [
        "LoRA adapter 'other' was trained for 'Qwen/Qwen2.5-7B', but this server serves "
        "'/models/tiny-text': its answers may be wrong."
    ]


def test_trtllm_cannot_load_at_run_time_so_everything_loads_at_start(adapters, tmp_path):
    config = write_yaml(
        tmp_path,
        f"lora_adapters: [{{name: a, path: {adapters}/r8}}, {{name: b, path: {adapters}/r16}}]\nauto_load: [a]",
    )
    plan = build_plan(Settings(MODEL_NAME="/m", ENGINE="trtllm", LORA_CONFIG=str(config), LORA_DYNAMIC=True))
    assert not plan.dynamic and [a.name for a in plan.at_start] == ["a", "b"]


# --- adapters from the Hugging Face Hub (fake) and from S3 (moto) ---------------------------------


def test_a_hub_adapter_is_downloaded_with_hf_token_into_the_models_cache(adapters, tmp_path, hf_cache):
    files = {p.name: p.read_bytes() for p in (adapters / "r16").iterdir()}
    with FakeHub(tmp_path / "hub") as hub:
        hub.add_repo("org/tiny-lora", files)
        hub.gate("org/tiny-lora", "hf_secret")
        plan = build_plan(
            settings(LORA_MODULES="hub=org/tiny-lora@main", HF_ENDPOINT=hub.url, HF_TOKEN="hf_secret")
        )
        spec = plan.adapters[0]
        assert Path(spec.path).is_relative_to(hf_cache.resolve()) and spec.info.rank == 16
        assert json.loads((Path(spec.path) / "adapter_config.json").read_text())["r"] == 16
        assert sorted(hub.downloaded()) == [
            "org/tiny-lora/adapter_config.json",
            "org/tiny-lora/adapter_model.safetensors",
        ]
        assert all(
            r.headers.get("authorization") == "Bearer hf_secret" for r in hub.requests if "resolve" in r.path
        )
        with pytest.raises(
            LoraError, match=r"LoRA adapter 'nope' \(org/missing\): org/missing was not found"
        ):
            build_plan(settings(LORA_MODULES="nope=org/missing", HF_ENDPOINT=hub.url, HF_TOKEN="hf_secret"))


def test_an_s3_adapter_is_copied_through_the_s3_source(adapters, tmp_path):
    server = MotoS3()
    try:
        server.start()
        server.upload_dir(adapters / "r8", "loras", "team/r8")
        plan = build_plan(
            settings(
                LORA_MODULES="fromS3=s3://loras/team/r8",
                S3_ENDPOINT_URL=server.url,
                AWS_ACCESS_KEY_ID="admin",
                AWS_SECRET_ACCESS_KEY="admin",
                AWS_REGION="us-east-1",
                MODEL_CACHE_DIR=str(tmp_path / "cache"),
            )
        )
    finally:
        server.stop()
    spec = plan.adapters[0]
    assert spec.path == str(tmp_path / "cache" / "s3" / "loras" / "team" / "r8") and spec.info.rank == 8
