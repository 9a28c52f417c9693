"""Where the caches go. Read-only and full volumes are stand-ins (`is_writable`, `free`): the tests
run as root, for whom no directory is read-only, and a disk cannot be filled on cue."""

import os

from app.cache_dirs import MIN_FREE_BYTES, choose, writable
from app.settings import Settings

PLENTY = lambda path: 100 * 2**30  # noqa: E731


def settings(data_dir, **env) -> Settings:
    return Settings(MODEL_NAME="org/m", DATA_DIR=str(data_dir), **env)


def test_both_caches_go_on_the_data_volume(tmp_path):
    dirs = choose(settings(tmp_path), free=PLENTY)
    assert dirs.hf_home == str(tmp_path / "huggingface") and dirs.vllm_cache_root == str(
        tmp_path / "vllm-cache"
    )
    assert dirs.notes == []
    env = {"HF_HOME": "/elsewhere"}
    dirs.export(env)
    assert env == {"HF_HOME": str(tmp_path / "huggingface"), "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}


def test_without_a_data_volume_the_libraries_defaults_stand(tmp_path):
    dirs = choose(settings(tmp_path / "absent"), free=PLENTY)
    assert (dirs.hf_home, dirs.vllm_cache_root, dirs.notes) == (None, None, [])
    env = {"PATH": "/bin"}
    dirs.export(env)
    assert env == {"PATH": "/bin"}


def test_a_read_only_or_full_volume_falls_back_with_a_warning(tmp_path):
    read_only = choose(settings(tmp_path), is_writable=lambda p: False, free=PLENTY)
    assert (read_only.hf_home, read_only.vllm_cache_root) == (None, None)
    assert [n[0] for n in read_only.notes] == ["warning", "warning"]
    assert read_only.notes[0][2]["why"] == "not writable"
    full = choose(settings(tmp_path), free=lambda p: MIN_FREE_BYTES - 1)
    assert full.hf_home is None and full.notes[0][2]["why"] == "under 1 GiB free"


def test_explicit_locations_win_and_a_read_only_hf_cache_is_fine_offline(tmp_path):
    mine = tmp_path / "mine"
    dirs = choose(settings(tmp_path, HF_HOME=str(mine), VLLM_CACHE_ROOT=str(mine / "v")), free=PLENTY)
    assert (dirs.hf_home, dirs.vllm_cache_root) == (str(mine), str(mine / "v"))
    offline = choose(
        settings(tmp_path, HF_HOME=str(mine), HF_HUB_OFFLINE="true"), is_writable=lambda p: False
    )
    assert offline.hf_home == str(mine)  # a baked, read-only cache is read, never written
    online = choose(settings(tmp_path, HF_HOME=str(mine)), is_writable=lambda p: False)
    # Kept, not swapped for the home folder: the download would land on the container's disk,
    # unseen. app/model.py refuses it with the fix (tests/integration/test_launcher.py).
    assert online.hf_home == str(mine) and all(n[2].get("cache") != "HF_HOME" for n in online.notes)
    vllm = choose(settings(tmp_path, VLLM_CACHE_ROOT=str(mine)), is_writable=lambda p: False)
    assert vllm.vllm_cache_root is None
    assert "VLLM_CACHE_ROOT cannot be used: the library's default cache instead" in [n[1] for n in vllm.notes]


def test_writable_really_writes(tmp_path):
    assert writable(tmp_path / "new" / "dir")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert not writable(blocker / "below")
    assert os.listdir(tmp_path / "new" / "dir") == []  # the probe file is gone
