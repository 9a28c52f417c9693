"""The OpenAI Batch API: files and batches stored under BATCH_DIR, run by the proxy itself.

    api.py       the /v1/files and /v1/batches routes (a small FastAPI app)
    store.py     SQLite state and file bodies on disk (durable through SIGKILL)
    validate.py  the input file's lines
    runner.py    runs each line through the proxy's own app, live traffic first
    oneshot.py   BATCH_INPUT/BATCH_OUTPUT: one file through the stack, then exit

The store opens on first use, or at start-up when BATCH_DIR already holds one (so unfinished
batches resume); a server whose clients never use the Batch API writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from app import workers
from app.batch.api import ApiError, build, owns
from app.batch.runner import Runner
from app.batch.store import AsyncStore
from app.logs import get_logger
from app.runtime import Runtime, extend_lifespan
from app.settings import Settings

__all__ = ["BatchService", "owns"]

log = get_logger("app.batch")
WORKERS_POLL_S = 1.0
"""Several proxy processes (app/workers.py): worker 0 runs every batch, and looks at the store this
often for batches created or cancelled through the other workers."""
ROOT = Path(__file__).resolve().parents[2]


def batch_dir(settings: Settings) -> Path:
    """BATCH_DIR, relative paths taken from the app's directory."""
    path = Path(settings.BATCH_DIR).expanduser()
    return path if path.is_absolute() else ROOT / path


class BatchService:
    """The routes (`self` is their ASGI app), the store, and the runner in the app's lifespan."""

    def __init__(self, settings: Settings, runtime: Runtime, keys: list[bytes]) -> None:
        self.runtime = runtime
        self.dir = batch_dir(settings)
        self.max_file_bytes = int(settings.BATCH_MAX_FILE_MB * 2**20)
        self.concurrency = settings.BATCH_CONCURRENCY
        self.yield_threshold = settings.BATCH_YIELD_THRESHOLD
        self.auth = keys[0] if keys else None
        self.store: AsyncStore | None = None
        self.runner: Runner | None = None
        self._pipeline: Any = None
        self._task: asyncio.Task | None = None
        self._watch: asyncio.Future | None = None
        self._lock = asyncio.Lock()
        self.api_inflight = 0
        self.app = build(self)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        # Uploads and polls of the Batch API are not live traffic the runner should yield to.
        self.api_inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.api_inflight -= 1

    @property
    def pipeline(self) -> Any:
        return self._pipeline

    @pipeline.setter
    def pipeline(self, app: Any) -> None:
        """The app's ASGI entry point (request context, dispatcher, proxy): batch lines go there."""
        self._pipeline = app
        if self.runner is not None:
            self.runner.pipeline = app

    async def open(self) -> AsyncStore:
        """The store, opened (and the runner started) on first use."""
        if self.store is not None:
            return self.store
        async with self._lock:
            if self.store is None:
                store = AsyncStore(self.dir)
                try:
                    await store.open()
                except Exception as exc:
                    await store.close()
                    log.error("batch storage unavailable", batch_dir=str(self.dir), error=str(exc))
                    raise ApiError(
                        503,
                        f"Batch storage is unavailable (BATCH_DIR {self.dir}): {exc}",
                        code="batch_storage",
                    ) from exc
                self.runner = Runner(
                    store,
                    self.runtime,
                    concurrency=self.concurrency,
                    yield_threshold=self.yield_threshold,
                    auth=self.auth,
                    not_live=lambda: self.api_inflight,
                )
                self.runner.pipeline = self._pipeline
                if workers.is_first():  # one runner, whatever the number of proxy processes
                    if workers.current() is not None:  # batches made by the other workers
                        self.runner.poll_s = WORKERS_POLL_S
                    self._task = asyncio.ensure_future(self.runner.run())
                self.store = store
        return self.store

    async def start(self) -> None:
        if (self.dir / "batch.db").exists():
            with contextlib.suppress(ApiError):  # logged; the routes answer 503
                await self.open()
        elif workers.current() is not None and workers.is_first():
            # Another worker may create the store: the runner starts once it exists.
            self._watch = asyncio.ensure_future(self._await_store())

    async def _await_store(self) -> None:
        while not (self.dir / "batch.db").exists():
            await asyncio.sleep(WORKERS_POLL_S)
        with contextlib.suppress(ApiError):
            await self.open()

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self.runner is not None:
            await self.runner.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        self.runner = None

    def register(self, api: Any) -> None:
        """Run the store and runner during `api`'s lifespan."""
        extend_lifespan(api, start=self.start, stop=self.stop)
