import re
import subprocess
import sys

import pytest
from pydantic import ValidationError

from app.settings import ENV_NAMES, Settings, field_default_text
from scripts.settings_docs import ENV_EXAMPLE, ROOT

REQUIRED_BY_ISSUE = [
    "MODEL_NAME",
    "SERVED_MODEL_NAME",
    "MODEL_REVISION",
    "HF_TOKEN",
    "HF_HOME",
    "ENGINE",
    "DEVICE",
    "PORT",
    "ENGINE_PORT",
    "MAX_MODEL_LEN",
    "GPU_MEMORY_UTIL",
    "TENSOR_PARALLEL_SIZE",
    "MAX_NUM_SEQS",
    "MAX_BATCHED_TOKENS",
    "ENABLE_CHUNKED_PREFILL",
    "ENABLE_PREFIX_CACHING",
    "DTYPE",
    "QUANTIZATION",
    "IMAGE_LIMIT",
    "VIDEO_LIMIT",
    "AUDIO_LIMIT",
    "TRUST_REMOTE_CODE",
    "ENGINE_EXTRA_ARGS",
    "API_KEY",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "STARTUP_TIMEOUT",
    "DRAIN_TIMEOUT",
    "MAX_REQUEST_BYTES",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_every_documented_variable_exists_and_is_described():
    assert set(REQUIRED_BY_ISSUE) <= set(ENV_NAMES)
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 10, name


def test_env_example_lists_every_setting_with_its_default_commented_out():
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        assert not line or line.startswith("#"), f"an active line in .env.example: {line!r}"
        if m := re.fullmatch(r"#([A-Z][A-Z0-9_]*)=(.*)", line):
            pairs[m[1]] = m[2]
    assert list(pairs) == list(ENV_NAMES)
    assert pairs == {name: field_default_text(name) for name in ENV_NAMES}


def test_env_example_and_readme_table_are_generated_from_the_class():
    result = subprocess.run(
        [sys.executable, "scripts/settings_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_empty_values_mean_unset(monkeypatch):
    monkeypatch.setenv("MODEL_NAME", "m")
    monkeypatch.setenv("MAX_MODEL_LEN", "")
    monkeypatch.setenv("ENABLE_PREFIX_CACHING", "")
    s = Settings()
    assert s.MAX_MODEL_LEN is None and s.ENABLE_PREFIX_CACHING is None


def test_values_are_parsed_and_validated(monkeypatch):
    monkeypatch.setenv("MODEL_NAME", "m")
    monkeypatch.setenv("GPU_MEMORY_UTIL", "0.9")
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    monkeypatch.setenv("log_level", "debug")  # names are case sensitive: ignored
    monkeypatch.setenv("LOG_LEVEL", "warning")
    s = Settings()
    assert s.GPU_MEMORY_UTIL == 0.9 and s.TRUST_REMOTE_CODE is True and s.LOG_LEVEL == "WARNING"
    monkeypatch.setenv("GPU_MEMORY_UTIL", "1.5")
    with pytest.raises(ValidationError):
        Settings()


def test_model_name_is_required_and_ports_must_differ():
    with pytest.raises(ValidationError, match="MODEL_NAME is required"):
        Settings()
    with pytest.raises(ValidationError, match="pick two ports"):
        Settings(MODEL_NAME="m", PORT=9000, ENGINE_PORT=9000)


def test_served_name_defaults_to_model_name_and_secrets_stay_secret():
    s = Settings(MODEL_NAME="org/m", API_KEY="sk-secret", HF_TOKEN="hf_x")
    assert s.served_model_name == "org/m"
    assert "sk-secret" not in repr(s) and "hf_x" not in repr(s)
    assert Settings(MODEL_NAME="org/m", SERVED_MODEL_NAME="chat").served_model_name == "chat"


def test_external_engine_needs_a_url_and_not_a_model():
    with pytest.raises(ValidationError, match="needs ENGINE_URL"):
        Settings(ENGINE="external")
    with pytest.raises(ValidationError, match="must start with http"):
        Settings(ENGINE="external", ENGINE_URL="host:8000")
    s = Settings(ENGINE="external", ENGINE_URL="http://10.0.0.5:8000/")
    assert s.engine_url == "http://10.0.0.5:8000"
    assert Settings(MODEL_NAME="m", ENGINE_PORT=9001).engine_url == "http://127.0.0.1:9001"
