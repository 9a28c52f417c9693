"""Request id, log context, the one canonical log line per request, and request metrics.

Plain ASGI (no BaseHTTPMiddleware): it wraps `send` to read the status and add `x-request-id`, and
hands the inner app a `RequestRecord` (in `scope["app.record"]`) for the fields only it knows:
model, stream, TTFT, token counts, modalities, error.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from app import logs, metrics
from app.errors import send_error
from app.proxy.headers import get_header
from app.routes import ANSWERED, Route, classify, route_label
from app.runtime import Runtime

RECORD_KEY = "app.record"
BATCH_KEY = "app.batch_id"
"""Set in the scope of a batch line (app/batch/runner.py) to the batch's id: the request log line
carries it. Only the runner builds such scopes: no client can set it."""
BATCH_OWNER_KEY = "app.batch_owner"
"""Beside BATCH_KEY: the name of the API key that made the batch ('' if unknown). The line is
logged and counted under it (app/proxy/handler.py)."""
REFUSED_KEY = "app.refused"
"""Set by the HTTP server (app/server.py) when it refused a request the app had already been given
(its body broke HTTP's framing): `(status, error)`, what the client got, for the request's line."""
# Longest values a log line holds whole (clients choose them; the rest is cut, its length noted).
MAX_LOGGED_MODEL = 256
MAX_LOGGED_PATH = 1024
MAX_LOGGED_ERROR = 1024

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")

_log = structlog.get_logger("app.request")


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str
    client: str | None
    start: float = field(default_factory=time.perf_counter)
    status: int = 0
    model: str | None = None
    stream: bool = False
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    modalities: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    disconnected: bool = False
    """The client hung up before the response was complete (logged as status 499)."""
    prompt: Any = None
    """Only with LOG_PROMPTS: the request's prompt, inline media elided."""
    batch_id: str | None = None
    """A line of a batch (Batch API): the batch's id."""
    route: Route | None = None
    """The path's entry in the route table (app/routes.py); None: unknown or refused."""
    # --- admission control and API keys (app/admission.py, app/keys.py) ---
    key: str | None = None
    """The name of the API key the request was made with (never the secret); None: no valid key."""
    queued_s: float | None = None
    """Time waited in the proxy's queue (MAX_CONCURRENT_REQUESTS set); 0: went in at once."""
    rejected: str | None = None
    """Refused by admission control or a key's limits: the reason (app/admission.py)."""
    response_headers: list[tuple[bytes, bytes]] | None = None
    """Added to the engine's response: a key's x-ratelimit-* headers."""
    adapter: str | None = None
    """The LoRA adapter the request names (app/lora/service.py); None for the base model."""
    tail: Any = None
    """What the response's end still has to tell (usage, an error event): read in the request's
    accounting by its `settle(rec)`, once the response is out (app/proxy/sse.py, response_body.py)."""

    @property
    def id_header(self) -> tuple[bytes, bytes]:
        return (b"x-request-id", self.request_id.encode())

    def fields(self, duration_s: float) -> dict[str, Any]:
        tps = None
        if self.completion_tokens and duration_s > 0:
            tps = round(self.completion_tokens / duration_s, 2)
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": _cut(self.path, MAX_LOGGED_PATH),
            "status": 499 if self.disconnected else self.status,
            "model": _cut(self.model, MAX_LOGGED_MODEL),
            "stream": self.stream,
            "duration_ms": round(duration_s * 1000, 2),
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 2),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_per_second": tps,
            "modalities": self.modalities,
            "adapter": _cut(self.adapter, MAX_LOGGED_MODEL),
            "client": self.client,
            "error": _cut(self.error, MAX_LOGGED_ERROR),
            "key": self.key,
            "queued_ms": None if self.queued_s is None else round(self.queued_s * 1000, 2),
            **({"prompt": self.prompt} if self.prompt is not None else {}),
            **({"batch_id": self.batch_id} if self.batch_id is not None else {}),
        }


def _cut(value: str | None, limit: int) -> str | None:
    if value is None or len(value) <= limit:
        return value
    return f"{value[:limit]}...<{len(value) - limit} more chars>"


_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's `X-Request-ID` when it is a sane token, else a new one: a random per-process
    prefix and a counter (unique across replicas, and cheaper than a uuid4 per request)."""
    given = get_header(headers, b"x-request-id")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given.decode()
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


class RequestContextMiddleware:
    """Classifies the path (app/routes.py) once for everyone after it. The proxy's own routes get
    `send` wrapped to set `rec.status` and add `x-request-id`; every other request's app does that
    itself (the pass-through sends up to one message per streamed token: wrapping `send` would cost
    a call each)."""

    def __init__(
        self,
        app: Any,
        runtime: Runtime,
        on_finished: Callable[[RequestRecord, int], None] | None = None,
        models: Any = None,
    ) -> None:
        self.app = app
        self.runtime = runtime
        self.on_finished = on_finished
        """Called with each counted request's record and final status (app/usage.py: usage per key)."""
        self.models = models
        """What the engine serves (app/lora/service.py): the metric `model` label's values, and
        the per-adapter counters."""
        self._ended: list[tuple[RequestRecord, float]] = []
        """Requests ended in this event-loop iteration, for `account`."""

    def account(self) -> None:
        """Metrics, usage and the log line of every request that ended since the last call.

        Run once per event-loop iteration for all the requests that ended in it, not at each one's
        end: the same work costs much less done in one run (bench/RESULTS.md), and nobody waits
        for it (the response is out). Also run before the app's shutdown, so the last
        requests are counted before usage is written."""
        ended, self._ended = self._ended, []
        models, on_finished = self.models, self.on_finished
        served = models.served if models is not None else None
        for rec, duration in ended:
            try:
                if (tail := rec.tail) is not None:
                    rec.tail = None
                    tail.settle(rec)
                observe(rec, duration, served)
                if rec.adapter is not None and models is not None:
                    models.record(rec, duration)
                if on_finished is not None:
                    on_finished(rec, 499 if rec.disconnected else rec.status)
            except Exception:  # accounting must never cost a request its log line, nor the others theirs
                _log.exception("request accounting failed", path=rec.path, request_id=rec.request_id)
            logs.request_line(rec.fields(duration))

    def _ended_soon(self, rec: RequestRecord, duration: float) -> None:
        self._ended.append((rec, duration))
        if len(self._ended) == 1:
            asyncio.get_running_loop().call_soon(self.account)

    def _accounting_first(self, receive: Any) -> Any:
        """The lifespan's `receive`: the requests that ended are accounted before shutdown begins."""

        async def wrapped() -> dict:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                self.account()
            return message

        return wrapped

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                receive = self._accounting_first(receive)
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope["headers"])
        client = scope.get("client")
        rec = RequestRecord(
            request_id=rid,
            method=scope["method"],
            path=scope["path"],
            client=f"{client[0]}:{client[1]}" if client else None,
            batch_id=scope.get(BATCH_KEY),
        )
        rec.route = route = classify(rec.path)
        scope[RECORD_KEY] = rec
        bound = logs.REQUEST_ID.set(rid)
        quiet = route is not None and route.quiet
        if not quiet:
            self.runtime.request_started()
            metrics.IN_FLIGHT.inc()

        if route is None or route.kind not in ANSWERED:
            inner_send = send
        else:

            async def inner_send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    rec.status = message["status"]
                    message["headers"] = [*message.get("headers", ()), rec.id_header]
                await send(message)

        try:
            await self.app(scope, receive, inner_send)
        except Exception as exc:  # the inner app failed: one 500, logged with its traceback
            rec.error = rec.error or f"internal error: {exc.__class__.__name__}"
            _log.exception("unhandled error", path=rec.path)
            if rec.status == 0:
                await send_with_id_safe(send, rec)
        finally:
            duration = time.perf_counter() - rec.start
            if (refused := scope.get(REFUSED_KEY)) is not None:
                rec.status, rec.error = refused
                rec.disconnected = False
                rec.tail = None
            if not quiet:
                self.runtime.request_finished()
                metrics.IN_FLIGHT.dec()
                self._ended_soon(rec, duration)
            else:
                _log.debug("request", **rec.fields(duration))
            logs.REQUEST_ID.reset(bound)


async def send_with_id_safe(send: Any, rec: RequestRecord) -> None:
    rec.status = 500
    try:
        await send_error(
            send, 500, "internal error in the proxy", code="internal_error", headers=[rec.id_header]
        )
    except Exception:  # the connection is gone; the log line says what happened
        pass


_children: dict[tuple[str, str, int], tuple[Any, ...]] = {}


def _series(route: str, model: str, status: int) -> tuple[Any, ...]:
    """The labelled children for one (route, model, status), looked up once: `labels()` takes a
    lock and builds a key every call."""
    key = (route, model, status)
    found = _children.get(key)
    if found is None:
        found = _children[key] = (
            metrics.REQUESTS.labels(route, model, str(status)),
            metrics.REQUEST_DURATION.labels(route, model),
            metrics.TTFT.labels(route, model),
            metrics.PROMPT_TOKENS.labels(model),
            metrics.COMPLETION_TOKENS.labels(model),
            metrics.TOKENS_PER_SECOND.labels(model),
        )
    return found


def observe(rec: RequestRecord, duration: float, served: frozenset[str] | None = None) -> None:
    """`served`: every name the engine serves (base model and LoRA adapters, app/lora/service.py),
    when known: then the `model` label is the served name the request used, whatever its status
    (errors per adapter); any other name is "". Unknown: only a request the engine accepted names a
    model label. Either way clients cannot mint label values."""
    status = 499 if rec.disconnected else rec.status
    if served is not None:
        name = rec.adapter or rec.model
        model = name if name in served else ""
    else:
        model = (
            rec.model if (rec.model and 200 <= status < 400 and len(rec.model) <= MAX_LOGGED_MODEL) else ""
        )
    requests, latency, ttft, prompt, completion, tps = _series(route_label(rec.route), model, status)
    requests.inc()
    latency.observe(duration)
    if rec.ttft_s is not None:
        ttft.observe(rec.ttft_s)
    if rec.prompt_tokens:
        prompt.inc(rec.prompt_tokens)
    if rec.completion_tokens:
        completion.inc(rec.completion_tokens)
        if duration > 0:
            tps.observe(rec.completion_tokens / duration)
    for modality, n in rec.modalities.items():
        metrics.REQUEST_PARTS.labels(modality).inc(n)
