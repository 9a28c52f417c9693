"""The dashboard's history in SQLite: one row per collector interval, rolled up into coarser tiers
and pruned by retention, so a week stays small and every window is one indexed range scan.

    raw   one row per scrape (SCRAPE_INTERVAL, 10 s)   kept 2 h    the 1h window
    1m    one row per minute                            kept 2 d    the 1d window
    10m   one row per 10 minutes                        kept       the 1w window (METRICS_RETENTION_DAYS)

A row holds what adds up: counts over the interval (requests, errors, tokens, prefix-cache hits and
queries), gauges (time-weighted averages and maxima), and histograms as sparse bucket counts
`[[lower, upper, n], ...]` (`upper` null for +Inf). Rolling rows up sums the counts, weights the
gauges by duration and merges the buckets, so a percentile of a day is computed from that day's
buckets, never averaged from percentiles. Rates and ratios are computed when read.

Rows carry a `source`: the proxy's own collector writes `local`; `python -m app.metrics_collector`
writes the URL it scrapes (or `--source`), so several can share one file.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

LOCAL_SOURCE = "local"

COUNTS = ("requests", "errors", "prompt_tokens", "completion_tokens", "prefix_hits", "prefix_queries")
GAUGES = ("running", "waiting", "kv_cache", "in_flight", "gpu_mem_used", "gpu_mem_total", "gpu_util")
PEAKS = ("running", "waiting", "kv_cache")
"""Gauges whose maximum over a rolled-up row is kept as well (`<name>_max`)."""
HISTOGRAMS = {"latency": (0.5, 0.95, 0.99), "ttft": (0.5, 0.95, 0.99), "itl": (0.5, 0.95)}
"""Histogram -> the quantiles stored with each row (`<name>_p50`, ...)."""

Buckets = list[list[Any]]
"""Sparse histogram: [[lower, upper, n], ...] with upper None for +Inf, n > 0."""


@dataclass(frozen=True)
class Tier:
    name: str
    step: int | None
    """Seconds one row covers; None: one row per scrape."""
    keep_s: float
    source: str | None = None
    """The tier rows are rolled up from."""


TIERS = (
    Tier("raw", None, 2 * 3600),
    Tier("m1", 60, 2 * 86400, "raw"),
    Tier("m10", 600, math.inf, "m1"),
)
WINDOWS = {"1h": (3600, "raw"), "1d": (86400, "m1"), "1w": (7 * 86400, "m10")}
"""Window -> (seconds, tier it is read from)."""

# Every series the history API serves: name -> (SQL over one row, unit, what it is).
SERIES: dict[str, tuple[str, str, str]] = {
    "request_rate": (
        "requests / dur",
        "req/s",
        "Requests answered per second (probes and scrapes excluded).",
    ),
    "error_rate": (
        "CAST(errors AS REAL) / NULLIF(requests, 0)",
        "ratio",
        "Share of requests answered with a 5xx status.",
    ),
    "latency_p50": ("latency_p50", "s", "End-to-end latency, median (requests that named a model)."),
    "latency_p95": ("latency_p95", "s", "End-to-end latency, 95th percentile."),
    "latency_p99": ("latency_p99", "s", "End-to-end latency, 99th percentile."),
    "ttft_p50": ("ttft_p50", "s", "Time to first token, median (the engine's histogram, else the proxy's)."),
    "ttft_p95": ("ttft_p95", "s", "Time to first token, 95th percentile."),
    "ttft_p99": ("ttft_p99", "s", "Time to first token, 99th percentile."),
    "itl_p50": ("itl_p50", "s", "Inter-token latency, median (the engine's)."),
    "itl_p95": ("itl_p95", "s", "Inter-token latency, 95th percentile."),
    "prompt_tokens_per_s": ("prompt_tokens / dur", "tokens/s", "Prompt tokens processed per second."),
    "completion_tokens_per_s": ("completion_tokens / dur", "tokens/s", "Tokens generated per second."),
    "requests_running": ("running", "requests", "Requests in the engine's running batch (average)."),
    "requests_running_max": ("running_max", "requests", "Requests running, peak."),
    "requests_waiting": ("waiting", "requests", "Requests queued in the engine (average)."),
    "requests_waiting_max": ("waiting_max", "requests", "Requests queued, peak."),
    "kv_cache_usage": ("kv_cache", "ratio", "KV cache in use, 0 to 1 (average)."),
    "kv_cache_usage_max": ("kv_cache_max", "ratio", "KV cache in use, peak."),
    "prefix_cache_hit_rate": (
        "prefix_hits / NULLIF(prefix_queries, 0)",
        "ratio",
        "Prompt tokens found in the prefix cache, of those looked up.",
    ),
    "requests_in_flight": ("in_flight", "requests", "Requests the proxy is serving (average)."),
    "gpu_memory_used_bytes": ("gpu_mem_used", "bytes", "GPU memory in use, all GPUs."),
    "gpu_memory_total_bytes": ("gpu_mem_total", "bytes", "GPU memory in all, all GPUs."),
    "gpu_utilization": ("gpu_util", "ratio", "GPU utilization, mean of the GPUs, 0 to 1."),
}


def _columns() -> list[tuple[str, str]]:
    cols = [("source", "TEXT NOT NULL"), ("ts", "REAL NOT NULL"), ("dur", "REAL NOT NULL")]
    cols += [(c, "REAL NOT NULL DEFAULT 0") for c in COUNTS]
    cols += [(g, "REAL") for g in GAUGES]
    cols += [(f"{g}_max", "REAL") for g in PEAKS]
    for name, qs in HISTOGRAMS.items():
        cols.append((f"{name}_hist", "TEXT"))
        cols += [(f"{name}_p{_pct(q)}", "REAL") for q in qs]
    return cols


def _pct(q: float) -> str:
    return f"{q * 100:g}"


COLUMNS = _columns()
COLUMN_NAMES = [name for name, _ in COLUMNS]


@dataclass
class Interval:
    """What happened between two scrapes, or over a rolled-up bucket."""

    ts: float
    """End of the interval (Unix seconds)."""
    dur: float
    counts: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float | None] = field(default_factory=dict)
    peaks: dict[str, float | None] = field(default_factory=dict)
    hists: dict[str, Buckets] = field(default_factory=dict)

    def row(self, source: str) -> tuple:
        values: dict[str, Any] = {"source": source, "ts": self.ts, "dur": self.dur}
        for c in COUNTS:
            values[c] = self.counts.get(c, 0.0)
        for g in GAUGES:
            values[g] = self.gauges.get(g)
        for g in PEAKS:
            values[f"{g}_max"] = self.peaks.get(g, self.gauges.get(g))
        for name, qs in HISTOGRAMS.items():
            buckets = self.hists.get(name) or []
            values[f"{name}_hist"] = orjson.dumps(buckets).decode() if buckets else None
            for q in qs:
                values[f"{name}_p{_pct(q)}"] = quantile(q, buckets)
        return tuple(values[c] for c in COLUMN_NAMES)


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of sparse bucket counts, interpolated linearly inside the bucket it falls in,
    as Prometheus's histogram_quantile does (+Inf bucket: its lower bound). None without data."""
    total = sum(n for _, _, n in buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for lower, upper, n in sorted(buckets, key=lambda b: math.inf if b[1] is None else b[1]):
        if seen + n >= rank:
            if upper is None:
                return lower
            return lower + (upper - lower) * ((rank - seen) / n)
        seen += n
    return None  # unreachable with n > 0; kept for safety


def merge_buckets(many: Iterable[Buckets]) -> Buckets:
    acc: dict[tuple[float, float | None], float] = {}
    for buckets in many:
        for lower, upper, n in buckets:
            acc[(lower, upper)] = acc.get((lower, upper), 0.0) + n
    return [[lo, up, n] for (lo, up), n in acc.items() if n > 0]


def merge(rows: list[dict[str, Any]], ts: float) -> Interval:
    """Roll rows (as read back, column -> value) up into one interval ending at `ts`."""
    dur = sum(r["dur"] for r in rows)
    out = Interval(ts=ts, dur=dur)
    for c in COUNTS:
        out.counts[c] = sum(r[c] or 0.0 for r in rows)
    for g in GAUGES:
        weighted = [(r[g], r["dur"]) for r in rows if r[g] is not None]
        span = sum(d for _, d in weighted)
        out.gauges[g] = sum(v * d for v, d in weighted) / span if weighted and span > 0 else None
    for g in PEAKS:
        peaks = [r[f"{g}_max"] for r in rows if r[f"{g}_max"] is not None]
        out.peaks[g] = max(peaks) if peaks else None
    for name in HISTOGRAMS:
        out.hists[name] = merge_buckets(orjson.loads(r[f"{name}_hist"]) for r in rows if r[f"{name}_hist"])
    return out


class MetricsStore:
    """One SQLite file; thread-safe (one connection behind a lock), called from worker threads."""

    def __init__(self, path: str | Path, retention_days: float = 7) -> None:
        self.path = Path(path)
        self.retention_s = retention_days * 86400
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            cols = ", ".join(f"{name} {kind}" for name, kind in COLUMNS)
            for tier in TIERS:
                self._db.execute(f"CREATE TABLE IF NOT EXISTS {tier.name} ({cols})")
                self._db.execute(
                    f"CREATE INDEX IF NOT EXISTS {tier.name}_source_ts ON {tier.name} (source, ts)"
                )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS rollup (source TEXT, tier TEXT, done REAL, "
                "PRIMARY KEY (source, tier))"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writing ------------------------------------------------------------------------------

    def add(self, interval: Interval, source: str = LOCAL_SOURCE, now: float | None = None) -> None:
        """Store one scrape interval, roll completed buckets up, prune what retention drops."""
        now = interval.ts if now is None else now
        marks = ", ".join("?" * len(COLUMN_NAMES))
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(f"INSERT INTO raw VALUES ({marks})", interval.row(source))
                for tier in TIERS:
                    if tier.step is not None:
                        self._roll_up(tier, source, now)
                for tier in TIERS:
                    keep = min(tier.keep_s, self.retention_s)
                    self._db.execute(f"DELETE FROM {tier.name} WHERE ts < ?", (now - keep,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _roll_up(self, tier: Tier, source: str, now: float) -> None:
        assert tier.step is not None and tier.source is not None
        step = tier.step
        until = math.floor(now / step) * step  # buckets ending at or before this are complete
        row = self._db.execute(
            "SELECT done FROM rollup WHERE source = ? AND tier = ?", (source, tier.name)
        ).fetchone()
        done = row["done"] if row else -math.inf
        if until <= done:
            return
        rows = self._db.execute(
            f"SELECT * FROM {tier.source} WHERE source = ? AND ts > ? AND ts <= ? ORDER BY ts",
            (source, done, until),
        ).fetchall()
        groups: dict[float, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(math.ceil(r["ts"] / step) * step, []).append(dict(r))
        marks = ", ".join("?" * len(COLUMN_NAMES))
        for end, members in groups.items():
            self._db.execute(f"INSERT INTO {tier.name} VALUES ({marks})", merge(members, end).row(source))
        self._db.execute(
            "INSERT INTO rollup VALUES (?, ?, ?) ON CONFLICT (source, tier) DO UPDATE SET done = excluded.done",
            (source, tier.name, until),
        )

    # --- reading ------------------------------------------------------------------------------

    def series(
        self, name: str, window: str, source: str = LOCAL_SOURCE, now: float | None = None
    ) -> dict[str, Any]:
        """One series over a window: {"metric", "window", "unit", "step_s", "points": [[ts, v]]}."""
        expr, unit, _ = SERIES[name]
        span, tier_name = WINDOWS[window]
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                f"SELECT ts, {expr} AS v FROM {tier_name} WHERE source = ? AND ts > ? ORDER BY ts",
                (source, now - span),
            ).fetchall()
        tier = next(t for t in TIERS if t.name == tier_name)
        return {
            "metric": name,
            "window": window,
            "unit": unit,
            "source": source,
            "step_s": tier.step,
            "points": [[round(r["ts"], 3), r["v"]] for r in rows],
        }

    def sources(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT source FROM m10 UNION SELECT DISTINCT source FROM raw")
            return sorted(r[0] for r in rows.fetchall())

    def count(self, tier: str) -> int:
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM {tier}").fetchone()[0]
