"""app/model.py under the huggingface_hub versions the supported base images ship.

The app's dependencies go into the engine's interpreter with the engine's hub version kept as
installed (scripts/install-app.sh), so the hub is whatever the base image has: 0.x where the
engine pins transformers 4.x (TensorRT-LLM 1.2.1's transformers==4.57.1 wants hub<1.0; vLLM
before 0.11), 1.x where vLLM allows it (vLLM 0.32 asks for >=1.31.0), 2.x in this venv. Each older
version is installed once with pip into .cache/hub-compat/<version> (no dependencies: requests and
httpx are in the venv already) and tests/app/test_model.py runs again with it first on the path,
against the same fake Hub. httpx2 comes only with hub 2.x, so it is hidden there, as in those images.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from scripts.settings_docs import ROOT

# The oldest hub of each major line the images can ship (see the module docstring).
OLDER_HUBS = ["0.36.0", "1.31.0"]
COMPAT = ROOT / ".cache" / "hub-compat"


def _install(version: str):
    target = COMPAT / version
    if not (target / "huggingface_hub").is_dir():
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(target),
                f"huggingface_hub=={version}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"pip could not install huggingface_hub=={version}:\n{result.stderr}"
    (target / "httpx2.py").write_text('raise ImportError("httpx2 comes with huggingface_hub 2.x only")\n')
    return target


@pytest.mark.parametrize("version", OLDER_HUBS)
def test_model_tests_pass_under_an_older_hub(version):
    env = {**os.environ, "PYTHONPATH": str(_install(version))}
    seen = subprocess.run(
        [sys.executable, "-c", "import huggingface_hub; print(huggingface_hub.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert seen.stdout.strip() == version, seen.stderr
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/app/test_model.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
