"""The ASGI application: the proxy's own routes on FastAPI, everything else passed to the engine.

    request -> RequestContextMiddleware -> /health /ping /info /metrics: FastAPI
                                        -> any other path: ProxyHandler (plain ASGI, no routing)

The pass-through is dispatched by an exact path lookup rather than through FastAPI's router, so the
hot path pays for no framework. FastAPI's own docs routes are off: `/docs` and `/openapi.json` are
the engine's, which describe the whole OpenAI API.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware.cors import CORSMiddleware

from app import __version__, dashboard, metrics
from app.engines import engine_for
from app.errors import send_error
from app.middleware import RequestContextMiddleware
from app.proxy.handler import ProxyHandler
from app.proxy.headers import get_header
from app.proxy.upstream import Upstream, UpstreamError
from app.runtime import Phase, Runtime
from app.security import MediaGuard, bearer, load_keys, matches
from app.settings import Settings

LOCAL_PATHS = frozenset({"/health", "/ping", "/info", "/metrics"}) | dashboard.PATHS
LOCAL_PREFIX = dashboard.PREFIX
HEALTH_TIMEOUT = 5.0


KEYED_LOCAL_PATHS = frozenset({"/info"})
"""Local routes that need an API key when keys are set (probes stay open)."""


class Dispatcher:
    def __init__(self, local: Any, proxy: Any, keys: list[bytes]) -> None:
        self.local = local
        self.proxy = proxy
        self.keys = keys

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path not in LOCAL_PATHS and not path.startswith(LOCAL_PREFIX):
                await self.proxy(scope, receive, send)
                return
            if self.keys and path in KEYED_LOCAL_PATHS:
                headers = scope["headers"]
                if not matches(bearer(get_header(headers, b"authorization")), self.keys):
                    await send_error(send, 401, "Missing or invalid API key.", code="invalid_api_key")
                    return
        await self.local(scope, receive, send)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> Any:
    """Build the app. Without a runtime (tests, a proxy in front of a running engine), the engine
    is taken as ready."""
    settings = settings or Settings()
    if runtime is None:
        runtime = Runtime()
        runtime.set_phase(Phase.READY)
    engine = engine_for(settings)
    keys = load_keys(settings.API_KEY.get_secret_value() if settings.API_KEY else None, settings.API_KEY_FILE)
    proxy = ProxyHandler(
        runtime=runtime,
        max_request_bytes=settings.MAX_REQUEST_BYTES,
        api_keys=keys,
        admin_key=settings.ADMIN_API_KEY.get_secret_value().encode() if settings.ADMIN_API_KEY else None,
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
    metrics_key = settings.METRICS_API_KEY.get_secret_value() if settings.METRICS_API_KEY else None

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
                "url": settings.engine_url,
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
    async def metrics_endpoint(request: Request) -> Response:
        """The proxy's metrics, then the engine's own `vllm:*` families: one scrape per replica."""
        if not dashboard.authorized(request, metrics_key):
            return dashboard.unauthorized()
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
    app: Any = RequestContextMiddleware(
        Dispatcher(api, proxy, keys),
        runtime,
        self_headed=lambda path: path not in LOCAL_PATHS and not path.startswith(LOCAL_PREFIX),
    )
    origins = [o.strip() for o in settings.CORS_ALLOW_ORIGINS.split(",") if o.strip()]
    if origins:  # off by default; the engine's own CORS headers are always dropped by the proxy
        app = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
        )
    return app
