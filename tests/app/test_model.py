"""app.model: local directories, the weight-format filter, and downloads through the real
huggingface_hub client.

The Hugging Face Hub cannot be reached from here, so every download test runs against
tests/fake_hub.py, a local server that answers the Hub's endpoints (and its error headers) for the
calls huggingface_hub makes; the client code itself is the real one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import pytest
import structlog
from structlog.testing import capture_logs

from app import model
from app.model import ModelError, ignore_patterns, resolve_model
from fake_hub import FakeHub
from stack import ROOT, free_port

REPO = "org/tiny"
FILES = {
    "config.json": '{"model_type": "llama"}',
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": '{"bos_token": "<s>"}',
    "model.safetensors": b"S" * 4096,
    "pytorch_model.bin": b"B" * 4096,
    "original/consolidated.pth": b"P" * 64,
}


@pytest.fixture(autouse=True)
def isolated_hf(monkeypatch, tmp_path):
    """No token, offline flag or telemetry from the machine running the tests leaks in."""
    import huggingface_hub.constants as constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Otherwise the first request's user agent asks huggingface.co itself for a list of agents (2.x).
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    try:
        from huggingface_hub.utils import _detect_agent
    except ImportError:  # hub 0.x and 1.x have no agent registry
        pass
    else:
        monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)


@pytest.fixture
def hub(tmp_path):
    with FakeHub(tmp_path / "hub") as fake:
        fake.add_repo(REPO, FILES)
        yield fake


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture
def logs(monkeypatch):
    """structlog records of app.model. A fresh proxy, because configure_logging caches loggers
    on first use and a logger cached under an earlier configuration would bypass the capture."""
    monkeypatch.setattr(model, "log", structlog.get_logger("app.model"))
    with capture_logs() as records:
        yield records


def download(hub: FakeHub, cache: str, repo: str = REPO, **kwargs) -> model.ResolvedModel:
    return resolve_model(repo, endpoint=hub.url, cache_dir=cache, **kwargs)


# --- local directories and names ---------------------------------------------------------------


def test_local_directory_is_used_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    resolved = resolve_model(str(tmp_path))
    assert resolved.source == "local"
    assert resolved.path == str(tmp_path.resolve())
    assert resolved.repo_id is None


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="looks like a path but no such directory exists"):
        resolve_model(str(tmp_path / "nope"))


def test_invalid_hub_id_is_an_error(cache):
    with pytest.raises(ModelError, match="neither a local directory nor a valid Hugging Face id"):
        resolve_model("not a valid//id", cache_dir=cache)


# --- ignore_patterns ----------------------------------------------------------------------------


def test_safetensors_present_skips_other_formats():
    skip = ignore_patterns(["config.json", "model.safetensors", "pytorch_model.bin", "x.pt"])
    assert {"*.bin", "*.pt", "*.pth"} <= set(skip)
    assert "*.safetensors" not in skip


def test_only_bin_keeps_bin_and_skips_pt():
    skip = ignore_patterns(["config.json", "pytorch_model.bin", "model.pt"])
    assert {"*.pt", "*.pth"} <= set(skip)
    assert "*.bin" not in skip and "*.safetensors" not in skip


def test_original_folder_always_skipped_and_does_not_count():
    # Only original/ has safetensors: they neither count as "present" nor get downloaded.
    skip = ignore_patterns(["original/model.safetensors", "pytorch_model.bin"])
    assert "original/*" in skip
    assert "*.bin" not in skip
    assert "original/*" in ignore_patterns([])


# --- downloads from the (fake) Hub --------------------------------------------------------------


def test_downloads_only_the_best_weight_format(hub, cache, logs):
    resolved = download(hub, cache)

    path = Path(resolved.path)
    assert (resolved.source, resolved.repo_id) == ("hub", REPO)
    assert path.is_relative_to(Path(cache).resolve())
    assert (path / "config.json").read_text() == FILES["config.json"]
    assert (path / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert (path / "tokenizer.json").is_file()
    assert not (path / "pytorch_model.bin").exists()
    assert not (path / "original").exists()
    fetched = hub.downloaded()
    assert f"{REPO}/model.safetensors" in fetched
    assert not [f for f in fetched if f.endswith((".bin", ".pth"))]
    assert not [r for r in hub.requests if r.path.endswith((".bin", ".pth"))]  # not even a HEAD

    progress = [r for r in logs if r["event"] == "download progress"]
    assert progress, [r["event"] for r in logs]
    assert any(r["total"] and r["done"] == r["total"] for r in progress)
    ready = [r for r in logs if r["event"] == "model ready"]
    assert ready and ready[0]["path"] == resolved.path


def test_gated_repo_asks_for_a_token(hub, cache):
    hub.gate(REPO, allowed_token="hf_granted")
    with pytest.raises(ModelError) as err:
        download(hub, cache)
    assert "gated" in str(err.value) and "HF_TOKEN" in str(err.value)


def test_token_is_sent_and_opens_a_gated_repo(hub, cache):
    hub.gate(REPO, allowed_token="hf_granted")
    resolved = download(hub, cache, token="hf_granted")
    assert (Path(resolved.path) / "model.safetensors").is_file()
    assert hub.requests and all(r.headers.get("authorization") == "Bearer hf_granted" for r in hub.requests)


def test_no_token_no_authorization_header(hub, cache):
    download(hub, cache)
    assert hub.requests and not [r for r in hub.requests if "authorization" in r.headers]


def test_wrong_token_on_gated_repo(hub, cache):
    hub.gate(REPO, allowed_token="hf_granted")
    with pytest.raises(ModelError, match="gated"):
        download(hub, cache, token="hf_other")


def test_missing_repo(hub, cache):
    with pytest.raises(ModelError) as err:
        download(hub, cache, repo="org/missing")
    assert "org/missing was not found" in str(err.value)


def test_missing_repo_with_token(hub, cache):
    with pytest.raises(ModelError, match="org/missing was not found"):
        download(hub, cache, repo="org/missing", token="hf_any")


def test_missing_revision(hub, cache):
    with pytest.raises(ModelError) as err:
        download(hub, cache, revision="v9.9")
    assert "revision 'v9.9'" in str(err.value) and "does not exist" in str(err.value)


def test_revision_is_passed_to_the_hub(hub, cache):
    commit = hub.commit(REPO)
    resolved = download(hub, cache, revision=commit)
    assert Path(resolved.path).name == commit
    assert all(commit in r.path for r in hub.requests if "/resolve/" in r.path)


# --- offline and unreachable Hub ----------------------------------------------------------------


def test_offline_uses_the_cache_without_requests(hub, cache):
    online = download(hub, cache)
    seen = len(hub.requests)

    offline = download(hub, cache, offline=True)

    assert offline.path == online.path
    assert (Path(offline.path) / "model.safetensors").is_file()
    assert len(hub.requests) == seen


def test_offline_with_empty_cache(hub, cache):
    with pytest.raises(ModelError) as err:
        download(hub, cache, offline=True)
    assert "not in the cache" in str(err.value) and "offline" in str(err.value)
    assert hub.requests == []


def test_offline_with_incomplete_cache(hub, cache):
    online = download(hub, cache)
    (Path(online.path) / "model.safetensors").unlink()
    if not hasattr(huggingface_hub, "get_cached_repo_tree"):
        # Hub 0.x caches no file listing, so it cannot tell a partial snapshot (the engine will).
        assert download(hub, cache, offline=True).path == online.path
        return
    with pytest.raises(ModelError, match="only partly in the cache"):
        download(hub, cache, offline=True)


def _closed_port_url() -> str:
    """Nothing listens there: connections are refused, as with no network."""
    return f"http://127.0.0.1:{free_port()}"


def test_unreachable_hub_falls_back_to_the_cache(hub, cache, logs):
    online = download(hub, cache)
    resolved = resolve_model(REPO, endpoint=_closed_port_url(), cache_dir=cache)
    assert resolved.path == online.path
    assert any(r["event"] == "hub unreachable, trying the cache" for r in logs)


def test_unreachable_hub_and_empty_cache(cache):
    with pytest.raises(ModelError, match="not in the cache and the Hub cannot be reached"):
        resolve_model(REPO, endpoint=_closed_port_url(), cache_dir=cache)


# --- a model baked into the image (issue 13) ----------------------------------------------------


def test_a_baked_model_is_found_under_an_empty_volume_without_the_hub(hub, cache, tmp_path, logs):
    baked = str(tmp_path / "models" / "hub")  # the image's /models/hub, outside the volume on /data
    built = download(hub, baked)
    seen = len(hub.requests)
    # At run time a fresh volume is mounted on HF_HOME (empty cache) and the Hub is unreachable.
    resolved = resolve_model(REPO, endpoint=_closed_port_url(), cache_dir=cache, baked_cache=baked)
    assert (resolved.source, resolved.path) == ("baked", built.path)
    assert len(hub.requests) == seen and not Path(cache).exists()
    # Another model is not baked: the HF cache and the Hub as before.
    hub.add_repo("org/other", FILES)
    other = resolve_model("org/other", endpoint=hub.url, cache_dir=cache, baked_cache=baked)
    assert other.source == "hub" and Path(other.path).is_relative_to(Path(cache).resolve())


# --- an HF cache the container's user cannot write (issue 13) -----------------------------------
# As root (tests and CI run as root) mode bits do not stop a write, so the check runs as the image's
# user (uid 10001, gid 0) through setpriv, against a root-owned 0755 folder: RunPod's volumes.

CHECK = """
import sys
from app.model import ModelError, check_cache_writable
try:
    check_cache_writable(sys.argv[1])
except ModelError as exc:
    print(exc)
    sys.exit(1)
"""


def _check_as_image_user(cache: Path) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=10001", "--regid=0", "--clear-groups", sys.executable]
    else:
        argv = [sys.executable]
    return subprocess.run(
        [*argv, "-c", CHECK, str(cache)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def root_owned_dir():
    path = Path(tempfile.mkdtemp(prefix="volume-"))
    path.chmod(0o755)  # as RunPod creates it: root's, readable by all, writable by root only
    if os.geteuid() != 0:
        path.chmod(0o555)
    yield path
    path.chmod(0o755)
    shutil.rmtree(path)


def test_an_unwritable_cache_is_one_sentence_with_the_fix(root_owned_dir):
    result = _check_as_image_user(root_owned_dir / "huggingface" / "hub")
    assert result.returncode == 1, result.stdout + result.stderr
    message = result.stdout.strip()
    assert "\n" not in message and "is not writable by this container's user" in message
    assert str(root_owned_dir / "huggingface" / "hub") in message
    assert "chown -R 10001:0" in message and "HF_HOME" in message and "-runpod" in message


def test_a_writable_cache_passes(root_owned_dir):
    writable = root_owned_dir / "hub"
    writable.mkdir()
    writable.chmod(0o777)
    assert _check_as_image_user(writable).returncode == 0
