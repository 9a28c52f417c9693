"""The container's main process (`scripts/start.sh` execs it): check the GPU, resolve the model,
start the engine on loopback, serve the proxy, supervise both, drain on SIGTERM.

    python -m app.launcher

The proxy is up from the first second, so orchestrators see the container's state while the model
downloads and loads (`/ping` 204, `/health` 503, requests 503 with `Retry-After`).

Exit codes: 0 after SIGTERM/SIGINT (drained), 1 when the GPU check, the model, the engine's start
or the engine itself fails (so the orchestrator restarts the container), 2 for invalid settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import shutil
import signal
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from app import cache_dirs, gpu, logs, metrics, preflight, profiles, sources, workers
from app.engine_failures import FailureWatcher, retry_length
from app.engines import engine_for, vllm_flags
from app.engines.base import mask_secrets, split_extra_args
from app.health_port import health_only
from app.logs import configure_from, get_logger, use_console
from app.main import create_app
from app.model import ModelError, looks_like_path, resolve_model
from app.profiles import sizing
from app.profiles.hardware import from_report
from app.proxy import passthrough
from app.proxy.upstream import Upstream, UpstreamError
from app.runtime import Phase, Runtime, run_reloaders
from app.server import ProxyServer, server_config
from app.settings import Settings, load_settings
from app.startup import StartupClock

log = get_logger("app.launcher")

ENGINE_STOP_TIMEOUT = 30.0
LEFTOVER_GRACE = 10.0
POLL_INTERVAL = 0.5
_ENGINE_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False if no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a zombie leader not yet reaped still counts as present
        return True
    return True


def engine_env(environ: dict[str, str] | os._Environ, usage_stats: bool = False) -> dict[str, str]:
    """The engine's environment: ours, with safe defaults the user has not overridden."""
    env = dict(environ)
    env.setdefault("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "0")  # a checked media URL must not redirect
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if not usage_stats:  # vLLM reports usage to stats.vllm.ai unless told not to (USAGE_STATS)
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
    return env


def _die_with_parent() -> None:
    """In the engine's child process: get SIGTERM if the launcher dies, so no orphan engine keeps
    holding GPU memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


async def _first(*aws: Awaitable[Any], keep: tuple[asyncio.Future, ...] = ()) -> asyncio.Future:
    """Wait for the first of several awaitables and return it (as a future); cancel the others,
    except those in `keep`, which belong to the caller and live on."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if task not in keep and not task.done():
                task.cancel()
    return next(t for t in tasks if t in done)


class Launcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = engine_for(settings)
        self.workers = workers.worker_count(settings)
        # Several proxy processes (app/workers.py): the state they share, and the pool.
        self.shared: workers.SharedState | None = None
        self.pool: workers.WorkerPool | None = None
        if self.workers > 1:
            self.shared = workers.SharedState.create()
            self.runtime: Runtime = workers.PublishedRuntime(self.shared, self.workers)
        else:
            self.runtime = Runtime()
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self.server: ProxyServer | None = None
        self.server_task: asyncio.Task | None = None
        self.health_server: ProxyServer | None = None
        self.health_task: asyncio.Task | None = None
        self.pump: asyncio.Future | None = None
        self._console = use_console(settings.LOG_FORMAT)
        self._last_level = "info"
        self.signal_name: str | None = None
        self.user_set = set(settings.model_fields_set)
        """The settings the user gave (they win over a profile's values)."""
        self.clock = StartupClock()
        self.watcher = FailureWatcher()
        self.model_path: str | None = None
        self.facts: Any = None
        self.computed_len: int | None = None
        self.retried = False

    # --- signals ------------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set():
            log.warning("second signal: stopping without waiting", signal=name)
            self.force.set()
        else:
            log.info("signal received: draining", signal=name, in_flight=self.runtime.inflight)
            self.signal_name = name
            self.stop.set()

    def _on_hangup(self) -> None:
        """SIGHUP: the app reloads its API keys (API_KEY_FILE); nothing else changes, nothing is
        dropped."""
        log.info("signal received: reloading API keys", signal="SIGHUP")
        if self.pool is not None:  # the workers hold the keys
            self.pool.signal(signal.SIGHUP)
        run_reloaders(self.runtime.reloaders, log)

    # --- the whole life -----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        try:
            return await self._run()
        finally:
            await self._stop_server()
            await self._stop_engine()
            if self.pump is not None:
                await asyncio.wait([self.pump], timeout=2)
            if self.shared is not None:
                self.shared.close(remove=True)

    async def _run(self) -> int:
        s = self.settings
        with self.clock.phase("gpu_check"):
            report = gpu.probe()
        self.runtime.gpus = report.as_dict()
        # An external engine has its own GPUs: this container needs none.
        problem = gpu.check_device(s.DEVICE, report) if self.engine.build_command else None
        if problem:
            log.error(problem)
            return 1
        cuda = gpu.check_cuda(report, s.CUDA_VERSION, s.ENGINE, s.cuda_compat) if s.DEVICE != "cpu" else None
        if cuda is not None and self.engine.build_command:
            message, fatal = cuda
            if fatal:
                log.error(message)
                return 1
            log.warning(message)
        log.info(
            "device",
            device=s.DEVICE,
            gpus=[f"{g.index}: {g.name} {g.memory_total_mib} MiB" for g in report.gpus],
            driver=report.driver_version,
            driver_cuda=report.cuda_driver_version,
            image_cuda=s.CUDA_VERSION,
            # The per-token relay step: compiled, or its Python stand-in (app/proxy/passthrough.py).
            relay="compiled" if passthrough.COMPILED else "python",
        )

        if not await self._start_server():
            return 1
        if self.engine.build_command is None:
            log.info("fronting an external engine", url=s.engine_url)
            self.runtime.detail = "waiting for the engine"
            self.clock.engine_launched()
            return await self._supervise()

        self._use_cache_dirs()
        # LoRA adapters (app/lora/) are checked before the model is fetched: a bad one fails in
        # seconds, not after a download and an engine start.
        if await self._lora_plan() is None:
            return 1 if not self.stop.is_set() else 0
        self.runtime.detail = "preflight"
        checking = asyncio.ensure_future(self._preflight(report))
        if await _first(checking, self.stop.wait()) is not checking:
            log.info("stopped during the preflight")
            return 0
        expected = checking.result()
        if expected is None:
            return 1
        s = self.settings  # with the profile's values

        self.runtime.detail = "resolving model"
        with self.clock.phase("download"):
            resolving = asyncio.ensure_future(
                asyncio.to_thread(
                    resolve_model,
                    s.MODEL_NAME,
                    revision=s.MODEL_REVISION,
                    token=s.HF_TOKEN.get_secret_value() if s.HF_TOKEN else None,
                    offline=s.HF_HUB_OFFLINE,
                    endpoint=s.HF_ENDPOINT,
                    expected_bytes=expected or None,
                    baked_cache=str(s.BAKED_MODELS_CACHE) if s.BAKED_MODELS_CACHE else None,
                    settings=s,
                )
            )
            if await _first(resolving, self.stop.wait()) is not resolving:
                log.info("stopped before the model was ready")
                return 0
        try:
            model = resolving.result()
        except ModelError as exc:
            log.error(str(exc))
            return 1
        self.runtime.model_path = self.model_path = model.path
        if not await self._launch():
            return 1
        return await self._supervise()

    async def _launch(self) -> bool:
        """Start the engine with the current settings (again, after a failure worth a retry)."""
        s = self.settings
        assert self.model_path is not None
        lora = self.runtime.lora
        argv = self.engine.build_command(s, self.model_path, lora=lora)
        if not self._prepare_engine(argv):
            return False
        self.runtime.engine_command = mask_secrets(argv)
        log.info("starting engine", engine=self.engine.name, command=self.runtime.engine_command)
        self.runtime.detail = "engine loading"
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            env={**engine_env(os.environ, usage_stats=s.USAGE_STATS), **lora.engine_env()},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            limit=2**20,
        )
        log.info("engine started", pid=self.proc.pid)
        self.clock.engine_launched()
        self.watcher.reset()
        self.pump = asyncio.ensure_future(self._pump(self.proc.stdout))
        return True

    async def _lora_plan(self) -> Any:
        """The LoRA start plan (app/lora/config.py): every adapter resolved and checked, or None
        after logging the one sentence that says which adapter is bad (or when stopped)."""
        from app.lora.adapter import LoraError
        from app.lora.config import build_plan

        s = self.settings
        self.runtime.detail = "resolving LoRA adapters"
        planning = asyncio.ensure_future(asyncio.to_thread(build_plan, s))
        if await _first(planning, self.stop.wait()) is not planning:
            log.info("stopped while LoRA adapters were resolved")
            return None
        try:
            plan = planning.result()
        except LoraError as exc:
            log.error(str(exc))
            return None
        for warning in plan.warnings:
            log.warning(warning)
        if plan.enabled:
            log.info(
                "lora",
                adapters={a.name: a.path for a in plan.adapters},
                at_start=[a.name for a in plan.at_start],
                max_lora_rank=plan.max_lora_rank,
                dynamic=plan.dynamic,
            )
        self.runtime.lora = plan
        return plan

    def _engine_exit(self) -> asyncio.Future:
        """Completes with the engine's exit code; never, for an engine the launcher did not start."""
        if self.proc is None:
            return asyncio.get_running_loop().create_future()
        return asyncio.ensure_future(self.proc.wait())

    async def _supervise(self) -> int:
        exited = self._engine_exit()
        ready = asyncio.ensure_future(self._wait_ready())
        first = await _first(ready, exited, self.stop.wait(), self.server_task, keep=(self.server_task,))
        if first is self.server_task:
            log.error("the proxy server stopped unexpectedly")
            return 1
        if first is exited:
            log.error("engine exited during start-up", exit_code=exited.result())
            if await self._retry_start():
                return await self._supervise()
            return 1
        if first is not ready:
            log.info("stopped while the engine was loading")
            return 0
        if not ready.result():
            log.error(
                "engine not healthy in time",
                startup_timeout_s=self.settings.STARTUP_TIMEOUT,
            )
            return 1

        self.clock.engine_ready()
        self.runtime.startup = self.clock.as_dict()
        for phase, seconds in self.runtime.startup.items():
            metrics.STARTUP_SECONDS.labels(phase).set(seconds)
        self.runtime.engine_version = await self._engine_version()
        # Everything alive now lives as long as the process: keep it out of the collector's full
        # passes, which otherwise rescan ~60k start-up objects every few thousand requests. The
        # hot path frees its objects by reference counting and makes few cycles, so young
        # collections can be rarer too (measured: ~7% less CPU per proxied request).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        self.runtime.set_phase(Phase.READY)
        log.info(
            "ready",
            url=f"http://{self.settings.HOST}:{self.settings.PORT}",
            model=self.settings.served_model_name,
            engine_version=self.runtime.engine_version,
            startup_s=self.runtime.startup,
        )

        exited = self._engine_exit()
        first = await _first(exited, self.stop.wait(), self.server_task, keep=(self.server_task,))
        if first is exited:
            code = exited.result()
            self.runtime.set_phase(Phase.STOPPED, f"engine exited with code {code}")
            log.error("engine exited; stopping so the container is restarted", exit_code=code)
            return 1
        if first is self.server_task:
            log.error("the proxy server stopped unexpectedly")
            return 1
        return await self._drain()

    async def _drain(self) -> int:
        await self._grace()
        self.runtime.set_phase(Phase.DRAINING)
        timeout = self.settings.DRAIN_TIMEOUT
        log.info("draining", in_flight=self.runtime.inflight, drain_timeout_s=timeout)
        idle = asyncio.ensure_future(self.runtime.wait_idle(timeout))
        first = await _first(idle, self.force.wait())
        if first is idle and idle.result():
            log.info("drained")
        else:
            # What is still in flight gets the server's graceful shutdown, then is cancelled.
            log.warning("drain cut short", in_flight=self.runtime.inflight, drain_timeout_s=timeout)
        return 0

    async def _grace(self) -> None:
        """SIGTERM: `/health` answers 503 at once, but new requests are still served for
        DRAIN_GRACE_SECONDS, so a router polling `/health` stops sending them before they would be
        refused (it retries a 503 on the same replica until its health check notices)."""
        grace = self.settings.DRAIN_GRACE_SECONDS
        if grace <= 0 or self.signal_name != "SIGTERM":
            return
        self.runtime.grace = True
        self.runtime.set_phase(Phase.DRAINING, "draining: still serving until routers notice")
        log.info("draining: /health answers 503, new requests still served", grace_s=grace)
        try:
            await _first(asyncio.sleep(grace), self.force.wait())
        finally:
            self.runtime.grace = False

    # --- pieces -------------------------------------------------------------------------------

    def _use_cache_dirs(self) -> None:
        """HF and vLLM caches on DATA_DIR (or where the user said), exported before huggingface_hub
        is imported and before the engine starts."""
        dirs = cache_dirs.choose(self.settings)
        dirs.export(os.environ)
        for level, message, fields in dirs.notes:
            getattr(log, level)(message, **fields)
        self.runtime.caches = dirs.as_dict()

    async def _preflight(self, report: gpu.GpuReport) -> int | None:
        """The Hub, the disk, the profile and the memory fit, before any download. None (after
        one error line) when the start cannot succeed; else the bytes still to download (0 when
        unknown)."""
        s = self.settings
        gpus = from_report(report)
        token = s.HF_TOKEN.get_secret_value() if s.HF_TOKEN else None
        with self.clock.phase("preflight"):
            try:
                if sources.handles(s.MODEL_NAME, s):  # s3:// and ModelScope check their own store
                    pre = preflight.Preflight(notes=["the Hub checks are skipped: not a Hugging Face model"])
                else:
                    pre = await asyncio.to_thread(
                        preflight.model_facts,
                        s.MODEL_NAME,
                        revision=s.MODEL_REVISION,
                        token=token,
                        offline=s.HF_HUB_OFFLINE,
                        endpoint=s.HF_ENDPOINT,
                    )
            except preflight.PreflightError as exc:
                log.error(str(exc))
                return None
            for note in pre.notes:
                log.info("preflight: " + note)
            expected = 0
            if pre.hub is not None:
                from huggingface_hub import constants

                cache = Path(constants.HF_HUB_CACHE)
                problem = preflight.disk_check(pre.hub, cache)
                if problem:
                    log.error(problem)
                    return None
                expected = pre.hub.total_bytes - preflight.already_cached(pre.hub, cache)
            self.facts = pre.facts
            model_id = (
                None
                if (Path(s.MODEL_NAME).expanduser().is_dir() or looks_like_path(s.MODEL_NAME))
                else s.MODEL_NAME
            )
            choice = profiles.choose(s, gpus, pre.facts, self.user_set, model_id=model_id)
            if choice.error:
                log.error(choice.error)
                return None
            if choice.warning:
                log.warning(choice.warning)
            self.settings = choice.settings
            self.runtime.profile = choice.report
            self._log_configuration(choice, gpus)
            fit = preflight.memory_fit(pre.facts, gpus, self.settings, s.MODEL_NAME)
            if fit is not None:
                level, message = fit
                getattr(log, level)(message)
                if level == "error":
                    return None
        return expected

    def _log_configuration(self, choice: profiles.Choice, gpus: Any) -> None:
        """One record: the configuration chosen, and the arithmetic behind it."""
        s, facts = self.settings, self.facts
        chosen = next((c for c in choice.candidates if c.profile == choice.report.get("id")), None)
        if chosen is None:  # no profile: the computed defaults' judgement, whatever it was
            chosen = next((c for c in choice.candidates if c.match == "computed"), None)
        arithmetic = None
        if facts is not None and chosen is not None and chosen.plan is not None:
            p = chosen.plan
            # What an out-of-memory retry may fall back to: the longest context the arithmetic fits.
            self.computed_len = min(p.fits_tokens, facts.max_model_len) // 256 * 256 or None
            arithmetic = {
                "gpus": gpus.label,
                "weights_gb": round(sizing.weights_bytes(facts, s.DTYPE, s.QUANTIZATION) / 1e9, 2),
                "weights_from": facts.weights_source,
                "kv_bytes_per_token": sizing.kv_bytes_per_token(facts, 1, 1, s.KV_CACHE_DTYPE, s.DTYPE),
                "model_max_len": facts.max_model_len,
                "chosen": p.arithmetic(),
                "tried": [t.arithmetic() for t in chosen.tried],
            }
        log.info(
            "engine configuration",
            profile=choice.report.get("id"),
            match=choice.report.get("match"),
            reason=choice.report.get("reason"),
            applied=choice.report.get("applied"),
            overridden=choice.report.get("overridden"),
            arithmetic=arithmetic,
        )

    async def _retry_start(self) -> bool:
        """After the engine exited during start-up: say why in one sentence, and start it once more
        with a shorter context when that is what it needs (AUTO_RETRY)."""
        if self.pump is not None:  # the last lines may still be in the pipe
            await asyncio.wait([self.pump], timeout=5)
        failure = self.watcher.failure
        if failure is None:
            return False
        s = self.settings
        log.error(failure.message, failure=failure.kind)
        current = s.MAX_MODEL_LEN or (self.facts.max_model_len if self.facts is not None else None)
        length = retry_length(failure, current, self.computed_len)
        if not (s.AUTO_RETRY and failure.retryable and not self.retried and length):
            return False
        self.retried = True
        log.warning(
            "retrying the engine start with a shorter context",
            failure=failure.kind,
            max_model_len=length,
            was=current,
        )
        self.clock.engine_failed()
        await self._stop_engine()
        self.settings = s.model_copy(update={"MAX_MODEL_LEN": length})
        if self.runtime.profile is not None:
            self.runtime.profile["retry"] = {"failure": failure.kind, "max_model_len": length, "was": current}
        return await self._launch()

    async def _start_server(self) -> bool:
        s = self.settings
        if self.shared is not None:
            return await self._start_workers()
        app = create_app(s, self.runtime)
        config = server_config(app, s.HOST, s.PORT, s.CLIENT_TIMEOUT, send_timeout=s.CLIENT_SEND_TIMEOUT)
        self.server = ProxyServer(config)
        self.server_task = asyncio.ensure_future(self.server.serve())
        while not self.server.started:
            if self.server_task.done():
                log.error("the proxy could not start", port=s.PORT)
                return False
            await asyncio.sleep(0.01)
        if s.PORT_HEALTH is not None and s.PORT_HEALTH != s.PORT:
            return await self._start_health_server(app)
        return True

    async def _start_workers(self) -> bool:
        """PROXY_WORKERS > 1: the workers serve PORT (and PORT_HEALTH); `server_task` is their
        supervision, which ends only when they keep dying."""
        assert self.shared is not None
        pool = self.pool = workers.WorkerPool(
            self.settings, self.shared, self.workers, logs.relay_lines, get_logger("app.workers")
        )
        try:
            pool.bind()
        except OSError as exc:
            log.error("the proxy could not start", port=self.settings.PORT, error=str(exc))
            return False
        if not await pool.start():
            return False
        self.server_task = asyncio.ensure_future(pool.supervise())
        return True

    async def _start_health_server(self, app: Any) -> bool:
        """RunPod load-balancing endpoints poll `/ping` on PORT_HEALTH: serve the same `/ping` and
        `/health` there (and nothing else). The app's lifespan runs on the main server only."""
        s = self.settings
        config = server_config(health_only(app), s.HOST, s.PORT_HEALTH, s.CLIENT_TIMEOUT, lifespan="off")
        self.health_server = ProxyServer(config)
        self.health_task = asyncio.ensure_future(self.health_server.serve())
        while not self.health_server.started:
            if self.health_task.done():
                log.error("the health port could not be served", port_health=s.PORT_HEALTH)
                return False
            await asyncio.sleep(0.01)
        log.info("health port", port_health=s.PORT_HEALTH, paths=["/ping", "/health"])
        return True

    def _prepare_engine(self, argv: list[str]) -> bool:
        """Check the engine's executable is there, write the files the engine reads its options
        from, and name, once, the settings this engine has no equivalent for."""
        s = self.settings
        if shutil.which(argv[0]) is None:  # e.g. ENGINE=trtllm in an image without TensorRT-LLM
            log.error(
                "the engine's executable is not installed in this image",
                engine=self.engine.name,
                executable=argv[0],
            )
            return False
        if self.engine.name == "vllm" and s.ENGINE_FLAGS_FILE is not None and not self._check_flags(argv):
            return False
        if self.engine.unmapped is not None:
            ignored = self.engine.unmapped(s)
            if ignored:
                log.warning(
                    "settings this engine has no equivalent for are ignored",
                    engine=self.engine.name,
                    settings=ignored,
                )
        lora = self.runtime.lora
        files = self.engine.config_files(s, lora=lora) if self.engine.config_files is not None else {}
        for path, text in files.items():
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(text)
            except OSError as exc:
                log.error("cannot write the engine's options file", path=path, error=str(exc))
                return False
            log.info("engine options file", path=path, options=text.strip())
        return True

    def _check_flags(self, argv: list[str]) -> bool:
        """Leave out (in place) the flags of the launcher's making that the image's vLLM does not
        have (app/engines/vllm_flags.py), naming them once; False if one the proxy needs is gone."""
        known = vllm_flags.load_known(self.settings.ENGINE_FLAGS_FILE)
        if known is None:
            log.warning(
                "no readable engine flag list: flags not checked", path=str(self.settings.ENGINE_FLAGS_FILE)
            )
            return True
        extra = len(split_extra_args(self.settings.ENGINE_EXTRA_ARGS))
        kept, dropped = vllm_flags.filter_flags(argv, known, keep_last=extra)
        needed = sorted(vllm_flags.ESSENTIAL.intersection(dropped))
        if needed:
            log.error(
                f"This image's vLLM has no {', '.join(needed)} flag, which the proxy needs: build the image on a vLLM release that has it (VLLM_VERSION)."
            )
            return False
        if dropped:
            log.warning("flags this vLLM does not have are left out", flags=dropped)
        argv[:] = kept
        return True

    async def _wait_ready(self) -> bool:
        """Poll the engine's health until it answers 200, or STARTUP_TIMEOUT passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.STARTUP_TIMEOUT
        client = Upstream(self.settings.engine_url, connect_timeout=2, first_byte_timeout=5, idle_timeout=5)
        await client.open()
        try:
            while loop.time() < deadline:
                with contextlib.suppress(UpstreamError):
                    status, _ = await client.get(self.engine.health_path, timeout=5)
                    if status == 200:
                        return True
                await asyncio.sleep(POLL_INTERVAL)
            return False
        finally:
            await client.close()

    async def _engine_version(self) -> str | None:
        if not self.engine.version_path:
            return None
        client = Upstream(self.settings.engine_url, connect_timeout=2, first_byte_timeout=5, idle_timeout=5)
        await client.open()
        try:
            status, body = await client.get(self.engine.version_path, timeout=5)
            if status == 200:
                import orjson

                version = orjson.loads(body).get("version")
                return str(version) if version else None
        except (UpstreamError, ValueError, AttributeError):
            pass
        finally:
            await client.close()
        return None

    async def _pump(self, stream: asyncio.StreamReader | None) -> None:
        """Relay the engine's output: as JSON log records (with the engine's level), or as is on
        a console."""
        if stream is None:
            return
        engine_log = get_logger("engine")
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the limit: take what is there
                raw = await stream.read(2**20)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            if self.runtime.phase is Phase.STARTING:
                self.clock.engine_line(line)
                self.watcher.feed(line)
            if self._console:
                print(line, flush=True)
                continue
            level = self._engine_level(line)
            getattr(engine_log, level)(line, source=self.engine.name)

    def _engine_level(self, line: str) -> str:
        """The level of an engine line: its own marker, else that of the block it continues (a
        traceback is an error down to its last line)."""
        match = _ENGINE_LEVEL.search(line[:80])
        if match:
            self._last_level = match.group(1).lower()
        elif line.startswith("Traceback"):
            self._last_level = "error"
        elif not (line[:1].isspace() or self._last_level == "error"):
            self._last_level = "info"
        return self._last_level

    async def _stop_engine(self) -> None:
        """Stop the engine and everything it started (vLLM runs its core in a child process): the
        whole process group, also when the engine's main process already died on its own, so no
        orphan keeps computing or holding GPU memory."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            log.info("stopping engine", pid=proc.pid)
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), ENGINE_STOP_TIMEOUT)
            except TimeoutError:
                log.warning("engine did not stop in time: killing it", pid=proc.pid)
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
            log.info("engine stopped", exit_code=proc.returncode)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEFTOVER_GRACE
        while _signal_group(proc.pid, 0):  # the engine's own children, still exiting or orphaned
            if loop.time() > deadline:
                log.warning("engine processes left behind: killing them", pgid=proc.pid)
                _signal_group(proc.pid, signal.SIGKILL)
                break
            await asyncio.sleep(POLL_INTERVAL)
            _signal_group(proc.pid, signal.SIGTERM)

    async def _stop_server(self) -> None:
        if self.pool is not None:
            if self.server_task is not None:
                self.server_task.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await self.server_task
            pool, self.pool = self.pool, None
            await pool.stop()
            return
        if self.health_server is not None and self.health_task is not None:
            self.health_server.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self.health_task
            self.health_server = None
        if self.server is None or self.server_task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self.server_task
        self.server = None


def _run_loop(coro: Awaitable[int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


def main() -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # huggingface_hub reads it at import
    settings = load_settings()
    if settings is None:
        return 2
    configure_from(settings)
    return _run_loop(Launcher(settings).run())


if __name__ == "__main__":
    sys.exit(main())
