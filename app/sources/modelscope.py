"""Models from ModelScope, through the `modelscope` package (imported only when used: it is slow to
import and most deployments never need it).

The model is downloaded here, before the engine starts (progress and errors in our log, one sentence
on failure), and the engine gets the local folder. The engine is also started with
`VLLM_USE_MODELSCOPE=True`, as vLLM expects when its models come from ModelScope: what it looks up by
id itself (a LoRA adapter loaded at run time, a separate tokenizer) then comes from ModelScope too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from app.logs import get_logger

log = get_logger("app.sources.modelscope")

PREFIX = "modelscope://"


class ModelScopeError(Exception):
    """A ModelScope model that cannot be had; the message is one sentence for the user."""


def model_id(name: str) -> str:
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def explain(exc: BaseException, repo: str, revision: str | None) -> str:
    kind = exc.__class__.__name__
    text = str(exc).splitlines()[0] if str(exc) else kind
    if kind in ("NotExistError", "NoValidRevisionError", "RepositoryNotFoundError"):
        return f"{repo} (revision {revision or 'master'}) was not found on ModelScope: {text}"
    if kind in ("NotLoginException", "AuthenticationError"):
        return f"ModelScope refused access to {repo} (a private model needs a ModelScope token): {text}"
    return f"downloading {repo} from ModelScope failed: {kind}: {text}"


def resolve(
    name: str, *, revision: str | None, cache_dir: Path, offline: bool, engine_env: Any = os.environ
) -> str:
    """The local folder of the model. Raises ModelScopeError."""
    repo = model_id(name)
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise ModelScopeError(
            "MODEL_SOURCE=modelscope needs the `modelscope` package in the image (pip install modelscope)."
        ) from exc
    engine_env["VLLM_USE_MODELSCOPE"] = "True"  # inherited by the engine (app/launcher.py engine_env)
    log.info("downloading model from ModelScope", model_id=repo, revision=revision, cache_dir=str(cache_dir))
    try:
        path = snapshot_download(
            model_id=repo, revision=revision, cache_dir=str(cache_dir), local_files_only=offline
        )
    except Exception as exc:
        raise ModelScopeError(explain(exc, repo, revision)) from exc
    if not Path(path).is_dir():
        raise ModelScopeError(f"ModelScope returned {path!r} for {repo}, which is not a folder.")
    return str(path)
