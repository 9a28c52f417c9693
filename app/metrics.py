"""Every metric the proxy exports, under one prefix, in one registry.

The registry is the proxy's own (not prometheus_client's global one), so `/metrics` can append the
engine's `vllm:*` families without two `process_*` families clashing. The request metrics are
`app.promlite`'s lock-free classes (they are updated several times per request on the hot path),
exposed through this registry like any prometheus_client metric.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from app.gpu import GpuCollector
from app.promlite import Counter, Gauge, Histogram

PREFIX = "vllm_api"

disable_created_metrics()  # no `_created` series: half the lines, no value for dashboards

REGISTRY = CollectorRegistry(auto_describe=True)
PROCESS = ProcessCollector(registry=REGISTRY)
"""This process's process_* families (left out when several proxy processes serve: app/workers.py)."""
PlatformCollector(registry=REGISTRY)

LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
    45.0, 60.0, 120.0, 300.0,
)  # fmt: skip
TOKENS_PER_SECOND_BUCKETS = (1, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)

# The `route` label is the route table's template (app/routes.py), `other` for unknown paths: a
# bounded set clients cannot add to.
REQUESTS = Counter(
    f"{PREFIX}_requests",
    "Requests answered by the proxy, by route, model and HTTP status (499: client hung up).",
    ["route", "model", "status"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    f"{PREFIX}_request_duration_seconds",
    "End-to-end request latency seen by the proxy, first request byte to last response byte.",
    ["route", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TTFT = Histogram(
    f"{PREFIX}_time_to_first_token_seconds",
    "Streams: time from the request to the first event carrying generated output.",
    ["route", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    f"{PREFIX}_prompt_tokens",
    "Prompt tokens, from the engine's usage report.",
    ["model"],
    registry=REGISTRY,
)
COMPLETION_TOKENS = Counter(
    f"{PREFIX}_completion_tokens",
    "Generated tokens, from the engine's usage report.",
    ["model"],
    registry=REGISTRY,
)
TOKENS_PER_SECOND = Histogram(
    f"{PREFIX}_tokens_per_second",
    "Per request: completion tokens divided by end-to-end duration.",
    ["model"],
    buckets=TOKENS_PER_SECOND_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    f"{PREFIX}_requests_in_flight",
    "Requests the proxy is serving now (streams included).",
    registry=REGISTRY,
)
REQUEST_PARTS = Counter(
    f"{PREFIX}_request_parts",
    "Content parts in requests, by modality (text, image, video, audio).",
    ["modality"],
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    f"{PREFIX}_upstream_errors",
    "Failures talking to the engine: connect (502), timeout (504), protocol (broken response).",
    ["kind"],
    registry=REGISTRY,
)

# --- Batch API (app/batch/) ---------------------------------------------------------------------
BATCH_LINES = Counter(
    f"{PREFIX}_batch_requests",
    "Batch lines recorded, by outcome: completed (2xx), failed (an error answer), invalid (never "
    "sent: the line could not be run), expired (not run before the completion window ended).",
    ["outcome"],
    registry=REGISTRY,
)
for _outcome in ("completed", "failed", "invalid", "expired"):
    BATCH_LINES.labels(_outcome)
BATCH_IN_FLIGHT = Gauge(
    f"{PREFIX}_batch_requests_in_flight",
    "Batch lines being answered now (also counted in requests_in_flight).",
    registry=REGISTRY,
)

# --- LoRA adapters (app/lora/) ------------------------------------------------------------------
# Per adapter, the request, token and TTFT families above carry the adapter's name in `model`: only
# names the engine serves (its /v1/models) become label values (app/middleware.py `observe`).
LORA_ADAPTERS_LOADED = Gauge(
    f"{PREFIX}_lora_adapters_loaded",
    "LoRA adapters the engine serves now (its /v1/models, read after every load and unload).",
    registry=REGISTRY,
)


# Labelled counters are exported at zero from the start, so "no errors" reads 0 rather than no data.
for _kind in ("connect", "timeout", "protocol"):
    UPSTREAM_ERRORS.labels(_kind)

# Per-GPU gauges from NVML, read at each scrape (none on a machine without an NVIDIA GPU):
# vllm_api_gpu_{memory_used_bytes,memory_total_bytes,utilization_ratio,temperature_celsius,power_watts}
GPU = GpuCollector(PREFIX)
REGISTRY.register(GPU)

# Start-up: seconds per phase of the last start (app/startup.py), set once when the engine is ready.
STARTUP_SECONDS = Gauge(
    f"{PREFIX}_startup_seconds",
    "Seconds the last start-up spent per phase: gpu_check, preflight, download, engine_load, compile, "
    "warmup, ready, failed_start (a retried attempt), total.",
    ["phase"],
    registry=REGISTRY,
)

# --- Admission control and API keys (app/admission.py, app/keys.py, app/usage.py) ----------------
# The `key` label is a key's name from API_KEY_FILE (or `key-<hash>` for a plain key, `anonymous`
# without keys, `batch` for batch lines): a set the operator bounds, never the secret.
QUEUE_WAIT_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0,
)  # fmt: skip
ADMISSION_QUEUE_DEPTH = Gauge(
    f"{PREFIX}_admission_queue_depth",
    "Requests waiting in the proxy for one of MAX_CONCURRENT_REQUESTS.",
    registry=REGISTRY,
)
ADMISSION_IN_FLIGHT = Gauge(
    f"{PREFIX}_admission_in_flight",
    "Requests holding one of MAX_CONCURRENT_REQUESTS (in flight to the engine).",
    registry=REGISTRY,
)
ADMISSION_WAIT = Histogram(
    f"{PREFIX}_admission_wait_seconds",
    "Time a request waited in the proxy's queue before it went to the engine (0: at once).",
    buckets=QUEUE_WAIT_BUCKETS,
    registry=REGISTRY,
)
REJECTIONS = Counter(
    f"{PREFIX}_admission_rejections",
    "Requests refused before the engine, by reason: queue_full and queue_timeout (429, the "
    "proxy's queue), key_parallel, key_rpm and key_tpm (429, a key's limits), model_not_allowed (403).",
    ["reason"],
    registry=REGISTRY,
)
for _reason in ("queue_full", "queue_timeout", "key_parallel", "key_rpm", "key_tpm", "model_not_allowed"):
    REJECTIONS.labels(_reason)
KEY_REQUESTS = Counter(
    f"{PREFIX}_key_requests",
    "Requests to the engine's API routes, by API key name and HTTP status (499: client hung up).",
    ["key", "status"],
    registry=REGISTRY,
)
KEY_PROMPT_TOKENS = Counter(
    f"{PREFIX}_key_prompt_tokens",
    "Prompt tokens by API key name, from the engine's usage report.",
    ["key"],
    registry=REGISTRY,
)
KEY_COMPLETION_TOKENS = Counter(
    f"{PREFIX}_key_completion_tokens",
    "Generated tokens by API key name, from the engine's usage report.",
    ["key"],
    registry=REGISTRY,
)
KEY_RELOADS = Counter(
    f"{PREFIX}_key_reloads",
    "Reloads of API_KEY_FILE (SIGHUP or a change of the file): ok, or error (the keys in use stay).",
    ["result"],
    registry=REGISTRY,
)
for _result in ("ok", "error"):
    KEY_RELOADS.labels(_result)
