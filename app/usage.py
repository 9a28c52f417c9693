"""What each API key used: requests, prompt and completion tokens, errors, kept in SQLite.

    GET /v1/usage?window=1h|1d|1w|all         a key sees its own; ADMIN_API_KEY sees every key
    GET /api/v1/key_usage?window=1h|1d|1w|all  the dashboard's per-key table (METRICS_API_KEY)

Every request to an engine route is counted under its key's name (app/keys.py) when it ends
(`Accounting.finished`, called by the request middleware): in memory first, then written every
FLUSH_S seconds (and when the app stops, and before a usage query) as one transaction of additive
upserts into per-minute rows. Several processes may write the same file (WAL, each adds its own
counts), so usage is whole across proxy processes and restarts; a process killed outright loses at
most its last FLUSH_S seconds. Minute rows older than ROLLUP_AFTER_S are folded into one row per day.
A batch's lines (app/batch/) count under the key that made the batch, but not against that key's
live limits (its tpm). Tokens are the engine's own usage report; `errors` counts answers of 400 and above and hang-ups
(499), `rate_limited` the 429s of the proxy's admission control (app/admission.py) among them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from app import metrics
from app.admission import Admission
from app.keys import ADMIN, ANONYMOUS, KeyRing
from app.logs import get_logger
from app.middleware import RECORD_KEY, RequestRecord
from app.routes import ENGINE
from app.runtime import extend_lifespan

log = get_logger("app.usage")

ROOT = Path(__file__).resolve().parents[1]
FLUSH_S = 2.0
ROLLUP_AFTER_S = 8 * 86400
ROLLUP_EVERY_S = 3600.0
WINDOWS: dict[str, int | None] = {"1h": 3600, "1d": 86400, "1w": 7 * 86400, "all": None}
COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "errors", "rate_limited")
RATE_HEADERS = (
    "retry-after",
    *(
        f"x-ratelimit-{what}-{kind}"
        for what in ("limit", "remaining", "reset")
        for kind in ("requests", "tokens")
    ),
)
"""What a browser on another origin may read of a 429 (CORS_ALLOW_ORIGINS)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL,
    bucket INTEGER NOT NULL,          -- unix seconds: the minute's start (a day's, once rolled up)
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    rate_limited INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, bucket)
) WITHOUT ROWID;
"""
_UPSERT = (
    "INSERT INTO usage (key, bucket, requests, prompt_tokens, completion_tokens, errors, rate_limited) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key, bucket) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in COLUMNS)
)


def usage_path(path: Path) -> Path:
    """USAGE_DB_PATH, relative paths taken from the app's directory."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else ROOT / path


class UsageStore:
    """The SQLite file. Thread-safe (the app calls it from worker threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        """Add (key, bucket, requests, prompt, completion, errors, rate_limited) rows to what is
        there, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_UPSERT, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def totals(self, since: int | None, key: str | None = None) -> dict[str, dict[str, int]]:
        sql = "SELECT key, " + ", ".join(f"SUM({c})" for c in COLUMNS) + " FROM usage WHERE bucket >= ?"
        args: list[Any] = [since if since is not None else -(2**62)]
        if key is not None:
            sql += " AND key = ?"
            args.append(key)
        with self._lock:
            rows = self._db.execute(sql + " GROUP BY key ORDER BY key", args).fetchall()
        return {row[0]: dict(zip(COLUMNS, (int(v or 0) for v in row[1:]), strict=True)) for row in rows}

    def rollup(self, now: float) -> int:
        """Fold minute rows older than ROLLUP_AFTER_S into one row per key and day; rows folded."""
        cutoff = int(now - ROLLUP_AFTER_S) // 86400 * 86400
        sums = ", ".join(f"SUM({c})" for c in COLUMNS)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    f"SELECT key, bucket / 86400 * 86400 AS day, {sums} FROM usage "
                    "WHERE bucket < ? AND bucket % 86400 != 0 GROUP BY key, day",
                    (cutoff,),
                ).fetchall()
                self._db.executemany(_UPSERT, rows)
                n = self._db.execute(
                    "DELETE FROM usage WHERE bucket < ? AND bucket % 86400 != 0", (cutoff,)
                ).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return n

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Usage:
    """Counts in memory, written to the store every FLUSH_S seconds."""

    def __init__(self, store: UsageStore | None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        self._pending: dict[tuple[str, int], list[int]] = {}
        self._flush_lock = asyncio.Lock()
        self._rolled_at = 0.0

    def record(self, key: str, status: int, prompt: int, completion: int, rate_limited: bool) -> None:
        bucket = int(self._clock()) // 60 * 60
        row = self._pending.get((key, bucket))
        if row is None:
            row = self._pending[(key, bucket)] = [0, 0, 0, 0, 0]
        row[0] += 1
        row[1] += prompt
        row[2] += completion
        row[3] += status >= 400
        row[4] += rate_limited

    async def flush(self) -> None:
        """Write what is pending; on failure it stays pending for the next try."""
        if self.store is None:
            return
        async with self._flush_lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, {}
            rows = [(key, bucket, *counts) for (key, bucket), counts in pending.items()]
            try:
                await asyncio.to_thread(self.store.add, rows)
            except Exception as exc:
                for (key, bucket), counts in pending.items():  # back, added to what came meanwhile
                    row = self._pending.setdefault((key, bucket), [0, 0, 0, 0, 0])
                    for i, n in enumerate(counts):
                        row[i] += n
                log.warning("usage not written yet: will retry", path=str(self.store.path), error=str(exc))

    async def run(self) -> None:
        """Flush every FLUSH_S seconds for the app's lifetime; fold old rows now and then."""
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()
            now = self._clock()
            if self.store is not None and now - self._rolled_at > ROLLUP_EVERY_S:
                self._rolled_at = now
                with contextlib.suppress(sqlite3.Error):
                    await asyncio.to_thread(self.store.rollup, now)

    async def totals(self, window: str, key: str | None = None) -> dict[str, dict[str, int]]:
        assert self.store is not None
        await self.flush()
        seconds = WINDOWS[window]
        since = None if seconds is None else (int(self._clock()) - seconds) // 60 * 60
        return await asyncio.to_thread(self.store.totals, since, key)


def open_usage(settings: Any) -> Usage:
    path = usage_path(settings.USAGE_DB_PATH)
    try:
        store = UsageStore(path)
    except Exception as exc:  # an unwritable data dir costs the usage history, not the server
        log.warning("usage per key off: cannot open the database", path=str(path), error=str(exc))
        store = None
    return Usage(store)


class Accounting:
    """Called by the request middleware once a request has ended: per-key metrics, usage, and the
    tokens a key spent against its tpm."""

    def __init__(self, usage: Usage, admission: Admission) -> None:
        self.usage = usage
        self.admission = admission
        self._children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}

    def finished(self, rec: RequestRecord, status: int) -> None:
        route = rec.route
        if rec.key is None or route is None or route.kind != ENGINE:
            return
        prompt, completion = rec.prompt_tokens or 0, rec.completion_tokens or 0
        children = self._children.get((rec.key, status))
        if children is None:  # looked up once per key and status: the hot path only adds
            children = self._children[(rec.key, status)] = (
                metrics.KEY_REQUESTS.labels(rec.key, status),
                metrics.KEY_PROMPT_TOKENS.labels(rec.key),
                metrics.KEY_COMPLETION_TOKENS.labels(rec.key),
            )
        requests, prompt_tokens, completion_tokens = children
        requests.inc()
        if prompt:
            prompt_tokens.inc(prompt)
        if completion:
            completion_tokens.inc(completion)
        if (prompt or completion) and rec.batch_id is None:  # batch lines: usage, not live limits
            self.admission.charge(rec.key, prompt + completion)
        self.usage.record(rec.key, status, prompt, completion, rec.rejected is not None and status == 429)


def _rows(totals: dict[str, dict[str, int]], names: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in sorted(set(names) | set(totals)):
        counts = totals.get(name) or dict.fromkeys(COLUMNS, 0)
        out.append(
            {"key": name, **counts, "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"]}
        )
    return out


def register(
    api: FastAPI, keyring: KeyRing, admission: Admission, usage: Usage, tasks: list[Callable[[], Any]]
) -> None:
    """The usage routes, and the app-lifetime tasks: usage flushing, `tasks` (the key file watch)."""

    async def stop() -> None:
        await usage.flush()
        if usage.store is not None:
            usage.store.close()

    extend_lifespan(api, tasks=lambda: [usage.run(), *(t() for t in tasks)], stop=stop)

    def bad_window(window: str) -> Response | None:
        if window in WINDOWS:
            return None
        return JSONResponse(
            {
                "error": {
                    "message": f"Unknown window {window[:32]!r}: use one of {', '.join(WINDOWS)}.",
                    "type": "invalid_request_error",
                    "param": "window",
                    "code": "invalid_window",
                }
            },
            status_code=400,
        )

    def unavailable() -> Response:
        return JSONResponse(
            {
                "error": {
                    "message": "Usage is not recorded: USAGE_DB_PATH cannot be opened (see the start-up log).",
                    "type": "service_unavailable",
                    "param": None,
                    "code": "usage_unavailable",
                }
            },
            status_code=503,
        )

    @api.get("/v1/usage")
    async def key_usage(request: Request, window: str = "1d") -> Response:
        """What the calling key used over the window; every key's, for ADMIN_API_KEY (and when no
        API key is configured)."""
        if (bad := bad_window(window)) is not None:
            return bad
        if usage.store is None:
            return unavailable()
        rec: RequestRecord = request.scope[RECORD_KEY]
        every = rec.key in (ADMIN, ANONYMOUS)
        totals = await usage.totals(window, None if every else rec.key)
        names = [e.name for e in keyring.entries] if every else [rec.key or ANONYMOUS]
        return JSONResponse(
            {"object": "usage", "window": window, "data": _rows(totals, names)},
            headers={"cache-control": "no-store"},
        )

    @api.get("/api/v1/key_usage")
    async def dashboard_key_usage(window: str = "1h") -> Response:
        """The dashboard's per-key table: every key's usage over the window, and the queue now."""
        if (bad := bad_window(window)) is not None:
            return bad
        totals = await usage.totals(window) if usage.store is not None else {}
        snap = admission.snapshot()
        rows = _rows(totals, [e.name for e in keyring.entries])
        for row in rows:
            row["queued"] = snap["queued_by_key"].get(row["key"], 0)
        return JSONResponse(
            {"window": window, "recorded": usage.store is not None, "admission": snap, "data": rows},
            headers={"cache-control": "no-store"},
        )
