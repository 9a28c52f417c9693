"""Where the Hugging Face cache and vLLM's compile cache live: on the DATA_DIR volume by default,
so a restarted container skips the download and the compile; the home folder's caches when that
volume is missing, read-only or full.

Both are environment variables the libraries read when they are imported (huggingface_hub) or
started (vLLM), so the launcher sets them before either happens, and the engine inherits them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_FREE_BYTES = 2**30  # a volume with less than this free counts as full


def writable(path: Path) -> bool:
    """The directory exists (or can be made) and a file can be created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
        return True
    except OSError:
        return False


def free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass
class CacheDirs:
    hf_home: str | None
    """None: huggingface_hub's own default (HF_HOME left as it is, or removed when unusable)."""
    vllm_cache_root: str | None
    notes: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    """(level, message, fields) to log."""

    def export(self, environ: MutableMapping[str, str]) -> None:
        for var, value in (("HF_HOME", self.hf_home), ("VLLM_CACHE_ROOT", self.vllm_cache_root)):
            if value:
                environ[var] = value
            else:
                environ.pop(var, None)

    def as_dict(self) -> dict[str, str | None]:
        return {"hf_home": self.hf_home, "vllm_cache_root": self.vllm_cache_root}


def choose(
    settings: Any,
    *,
    is_writable: Callable[[Path], bool] = writable,
    free: Callable[[Path], int] = free_bytes,
) -> CacheDirs:
    """The two cache roots. An explicit HF_HOME is always kept (read-only is fine offline; online,
    app/model.py says why it cannot be used); an explicit VLLM_CACHE_ROOT while it can be
    written; otherwise DATA_DIR's, then the libraries' own defaults in the home folder."""
    data = settings.DATA_DIR
    out = CacheDirs(None, None)

    def problem(path: Path) -> str | None:
        if not is_writable(path):
            return "not writable"
        if free(path) < MIN_FREE_BYTES:
            return f"under {MIN_FREE_BYTES // 2**30} GiB free"
        return None

    data_problem = problem(data) if data.exists() else None
    for var, explicit, sub in (
        ("HF_HOME", settings.HF_HOME, "huggingface"),
        ("VLLM_CACHE_ROOT", settings.VLLM_CACHE_ROOT, "vllm-cache"),
    ):
        chosen: Path | None = None
        if explicit is not None:
            # An HF_HOME the user named is kept even when it cannot be written: falling back would
            # download onto the container's own disk, unseen; app/model.py refuses it in one
            # sentence with the fix (RunPod's root-owned volumes) before any download.
            why = None if var == "HF_HOME" else problem(explicit)
            if why is None:
                chosen = explicit
            else:
                out.notes.append(
                    (
                        "warning",
                        f"{var} cannot be used: the library's default cache instead",
                        {var.lower(): str(explicit), "why": why},
                    )  # fmt: skip
                )
        elif data.exists() and data_problem is None:
            chosen = data / sub
        elif data.exists():
            out.notes.append(
                (
                    "warning",
                    "DATA_DIR cannot hold the caches: the libraries' defaults instead",
                    {"data_dir": str(data), "why": data_problem, "cache": var},
                )  # fmt: skip
            )
        if var == "HF_HOME":
            out.hf_home = str(chosen) if chosen else None
        else:
            out.vllm_cache_root = str(chosen) if chosen else None
    return out
