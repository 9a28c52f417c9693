"""The ASGI application: the proxy's own routes on FastAPI, the engine's passed to the engine.

    request -> RequestContextMiddleware -> local routes (/health /ping /info /metrics ...): FastAPI
               (classifies the path:       -> engine and admin routes: ProxyHandler (plain ASGI)
                app/routes.py)             -> anything else: 400 or 404 from the dispatcher

The pass-through is dispatched by the route table's exact lookup rather than through FastAPI's
router, so the hot path pays for no framework. FastAPI's own docs routes are off: `/docs` and
`/openapi.json` are the engine's, which describe the whole OpenAI API.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware.cors import CORSMiddleware

from app import __version__, dashboard, keys, metrics, usage, workers
from app.admission import Admission
from app.batch import BatchService
from app.engines import engine_for
from app.errors import send_error
from app.keys import KeyRing
from app.lora.service import LoraService
from app.middleware import RECORD_KEY, RequestContextMiddleware, RequestRecord
from app.proxy.handler import ProxyHandler
from app.proxy.upstream import Upstream, UpstreamError
from app.routes import ADMIN_KEY, ANSWERED, BAD_PATH, BATCH, KEY_OR_ADMIN, METRICS_KEY, OPEN, PROXIED
from app.runtime import Phase, Runtime
from app.security import (
    SEVERAL_AUTHORIZATION,
    MediaGuard,
    authorization,
    bearer,
    mask_url_userinfo,
    matches,
)
from app.settings import Settings

HEALTH_TIMEOUT = 5.0


class Dispatcher:
    """Sends each request where the route table (app/routes.py) says: the proxy's own routes
    (after their key check) to FastAPI or the Batch API, engine routes to the pass-through,
    anything else a 400 (a path that could be routed differently than it was checked) or a 404,
    never to the engine."""

    def __init__(
        self,
        local: Any,
        proxy: Any,
        keyring: KeyRing,
        metrics_key: bytes | None,
        batch: Any,
        admin_key: bytes | None = None,
    ) -> None:
        self.local = local
        self.proxy = proxy
        self.keyring = keyring
        self.metrics_key = metrics_key
        self.batch = batch
        self.admin_key = admin_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.local(scope, receive, send)
            return
        rec: RequestRecord = scope[RECORD_KEY]
        route = rec.route
        if route is not None and route.kind in PROXIED:
            await self.proxy(scope, receive, send)
            return
        if route is None or route.kind not in ANSWERED:
            await refuse_path(scope["path"], rec, send)
            return
        if route.auth != OPEN:
            auth, several = authorization(scope["headers"])
            if several:
                await send_error(send, 400, SEVERAL_AUTHORIZATION, code="invalid_authorization")
                return
            if route.auth == ADMIN_KEY:  # the proxy's own admin routes (LoRA): 403, like the proxied ones
                if self.admin_key is None or not matches(bearer(auth), (self.admin_key,)):
                    rec.error = "admin route refused"
                    await send_error(
                        send,
                        403,
                        f"{route.path} is an admin route: it needs `Authorization: Bearer <ADMIN_API_KEY>`"
                        + ("." if self.admin_key else ", and ADMIN_API_KEY is not set on this server."),
                        code="admin_route",
                    )
                    return
                rec.key = keys.ADMIN
                await self.local(scope, receive, send)
                return
            if route.auth == METRICS_KEY:
                refused = self.metrics_key is not None and not matches(bearer(auth), (self.metrics_key,))
                which = "METRICS_API_KEY"
            else:  # API_KEY, KEY_OR_ADMIN: the caller's name is the request's `key`
                rec.key = self.caller(bearer(auth), route.auth)
                refused, which = rec.key is None, "API key"
            if refused:
                await send_error(
                    send,
                    401,
                    f"Missing or invalid {which}: send `Authorization: Bearer <key>`.",
                    code="invalid_api_key",
                    headers=[(b"www-authenticate", b"Bearer")],
                )
                return
        await (self.batch if route.kind == BATCH else self.local)(scope, receive, send)

    def caller(self, token: bytes | None, auth: str) -> str | None:
        """The name of the key a local route is called with; None: refused."""
        if auth == KEY_OR_ADMIN and self.admin_key is not None and matches(token, (self.admin_key,)):
            return keys.ADMIN
        if not self.keyring.active:
            return keys.ANONYMOUS
        entry = self.keyring.identify(token)
        return entry.name if entry is not None and not entry.expired() else None


async def refuse_path(path: str, rec: RequestRecord, send: Any) -> None:
    """400 for a path holding what only percent-encoding can put there, 404 for an unknown one."""
    rec.status = 400 if BAD_PATH.search(path) else 404
    if rec.status == 400:
        rec.error = "path refused"
        message = "The request path holds a control character, space, `?` or `#` (percent-encoded)."
        code = "invalid_path"
    else:
        rec.error = "unknown route"
        message = "Unknown route: this server serves the OpenAI-compatible API (see /docs)."
        code = "not_found"
    await send_error(send, rec.status, message, code=code, headers=[rec.id_header])


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> Any:
    """Build the app. Without a runtime (tests, a proxy in front of a running engine), the engine
    is taken as ready."""
    settings = settings or Settings()
    if runtime is None:
        runtime = Runtime()
        runtime.set_phase(Phase.READY)
    engine = engine_for(settings)
    # API keys, admission control and usage per key (app/keys.py, app/admission.py, app/usage.py)
    keyring = KeyRing(
        settings.API_KEY.get_secret_value() if settings.API_KEY else None, settings.API_KEY_FILE
    )
    runtime.reloaders.append(keyring.reload)  # SIGHUP (the launcher)
    # With several proxy processes each enforces its share of every limit (app/admission.py).
    worker = workers.current()
    admission = Admission(
        settings.MAX_CONCURRENT_REQUESTS,
        settings.MAX_QUEUED_REQUESTS,
        settings.QUEUE_TIMEOUT,
        share=worker[1] if worker else 1,
    )
    accounting = usage.Accounting(usage.open_usage(settings), admission)
    admin_key = settings.ADMIN_API_KEY.get_secret_value().encode() if settings.ADMIN_API_KEY else None
    proxy = ProxyHandler(
        runtime=runtime,
        max_request_bytes=settings.MAX_REQUEST_BYTES,
        keyring=keyring,
        admission=admission,
        default_model=settings.served_model_name,
        admin_key=admin_key,
        media=MediaGuard(settings.media_domains, allow_private=settings.ALLOW_PRIVATE_MEDIA_URLS),
        sse_keepalive=settings.SSE_KEEPALIVE_INTERVAL,
        log_prompts=settings.LOG_PROMPTS,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        upstream = Upstream(
            settings.engine_url,
            connect_timeout=settings.UPSTREAM_CONNECT_TIMEOUT,
            first_byte_timeout=settings.UPSTREAM_FIRST_BYTE_TIMEOUT,
            idle_timeout=settings.UPSTREAM_IDLE_TIMEOUT,
        )
        await upstream.open()
        proxy.upstream = upstream
        try:
            yield
        finally:
            proxy.upstream = None
            await upstream.close()

    api = FastAPI(
        title="vLLM Inference API",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    api.state.settings = settings
    api.state.runtime = runtime
    metrics_key = settings.METRICS_API_KEY.get_secret_value().encode() if settings.METRICS_API_KEY else None

    async def engine_check() -> tuple[bool, str]:
        """(healthy, detail): the launcher's view of the engine, then the engine's own /health."""
        if runtime.phase is not Phase.READY:
            return False, runtime.detail
        assert proxy.upstream is not None
        try:
            status, _ = await proxy.upstream.get(engine.health_path, timeout=HEALTH_TIMEOUT)
        except UpstreamError as exc:
            return False, f"engine health check failed: {exc}"
        if status != 200:
            return False, f"engine health check answered {status}"
        return True, "ready"

    @api.get("/health")
    async def health() -> Response:
        """200 once the engine answers; 503 while starting, draining, or after it stopped."""
        ok, detail = await engine_check()
        body = {
            "status": "ready"
            if ok
            else ("unhealthy" if runtime.phase is Phase.READY else runtime.phase.value),
            "detail": detail,
            "model": settings.served_model_name,
            "in_flight": runtime.inflight,
            "uptime_s": round(time.time() - runtime.started_at, 1),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @api.get("/ping")
    async def ping() -> Response:
        """RunPod's load-balancer convention: 200 ready, 204 initializing, 503 unhealthy."""
        ok, _ = await engine_check()
        if ok:
            return JSONResponse({"status": "healthy"})
        if runtime.phase is Phase.STARTING:
            return Response(status_code=204)
        return JSONResponse({"status": runtime.phase.value}, status_code=503)

    @api.get("/info")
    async def info() -> dict:
        """What is being served, on what, and how the engine was started."""
        return {
            "model": settings.MODEL_NAME,
            "served_model_name": settings.served_model_name,
            "model_path": runtime.model_path,
            "status": runtime.phase.value,
            "detail": runtime.detail,
            "engine": {
                "name": engine.name,
                "version": runtime.engine_version,
                "url": mask_url_userinfo(settings.engine_url),
                "command": runtime.engine_command,
            },
            "device": settings.DEVICE,
            "gpus": runtime.gpus,
            "profile": runtime.profile,
            "startup_s": runtime.startup,
            "caches": runtime.caches,
            "uptime_s": round(time.time() - runtime.started_at, 1),
            "proxy_version": __version__,
        }

    @api.get("/metrics")
    async def metrics_endpoint() -> Response:
        """The proxy's metrics, then the engine's own `vllm:*` families: one scrape per replica.
        METRICS_API_KEY is checked by the dispatcher (the route table says who may call what)."""
        own = generate_latest(metrics.REGISTRY)
        engine_text = b""
        if runtime.phase in (Phase.READY, Phase.DRAINING) and proxy.upstream is not None:
            try:
                status, text = await proxy.upstream.get(engine.metrics_path, timeout=HEALTH_TIMEOUT)
                if status == 200:
                    engine_text = engine.select_metrics(text)
            except UpstreamError:
                pass
        return Response(own + engine_text, media_type=CONTENT_TYPE_LATEST)

    dashboard.register(api, settings, runtime, engine, proxy)
    usage.register(api, keyring, admission, accounting.usage, tasks=[keyring.watch])
    batch = BatchService(settings, runtime, keyring.secrets())
    batch.register(api)  # the batch store and runner live in the app's lifespan
    # LoRA adapters (app/lora/): admin routes, GET /v1/lora_adapters, what the engine serves.
    lora = LoraService(settings, runtime, proxy)
    lora.register(api)
    proxy.models = lora
    app: Any = RequestContextMiddleware(
        Dispatcher(api, proxy, keyring, metrics_key, batch, admin_key),
        runtime,
        accounting.finished,
        models=lora,
    )
    batch.pipeline = app  # batch lines take the live requests' path: log line, metrics, keys, proxy
    origins = [o.strip() for o in settings.CORS_ALLOW_ORIGINS.split(",") if o.strip()]
    if origins:  # off by default; the engine's own CORS headers are always dropped by the proxy
        app = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id", *usage.RATE_HEADERS],
        )
    return app
