"""Aggregates of the load tester: percentiles, and failures counted, never dropped."""

import random

import numpy as np
import pytest

from app.loadtest.client import Result
from app.loadtest.stats import aggregate, hit_rate, metrics_delta, percentile, ratios, summarize


def test_percentiles_agree_with_numpy():
    rng = random.Random(1)
    for n in (1, 2, 7, 100, 1001):
        values = sorted(rng.expovariate(3) for _ in range(n))
        for p in (0, 50, 95, 99, 100):
            assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_summary_of_nothing_is_empty_not_zero():
    assert summarize([None, None]) == {
        "count": 0,
        "mean": None,
        "median": None,
        "p95": None,
        "p99": None,
        "min": None,
        "max": None,
    }


def ok(i: int, latency: float, ttft: float | None, tokens: int) -> Result:
    tpot = (latency - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
    return Result(
        str(i),
        f"r{i}",
        latency_s=latency,
        ttft_s=ttft,
        tpot_s=tpot,
        prompt_tokens=10,
        completion_tokens=tokens,
    )


def failed(i: int, latency: float, error: str, status: int | None = 500) -> Result:
    return Result(str(i), f"r{i}", latency_s=latency, status=status, error=error)


def test_failures_are_counted_listed_and_summarised_apart():
    results = [
        ok(0, 1.0, 0.1, 11),
        ok(1, 2.0, 0.2, 11),
        failed(2, 30.0, "HTTP 500: boom"),
        failed(3, 31.0, "HTTP 500: boom"),
        failed(4, 5.0, "timeout after 5 s", None),
    ]
    summary = aggregate(results, duration_s=2.0, engine=None)
    assert (summary["requests"], summary["ok"], summary["failed"]) == (5, 2, 3)
    assert summary["error_rate"] == pytest.approx(0.6)
    assert summary["errors"] == [
        {"status": 500, "error": "HTTP 500: boom", "count": 2},
        {"status": None, "error": "timeout after 5 s", "count": 1},
    ]
    assert summary["latency_s"]["max"] == 2.0  # the failed ones' 30 s are not in the percentiles...
    assert summary["failed_latency_s"]["count"] == 3  # ...but summarised here
    assert summary["failed_latency_s"]["max"] == 31.0
    assert summary["completion_tokens"] == 22 and summary["prompt_tokens"] == 20
    assert summary["request_throughput"] == 1.0 and summary["output_throughput"] == 11.0
    assert summary["tpot_s"]["mean"] == pytest.approx(((1.0 - 0.1) / 10 + (2.0 - 0.2) / 10) / 2)


def test_a_request_without_ttft_still_counts_for_latency():
    summary = aggregate([ok(0, 1.0, None, 5), ok(1, 3.0, 0.5, 5)], duration_s=3.0, engine=None)
    assert summary["latency_s"]["count"] == 2 and summary["ttft_s"]["count"] == 1


def test_prefix_cache_hit_rate_from_counter_deltas():
    before = {"prefix_cache_hits": 100.0, "prefix_cache_queries": 400.0}
    after = {"prefix_cache_hits": 400.0, "prefix_cache_queries": 1000.0}
    assert hit_rate(metrics_delta(before, after)) == pytest.approx(0.5)
    assert hit_rate(metrics_delta(before, before)) is None  # nothing asked: no rate, not 0
    assert metrics_delta(None, after) is None


def test_ratios_are_b_over_a_and_none_where_undefined():
    a = aggregate([ok(0, 1.0, 0.1, 11)], 1.0, None)
    b = aggregate([ok(0, 2.0, 0.3, 11)], 2.0, None)
    r = ratios(a, b)
    assert r["latency_s"]["mean"] == pytest.approx(2.0)
    assert r["ttft_s"]["p99"] == pytest.approx(3.0)
    assert r["request_throughput"] == pytest.approx(0.5)
    empty = aggregate([failed(0, 1.0, "x")], 1.0, None)
    assert ratios(empty, b)["ttft_s"]["mean"] is None
