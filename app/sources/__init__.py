"""Model sources besides local folders and the Hugging Face Hub (app/model.py): `s3://` (S3, MinIO
and other S3-compatible stores) and ModelScope (`modelscope://org/name` or MODEL_SOURCE=modelscope).

`resolve_model` asks `handles(name, settings)` first and hands such names to `resolve`, which gives
the local folder the engine loads (or, for `s3://` with LOAD_FORMAT=runai_streamer, the URL itself:
the engine streams the weights from the store).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from app.logs import get_logger
from app.sources import modelscope, s3

log = get_logger("app.sources")


class SourceError(Exception):
    """The one sentence the user sees."""


def handles(name: str, settings: Any | None) -> bool:
    if name.startswith(("s3://", modelscope.PREFIX)):
        return True
    if settings is None or settings.MODEL_SOURCE != "modelscope":
        return False
    if name.startswith(("/", "./", "../", "~")):  # meant as a path: resolve_model says if it is missing
        return False
    return not Path(name).expanduser().is_dir()  # a local folder stays a local folder


def cache_root(settings: Any) -> Path:
    if settings.MODEL_CACHE_DIR is not None:
        return Path(settings.MODEL_CACHE_DIR).expanduser()
    hf_home = settings.HF_HOME or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return Path(hf_home).expanduser()


def resolve(
    name: str, settings: Any, *, revision: str | None = None, offline: bool = False
) -> tuple[str, str]:
    """(path for the engine, source name). Raises SourceError."""
    if name.startswith("s3://"):
        return _s3(name, settings), "s3"
    try:
        path = modelscope.resolve(
            name, revision=revision, cache_dir=cache_root(settings) / "modelscope", offline=offline
        )
    except modelscope.ModelScopeError as exc:
        raise SourceError(str(exc)) from exc
    return path, "modelscope"


def _s3(url: str, settings: Any) -> str:
    cfg = s3.S3Config.from_settings(settings)
    try:
        bucket, prefix = s3.parse_url(url)
        if getattr(settings, "LOAD_FORMAT", None) == "runai_streamer":
            # The engine streams the weights itself; it reads the endpoint from AWS_ENDPOINT_URL.
            s3.check_readable(url, cfg)
            if cfg.endpoint_url:
                os.environ.setdefault("AWS_ENDPOINT_URL", cfg.endpoint_url)
            log.info("model streamed from S3 by the engine", url=url)
            return url
        dest = cache_root(settings) / "s3" / bucket / prefix.strip("/")
        try:
            return str(s3.fetch_s3_dir(url, dest, cfg))
        except s3.S3Error as exc:
            cause = exc.__cause__
            unreachable = cause is not None and cause.__class__.__name__ == "EndpointConnectionError"
            if unreachable and s3.is_complete(dest):
                log.warning("S3 unreachable: serving the copy already in the cache", url=url, error=str(exc))
                return str(dest)
            raise
    except s3.S3Error as exc:
        raise SourceError(str(exc)) from exc
