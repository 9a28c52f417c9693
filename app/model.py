"""Where the weights come from: a local directory as it is, or a Hugging Face repo downloaded into
the HF cache with huggingface_hub (token, revision, offline mode honoured, progress in the logs).

The hub client is whichever the engine's image ships (its version is kept as installed, see
scripts/install-app.sh): 0.x (requests; TensorRT-LLM's transformers pin, older vLLM), 1.x (httpx;
vLLM 0.32 allows >=1.31) or 2.x (httpx2). Only API common to all three is used unguarded;
tests/app/test_model_hub_versions.py runs this module's tests under each.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.logs import get_logger

log = get_logger("app.model")

# Weight formats by preference; only the best one present is downloaded.
WEIGHT_FORMATS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
ALWAYS_SKIP = ["original/*", "*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.tflite"]


class ModelError(Exception):
    """A model that cannot be had; the message is the one line the user sees."""


@dataclass
class ResolvedModel:
    path: str
    source: str  # "local", "baked", "hub", "s3" or "modelscope"
    repo_id: str | None = None


def looks_like_path(name: str) -> bool:
    """Hub ids are `org/name`; anything anchored like a path is meant as one."""
    return name.startswith(("/", "./", "../", "~"))


def ignore_patterns(files: list[str]) -> list[str]:
    """What not to download: every weight format but the best present, and known duplicates."""
    skip = list(ALWAYS_SKIP)
    for i, pattern in enumerate(WEIGHT_FORMATS):
        suffix = pattern[1:]
        if any(f.endswith(suffix) and not f.startswith("original/") for f in files):
            skip += [p for p in WEIGHT_FORMATS[i + 1 :]]
            break
    return skip


def explain_hub_error(exc: BaseException, repo_id: str, revision: str | None) -> str:
    """One actionable line for each way a download fails."""
    from huggingface_hub import errors

    rev = revision or "main"
    if isinstance(exc, errors.GatedRepoError):
        return (
            f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id} "
            "and set HF_TOKEN to a token of that account."
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (
            f"{repo_id} was not found on the Hugging Face Hub (check the id; a private repo needs HF_TOKEN)."
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"revision {rev!r} of {repo_id} does not exist (MODEL_REVISION)."
    incomplete = getattr(errors, "IncompleteSnapshotError", None)  # hub >= 1.x
    if incomplete is not None and isinstance(exc, incomplete):
        return (
            f"{repo_id} is only partly in the cache and the Hub cannot be reached (offline, "
            "HF_HUB_OFFLINE=1, or no network): finish the download with network access."
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return (
            f"{repo_id} is not in the cache and the Hub cannot be reached (offline, "
            "HF_HUB_OFFLINE=1, or no network): download it first or mount a cache at HF_HOME."
        )
    if isinstance(exc, errors.HfHubHTTPError):
        return f"downloading {repo_id} failed: {exc}".splitlines()[0]
    return f"downloading {repo_id} failed: {exc.__class__.__name__}: {exc}".splitlines()[0]


class _Discard:
    """Where the bars would be drawn: nowhere (a file object that needs no closing)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def _progress_class(expected_bytes: int | None = None) -> Any:
    """A tqdm that reports through the log every few seconds instead of drawing bars: bytes done,
    percent, rate and time left. The byte bars' totals grow as each file starts, so the percent
    and time left use the preflight's total of the download when it is larger."""
    from tqdm.auto import tqdm

    class LogProgress(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = False
            kwargs["file"] = _Discard()  # tqdm never closes its file: no devnull handle per bar
            super().__init__(*args, **kwargs)
            self._last_log = 0.0
            self._started = time.monotonic()

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            now = time.monotonic()
            if now - self._last_log >= 5 or (self.total and self.n >= self.total):
                self._last_log = now
                log.info("download progress", **progress_fields(self, now - self._started, expected_bytes))
            return out

    return LogProgress


def progress_fields(bar: Any, elapsed: float, expected_bytes: int | None = None) -> dict[str, Any]:
    """What one progress record says about a bar: done and total, and for bytes the percent,
    rate (bytes/s) and seconds left."""
    done = int(bar.n)
    total = int(bar.total) if bar.total else None
    fields: dict[str, Any] = {"what": bar.desc or "files", "done": done, "total": total, "unit": bar.unit}
    if bar.unit == "B":
        if expected_bytes and (total is None or expected_bytes > total):
            total = fields["total"] = expected_bytes
        rate = done / elapsed if elapsed > 0 else None
        fields["percent"] = round(100 * done / total, 1) if total else None
        fields["rate_bytes_per_s"] = int(rate) if rate else None
        fields["eta_s"] = round((total - done) / rate, 1) if rate and total and total >= done else None
    return fields


def _on_a_tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _cached_skip(repo_id: str, revision: str | None, cache_dir: str | None) -> list[str] | None:
    """The ignore patterns of the earlier download, from the file listing cached with it.

    Offline, snapshot_download checks the cached snapshot against that listing: without the same
    patterns every skipped weight format counts as missing (IncompleteSnapshotError). A hub without
    cached listings (0.x) does not check completeness: nothing to pass."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:
        return None
    try:
        tree = get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError:
        return None  # no listing cached: snapshot_download does not check completeness either
    return ignore_patterns([f.path for f in tree])


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """What the hub client raises when the Hub cannot be reached: connection refused or timed out,
    from whichever HTTP library this hub version uses (requests, httpx or httpx2)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    found: list[type[BaseException]] = [OfflineModeIsEnabled]
    for module, names in (
        ("httpx2", ("ConnectError", "TimeoutException")),
        ("httpx", ("ConnectError", "TimeoutException")),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            lib = __import__(module)
        except ImportError:
            continue
        found += [getattr(lib, name) for name in names]
    return tuple(found)


def _list_files(api: Any, repo_id: str, revision: str | None, token: str | None) -> list[str]:
    """The repo's file names, from one repo-info request. (list_repo_files would retry a dead
    connection with backoff for ~20 s before the cache fallback gets its turn.)"""
    info = api.model_info(repo_id, revision=revision, token=token)
    if info.siblings is not None:
        return [s.rfilename for s in info.siblings]
    return api.list_repo_files(repo_id, revision=revision, token=token)


def _baked(name: str, revision: str | None, baked_cache: str | None) -> str | None:
    """The snapshot of `name` in the cache baked into the image, if it is there whole; no network.
    It lives outside HF_HOME's volume, so a volume mounted on /data cannot hide it."""
    if not baked_cache or not Path(baked_cache).is_dir():
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name,
            revision=revision,
            cache_dir=baked_cache,
            local_files_only=True,
            ignore_patterns=_cached_skip(name, revision, baked_cache),
        )
    except Exception:  # not baked (or not whole): the HF cache and the Hub as usual
        return None


def check_cache_writable(cache_dir: str | Path | None = None) -> None:
    """Raise ModelError, in one sentence with the fix, if the HF cache cannot be written: a volume
    owned by root (RunPod's) while the image runs as uid 10001 would otherwise fail deep in the
    download with a PermissionError. Tries for real (root ignores mode bits; read-only mounts not)."""
    from huggingface_hub import constants

    path = Path(cache_dir or constants.HF_HUB_CACHE)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ModelError(
            f"The Hugging Face cache {path} is not writable by this container's user "
            f"(uid {os.getuid()}, gid {os.getgid()}; {exc.strerror or exc}): make that folder writable by "
            "it (for a volume: chown -R 10001:0), point HF_HOME at a writable folder, set "
            "HF_HUB_OFFLINE=1 for a cache filled in advance, or on RunPod, whose volumes are "
            "root-owned, use the image's -runpod variant, which runs as root."
        ) from exc


def resolve_model(
    name: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    offline: bool = False,
    cache_dir: str | None = None,
    endpoint: str | None = None,
    baked_cache: str | None = None,
    settings: Any = None,
    expected_bytes: int | None = None,
) -> ResolvedModel:
    """A local directory, a snapshot baked into the image (`baked_cache`), a model from `s3://` or
    ModelScope (app/sources/), or the path of the downloaded snapshot. Raises ModelError.
    `expected_bytes` (the preflight's size of the download) makes the progress percent exact."""
    from app import sources  # s3:// and ModelScope (issue 21): app/sources/

    if sources.handles(name, settings):
        if settings is None:
            from app.settings import Settings

            settings = Settings()
        try:
            path, source = sources.resolve(name, settings, revision=revision, offline=offline)
        except sources.SourceError as exc:
            raise ModelError(str(exc)) from exc
        log.info("model ready", source=source, model=name, path=path)
        return ResolvedModel(path=path, source=source, repo_id=name)
    local = Path(name).expanduser()
    if local.is_dir():
        return ResolvedModel(path=str(local.resolve()), source="local")
    if looks_like_path(name):
        raise ModelError(f"MODEL_NAME {name!r} looks like a path but no such directory exists.")
    baked = _baked(name, revision, baked_cache)
    if baked is not None:
        log.info("model ready", repo_id=name, path=baked, baked=True)
        return ResolvedModel(path=baked, source="baked", repo_id=name)

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError

    if not offline:
        check_cache_writable(cache_dir)
    kwargs: dict[str, Any] = {"revision": revision, "token": token, "cache_dir": cache_dir}
    if endpoint:
        kwargs["endpoint"] = endpoint
    try:
        files = None
        if not offline:
            try:
                files = _list_files(HfApi(endpoint=endpoint), name, revision, token)
            except _unreachable_errors() as exc:
                # What snapshot_download itself does when the Hub is unreachable: use the cache.
                log.warning("hub unreachable, trying the cache", repo_id=name, error=str(exc))
        if files is None:
            path = snapshot_download(
                name, local_files_only=True, ignore_patterns=_cached_skip(name, revision, cache_dir), **kwargs
            )
        else:
            skip = ignore_patterns(files)
            log.info("downloading model", repo_id=name, revision=revision or "main", skipping=skip)
            # On a terminal, huggingface_hub's own bars; otherwise progress records in the log.
            bars = None if _on_a_tty() else _progress_class(expected_bytes)
            path = snapshot_download(name, ignore_patterns=skip, tqdm_class=bars, **kwargs)
    except HFValidationError as exc:
        raise ModelError(
            f"MODEL_NAME {name!r} is neither a local directory nor a valid Hugging Face id."
        ) from exc
    except Exception as exc:
        raise ModelError(explain_hub_error(exc, name, revision)) from exc
    log.info("model ready", repo_id=name, path=path)
    return ResolvedModel(path=path, source="hub", repo_id=name)
