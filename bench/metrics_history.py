"""The dashboard's SQLite history under a simulated week: database size, write cost per reading,
query time per window.

    python bench/metrics_history.py [--interval 10] [--days 7] [--db /tmp/history.db]

Each simulated reading carries traffic (requests, errors, tokens) and latency, TTFT and ITL
buckets spread the way a busy server's are, so the rows and roll-ups are as large as real ones.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.metrics_store import SERIES, WINDOWS, Interval, MetricsStore  # noqa: E402

LATENCY = [0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0]
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0]


def buckets(bounds: list[float], n: int, rng: random.Random) -> list[list]:
    counts: dict[int, float] = {}
    for _ in range(n):
        i = min(int(rng.expovariate(0.6)), len(bounds) - 1)
        counts[i] = counts.get(i, 0) + 1
    return [[bounds[i - 1] if i else 0.0, bounds[i], c] for i, c in counts.items()]


def reading(ts: float, dur: float, rng: random.Random) -> Interval:
    n = rng.randint(0, 40)
    return Interval(
        ts=ts,
        dur=dur,
        counts={
            "requests": n,
            "errors": rng.random() < 0.05,
            "prompt_tokens": n * 300,
            "completion_tokens": n * 120,
            "prefix_hits": n * 100,
            "prefix_queries": n * 300,
        },
        gauges={
            "running": rng.randint(0, 32),
            "waiting": rng.randint(0, 4),
            "kv_cache": rng.random(),
            "in_flight": rng.randint(0, 36),
            "gpu_mem_used": 70e9,
            "gpu_mem_total": 80e9,
            "gpu_util": rng.random(),
        },
        hists={
            "latency": buckets(LATENCY, n, rng),
            "ttft": buckets(LATENCY, n, rng),
            "itl": buckets(ITL, n * 5, rng),
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=10)
    parser.add_argument("--days", type=float, default=7)
    parser.add_argument("--db")
    args = parser.parse_args()
    db = Path(args.db or tempfile.mkdtemp()) / "history.db" if not args.db else Path(args.db)
    store = MetricsStore(db, retention_days=args.days)
    rng = random.Random(1)
    end = time.time()
    start = end - args.days * 86400
    steps = int(args.days * 86400 / args.interval)
    began = time.perf_counter()
    worst = 0.0
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        store.add(reading(start + i * args.interval, args.interval, rng))
        worst = max(worst, time.perf_counter() - t0)
    took = time.perf_counter() - began
    print(f"{steps} readings every {args.interval:g}s over {args.days:g} days: {took:.1f}s")
    print(f"write per reading: mean {took / steps * 1000:.2f} ms, worst {worst * 1000:.1f} ms")
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(
        f"database: {os.path.getsize(db) / 2**20:.2f} MiB; rows: "
        + ", ".join(f"{t} {store.count(t)}" for t in ("raw", "m1", "m10"))
    )
    for window in WINDOWS:
        t0 = time.perf_counter()
        for name in SERIES:
            body = store.series(name, window, now=end)
        per = (time.perf_counter() - t0) / len(SERIES) * 1000
        print(f"window {window}: {len(body['points'])} points, {per:.2f} ms per series")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
