"""The collector behind the dashboard: reads the proxy's and the engine's metrics every
SCRAPE_INTERVAL seconds, turns two readings into one interval (rates from counter deltas,
percentiles from histogram bucket deltas) and stores it (app/metrics_store.py).

Inside the proxy it is one background task started in the app's lifespan: the proxy's registry is
read in-process, the engine's `/metrics` through the proxy's pooled upstream client, and parsing
and SQLite run in a worker thread, so the event loop pays only for the engine's GET. The recent
readings are kept in memory too: `/api/v1/live_metrics` compares a fresh reading against the one
about a minute old.

Standalone, it scrapes any `/metrics` URL (this proxy's, or a vLLM server's own) into a database:

    python -m app.metrics_collector http://host:8000/metrics --db data/metrics.db --interval 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from app.metrics_store import LOCAL_SOURCE, Buckets, Interval, MetricsStore, quantile

LIVE_WINDOW_S = 60.0
"""Live values are rates and percentiles over about this long (the oldest kept reading within it)."""

# The samples read from a metrics text, by exact sample name.
ENGINE_SAMPLES = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
    }
)
PROXY_SAMPLES = frozenset(
    {
        "vllm_api_requests_total",
        "vllm_api_request_duration_seconds_bucket",
        "vllm_api_time_to_first_token_seconds_bucket",
        "vllm_api_prompt_tokens_total",
        "vllm_api_completion_tokens_total",
        "vllm_api_requests_in_flight",
        "vllm_api_gpu_memory_used_bytes",
        "vllm_api_gpu_memory_total_bytes",
        "vllm_api_gpu_utilization_ratio",
    }
)
_LINE_PREFIXES = tuple(name.encode() + end for name in ENGINE_SAMPLES | PROXY_SAMPLES for end in (b"{", b" "))

# Counter sample -> counter in the snapshot. The engine's own token counters are preferred (they
# count as tokens are made, aborted requests too); the proxy's stand in for other engines.
_COUNTERS = {
    "vllm_api_requests_total": "requests",
    "vllm_api_prompt_tokens_total": "proxy_prompt_tokens",
    "vllm_api_completion_tokens_total": "proxy_completion_tokens",
    "vllm:prompt_tokens_total": "engine_prompt_tokens",
    "vllm:generation_tokens_total": "engine_completion_tokens",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:prefix_cache_queries_total": "prefix_queries",
}
_HISTOGRAMS = {
    "vllm_api_request_duration_seconds_bucket": "latency",
    "vllm_api_time_to_first_token_seconds_bucket": "proxy_ttft",
    "vllm:time_to_first_token_seconds_bucket": "engine_ttft",
    "vllm:inter_token_latency_seconds_bucket": "itl",
}


@dataclass
class Snapshot:
    """One reading: counters and histogram buckets (cumulative) and gauges, summed over labels."""

    ts: float
    counters: dict[str, float] = field(default_factory=dict)
    hists: dict[str, dict[float, float]] = field(default_factory=dict)
    """name -> {upper bound: cumulative count}"""
    gauges: dict[str, float | None] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per `model` label of the proxy's request metrics (base model and LoRA adapters): counters
    and the TTFT buckets (`ttft`: {upper bound: cumulative count})."""


def engine_lines(text: bytes) -> str:
    """The lines of a metrics text the collector reads (a few dozen of a few thousand)."""
    return "\n".join(line.decode() for line in text.split(b"\n") if line.startswith(_LINE_PREFIXES))


def samples_of(families: Iterable[Any]) -> Iterable[Any]:
    for family in families:
        yield from family.samples


def take_snapshot(samples: Iterable[Any], ts: float) -> Snapshot:
    snap = Snapshot(ts=ts)
    counters: dict[str, float] = collections.defaultdict(float)
    hists: dict[str, dict[float, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    gauge_sum: dict[str, float] = collections.defaultdict(float)
    kv: list[float] = []
    util: list[float] = []
    models: dict[str, dict[str, Any]] = {}
    for s in samples:
        name, labels, value = s.name, s.labels, s.value
        if name in _PER_MODEL and labels.get("model"):
            _per_model(models, name, labels, value)
        if name in _COUNTERS:
            counters[_COUNTERS[name]] += value
            if name == "vllm_api_requests_total" and labels.get("status", "").startswith("5"):
                counters["errors"] += value
        elif name in _HISTOGRAMS:
            # End-to-end latency: only requests that named a model the engine accepted (the work,
            # not /v1/models or refused requests).
            if name == "vllm_api_request_duration_seconds_bucket" and not labels.get("model"):
                continue
            hists[_HISTOGRAMS[name]][float(labels["le"])] += value
        elif name == "vllm:num_requests_running":
            gauge_sum["running"] += value
        elif name == "vllm:num_requests_waiting":
            gauge_sum["waiting"] += value
        elif name == "vllm:kv_cache_usage_perc":
            kv.append(value)
        elif name == "vllm_api_requests_in_flight":
            gauge_sum["in_flight"] += value
        elif name == "vllm_api_gpu_memory_used_bytes":
            gauge_sum["gpu_mem_used"] += value
        elif name == "vllm_api_gpu_memory_total_bytes":
            gauge_sum["gpu_mem_total"] += value
        elif name == "vllm_api_gpu_utilization_ratio":
            util.append(value)
    snap.counters = dict(counters)
    snap.hists = {k: dict(v) for k, v in hists.items()}
    snap.gauges = dict(gauge_sum)
    snap.gauges["kv_cache"] = max(kv) if kv else None
    snap.gauges["gpu_util"] = sum(util) / len(util) if util else None
    snap.models = models
    return snap


# --- per model and LoRA adapter (the `model` label: only names the engine serves) ---------------
_PER_MODEL = {
    "vllm_api_requests_total": "requests",
    "vllm_api_prompt_tokens_total": "prompt_tokens",
    "vllm_api_completion_tokens_total": "completion_tokens",
    "vllm_api_time_to_first_token_seconds_bucket": "ttft",
}


def _per_model(models: dict[str, dict[str, Any]], name: str, labels: dict[str, str], value: float) -> None:
    row = models.setdefault(
        labels["model"],
        {"requests": 0.0, "errors": 0.0, "prompt_tokens": 0.0, "completion_tokens": 0.0, "ttft": {}},
    )
    key = _PER_MODEL[name]
    if key == "ttft":
        bound = float(labels["le"])
        row["ttft"][bound] = row["ttft"].get(bound, 0.0) + value
        return
    row[key] += value
    status = labels.get("status", "")
    if key == "requests" and status[:1] in ("4", "5") and status != "499":  # answered with an error
        row["errors"] += value


def model_rows(prev: Snapshot | None, cur: Snapshot) -> list[dict[str, Any]]:
    """The dashboard's per-model table: totals since the proxy started, and rates and TTFT
    percentiles between `prev` and `cur` (None without a previous reading)."""
    rows = []
    dur = max(cur.ts - prev.ts, 1e-6) if prev is not None else None
    for model, now in sorted(cur.models.items()):
        before = prev.models.get(model, {}) if prev is not None else {}
        row: dict[str, Any] = {
            "model": model,
            "requests": now["requests"],
            "errors": now["errors"],
            "prompt_tokens": now["prompt_tokens"],
            "completion_tokens": now["completion_tokens"],
            "request_rate": None,
            "completion_tokens_per_s": None,
            "error_rate": None,
            "ttft_p50": None,
            "ttft_p95": None,
        }
        if dur is not None:
            requests = _delta(before.get("requests"), now["requests"])
            ttft = bucket_delta(before.get("ttft"), now["ttft"])
            row.update(
                request_rate=requests / dur,
                completion_tokens_per_s=_delta(before.get("completion_tokens"), now["completion_tokens"])
                / dur,
                error_rate=_ratio(_delta(before.get("errors"), now["errors"]), requests),
                ttft_p50=quantile(0.5, ttft),
                ttft_p95=quantile(0.95, ttft),
            )
        rows.append(row)
    return rows


def _delta(before: float | None, now: float | None) -> float:
    if now is None:
        return 0.0
    if before is None or now < before:  # new, or the process behind it restarted
        return now
    return now - before


def bucket_delta(before: dict[float, float] | None, now: dict[float, float] | None) -> Buckets:
    """Cumulative buckets of two readings -> sparse per-bucket counts of what happened between."""
    if not now:
        return []
    before = before or {}
    if now.get(math.inf, 0.0) < before.get(math.inf, 0.0):  # counter reset
        before = {}
    out: Buckets = []
    lower, cum_before = 0.0, 0.0
    for upper in sorted(now):
        cum = now[upper] - before.get(upper, 0.0)
        n = cum - cum_before
        if n > 0:
            out.append([lower, None if upper == math.inf else upper, n])
        lower, cum_before = upper, cum
    return out


def interval(prev: Snapshot, cur: Snapshot) -> Interval:
    """What happened between two readings."""
    iv = Interval(ts=cur.ts, dur=max(cur.ts - prev.ts, 1e-6))

    def d(key: str) -> float:
        return _delta(prev.counters.get(key), cur.counters.get(key))

    def engine_or_proxy(what: str) -> float:
        return d(f"engine_{what}" if f"engine_{what}" in cur.counters else f"proxy_{what}")

    iv.counts = {
        "requests": d("requests"),
        "errors": d("errors"),
        "prompt_tokens": engine_or_proxy("prompt_tokens"),
        "completion_tokens": engine_or_proxy("completion_tokens"),
        "prefix_hits": d("prefix_hits"),
        "prefix_queries": d("prefix_queries"),
    }
    iv.gauges = dict(cur.gauges)
    ttft = "engine_ttft" if "engine_ttft" in cur.hists else "proxy_ttft"
    iv.hists = {
        "latency": bucket_delta(prev.hists.get("latency"), cur.hists.get("latency")),
        "ttft": bucket_delta(prev.hists.get(ttft), cur.hists.get(ttft)),
        "itl": bucket_delta(prev.hists.get("itl"), cur.hists.get("itl")),
    }
    return iv


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def live_values(snap: Snapshot, iv: Interval | None) -> dict[str, Any]:
    """The dashboard's tiles: gauges now, rates and percentiles over `iv` (None: not yet known)."""
    g = snap.gauges
    out: dict[str, Any] = {
        "requests_running": g.get("running"),
        "requests_waiting": g.get("waiting"),
        "kv_cache_usage": g.get("kv_cache"),
        "requests_in_flight": g.get("in_flight"),
        "gpu_memory_used_bytes": g.get("gpu_mem_used"),
        "gpu_memory_total_bytes": g.get("gpu_mem_total"),
        "gpu_utilization": g.get("gpu_util"),
        "window_s": None,
    }
    keys = (
        "request_rate",
        "error_rate",
        "prompt_tokens_per_s",
        "completion_tokens_per_s",
        "prefix_cache_hit_rate",
        "latency_p50",
        "latency_p95",
        "ttft_p50",
        "ttft_p95",
        "itl_p50",
    )
    out.update(dict.fromkeys(keys))
    if iv is not None:
        c = iv.counts
        out.update(
            window_s=round(iv.dur, 1),
            request_rate=c["requests"] / iv.dur,
            error_rate=_ratio(c["errors"], c["requests"]),
            prompt_tokens_per_s=c["prompt_tokens"] / iv.dur,
            completion_tokens_per_s=c["completion_tokens"] / iv.dur,
            prefix_cache_hit_rate=_ratio(c["prefix_hits"], c["prefix_queries"]),
            latency_p50=quantile(0.5, iv.hists["latency"]),
            latency_p95=quantile(0.95, iv.hists["latency"]),
            ttft_p50=quantile(0.5, iv.hists["ttft"]),
            ttft_p95=quantile(0.95, iv.hists["ttft"]),
            itl_p50=quantile(0.5, iv.hists["itl"]),
        )
    return out


class Collector:
    """Readings every `interval_s`, intervals into the store, recent readings kept for live values.

    `read` returns the families to read (an iterable of prometheus_client Metric objects) and is
    called in a worker thread; `fetch` (optional, awaited on the loop) returns the engine's metrics
    text, or None when the engine cannot be asked.
    """

    def __init__(
        self,
        store: MetricsStore | None,
        interval_s: float,
        read: Callable[[bytes | None], Iterable[Any]],
        fetch: Callable[[], Awaitable[bytes | None]] | None = None,
        source: str = LOCAL_SOURCE,
        log: Any = None,
    ) -> None:
        self.store = store
        self.interval_s = interval_s
        self.source = source
        self._read = read
        self._fetch = fetch
        self._log = log
        keep = max(2, math.ceil(LIVE_WINDOW_S / max(interval_s, 0.1)) + 2)
        self.recent: collections.deque[Snapshot] = collections.deque(maxlen=keep)
        self.last_cost_s: float | None = None
        """Seconds the last reading took in the worker thread (parse, derive, SQLite)."""
        self.ticks = 0

    async def _text(self) -> bytes | None:
        if self._fetch is None:
            return None
        try:
            return await self._fetch()
        except Exception:  # the engine is starting, stopped, or slow: gauges from the proxy only
            return None

    def _snapshot(self, text: bytes | None) -> Snapshot:
        return take_snapshot(samples_of(self._read(text)), time.time())

    def _record(self, text: bytes | None) -> Snapshot:
        start = time.perf_counter()
        snap = self._snapshot(text)
        prev = self.recent[-1] if self.recent else None
        if prev is not None and self.store is not None:
            try:
                self.store.add(interval(prev, snap), self.source)
            except Exception as exc:  # disk full, file removed: keep the live values going
                if self._log is not None:
                    self._log.warning("metrics history not written", error=str(exc))
        self.recent.append(snap)
        self.last_cost_s = time.perf_counter() - start
        self.ticks += 1
        return snap

    async def tick(self) -> Snapshot:
        return await asyncio.to_thread(self._record, await self._text())

    async def run(self) -> None:
        """Read every interval_s until cancelled; a failing reading never stops the loop."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.tick()
            except Exception as exc:
                if self._log is not None:
                    self._log.warning("metrics collection failed", error=f"{exc.__class__.__name__}: {exc}")
            next_at = max(next_at + self.interval_s, loop.time() + self.interval_s / 10)
            await asyncio.sleep(next_at - loop.time())

    def baseline(self, now: float) -> Snapshot | None:
        """The oldest kept reading no older than the live window (and at least a second old)."""
        for snap in list(self.recent):
            if now - LIVE_WINDOW_S - self.interval_s <= snap.ts <= now - 1:
                return snap
        return None

    async def live(self) -> dict[str, Any]:
        text = await self._text()
        snap = await asyncio.to_thread(self._snapshot, text)
        base = self.baseline(snap.ts)
        out = live_values(snap, interval(base, snap) if base is not None else None)
        out["models"] = model_rows(base, snap)
        out["ts"] = round(snap.ts, 3)
        out["engine_metrics"] = text is not None
        return out


# --- standalone -------------------------------------------------------------------------------


def scrape(url: str, api_key: str | None, timeout: float = 10) -> bytes:
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - the operator's URL
        return resp.read()


def families_from_text(text: bytes | None) -> Iterable[Any]:
    return text_string_to_metric_families(engine_lines(text)) if text else ()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.metrics_collector",
        description="Scrape a /metrics URL into the dashboard's SQLite history.",
    )
    parser.add_argument("url", help="a /metrics URL: this proxy's, or a vLLM server's own")
    parser.add_argument("--db", default=os.environ.get("METRICS_DB_PATH", "data/metrics.db"))
    parser.add_argument("--interval", type=float, default=float(os.environ.get("SCRAPE_INTERVAL", 10)))
    parser.add_argument(
        "--retention-days", type=float, default=float(os.environ.get("METRICS_RETENTION_DAYS", 7))
    )
    parser.add_argument("--source", help="name the rows are stored under (default: the URL)")
    parser.add_argument("--api-key", default=os.environ.get("METRICS_API_KEY"), help="METRICS_API_KEY")
    parser.add_argument("--count", type=int, default=0, help="stop after this many readings (0: never)")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")

    store = MetricsStore(args.db, args.retention_days)
    source = args.source or args.url
    last: Snapshot | None = None
    readings = 0
    print(f"collecting {args.url} every {args.interval:g}s into {args.db} as {source!r}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            started = time.monotonic()
            try:
                text = scrape(args.url, args.api_key)
            except OSError as exc:
                print(f"scrape failed: {exc}", file=sys.stderr, flush=True)
            else:
                snap = take_snapshot(samples_of(families_from_text(text)), time.time())
                if last is not None:
                    store.add(interval(last, snap), source)
                last = snap
            readings += 1
            if args.count and readings >= args.count:
                break
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
