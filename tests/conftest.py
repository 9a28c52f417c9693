from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MODELS_DIR = Path(os.environ.get("TINY_MODELS_DIR", ROOT / ".cache" / "models"))


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """The tiny text and image models, built once (random weights, no network)."""
    from scripts.tiny_models import build_text, build_vision

    return {"text": build_text(MODELS_DIR / "tiny-text"), "vision": build_vision(MODELS_DIR / "tiny-vision")}


@pytest.fixture(scope="session")
def stack_logs(tmp_path_factory) -> Path:
    path = Path(os.environ.get("TEST_ARTIFACTS", tmp_path_factory.mktemp("stacks")))
    path.mkdir(parents=True, exist_ok=True)
    return path
