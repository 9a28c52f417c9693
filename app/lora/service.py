"""LoRA adapters inside the proxy: what the engine serves, the admin routes, per-adapter counters.

    GET  /v1/lora_adapters         every adapter known: name, source, base, rank, origin, loaded,
                                   loaded_at, requests, tokens, errors, last used (an API key)
    POST /v1/load_lora_adapter     checked here first (same checks as at start; a Hugging Face id or
                                   s3:// downloaded like the model), then passed to the engine
    POST /v1/unload_lora_adapter   passed to the engine (vLLM drops the name; it does not free the
                                   adapter's memory until its cache evicts it)

The truth is the engine's: after every load and unload, at ready and every LORA_SCAN_INTERVAL, the
proxy reads the engine's `/v1/models` (adapters are the cards with a `parent`); `GET
/v1/lora_adapters` reads it again before it answers. The names in it are the only values the
request metrics' `model` label takes (app/middleware.py), so made-up names cannot grow `/metrics`.

What the proxy changes: the engine gets the local folder as `lora_path` (the load route's body is
re-serialised from the checked object with that path), and a request whose `model` is
`<base>:<adapter>` (vllm_mxext's form) is sent with `model` set to the adapter's name: its body is
re-serialised from the JSON the proxy parsed (`json.loads`/`json.dumps`: the same value, in
different bytes); the response says what the engine says (the adapter's name). A request for a
known adapter that is not loaded (LORA_CONFIG outside auto_load, a LORA_DIR folder added since the
last scan) loads it first, when runtime loading is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from app import metrics
from app.engines.base import split_extra_args
from app.errors import error_body
from app.logs import get_logger
from app.lora.adapter import LoraError, check_folder
from app.lora.config import CONFIG, DIR, ENGINE, RUNTIME, AdapterSpec, env_flag, resolve_source, wanted
from app.proxy.upstream import UpstreamError
from app.runtime import Phase, extend_lifespan

log = get_logger("app.lora")

MODELS_TIMEOUT = 10.0
LOAD_TIMEOUT = 300.0
_JSON = [(b"content-type", b"application/json")]


# vLLM's request bodies (vllm/entrypoints/serve/lora/protocol.py), read with the same pydantic rules.
class LoadRequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False


class UnloadRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


@dataclass
class Entry:
    name: str
    source: str | None
    path: str | None
    origin: str
    base_model: str | None = None
    rank: int | None = None
    description: str | None = None
    loaded: bool = False
    loaded_at: float | None = None
    unloaded: bool = False
    """Unloaded by the admin route: not loaded again on first use or by the folder scan."""
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    last_used: float | None = None

    def public(self, parent: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "loaded": self.loaded,
            "origin": self.origin,
            "source": self.source,
            "path": self.path,
            "parent": parent,
            "base_model": self.base_model,
            "rank": self.rank,
            "description": self.description,
            "loaded_at": _iso(self.loaded_at),
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "errors": self.errors,
            "last_used": _iso(self.last_used),
        }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _error(status: int, message: str, code: str, param: str | None = None) -> Response:
    return Response(
        error_body(status, message, code=code, param=param), status, media_type="application/json"
    )


def rewrite_model(body: bytes, name: str) -> bytes:
    """The body with `model` set to `name`, re-serialised from the value the engine would parse."""
    obj = json.loads(body)
    obj["model"] = name
    return json.dumps(obj, ensure_ascii=False).encode()


def folder_signature(path: Path) -> tuple | None:
    """What a folder holds (names, sizes, mtimes): unchanged between two scans means copied whole."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()))
    except OSError:
        return None


class LoraService:
    def __init__(self, settings: Any, runtime: Any, proxy: Any) -> None:
        self.settings = settings
        self.runtime = runtime
        self.proxy = proxy
        self.base: str = settings.served_model_name
        self.on = wanted(settings) or "--enable-lora" in split_extra_args(settings.ENGINE_EXTRA_ARGS)
        self.adapters: dict[str, Entry] = {}
        self.loaded: frozenset[str] = frozenset()
        """The adapters the engine serves (its /v1/models cards with a parent)."""
        self.served: frozenset[str] | None = None
        """Every name the engine serves, base model(s) included; None until first read (and when
        LoRA is off: the metrics then keep their older rule)."""
        self._planned = False
        self._loading: dict[str, asyncio.Future] = {}
        self._seen: dict[str, tuple | None] = {}
        self._refused: dict[str, tuple | None] = {}
        self._lock: asyncio.Lock | None = None

    # --- what the engine serves ---------------------------------------------------------------

    @property
    def plan(self) -> Any:
        return self.runtime.lora

    @property
    def runtime_loading(self) -> bool | None:
        """Whether the engine loads adapters at run time; None: not known (an external engine)."""
        engine = self.settings.ENGINE
        if engine == "trtllm":
            return False
        if engine == "external":
            return None
        plan = self.plan
        return bool((plan is not None and plan.dynamic) or env_flag("VLLM_ALLOW_RUNTIME_LORA_UPDATING"))

    @property
    def max_rank(self) -> int | None:
        plan = self.plan
        return plan.max_lora_rank if plan is not None else self.settings.MAX_LORA_RANK

    def _import_plan(self) -> None:
        """The launcher's plan: every configured adapter, loaded or not yet."""
        plan = self.plan
        if self._planned or plan is None:
            return
        self._planned = True
        for spec in plan.adapters:
            self.adapters[spec.name] = self._entry(spec)

    @staticmethod
    def _entry(spec: AdapterSpec) -> Entry:
        info = spec.info
        return Entry(
            name=spec.name,
            source=spec.source,
            path=spec.path,
            origin=spec.origin,
            base_model=info.base_model if info else spec.base_model_name,
            rank=info.rank if info else None,
            description=spec.description,
        )

    async def refresh(self) -> bool:
        """Read the engine's /v1/models; False when it cannot be read (then nothing changes)."""
        upstream = self.proxy.upstream
        if upstream is None:
            return False
        try:
            status, body = await upstream.get("/v1/models", timeout=MODELS_TIMEOUT)
            cards = orjson.loads(body)["data"] if status == 200 else None
        except (UpstreamError, orjson.JSONDecodeError, KeyError, TypeError):
            cards = None
        if not isinstance(cards, list):
            return False
        self._import_plan()
        names, adapters = set(), {}
        for card in cards:
            if isinstance(card, dict) and isinstance(card.get("id"), str):
                names.add(card["id"])
                if card.get("parent"):
                    adapters[card["id"]] = card.get("root")
        now = time.time()
        for name, root in adapters.items():
            entry = self.adapters.get(name)
            if entry is None:  # loaded around the proxy: ENGINE_EXTRA_ARGS, SageMaker's /adapters
                entry = self.adapters[name] = Entry(name, root, root, ENGINE)
                with contextlib.suppress(LoraError, TypeError):
                    info = check_folder(root, name)
                    entry.rank, entry.base_model = info.rank, info.base_model
            if not entry.loaded:
                entry.loaded, entry.loaded_at, entry.unloaded = True, now, False
        for entry in self.adapters.values():
            if entry.loaded and entry.name not in adapters:
                entry.loaded = False
        self.loaded = frozenset(adapters)
        self.served = frozenset(names)
        metrics.LORA_ADAPTERS_LOADED.set(len(adapters))
        return True

    # --- requests -----------------------------------------------------------------------------

    async def prepare(self, info: Any, rec: Any) -> bytes | None:
        """For a request naming a model other than the base one: the adapter it names (log line,
        counters), loaded first if it is known but not loaded; the body to send when `model` had
        to change (`<base>:<adapter>`), else None."""
        model: str = info.model
        if model in self.loaded:
            rec.adapter = model
            return None
        if self.served is not None and model in self.served:
            return None
        name = model[len(self.base) + 1 :] if model.startswith(self.base + ":") else model
        if name not in self.loaded and self._loads_on_use(name):
            await self.ensure_loaded(name)
        if name in self.loaded or name in self.adapters:
            rec.adapter = name
        if name != model and name in self.loaded:
            return rewrite_model(info.body, name)
        return None

    def record(self, rec: Any, duration: float) -> None:
        """Per-adapter counters, from the request's log record."""
        entry = self.adapters.get(rec.adapter)
        if entry is None:
            return
        status = 499 if rec.disconnected else rec.status
        entry.requests += 1
        entry.prompt_tokens += rec.prompt_tokens or 0
        entry.completion_tokens += rec.completion_tokens or 0
        if status >= 400 and status != 499:
            entry.errors += 1
        entry.last_used = time.time()

    def _dir_folder(self, name: str) -> Path | None:
        plan = self.plan
        lora_dir = plan.lora_dir if plan is not None else None
        if not lora_dir or name.startswith(".") or "/" in name or "\\" in name or "\x00" in name:
            return None
        folder = Path(lora_dir) / name
        return folder if (folder / "adapter_config.json").is_file() else None

    def _loads_on_use(self, name: str) -> bool:
        if not self.runtime_loading:
            return False
        entry = self.adapters.get(name)
        if entry is not None:
            return not entry.unloaded and entry.origin in (CONFIG, DIR) and entry.path is not None
        folder = self._dir_folder(name)
        # A folder that failed its check is tried again only once it changed (no log per request).
        return folder is not None and self._refused.get(name, ()) != folder_signature(folder)

    async def ensure_loaded(self, name: str) -> None:
        """Load a known adapter (or a new LORA_DIR folder) once, however many requests wait."""
        task = self._loading.get(name)
        if task is None:
            task = self._loading[name] = asyncio.ensure_future(self._load_known(name))
            task.add_done_callback(lambda _: self._loading.pop(name, None))
        with contextlib.suppress(Exception):
            await asyncio.shield(task)  # a client hanging up does not cancel the load

    async def _load_known(self, name: str) -> bool:
        entry = self.adapters.get(name)
        if entry is None:
            folder = self._dir_folder(name)
            if folder is None:
                return False
            entry = Entry(name, str(folder), str(folder), DIR)
        try:
            info = await asyncio.to_thread(check_folder, entry.path, name, self.max_rank)
        except LoraError as exc:
            log.warning("lora adapter not loaded", adapter=name, error=str(exc))
            if entry.origin == DIR:
                self._refused[name] = folder_signature(Path(entry.path))
            return False
        entry.rank, entry.base_model = info.rank, info.base_model
        status, _, body = await self._engine_post(
            "/v1/load_lora_adapter", {"lora_name": name, "lora_path": entry.path}
        )
        if status != 200:
            log.warning(
                "lora adapter not loaded",
                adapter=name,
                status=status,
                error=body[:300].decode("utf-8", "replace"),
            )
            return False
        self.adapters.setdefault(name, entry)
        log.info("lora adapter loaded", adapter=name, origin=entry.origin, path=entry.path, rank=entry.rank)
        await self.refresh()
        return True

    async def _engine_post(self, path: str, payload: dict[str, Any]) -> tuple[int, bytes, bytes]:
        """(status, content type, body) of a POST to the engine; 502/504 OpenAI-shaped on failure."""
        upstream = self.proxy.upstream
        if upstream is None:
            return (
                503,
                b"application/json",
                error_body(503, "The engine is not running.", code="engine_unavailable"),
            )
        try:
            resp = await upstream.request(
                "POST", path, list(_JSON), json.dumps(payload).encode(), timeout=LOAD_TIMEOUT
            )
            body = await resp.body_then_release()
        except UpstreamError as exc:
            metrics.UPSTREAM_ERRORS.labels(exc.kind).inc()
            status = 504 if exc.kind == "timeout" else 502
            return (
                status,
                b"application/json",
                error_body(status, f"Upstream engine error: {exc}", code="engine_error"),
            )
        ctype = next((v for k, v in resp.headers if k == b"content-type"), b"text/plain")
        return resp.status, ctype, body

    # --- the folder scan ----------------------------------------------------------------------

    async def scan(self) -> None:
        """LORA_DIR with runtime loading: load folders that appeared, once they hold an adapter and
        did not change since the previous scan (a folder still being copied waits)."""
        plan = self.plan
        if plan is None or not plan.lora_dir or not self.runtime_loading:
            return
        try:
            folders = [p for p in Path(plan.lora_dir).iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            return
        for folder in sorted(folders):
            name = folder.name
            entry = self.adapters.get(name)
            if name in self.loaded or name in self._loading or (entry is not None and entry.unloaded):
                continue
            if entry is not None and entry.origin != DIR:
                continue  # a configured adapter of the same name wins
            signature = folder_signature(folder)
            previous, self._seen[name] = self._seen.get(name), signature
            if signature is None or signature != previous or self._refused.get(name) == signature:
                continue
            await self.ensure_loaded(name)
            if name not in self.loaded:
                self._refused[name] = signature  # logged once; tried again when the folder changes

    async def run(self) -> None:
        """From ready on: what the engine serves, then every LORA_SCAN_INTERVAL the folder scan
        and /v1/models again (changes made around the proxy)."""
        while self.runtime.phase is not Phase.READY or self.proxy.upstream is None:
            await asyncio.sleep(0.2)
        await self.refresh()
        interval = self.settings.LORA_SCAN_INTERVAL
        while True:
            await asyncio.sleep(interval)
            if self.runtime.phase is not Phase.READY:
                continue
            try:
                await self.scan()
                await self.refresh()
            except Exception as exc:  # a failing look never stops the loop
                log.warning("lora scan failed", error=f"{exc.__class__.__name__}: {exc}")

    # --- routes -------------------------------------------------------------------------------

    def register(self, api: FastAPI) -> None:
        service = self
        extend_lifespan(api, tasks=lambda: [service.run()] if service.on else [])

        @api.get("/v1/lora_adapters")
        async def list_adapters() -> Response:
            """Every adapter known, checked against the engine's /v1/models first."""
            fresh = (
                await service.refresh() if service.runtime.phase in (Phase.READY, Phase.DRAINING) else False
            )
            plan = service.plan
            body = {
                "object": "list",
                "base_model": service.base,
                "engine_checked": fresh,
                "runtime_loading": service.runtime_loading,
                "max_lora_rank": service.max_rank,
                "lora_dir": plan.lora_dir if plan is not None else None,
                "data": [e.public(service.base) for _, e in sorted(service.adapters.items())],
            }
            return JSONResponse(body, headers={"cache-control": "no-store"})

        @api.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Response:
            return await service._admin(request, load=True)

        @api.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Response:
            return await service._admin(request, load=False)

    async def _admin(self, request: Request, load: bool) -> Response:
        if not self.runtime.accepting:
            return _error(
                503,
                f"The engine is not serving ({self.runtime.detail}); retry shortly.",
                "engine_unavailable",
            )
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":  # vLLM's validate_json_request
            return _error(
                400, "Unsupported Media Type: Only 'application/json' is allowed.", "invalid_request"
            )
        try:
            payload = (LoadRequest if load else UnloadRequest).model_validate_json(await request.body())
        except ValidationError as exc:
            message = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
            return _error(400, f"Invalid request: {message}.", "invalid_request")
        name = payload.lora_name
        if self.runtime_loading is False:
            return _error(
                404,
                "Runtime LoRA loading is off on this server: start it with LORA_DYNAMIC=true "
                + ("(vLLM only)." if self.settings.ENGINE == "trtllm" else "(and ADMIN_API_KEY)."),
                "lora_runtime_loading_off",
            )
        if not load:
            status, ctype_b, body = await self._engine_post(
                "/v1/unload_lora_adapter", payload.model_dump(exclude_none=True)
            )
            if status == 200:
                entry = self.adapters.get(name)
                if entry is not None:
                    entry.unloaded = True
                log.info("lora adapter unloaded", adapter=name)
                await self.refresh()
            return Response(body, status, media_type=ctype_b.decode("latin-1"))
        if name and name == self.base:  # vLLM's own check, before anything is downloaded
            return _error(
                400, f"The lora adapter '{name}' conflicts with a served base model.", "invalid_request"
            )
        if not name or not payload.lora_path:
            return _error(400, "Both 'lora_name' and 'lora_path' must be provided.", "invalid_request")
        spec = AdapterSpec(name, payload.lora_path, RUNTIME)
        try:
            spec.path = await asyncio.to_thread(resolve_source, spec, self.settings)
            spec.info = await asyncio.to_thread(check_folder, spec.path, name, self.max_rank)
        except LoraError as exc:
            log.warning("lora adapter refused", adapter=name, error=str(exc))
            return _error(400, str(exc), "invalid_lora_adapter", param="lora_path")
        engine_payload = payload.model_dump()
        engine_payload["lora_path"] = spec.path
        status, ctype_b, body = await self._engine_post("/v1/load_lora_adapter", engine_payload)
        if status == 200:
            previous = self.adapters.get(name)
            entry = self._entry(spec)
            if previous is not None:  # keep its counters and how it first came
                entry.origin = previous.origin if previous.origin != ENGINE else RUNTIME
                for field in ("requests", "prompt_tokens", "completion_tokens", "errors", "last_used"):
                    setattr(entry, field, getattr(previous, field))
                entry.description = previous.description
            self.adapters[name] = entry
            log.info(
                "lora adapter loaded",
                adapter=name,
                origin=entry.origin,
                source=spec.source,
                path=spec.path,
                rank=entry.rank,
            )
            await self.refresh()
        return Response(body, status, media_type=ctype_b.decode("latin-1"))
