"""What is configured, and the start plan the launcher builds from it.

Three ways to name adapters, all at once if wanted (a name may be used once):
- `LORA_MODULES`: `name=path` pairs, comma-separated, or a JSON list of `{"name", "path",
  "base_model_name"}` as vLLM's `--lora-modules` takes them (origin `static`);
- `LORA_CONFIG`: vllm_mxext's YAML (`base_model`, `lora_adapters`, `lora_settings`, `auto_load`;
  origin `config`): adapters in `auto_load` are loaded at start, the others on first use (or by the
  admin route) when runtime loading is on, and at start when it is off;
- `LORA_DIR`: every subfolder is an adapter named after it, loaded at start (origin `dir`); with
  runtime loading on, folders added later are picked up (app/lora/service.py).

A path is a local folder, a Hugging Face repo id (`org/repo` or `org/repo@revision`, downloaded by
the launcher into the model's cache with HF_TOKEN) or `s3://bucket/prefix` (the S3 source).

`build_plan` resolves and checks every configured adapter before the engine starts; its settings
(`max_lora_rank` derived from the adapters when MAX_LORA_RANK is unset) become engine flags.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.lora.adapter import ALLOWED_RANKS, AdapterInfo, LoraError, base_matches, check_folder, rank_needed

STATIC, CONFIG, DIR, RUNTIME, ENGINE = "static", "config", "dir", "runtime", "engine"
"""How an adapter came: LORA_MODULES, LORA_CONFIG, LORA_DIR, the admin route (or the CLI), or
found in the engine's list without the proxy having loaded it (ENGINE_EXTRA_ARGS, SageMaker's
/adapters route)."""

_CONFIG_KEYS = {"base_model", "lora_adapters", "lora_settings", "auto_load"}
_ADAPTER_KEYS = {"name", "path", "format", "description", "base_model_name"}
_SETTINGS_KEYS = {"max_lora_rank", "max_loras", "enable_dynamic_loading", "cache_size"}
_FORMATS = {"huggingface", "hf", "peft"}


@dataclass
class AdapterSpec:
    name: str
    source: str
    """As configured: a local path, a Hugging Face id (`org/repo[@rev]`) or an `s3://` URL."""
    origin: str
    base_model_name: str | None = None
    description: str | None = None
    at_start: bool = True
    """Loaded when the engine starts (False: on first use or by the admin route)."""
    path: str | None = None
    """The local folder the engine loads (set by `build_plan`)."""
    info: AdapterInfo | None = None


@dataclass
class LoraPlan:
    adapters: list[AdapterSpec] = field(default_factory=list)
    enabled: bool = False
    dynamic: bool = False
    """Runtime loading on the engine (VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""
    max_lora_rank: int | None = None
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    lora_dir: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def at_start(self) -> list[AdapterSpec]:
        return [a for a in self.adapters if a.at_start]

    def engine_env(self) -> dict[str, str]:
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"} if self.dynamic else {}


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LoraError(f"{where}: an adapter needs a non-empty name.")
    name = value.strip()
    if any(c.isspace() for c in name) or "," in name or "=" in name or "/" in name:
        raise LoraError(f"{where}: adapter name {name!r} may not hold spaces, ',', '=' or '/'.")
    return name


def parse_modules(text: str) -> list[AdapterSpec]:
    """LORA_MODULES: `name=path,name=path` or a JSON list of {name, path, base_model_name}."""
    text = text.strip()
    if not text:
        return []
    out: list[AdapterSpec] = []
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise LoraError(f"LORA_MODULES is not valid JSON: {exc}.") from None
        if not isinstance(items, list):
            raise LoraError("LORA_MODULES: a JSON value must be a list of adapters.")
        for item in items:
            if not isinstance(item, dict):
                raise LoraError(f"LORA_MODULES: {item!r} is not an object with name and path.")
            unknown = set(item) - {"name", "path", "base_model_name", "is_3d_lora_weight"}
            if unknown:
                raise LoraError(
                    f"LORA_MODULES: unknown fields {sorted(unknown)} (name, path, base_model_name)."
                )
            name = _name(item.get("name"), "LORA_MODULES")
            path = item.get("path")
            if not isinstance(path, str) or not path.strip():
                raise LoraError(f"LORA_MODULES: adapter {name!r} needs a path.")
            base = item.get("base_model_name")
            out.append(
                AdapterSpec(
                    name, path.strip(), STATIC, base_model_name=base if isinstance(base, str) else None
                )
            )
        return out
    for pair in text.split(","):
        if not pair.strip():
            continue
        name, eq, path = pair.partition("=")
        if not eq or not path.strip():
            raise LoraError(f"LORA_MODULES: {pair.strip()!r} is not name=path.")
        out.append(AdapterSpec(_name(name, "LORA_MODULES"), path.strip(), STATIC))
    return out


@dataclass
class ConfigFile:
    adapters: list[AdapterSpec]
    base_model: dict[str, Any]
    settings: dict[str, Any]


def parse_config(path: str | Path) -> ConfigFile:
    """LORA_CONFIG, vllm_mxext's YAML. Unknown keys are refused (a typo must not pass silently)."""
    import yaml

    where = f"LORA_CONFIG {path}"
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise LoraError(f"{where} cannot be read: {exc.strerror or exc}.") from None
    except yaml.YAMLError as exc:
        raise LoraError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}.") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise LoraError(
            f"{where}: the file must be a mapping (base_model, lora_adapters, lora_settings, auto_load)."
        )
    unknown = set(doc) - _CONFIG_KEYS
    if unknown:
        raise LoraError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_CONFIG_KEYS)}).")
    base = doc.get("base_model") or {}
    if not isinstance(base, dict):
        raise LoraError(f"{where}: base_model must be a mapping (model_path, model_name).")
    settings = doc.get("lora_settings") or {}
    if not isinstance(settings, dict) or set(settings) - _SETTINGS_KEYS:
        raise LoraError(f"{where}: lora_settings takes only {sorted(_SETTINGS_KEYS)}.")
    for key in ("max_lora_rank", "max_loras", "cache_size"):
        value = settings.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise LoraError(f"{where}: lora_settings.{key} must be a positive integer, not {value!r}.")
    if not isinstance(settings.get("enable_dynamic_loading", False), bool):
        raise LoraError(f"{where}: lora_settings.enable_dynamic_loading must be true or false.")
    auto = doc.get("auto_load")
    if auto is not None and not (isinstance(auto, list) and all(isinstance(a, str) for a in auto)):
        raise LoraError(f"{where}: auto_load must be a list of adapter names.")
    items = doc.get("lora_adapters") or []
    if not isinstance(items, list):
        raise LoraError(f"{where}: lora_adapters must be a list.")
    adapters = []
    for item in items:
        if not isinstance(item, dict):
            raise LoraError(f"{where}: each of lora_adapters is a mapping with name and path, not {item!r}.")
        name = _name(item.get("name"), where)
        extra = set(item) - _ADAPTER_KEYS
        if extra:
            raise LoraError(f"{where}: adapter {name!r} has unknown keys {sorted(extra)}.")
        source = item.get("path")
        if not isinstance(source, str) or not source.strip():
            raise LoraError(f"{where}: adapter {name!r} needs a path.")
        fmt = item.get("format")
        if fmt is not None and str(fmt).lower() not in _FORMATS:
            raise LoraError(
                f"{where}: adapter {name!r} has format {fmt!r}; only huggingface (PEFT) adapters are served."
            )
        description = item.get("description")
        adapters.append(
            AdapterSpec(
                name,
                source.strip(),
                CONFIG,
                base_model_name=item.get("base_model_name"),
                description=str(description) if description is not None else None,
                at_start=auto is None or name in auto,
            )
        )
    names = {a.name for a in adapters}
    for name in auto or ():
        if name not in names:
            raise LoraError(f"{where}: auto_load names {name!r}, which lora_adapters does not define.")
    return ConfigFile(adapters, base, settings)


def scan_dir(path: str | Path) -> list[AdapterSpec]:
    """LORA_DIR: each subfolder (not hidden) is an adapter named after it."""
    root = Path(path)
    try:
        entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise LoraError(f"LORA_DIR {root} cannot be read: {exc.strerror or exc}.") from None
    return [AdapterSpec(_name(p.name, f"LORA_DIR {root}"), str(p), DIR) for p in entries]


def configured(settings: Any) -> tuple[list[AdapterSpec], ConfigFile | None]:
    """Every adapter the settings name (no I/O beyond reading LORA_CONFIG and listing LORA_DIR)."""
    specs = parse_modules(settings.LORA_MODULES)
    config = parse_config(settings.LORA_CONFIG) if settings.LORA_CONFIG else None
    if config is not None:
        specs += config.adapters
    if settings.LORA_DIR:
        specs += scan_dir(settings.LORA_DIR)
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise LoraError(
                f"LoRA adapter name {spec.name!r} is used twice ({seen[spec.name]} and {spec.origin})."
            )
        if spec.name == settings.served_model_name:
            raise LoraError(f"LoRA adapter name {spec.name!r} is the served model's name: pick another.")
        seen[spec.name] = spec.origin
    return specs, config


def wanted(settings: Any) -> bool:
    """Whether LoRA is on: an adapter source is set, or runtime loading is asked for."""
    return bool(
        settings.LORA_MODULES.strip() or settings.LORA_CONFIG or settings.LORA_DIR or settings.LORA_DYNAMIC
    )


def resolve_source(spec: AdapterSpec, settings: Any) -> str:
    """The local folder of an adapter: as is, or downloaded (Hugging Face, S3) like the model."""
    from app.model import ModelError, looks_like_path, resolve_model

    source = spec.source
    local = Path(source).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if looks_like_path(source):
        raise LoraError(f"LoRA adapter {spec.name!r}: {source} is not a directory.")
    repo, _, revision = source.partition("@")
    if not source.startswith("s3://") and repo.count("/") != 1:
        raise LoraError(
            f"LoRA adapter {spec.name!r}: {source!r} is neither a directory, a Hugging Face id (org/repo) nor s3://."
        )
    try:
        return resolve_model(
            source if source.startswith("s3://") else repo,
            revision=None if source.startswith("s3://") else (revision or None),
            token=settings.HF_TOKEN.get_secret_value() if settings.HF_TOKEN else None,
            offline=settings.HF_HUB_OFFLINE,
            endpoint=settings.HF_ENDPOINT,
            baked_cache=str(settings.BAKED_MODELS_CACHE) if settings.BAKED_MODELS_CACHE else None,
            settings=settings,
        ).path
    except ModelError as exc:
        raise LoraError(f"LoRA adapter {spec.name!r} ({source}): {exc}") from None


def build_plan(settings: Any, resolve: bool = True) -> LoraPlan:
    """Resolve (download) and check every configured adapter; derive the engine's LoRA settings.
    Raises LoraError with the one sentence to show."""
    plan = LoraPlan(enabled=wanted(settings))
    if not plan.enabled:
        return plan
    specs, config = configured(settings)
    file_settings = config.settings if config is not None else {}
    dynamic = settings.LORA_DYNAMIC
    if dynamic is None:
        dynamic = bool(file_settings.get("enable_dynamic_loading", False))
    if settings.ENGINE == "trtllm":
        dynamic = False  # trtllm-serve cannot load adapters at run time (named once at start)
    plan.dynamic = dynamic
    plan.lora_dir = str(settings.LORA_DIR) if settings.LORA_DIR else None
    max_rank = settings.MAX_LORA_RANK or file_settings.get("max_lora_rank")
    if max_rank is not None and max_rank not in ALLOWED_RANKS:
        raise LoraError(
            f"LORA_CONFIG lora_settings.max_lora_rank {max_rank} is not one vLLM takes {ALLOWED_RANKS}."
        )
    plan.max_loras = settings.MAX_LORAS or file_settings.get("max_loras")
    plan.max_cpu_loras = settings.MAX_CPU_LORAS or file_settings.get("cache_size")
    if plan.max_loras and plan.max_cpu_loras and plan.max_cpu_loras < plan.max_loras:
        raise LoraError(
            f"MAX_CPU_LORAS ({plan.max_cpu_loras}) must be at least MAX_LORAS ({plan.max_loras}), as vLLM requires."
        )
    if config is not None:
        for key, value in (("model_path", settings.MODEL_NAME), ("model_name", settings.served_model_name)):
            theirs = config.base_model.get(key)
            if theirs and not base_matches(str(theirs), settings.MODEL_NAME, settings.served_model_name):
                plan.warnings.append(
                    f"LORA_CONFIG base_model.{key} is {theirs!r}, but this server serves {value!r} (MODEL_NAME wins)."
                )
    for spec in specs:
        if not dynamic:
            spec.at_start = True  # nothing could load it later
        spec.path = resolve_source(spec, settings) if resolve else spec.source
        spec.info = check_folder(spec.path, spec.name, max_rank)
        base = spec.info.base_model
        if not base_matches(base, settings.MODEL_NAME, settings.served_model_name):
            plan.warnings.append(
                f"LoRA adapter {spec.name!r} was trained for {base!r}, but this server serves "
                f"{settings.MODEL_NAME!r}: its answers may be wrong."
            )
    plan.adapters = specs
    if max_rank is None and specs:
        max_rank = rank_needed(max(s.info.rank for s in specs if s.info))
    plan.max_lora_rank = max_rank
    return plan


def env_flag(name: str) -> bool:
    """An engine env switch as vLLM reads it (`1` or `true`)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true")
