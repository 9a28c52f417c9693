"""A local stand-in for the `modelscope` package: ModelScope's hub cannot be reached from here.

Only what app/sources/modelscope.py calls: `snapshot_download(model_id, revision, cache_dir,
local_files_only)`, serving models from the folder in FAKE_MODELSCOPE_HUB (`<hub>/<org>/<name>`),
copied into `cache_dir` as the real one does, and its not-found error class. Every call is recorded
in CALLS. tests/app/sources/test_modelscope_source.py checks this signature against the real package.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

__version__ = "1.40.2"
CALLS: list[dict[str, Any]] = []


class NotExistError(Exception):
    pass


def snapshot_download(
    model_id: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = False,
    **kwargs: Any,
) -> str:
    CALLS.append(
        {
            "model_id": model_id,
            "revision": revision,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
        }
    )
    src = Path(os.environ["FAKE_MODELSCOPE_HUB"]) / str(model_id)
    if not src.is_dir():
        raise NotExistError(f"The model: {model_id} not exists")
    dest = Path(cache_dir or "~/.cache/modelscope/hub").expanduser() / "models" / str(model_id)
    if not dest.is_dir():
        if local_files_only:
            raise ValueError(f"Cannot find the requested files in the cached path for {model_id}")
        shutil.copytree(src, dest)
    return str(dest)
