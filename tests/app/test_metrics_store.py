"""The SQLite history: percentiles from buckets, roll-ups that add up, retention, window reads."""

import math
import time

import pytest

from app.metrics_store import SERIES, TIERS, WINDOWS, Interval, MetricsStore, merge_buckets, quantile


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    # 10 observations in (0, 0.1], 10 in (0.1, 0.5]: the median is the top of the first bucket,
    # the 75th percentile halfway through the second.
    buckets = [[0.0, 0.1, 10], [0.1, 0.5, 10]]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.3)
    assert quantile(0.99, [[0.0, 1.0, 1], [60.0, None, 1]]) == 60.0  # +Inf bucket: its lower bound
    assert quantile(0.5, []) is None


def test_merged_buckets_add_up():
    merged = merge_buckets([[[0.0, 0.1, 2], [0.1, 0.5, 1]], [[0.1, 0.5, 3], [60.0, None, 1]]])
    assert sorted(merged, key=lambda b: b[0]) == [[0.0, 0.1, 2], [0.1, 0.5, 4], [60.0, None, 1]]


def reading(ts, dur=10.0, requests=6, slow=False, running=2.0):
    hist = [[0.5, 1.0, requests]] if slow else [[0.0, 0.1, requests]]
    return Interval(
        ts=ts,
        dur=dur,
        counts={"requests": requests, "errors": 1, "prompt_tokens": 100, "completion_tokens": 50},
        gauges={"running": running, "kv_cache": 0.25},
        hists={"latency": hist, "ttft": hist},
    )


def test_rollups_sum_counts_weight_gauges_and_merge_buckets(tmp_path):
    store = MetricsStore(tmp_path / "h.db")
    start = 1_800_000_000  # a multiple of 600: buckets line up
    # 10 minutes at 10 s: the first five minutes fast and idle-ish, the next five slow and busy.
    for i in range(1, 61):
        store.add(reading(start + i * 10, slow=i > 30, running=1.0 if i <= 30 else 3.0), now=start + i * 10)
    store.add(reading(start + 610), now=start + 610)  # closes the last minute and the 10-minute bucket
    assert store.count("m1") == 10 and store.count("m10") == 1

    now = start + 611
    rate = store.series("request_rate", "1d", now=now)
    assert rate["step_s"] == 60 and len(rate["points"]) == 10
    assert all(v == pytest.approx(6 / 10) for _, v in rate["points"])  # 36 requests per 60 s
    week = {name: store.series(name, "1w", now=now)["points"] for name in SERIES}
    assert week["request_rate"] == [[start + 600, pytest.approx(0.6)]]
    assert week["error_rate"][0][1] == pytest.approx(1 / 6)
    assert week["requests_running"][0][1] == pytest.approx(2.0)  # 1 for 5 min, 3 for 5 min
    assert week["requests_running_max"][0][1] == 3.0
    # Half the requests in (0, 0.1], half in (0.5, 1]: the p95 of the merged buckets is in the slow
    # one; an average of the per-minute p95s would say ~0.5.
    assert week["latency_p95"][0][1] == pytest.approx(0.5 + 0.5 * 0.9)
    assert week["latency_p50"][0][1] == pytest.approx(0.1)
    assert week["gpu_memory_used_bytes"][0][1] is None  # no GPU: no value, not zero


def test_each_window_reads_its_own_tier_and_range(tmp_path):
    store = MetricsStore(tmp_path / "h.db")
    now = 1_800_000_000
    for i in range(3 * 360, 0, -1):  # three hours at 10 s
        store.add(reading(now - i * 10), now=now - i * 10)
    hour = store.series("request_rate", "1h", now=now)["points"]
    assert 359 <= len(hour) <= 361 and hour[0][0] > now - 3600
    day = store.series("request_rate", "1d", now=now)["points"]
    assert 178 <= len(day) <= 180  # three hours of minutes
    assert {w: t for w, (_, t) in WINDOWS.items()} == {"1h": "raw", "1d": "m1", "1w": "m10"}


def test_retention_prunes_every_tier(tmp_path):
    store = MetricsStore(tmp_path / "h.db", retention_days=1 / 24)  # one hour
    now = 1_800_000_000
    for i in range(180, 0, -1):  # three hours at a minute
        store.add(reading(now - i * 60, dur=60), now=now - i * 60)
    for tier in TIERS:
        oldest = store._db.execute(f"SELECT MIN(ts) FROM {tier.name}").fetchone()[0]
        assert oldest is None or oldest >= now - 60 - 3600 - 600, tier.name


def test_sources_are_kept_apart(tmp_path):
    store = MetricsStore(tmp_path / "h.db")
    now = time.time()
    store.add(reading(now - 20, requests=10), "local")
    store.add(reading(now - 10, requests=1), "http://other:8000/metrics")
    assert store.sources() == ["http://other:8000/metrics", "local"]
    assert store.series("request_rate", "1h", "local", now=now)["points"][0][1] == 1.0
    other = store.series("request_rate", "1h", "http://other:8000/metrics", now=now)["points"]
    assert other[0][1] == pytest.approx(0.1)


def test_a_simulated_day_stays_small_and_fast(tmp_path):
    """A day of readings every 60 s (bench/metrics_history.py measures a week at 10 s)."""
    store = MetricsStore(tmp_path / "h.db")
    now = time.time()
    for i in range(1440, 0, -1):
        store.add(reading(now - i * 60, dur=60), now=now - i * 60)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert (tmp_path / "h.db").stat().st_size < 2 * 2**20
    began = time.perf_counter()
    for window in WINDOWS:
        for name in SERIES:
            store.series(name, window, now=now)
    per_query = (time.perf_counter() - began) / (len(WINDOWS) * len(SERIES))
    assert per_query < 0.05, per_query
    assert not math.isnan(store.series("latency_p95", "1w", now=now)["points"][-1][1])
