"""Before any download: can this model be had, does it fit on the disk, does it fit on the GPUs?

1. The Hub (skipped for a local directory and with HF_HUB_OFFLINE=1): one metadata request
   (`model_info` with file sizes) says whether the repo exists, whether it is gated (and a token is
   there), whether the revision exists, and how many bytes the download is; then the model's
   `config.json` (a few KB, into the cache the download uses anyway) proves the token was granted
   access and gives the shapes for the memory arithmetic.
2. Free disk at the Hugging Face cache against what is still to download.
3. The profile (app.profiles.choose), then the memory fit of the configuration the engine gets.

Each failure is one sentence that says what to do; the launcher exits 1 within seconds.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.logs import get_logger
from app.model import explain_hub_error, ignore_patterns, looks_like_path
from app.profiles.hardware import GpuSet
from app.profiles.model_facts import (
    ModelFacts,
    ModelFactsError,
    facts_from_config,
    read_local,
    set_weights_from_size,
)
from app.profiles.sizing import MIN_CONTEXT, plan, valid_tp

log = get_logger("app.preflight")

DISK_MARGIN = 1.02  # a little over the files' sizes: lock files, the refs, filesystem blocks
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class PreflightError(Exception):
    """The start cannot succeed; the message is the one sentence the user sees."""


@dataclass
class HubMetadata:
    repo_id: str
    revision: str
    sha: str | None
    gated: Any
    files: dict[str, int | None]
    """The files the download will fetch, with their sizes."""
    params: int | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size or 0 for size in self.files.values())

    @property
    def weights_bytes(self) -> int:
        return sum(size or 0 for name, size in self.files.items() if name.endswith(WEIGHT_SUFFIXES))


@dataclass
class Preflight:
    facts: ModelFacts | None = None
    hub: HubMetadata | None = None
    notes: list[str] = field(default_factory=list)
    """What was skipped, and why (logged)."""


def _wanted(files: list[str]) -> list[str]:
    skip = ignore_patterns(files)
    return [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in skip)]


def hub_metadata(
    repo_id: str,
    *,
    revision: str | None,
    token: str | None,
    endpoint: str | None = None,
    cache_dir: str | None = None,
) -> tuple[HubMetadata, dict[str, Any] | None]:
    """The repo's metadata and its config.json. Raises PreflightError with the sentence to show;
    returns None for the metadata when the Hub cannot be reached (the cache may still have it)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HFValidationError

    rev = revision or "main"
    try:
        info = HfApi(endpoint=endpoint).model_info(
            repo_id, revision=revision, token=token, files_metadata=True
        )
    except HFValidationError as exc:
        raise PreflightError(
            f"MODEL_NAME {repo_id!r} is neither a local directory nor a valid Hugging Face id."
        ) from exc
    except Exception as exc:
        raise PreflightError(explain_hub_error(exc, repo_id, revision)) from exc
    if info.gated and not token:
        raise PreflightError(
            f"{repo_id} is gated and no HF_TOKEN is set: accept its license at "
            f"https://huggingface.co/{repo_id} and set HF_TOKEN to a token of that account."
        )
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    meta = HubMetadata(
        repo_id=repo_id,
        revision=rev,
        sha=info.sha,
        gated=info.gated,
        files={name: sizes[name] for name in _wanted(list(sizes))},
        params=(info.safetensors.total if getattr(info, "safetensors", None) else None),
    )
    if "config.json" not in sizes:
        return meta, None
    try:
        path = hf_hub_download(
            repo_id,
            "config.json",
            revision=revision,  # by name: the cache records which commit "main" is
            token=token,
            cache_dir=cache_dir,
            endpoint=endpoint,
        )
    except GatedRepoError as exc:
        raise PreflightError(
            f"{repo_id} is gated and the HF_TOKEN given has not been granted access: accept its "
            f"license at https://huggingface.co/{repo_id} with the token's account, or use another token."
        ) from exc
    except EntryNotFoundError:
        return meta, None
    except Exception as exc:
        raise PreflightError(explain_hub_error(exc, repo_id, revision)) from exc
    try:
        return meta, json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return meta, None


def already_cached(meta: HubMetadata, cache_dir: Path) -> int:
    """Bytes of the wanted files already in the cache's snapshot of this commit."""
    if not meta.sha:
        return 0
    snapshot = cache_dir / f"models--{meta.repo_id.replace('/', '--')}" / "snapshots" / meta.sha
    total = 0
    for name, size in meta.files.items():
        path = snapshot / name
        if path.exists() and size:
            total += size
    return total


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_check(
    meta: HubMetadata, cache_dir: Path, free_bytes: Callable[[Path], int] | None = None
) -> str | None:
    """None if the cache's disk holds what is still to download, else the sentence to show."""
    needed = int((meta.total_bytes - already_cached(meta, cache_dir)) * DISK_MARGIN)
    if needed <= 0:
        return None
    where = _existing(cache_dir)
    free = free_bytes(where) if free_bytes else shutil.disk_usage(where).free
    if free >= needed:
        return None
    return (
        f"Downloading {meta.repo_id} needs {needed / 1e9:.1f} GB and {cache_dir} has {free / 1e9:.1f} GB "
        "free: mount a larger volume at DATA_DIR (or HF_HOME), or free some space."
    )


def memory_fit(facts: ModelFacts | None, gpus: GpuSet, settings: Any, name: str) -> tuple[str, str] | None:
    """None if the configuration fits on the GPUs (weights, the allowance, some KV cache), else
    (level, sentence). `error` when it certainly cannot start: the parallel sizes do not match the
    GPUs or the model, or the weights alone exceed the memory vLLM may use. `warning` when only the
    allowance (an estimate) tips it over: vLLM then decides. A context longer than what fits is left
    to vLLM, which says what fits (and the launcher retries with it)."""
    if facts is None or gpus.count == 0 or settings.DEVICE == "cpu":
        return None
    tp, pp = settings.TENSOR_PARALLEL_SIZE or 1, settings.PIPELINE_PARALLEL_SIZE or 1
    if tp * pp > gpus.count:
        return "error", (
            f"TENSOR_PARALLEL_SIZE={tp} x PIPELINE_PARALLEL_SIZE={pp} needs {tp * pp} GPUs and "
            f"{gpus.count} {'is' if gpus.count == 1 else 'are'} visible: start the container with more "
            "GPUs or lower the sizes."
        )
    why = valid_tp(facts, tp)
    if why:
        sizes = [t for t in range(1, gpus.count + 1) if valid_tp(facts, t) is None]
        return "error", (
            f"{name}: {why}; valid sizes on {gpus.count} GPUs: {', '.join(map(str, sizes))} (TENSOR_PARALLEL_SIZE)."
        )
    kwargs = {
        "gpu_memory_utilization": settings.GPU_MEMORY_UTIL,
        "dtype": settings.DTYPE,
        "quantization": settings.QUANTIZATION,
        "kv_cache_dtype": settings.KV_CACHE_DTYPE,
        "max_num_seqs": settings.MAX_NUM_SEQS,
        "max_batched_tokens": settings.MAX_BATCHED_TOKENS,
    }
    floor = min(MIN_CONTEXT, facts.max_model_len)
    here = plan(facts, gpus, tp, pp, **kwargs)
    if here.fits_tokens >= floor:
        return None
    # How many of these GPUs it would take.
    bigger = [
        t
        for t in (2, 4, 8, 16)
        if t > tp * pp
        and valid_tp(facts, t) is None
        and plan(
            facts, GpuSet(t, gpus.name, gpus.memory_mib, gpus.compute_capability), t, **kwargs
        ).fits_tokens
        >= floor
    ]
    advice = (
        f"use {bigger[0]} such GPUs (TENSOR_PARALLEL_SIZE={bigger[0]})"
        if bigger
        else "use GPUs with more memory"
    )
    weights = f"its weights take {here.weights_bytes / 1e9:.1f} GB per GPU at TENSOR_PARALLEL_SIZE={tp}"
    budget = (
        f"the {gpus.name}'s {here.budget_bytes / 1e9:.1f} GB (GPU_MEMORY_UTIL {here.gpu_memory_utilization})"
    )
    if here.weights_bytes > here.budget_bytes:
        return "error", f"{name} does not fit: {weights}, more than {budget}: {advice}, or a quantized model."
    return "warning", (
        f"{name} may not fit: {weights} and, with an estimated {here.allowance_bytes / 1e9:.1f} GB for "
        f"activations, leave no room for a KV cache in {budget}; vLLM will tell. Else {advice}."
    )


def _cached_config(repo_id: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The snapshot directory holding the model's config.json in the cache, if any."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def model_facts(
    name: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    offline: bool = False,
    endpoint: str | None = None,
    cache_dir: str | None = None,
) -> Preflight:
    """Step 1: what the Hub (or the local directory, or the cache when offline) says of the model."""
    result = Preflight()
    local = Path(name).expanduser()
    if local.is_dir() or looks_like_path(name):
        if local.is_dir():
            try:
                result.facts = read_local(local)
            except ModelFactsError as exc:
                result.notes.append(f"no memory arithmetic: {exc}")
        return result  # a missing path is the download step's error, with its own sentence
    if offline:
        snapshot = _cached_config(name, revision, cache_dir)
        result.notes.append(
            "HF_HUB_OFFLINE=1: the Hub checks are skipped"
            + ("" if snapshot is not None else f"; {name} is not in the cache")
        )
        if snapshot is not None:
            try:
                result.facts = read_local(snapshot)
            except ModelFactsError as exc:
                result.notes.append(f"no memory arithmetic: {exc}")
        return result
    from app.model import _unreachable_errors  # the hub's HTTP library differs by version

    try:
        meta, config = hub_metadata(
            name, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir
        )
    except PreflightError as exc:
        if isinstance(exc.__cause__, _unreachable_errors()):
            result.notes.append(f"the Hub cannot be reached ({exc.__cause__}): the Hub checks are skipped")
            snapshot = _cached_config(name, revision, cache_dir)
            if snapshot is not None:
                result.facts = read_local(snapshot)
            return result
        raise
    result.hub = meta
    if config is not None:
        try:
            result.facts = facts_from_config(config)
        except ModelFactsError as exc:
            result.notes.append(f"no memory arithmetic: {exc}")
        else:
            if meta.weights_bytes:
                set_weights_from_size(result.facts, meta.weights_bytes, "Hub file sizes", params=meta.params)
    else:
        result.notes.append("no config.json in the repo: no memory arithmetic")
    return result
