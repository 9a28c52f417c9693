"""Aggregates of a run: percentiles, counts, throughput, prefix-cache hit rates.

How failures count: TTFT, TPOT and latency percentiles are over the successful requests only; every
failed request is counted in `failed` and `error_rate`, listed by message in `errors`, and its
latency summarised apart in `failed_latency_s`. Nothing is dropped without being counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from app.loadtest.client import Result

STAT_KEYS = ("mean", "median", "p95", "p99", "min", "max")


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = (len(sorted_values) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def summarize(values: Iterable[float | None]) -> dict[str, Any]:
    """count, mean, median, p95, p99, min, max of the values that are not None (None when empty)."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return {"count": 0, **dict.fromkeys(STAT_KEYS)}
    return {
        "count": len(data),
        "mean": sum(data) / len(data),
        "median": percentile(data, 50),
        "p95": percentile(data, 95),
        "p99": percentile(data, 99),
        "min": data[0],
        "max": data[-1],
    }


def hit_rate(delta: dict[str, float] | None) -> float | None:
    if not delta or not delta.get("prefix_cache_queries"):
        return None
    return delta.get("prefix_cache_hits", 0.0) / delta["prefix_cache_queries"]


def metrics_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {key: after[key] - before.get(key, 0.0) for key in after}


def add_deltas(total: dict[str, float] | None, more: dict[str, float] | None) -> dict[str, float] | None:
    if more is None:
        return total
    if total is None:
        return dict(more)
    return {key: total.get(key, 0.0) + more.get(key, 0.0) for key in {*total, *more}}


def aggregate(
    results: Sequence[Result], duration_s: float, engine: dict[str, float] | None
) -> dict[str, Any]:
    """The summary of one side of a run (or of one round): see the module docstring."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    completion_tokens = sum(r.completion_tokens or 0 for r in ok)
    errors = Counter((r.status, r.error) for r in failed)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: None)
    return {
        "requests": len(results),
        "ok": len(ok),
        "failed": len(failed),
        "error_rate": len(failed) / len(results) if results else 0.0,
        "errors": [
            {"status": status, "error": error, "count": count}
            for (status, error), count in errors.most_common()
        ],
        "duration_s": duration_s,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "tokens_without_usage": sum(1 for r in ok if not r.tokens_from_usage),
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(completion_tokens),
        "total_token_throughput": per_s(prompt_tokens + completion_tokens),
        "ttft_s": summarize(r.ttft_s for r in ok),
        "tpot_s": summarize(r.tpot_s for r in ok),
        "latency_s": summarize(r.latency_s for r in ok),
        "failed_latency_s": summarize(r.latency_s for r in failed),
        "engine": engine,
        "prefix_cache_hit_rate": hit_rate(engine),
    }


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """b / a for the throughputs and every statistic of TTFT, TPOT and latency."""

    def div(x: float | None, y: float | None) -> float | None:
        return x / y if x is not None and y else None

    out: dict[str, Any] = {
        key: div(b[key], a[key])
        for key in ("request_throughput", "output_throughput", "total_token_throughput")
    }
    for metric in ("ttft_s", "tpot_s", "latency_s"):
        out[metric] = {k: div(b[metric][k], a[metric][k]) for k in STAT_KEYS}
    return out
