"""State shared by the launcher and the proxy: where the engine is in its life, and what is in flight."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from app.logs import get_logger

_log = get_logger("app.runtime")


class Phase(enum.StrEnum):
    STARTING = "starting"  # checking the GPU, downloading the model, engine loading
    READY = "ready"
    DRAINING = "draining"  # SIGTERM received: finishing in-flight requests, then refusing new ones
    STOPPED = "stopped"  # the engine exited


@dataclass
class Runtime:
    phase: Phase = Phase.STARTING
    detail: str = "starting"
    """What start-up is doing, or why the engine stopped: shown by /health and /info."""
    started_at: float = field(default_factory=time.time)
    engine_version: str | None = None
    engine_command: list[str] = field(default_factory=list)
    """The engine's argv with secrets masked."""
    model_path: str | None = None
    gpus: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    """The configuration chosen at start-up (profile, computed defaults or none) and what overrode it."""
    startup: dict[str, float] | None = None
    """Seconds per start-up phase, once ready."""
    caches: dict[str, str | None] | None = None
    """Where the Hugging Face and vLLM caches are."""
    inflight: int = 0
    grace: bool = False
    """Draining, but still serving new requests (DRAIN_GRACE_SECONDS) until routers notice."""
    reloaders: list[Callable[[], Any]] = field(default_factory=list)
    """Called on SIGHUP (the launcher): the app's API keys reload from API_KEY_FILE."""
    lora: Any = None
    """The LoRA start plan (app/lora/config.py), set by the launcher before the engine starts."""
    _idle: asyncio.Event | None = None

    def set_phase(self, phase: Phase, detail: str | None = None) -> None:
        self.phase = phase
        self.detail = detail or phase.value

    @property
    def accepting(self) -> bool:
        return self.phase is Phase.READY or (self.phase is Phase.DRAINING and self.grace)

    def request_started(self) -> None:
        self.inflight += 1

    def request_finished(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if `timeout` passed first."""
        if self.inflight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._idle = None


def run_reloaders(reloaders: list[Callable[[], Any]], log: Any, **fields: Any) -> None:
    """SIGHUP: each reload in turn; one that fails is logged and never takes the server down."""
    for reload in reloaders:
        try:
            reload()
        except Exception:
            log.exception("reload failed", **fields)


def extend_lifespan(
    api: Any,
    *,
    start: Callable[[], Awaitable[Any]] | None = None,
    tasks: Callable[[], Iterable[Coroutine[Any, Any, Any]]] = tuple,
    stop: Callable[[], Any] | None = None,
) -> None:
    """Run more inside `api`'s lifespan, after what it runs already: `start`, then the background
    `tasks` (made when the app starts); on the way out the tasks are cancelled and awaited (one that
    failed is logged, never raised: shutdown goes on), then `stop` (sync or async)."""
    inner = api.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: Any):
        async with inner(app) as state:
            if start is not None:
                await start()
            running = [asyncio.ensure_future(coro) for coro in tasks()]
            try:
                yield state
            finally:
                for task in running:
                    task.cancel()
                for task in running:
                    with contextlib.suppress(asyncio.CancelledError):
                        try:
                            await task
                        except Exception:
                            _log.exception("background task failed")
                if stop is not None and inspect.isawaitable(done := stop()):
                    await done

    api.router.lifespan_context = lifespan
