"""ModelScope as a model source (app/sources/modelscope.py through resolve_model).

ModelScope's hub cannot be reached from here: these tests use a local stand-in for the `modelscope`
package (tests/fake_modelscope/), whose `snapshot_download` signature is checked against the real
package's, installed from requirements.txt."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path

import pytest

from app.model import ModelError, resolve_model
from app.settings import Settings

FAKE = Path(__file__).resolve().parents[2] / "fake_modelscope"


@pytest.fixture
def fake_modelscope(monkeypatch, tmp_path):
    hub = tmp_path / "hub" / "org" / "tiny"
    hub.mkdir(parents=True)
    (hub / "config.json").write_text('{"model_type": "llama"}')
    monkeypatch.setenv("FAKE_MODELSCOPE_HUB", str(tmp_path / "hub"))
    monkeypatch.syspath_prepend(str(FAKE))
    monkeypatch.delitem(sys.modules, "modelscope", raising=False)
    # Set through monkeypatch so that what the code under test sets is undone too: a leaked
    # VLLM_USE_MODELSCOPE would reach every engine the rest of the session starts.
    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "False")
    module = importlib.import_module("modelscope")
    assert module.__file__.startswith(str(FAKE))
    module.CALLS.clear()
    yield module
    sys.modules.pop("modelscope", None)  # not through monkeypatch: it would put the stand-in back


def settings(tmp_path: Path, name: str, **env) -> Settings:
    return Settings(MODEL_NAME=name, MODEL_CACHE_DIR=tmp_path / "cache", **env)


def test_a_modelscope_url_is_downloaded_from_modelscope_and_the_engine_told(fake_modelscope, tmp_path):
    s = settings(tmp_path, "modelscope://org/tiny")
    model = resolve_model(s.MODEL_NAME, revision="v1", settings=s)
    assert model.source == "modelscope"
    assert Path(model.path, "config.json").is_file()
    assert Path(model.path).is_relative_to(tmp_path / "cache" / "modelscope")
    expected = {
        "model_id": "org/tiny",
        "revision": "v1",
        "cache_dir": str(tmp_path / "cache" / "modelscope"),
        "local_files_only": False,
    }
    calls = fake_modelscope.CALLS
    assert calls == [expected]
    assert os.environ["VLLM_USE_MODELSCOPE"] == "True"  # the engine inherits it


def test_model_source_modelscope_takes_plain_ids_but_not_local_folders(fake_modelscope, tmp_path):
    s = settings(tmp_path, "org/tiny", MODEL_SOURCE="modelscope")
    assert resolve_model("org/tiny", settings=s).source == "modelscope"
    local = tmp_path / "local-model"
    local.mkdir()
    assert resolve_model(str(local), settings=s).source == "local"
    assert len(fake_modelscope.CALLS) == 1


def test_offline_uses_only_the_cache(fake_modelscope, tmp_path):
    s = settings(tmp_path, "modelscope://org/tiny")
    with pytest.raises(ModelError):
        resolve_model(s.MODEL_NAME, offline=True, settings=s)
    resolve_model(s.MODEL_NAME, settings=s)
    assert resolve_model(s.MODEL_NAME, offline=True, settings=s).source == "modelscope"
    assert [c["local_files_only"] for c in fake_modelscope.CALLS] == [True, False, True]


def test_a_missing_model_is_one_sentence(fake_modelscope, tmp_path):
    s = settings(tmp_path, "modelscope://org/nope")
    with pytest.raises(ModelError) as err:
        resolve_model(s.MODEL_NAME, settings=s)
    assert str(err.value).startswith("org/nope (revision master) was not found on ModelScope")
    assert "\n" not in str(err.value)


def test_without_the_package_the_message_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails
    s = settings(tmp_path, "modelscope://org/tiny")
    with pytest.raises(ModelError, match="needs the `modelscope` package"):
        resolve_model(s.MODEL_NAME, settings=s)


def test_the_stand_in_matches_the_real_packages_signature():
    import modelscope
    from modelscope.hub.snapshot_download import snapshot_download

    assert modelscope.__file__ and not modelscope.__file__.startswith(str(FAKE))
    params = inspect.signature(snapshot_download).parameters
    for name in ("model_id", "revision", "cache_dir", "local_files_only"):
        assert name in params
    assert modelscope.snapshot_download is snapshot_download  # the top-level name we import


def test_with_model_source_modelscope_a_missing_path_is_still_a_missing_path(fake_modelscope, tmp_path):
    s = settings(tmp_path, "./no/such/folder", MODEL_SOURCE="modelscope")
    with pytest.raises(ModelError, match="looks like a path but no such directory exists"):
        resolve_model(s.MODEL_NAME, settings=s)
    assert fake_modelscope.CALLS == []
