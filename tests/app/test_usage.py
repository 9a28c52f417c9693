"""The usage store (app/usage.py): additive rows that several writers can share, windows, the
per-day fold of old rows, and counts that are never lost when a write fails."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from pathlib import Path

from app.admission import Admission
from app.keys import KeyEntry
from app.middleware import RequestRecord
from app.routes import classify
from app.usage import Accounting, Usage, UsageStore

DAY = 86400


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _write(path: str, key: str, n: int) -> None:
    store = UsageStore(Path(path))
    for _ in range(n):
        store.add([(key, 600, 1, 2, 3, 0, 0)])
    store.close()


def test_several_processes_add_to_the_same_rows_and_nothing_is_lost(tmp_path):
    path = tmp_path / "usage.db"
    UsageStore(path).close()
    ctx = multiprocessing.get_context("fork")  # the modules are loaded already
    procs = [ctx.Process(target=_write, args=(str(path), key, 200)) for key in ("a", "a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = UsageStore(path)
    totals = store.totals(None)
    assert totals["a"] == {
        "requests": 400,
        "prompt_tokens": 800,
        "completion_tokens": 1200,
        "errors": 0,
        "rate_limited": 0,
    }
    assert totals["b"]["requests"] == 200
    assert store.totals(None, "b").keys() == {"b"}


def test_windows_count_whole_minutes_and_old_minutes_fold_into_days(tmp_path):
    clock = Clock(100 * DAY + 5000)
    usage = Usage(UsageStore(tmp_path / "usage.db"), clock=clock)

    async def main() -> None:
        for age in (0, 30 * 60, 2 * 3600, 3 * DAY, 20 * DAY, 20 * DAY + 60, 30 * DAY):
            clock.now = 100 * DAY + 5000 - age
            usage.record("k", 200, 1, 1, False)
        clock.now = 100 * DAY + 5000
        usage.record("k", 429, 0, 0, True)
        got = {w: (await usage.totals(w))["k"]["requests"] for w in ("1h", "1d", "1w", "all")}
        assert got == {"1h": 3, "1d": 4, "1w": 5, "all": 8}
        assert (await usage.totals("1h"))["k"]["rate_limited"] == 1
        assert (await usage.totals("1h"))["k"]["errors"] == 1
        assert usage.store.rollup(clock.now) == 3  # the three rows older than 8 days
        assert {w: (await usage.totals(w))["k"]["requests"] for w in ("1h", "1d", "1w", "all")} == got
        rows = usage.store._db.execute("SELECT COUNT(*) FROM usage WHERE bucket % 86400 = 0").fetchone()[0]
        assert rows == 2  # the 20-day-old minutes share a day

    asyncio.run(main())


def test_a_failed_write_keeps_the_counts_for_the_next(tmp_path):
    store = UsageStore(tmp_path / "usage.db")
    usage = Usage(store)
    real_add = store.add
    calls = []

    def failing(rows):
        calls.append(rows)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        real_add(rows)

    store.add = failing  # type: ignore[method-assign]

    async def main() -> None:
        usage.record("k", 200, 5, 6, False)
        await usage.flush()  # fails: the counts stay pending
        usage.record("k", 200, 5, 6, False)
        await usage.flush()
        assert store.totals(None)["k"] == {
            "requests": 2,
            "prompt_tokens": 10,
            "completion_tokens": 12,
            "errors": 0,
            "rate_limited": 0,
        }

    asyncio.run(main())


def test_accounting_counts_engine_routes_and_charges_a_keys_tpm_with_prompt_only_usage():
    async def main() -> None:
        admission = Admission()
        key = KeyEntry("k", b"s", tpm=60)
        (await admission.enter("k", key, type("R", (), {"queued_s": None})())).release()
        usage = Usage(None)
        accounting = Accounting(usage, admission)
        rec = RequestRecord("r", "POST", "/v1/embeddings", None, route=classify("/v1/embeddings"))
        rec.key, rec.prompt_tokens = "k", 60  # embeddings: prompt tokens only
        accounting.finished(rec, 200)
        local = RequestRecord("r2", "GET", "/info", None, route=classify("/info"))
        local.key = "k"
        accounting.finished(local, 200)  # the proxy's own routes are not usage
        assert [counts[0] for counts in usage._pending.values()] == [1]
        assert admission._keys["k"].tpm.level <= 0

    asyncio.run(main())
