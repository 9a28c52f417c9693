"""`python -m app.profiles list`, run as a user runs it: no GPU here (declared GPU sets), no
network (a local directory, and a model already in the Hugging Face cache with HF_HUB_OFFLINE=1;
the cache is filled from tests/fake_hub.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from model_configs import LLAMA_31_8B, LLAMA_31_70B, write_model

from fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[3]
KEYS = {"group", "profile", "tensor_parallel_size", "max_model_len", "gb_per_gpu", "reason"}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run(
        [sys.executable, "-m", "app.profiles", "list", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_json_for_a_local_directory_on_declared_gpus(tmp_path):
    model = write_model(tmp_path / "my-llama", LLAMA_31_8B)
    out = cli("--model", str(model), "--gpus", "1xL4-24GB", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows and all(set(r) >= KEYS for r in rows)
    first = rows[0]  # no profile for a local directory of this family: the computed defaults
    assert (first["group"], first["profile"], first["tensor_parallel_size"]) == ("runnable", None, 1)
    assert 16_000 < first["max_model_len"] < 40_000 and first["gb_per_gpu"] <= 24.2


def test_a_cached_hub_model_offline_gets_its_profiles_with_the_arithmetic(tmp_path):
    from app.model import resolve_model

    hf_home = tmp_path / "hf"
    with FakeHub(tmp_path / "hub") as hub:
        hub.add_repo("meta-llama/Llama-3.1-8B-Instruct", {"config.json": json.dumps(LLAMA_31_8B)})
        resolve_model("meta-llama/Llama-3.1-8B-Instruct", endpoint=hub.url, cache_dir=str(hf_home / "hub"))
    out = cli(
        "--model", "meta-llama/Llama-3.1-8B-Instruct", "--gpus", "1xL4-24GB", "--json",
        env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows[0]["profile"] == "llama-3.1-8b-fp8-tp1" and rows[0]["group"] == "runnable"
    short = next(r for r in rows if r["profile"] == "llama-3.1-8b-bf16-tp1")
    assert short["group"] == "low_memory" and short["fits_max_model_len"] and short["arithmetic"]
    assert {r["group"] for r in rows} == {"runnable", "low_memory", "incompatible"}


def test_text_output_groups_and_marks_autos_choice(tmp_path):
    model = write_model(tmp_path / "big", LLAMA_31_70B)
    out = cli("--model", str(model), "--gpus", "8xH100-80GB")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert (
        text.startswith("Model: ") and "141.1 GB of bfloat16 weights, 320 KiB of KV cache per token" in text
    )
    assert "GPUs: 8xH100-80GB (declared)" in text
    assert "Compatible and runnable\n  * (computed defaults)                tp=4" in text
    out = cli("--model", str(model), "--gpus", "1xL4")
    assert "Incompatible" in out.stdout and "leave no room for a KV cache" in out.stdout
    assert "Nothing runs here" in out.stdout


def test_every_profile_on_this_gpu_less_machine_and_bad_gpu_specs():
    out = cli("--gpus", "auto", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) > 20 and all(r["group"] == "incompatible" for r in rows)
    assert any(r["reason"] == "needs 1 GPU; none found" for r in rows)
    bad = cli("--gpus", "lots of GPUs")
    assert bad.returncode == 2 and "is not <count>x<board>[-<memory>GB]" in bad.stderr
    sizes = cli("--gpus", "2xA100")
    assert sizes.returncode == 2 and "2xA100-40GB, 2xA100-80GB" in sizes.stderr
