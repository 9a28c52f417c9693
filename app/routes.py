"""The route table: every path the proxy serves, what it is, and who may call it.

Every decision about a path reads this one table: the dispatcher (app/main.py: local, engine or
404), the keys (app/proxy/handler.py for engine routes, the dispatcher for local ones), the metrics
`route` label (app/metrics.py), the quiet paths (app/middleware.py) and the health port
(app/health_port.py). A path is classified as the engine will route it: Starlette matches the
percent-decoded `scope["path"]`, and the proxy forwards the client's raw bytes, so both sides see
the same path.

The engine routes are an allow-list of vLLM 0.32's: a path the table does not know is answered
`404` by the proxy and never reaches the engine. tests/app/test_routes.py builds vLLM's own route
list and fails when vLLM defines a route this table does not classify, so an upgrade cannot add an
unchecked one. Adding a route is one line below: `_engine(path)` for an API route any key may call,
`_admin(path)` for one that changes or exposes the server (it needs ADMIN_API_KEY). A path
parameter is written as FastAPI writes it (`/v1/responses/{response_id}`: one segment;
`{name:path}`: the rest of the path).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOCAL = "local"
"""Answered by the proxy itself."""
ENGINE = "engine"
"""Passed to the engine; needs an API key when keys are set."""
ADMIN = "admin"
"""Passed to the engine only with ADMIN_API_KEY."""
BATCH = "batch"
"""Answered by the proxy's Batch API (app/batch/); needs an API key when keys are set."""
REFUSED = "refused"
"""Known, never passed on: the proxy answers 404."""
PROXIED = frozenset({ENGINE, ADMIN})
ANSWERED = frozenset({LOCAL, BATCH})
"""Answered by the proxy itself (its own apps), never by the engine."""

# Who may call a local route: anyone, an API key holder (when keys are set), or the holder of
# METRICS_API_KEY (when it is set).
OPEN = "open"
API_KEY = "api"
METRICS_KEY = "metrics"
ADMIN_KEY = "admin"
KEY_OR_ADMIN = "key_or_admin"
"""An API key (when keys are set) or ADMIN_API_KEY: `/v1/usage`, where each key sees its own."""


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    """The template, as FastAPI writes it; also the metric `route` label."""
    kind: str
    auth: str
    quiet: bool = False
    """Probes, scrapes and the dashboard's polling: no request metrics, log line at DEBUG."""
    health_port: bool = False
    """Also served on PORT_HEALTH."""


def _local(path: str, auth: str = OPEN, *, quiet: bool = False, health_port: bool = False) -> Route:
    return Route(path, LOCAL, auth, quiet, health_port)


def _engine(path: str) -> Route:
    return Route(path, ENGINE, API_KEY)


def _admin(path: str) -> Route:
    return Route(path, ADMIN, ADMIN_KEY)


def _batch(path: str) -> Route:
    return Route(path, BATCH, API_KEY)


def _refused(path: str, *, quiet: bool = False) -> Route:
    return Route(path, REFUSED, OPEN, quiet)


TABLE: tuple[Route, ...] = (
    # --- the proxy's own ---------------------------------------------------------------------
    _local("/health", quiet=True, health_port=True),
    _local("/ping", quiet=True, health_port=True),
    _local("/info", API_KEY),
    _local("/metrics", METRICS_KEY, quiet=True),
    _local("/dashboard", quiet=True),
    _local("/api/v1/live_metrics", METRICS_KEY, quiet=True),
    _local("/api/v1/historical_metrics", METRICS_KEY, quiet=True),
    _local("/api/v1/historical_metrics/{metric_name}", METRICS_KEY, quiet=True),
    _refused("/favicon.ico", quiet=True),
    # --- usage per API key (app/usage.py) ------------------------------------------------------
    _local("/v1/usage", KEY_OR_ADMIN),
    _local("/api/v1/key_usage", METRICS_KEY, quiet=True),
    # --- LoRA adapters, answered by the proxy (app/lora/service.py) ----------------------------
    _local("/v1/lora_adapters", API_KEY),
    # vLLM's own routes, checked by the proxy (the adapter folder, its rank) before the engine
    # gets them, and recorded: the admin key, as for every admin route.
    _local("/v1/load_lora_adapter", ADMIN_KEY),
    _local("/v1/unload_lora_adapter", ADMIN_KEY),
    # --- the OpenAI Batch API, answered by the proxy (app/batch/api.py) ------------------------
    _batch("/v1/files"),
    _batch("/v1/files/{file_id}"),
    _batch("/v1/files/{file_id}/content"),
    _batch("/v1/batches"),
    _batch("/v1/batches/{batch_id}"),
    _batch("/v1/batches/{batch_id}/cancel"),
    # --- vLLM's API (0.32) -------------------------------------------------------------------
    _engine("/v1/chat/completions"),
    _engine("/v1/chat/completions/batch"),
    _engine("/v1/chat/completions/render"),
    _engine("/v1/chat/completions/derender"),
    _engine("/v1/completions"),
    _engine("/v1/completions/render"),
    _engine("/v1/completions/derender"),
    _engine("/v1/responses"),
    _engine("/v1/responses/render"),
    _engine("/v1/responses/{response_id}"),
    _engine("/v1/responses/{response_id}/cancel"),
    _engine("/v1/messages"),
    _engine("/v1/messages/count_tokens"),
    _engine("/v1/messages/render"),
    _engine("/v1/models"),
    _engine("/v1/embeddings"),
    _engine("/v2/embed"),
    _engine("/pooling"),
    _engine("/classify"),
    _engine("/score"),
    _engine("/v1/score"),
    _engine("/rerank"),
    _engine("/v1/rerank"),
    _engine("/v2/rerank"),
    _engine("/v1/audio/transcriptions"),
    _engine("/v1/audio/translations"),
    _engine("/tokenize"),
    _engine("/detokenize"),
    _engine("/tokenizer_info"),
    _engine("/generative_scoring"),
    _engine("/v1/systemone"),
    _engine("/inference/v1/generate"),
    _engine("/cohere/v2/chat"),
    _engine("/cohere/v2/chat/render"),
    _engine("/version"),
    _engine("/load"),
    _engine("/docs"),
    _engine("/docs/oauth2-redirect"),
    _engine("/redoc"),
    _engine("/openapi.json"),
    _engine("/static/{path:path}"),  # --enable-offline-docs: the docs page's assets
    # --- vLLM's routes that change or expose the server --------------------------------------
    _admin("/adapters"),  # the same, SageMaker's way (runtime LoRA updating)
    _admin("/adapters/{adapter_name}"),
    _admin("/invocations"),  # SageMaker: any request type, and LoRA adapters by header
    _admin("/scale_elastic_ep"),
    _admin("/is_scaling_elastic_ep"),
    _admin("/inference/v1/abort_requests"),
    _admin("/abort_requests"),
    _admin("/kv_event_sources"),
    _admin("/start_profile"),
    _admin("/stop_profile"),
    _admin("/fault_tolerance/apply"),
    _admin("/fault_tolerance/status"),
    # VLLM_SERVER_DEV_MODE=1
    _admin("/reset_prefix_cache"),
    _admin("/reset_mm_cache"),
    _admin("/reset_encoder_cache"),
    _admin("/collective_rpc"),
    _admin("/server_info"),
    _admin("/sleep"),
    _admin("/release_kv_cache_memory"),
    _admin("/wake_up"),
    _admin("/is_sleeping"),
    _admin("/pause"),
    _admin("/resume"),
    _admin("/is_paused"),
    _admin("/init_weight_transfer_engine"),
    _admin("/shutdown_weight_transfer_engine"),
    _admin("/start_weight_update"),
    _admin("/start_draft_weight_update"),
    _admin("/update_weights"),
    _admin("/finish_weight_update"),
    _admin("/update_weight_version"),
    _admin("/weight_info"),
    _admin("/weight_checker"),
    _admin("/get_world_size"),
    # --- TensorRT-LLM's trtllm-serve (ENGINE=trtllm) beyond the routes above ------------------
    # (tensorrt_llm/serve/openai_server.py, register_routes; vLLM answers them 404)
    _engine("/health_generate"),  # a one-token generation: the engine can really answer
    _admin("/perf_metrics"),  # timings of recent requests
    _admin("/energy_metrics"),
    _admin("/steady_clock_offset"),  # clock sync for disaggregated serving
    _admin("/kv_cache_events"),
    _admin("/v1/data_transceiver_state"),
    # --- vLLM's, not relayed -----------------------------------------------------------------
    _refused("/v1/realtime"),  # a WebSocket: the proxy relays HTTP only
    _refused("/metrics{path:path}"),  # vLLM mounts its metrics app on every path under /metrics
)

TRTLLM_ONLY = frozenset(
    {
        "/health_generate",
        "/perf_metrics",
        "/energy_metrics",
        "/steady_clock_offset",
        "/kv_cache_events",
        "/v1/data_transceiver_state",
    }
)
"""trtllm-serve's routes that vLLM lacks (tests/app/test_routes.py leaves them out of its check
that every engine route is one of vLLM's)."""

_PARAM = re.compile(r"\{(\w+)(:path)?\}")


def _pattern(template: str) -> re.Pattern[str]:
    """A template's regex, as Starlette compiles it (`{x}`: one segment; `{x:path}`: the rest)."""
    out, at = [], 0
    for match in _PARAM.finditer(template):
        out += [re.escape(template[at : match.start()]), ".*" if match.group(2) else "[^/]+"]
        at = match.end()
    out.append(re.escape(template[at:]))
    return re.compile("".join(out))


_EXACT = {r.path: r for r in TABLE if "{" not in r.path}
_PATTERNS = [(_pattern(r.path), r) for r in TABLE if "{" in r.path]
assert len(_EXACT) + len(_PATTERNS) == len(TABLE), "a path is listed twice"

BAD_PATH = re.compile(r"[\x00-\x20\x7f?#]")
"""What a decoded path must not hold: a control character, space, `?` or `#` can only come from
percent-encoding, and would make a request line or the engine's routing differ from what was
checked here."""


def classify(path: str) -> Route | None:
    """The route of a percent-decoded path; None for a path the table does not know or a bad one."""
    route = _EXACT.get(path)
    if route is not None:
        return route
    if BAD_PATH.search(path):
        return None
    for pattern, route in _PATTERNS:
        if pattern.fullmatch(path):
            return route
    return None


def route_label(route: Route | None) -> str:
    """The metric `route` label: the template (a bounded set), `other` for anything else."""
    return route.path if route is not None else "other"
