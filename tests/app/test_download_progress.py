"""Download progress in the log: bytes, percent, rate and time left, through the real
huggingface_hub client against tests/fake_hub.py (the Hub cannot be reached from here)."""

from types import SimpleNamespace

import pytest
import structlog
from structlog.testing import capture_logs

from app import model
from app.model import progress_fields, resolve_model
from fake_hub import FakeHub


def test_progress_fields_for_bytes_use_the_preflights_total_when_larger():
    bar = SimpleNamespace(n=250_000_000, total=400_000_000, unit="B", desc="Downloading bytes")
    assert progress_fields(bar, 10.0) == {
        "what": "Downloading bytes",
        "done": 250_000_000,
        "total": 400_000_000,
        "unit": "B",
        "percent": 62.5,
        "rate_bytes_per_s": 25_000_000,
        "eta_s": 6.0,
    }
    # The bar's total grows as files start; the preflight knew the whole download.
    fields = progress_fields(bar, 10.0, expected_bytes=1_000_000_000)
    assert (fields["total"], fields["percent"], fields["eta_s"]) == (1_000_000_000, 25.0, 30.0)
    files = SimpleNamespace(n=2, total=5, unit="it", desc="Fetching 5 files")
    assert progress_fields(files, 1.0) == {"what": "Fetching 5 files", "done": 2, "total": 5, "unit": "it"}


@pytest.fixture(autouse=True)
def isolated_hf(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import _detect_agent

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)


def test_a_download_logs_bytes_percent_rate_and_eta(tmp_path, monkeypatch):
    monkeypatch.setattr(model, "log", structlog.get_logger("app.model"))
    with FakeHub(tmp_path / "hub") as hub, capture_logs() as records:
        hub.add_repo("org/m", {"config.json": "{}", "model.safetensors": b"S" * 200_000})
        resolve_model("org/m", endpoint=hub.url, cache_dir=str(tmp_path / "cache"), expected_bytes=200_002)
    progress = [r for r in records if r["event"] == "download progress" and r["unit"] == "B"]
    assert progress, records
    last = progress[-1]
    assert last["total"] == 200_002 and last["done"] == 200_002 and last["percent"] == 100.0
    assert last["rate_bytes_per_s"] > 0 and last["eta_s"] == 0.0
