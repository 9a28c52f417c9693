"""The collector: readings from metrics texts and the proxy's registry, intervals between two
readings, the background loop and live values."""

import asyncio
import itertools

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from app.metrics_collector import (
    Collector,
    bucket_delta,
    families_from_text,
    interval,
    live_values,
    samples_of,
    take_snapshot,
)
from app.metrics_store import MetricsStore


def engine_text(requests_ok=0, requests_5xx=0, ttft=(0, 0, 0), gen=0, running=0, kv=0.0, hits=0, queries=0):
    """An exposition text shaped like the proxy's /metrics: its own families, then vLLM's."""
    le = ["0.01", "0.1", "+Inf"]
    cum = list(itertools.accumulate(ttft))
    lines = [
        "# HELP vllm_api_requests_total Requests.",
        "# TYPE vllm_api_requests_total counter",
        f'vllm_api_requests_total{{route="/v1/completions",model="m",status="200"}} {requests_ok}',
        f'vllm_api_requests_total{{route="/v1/completions",model="",status="502"}} {requests_5xx}',
        f'vllm_api_request_duration_seconds_bucket{{route="/v1/completions",model="m",le="0.1"}} {requests_ok}',
        f'vllm_api_request_duration_seconds_bucket{{route="/v1/completions",model="m",le="+Inf"}} {requests_ok}',
        f'vllm_api_request_duration_seconds_bucket{{route="/v1/models",model="",le="0.1"}} {requests_5xx * 100}',
        f'vllm_api_request_duration_seconds_bucket{{route="/v1/models",model="",le="+Inf"}} {requests_5xx * 100}',
        "vllm_api_requests_in_flight 3.0",
        "# HELP vllm:num_requests_running Running.",
        "# TYPE vllm:num_requests_running gauge",
        f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}',
        f'vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {kv}',
        f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {gen}',
        f'vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {hits}',
        f'vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {queries}',
        'vllm:e2e_request_latency_seconds_bucket{engine="0",model_name="m",le="+Inf"} 999',
    ]
    lines += [
        f'vllm:time_to_first_token_seconds_bucket{{engine="0",model_name="m",le="{b}"}} {c}'
        for b, c in zip(le, cum, strict=True)
    ]
    return ("\n".join(lines) + "\n").encode()


def snap(text, ts):
    return take_snapshot(samples_of(families_from_text(text)), ts)


def test_an_interval_holds_rates_ratios_and_bucket_deltas():
    a = snap(engine_text(requests_ok=10, ttft=(5, 0, 0), gen=100, hits=0, queries=10), 100.0)
    b = snap(
        engine_text(
            requests_ok=28, requests_5xx=2, ttft=(5, 10, 10), gen=300, running=4, kv=0.5, hits=30, queries=60
        ),
        110.0,
    )
    iv = interval(a, b)
    assert iv.dur == 10.0
    assert iv.counts["requests"] == 20 and iv.counts["errors"] == 2
    assert iv.counts["completion_tokens"] == 200  # the engine's counter
    assert iv.hists["ttft"] == [[0.01, 0.1, 10], [0.1, None, 10]]  # the engine's TTFT, per bucket
    assert iv.hists["latency"] == [[0.0, 0.1, 18]]  # only requests that named a model
    live = live_values(b, iv)
    assert live["request_rate"] == 2.0 and live["error_rate"] == 0.1
    assert live["completion_tokens_per_s"] == 20.0
    assert live["prefix_cache_hit_rate"] == pytest.approx(30 / 50)
    assert live["requests_running"] == 4 and live["kv_cache_usage"] == 0.5
    assert live["requests_in_flight"] == 3.0
    assert live["ttft_p50"] == pytest.approx(0.1) and live["ttft_p95"] == 0.1  # +Inf: its lower bound
    assert live["gpu_memory_used_bytes"] is None  # no GPU gauges in the text


def test_a_counter_reset_counts_from_zero_instead_of_going_negative():
    assert bucket_delta({0.1: 50, float("inf"): 60}, {0.1: 2, float("inf"): 3}) == [
        [0.0, 0.1, 2],
        [0.1, None, 1],
    ]
    a = snap(engine_text(requests_ok=1000, gen=5000), 0.0)
    b = snap(engine_text(requests_ok=4, gen=40), 10.0)
    iv = interval(a, b)
    assert iv.counts["requests"] == 4 and iv.counts["completion_tokens"] == 40


def test_the_proxys_own_registry_is_read_in_process():
    registry = CollectorRegistry()
    requests = Counter("vllm_api_requests", "r", ["route", "model", "status"], registry=registry)
    ttft = Histogram("vllm_api_time_to_first_token_seconds", "t", ["route", "model"], registry=registry)
    requests.labels("/v1/chat/completions", "m", "200").inc(3)
    for v in (0.02, 0.03, 0.2):
        ttft.labels("/v1/chat/completions", "m").observe(v)
    s0 = take_snapshot(samples_of(registry.collect()), 0.0)
    assert s0.counters["requests"] == 3
    assert s0.hists["proxy_ttft"][0.025] == 1 and s0.hists["proxy_ttft"][float("inf")] == 3
    # No engine TTFT in the reading (another engine): the proxy's stands in.
    iv = interval(take_snapshot([], -10.0), s0)
    assert sum(n for *_, n in iv.hists["ttft"]) == 3


def test_the_collector_loop_stores_intervals_and_serves_live_values(tmp_path):
    store = MetricsStore(tmp_path / "h.db")
    texts = iter([engine_text(requests_ok=n, gen=10 * n) for n in (0, 5, 10, 15, 20, 25, 30)])

    async def fetch():
        return next(texts)

    async def scenario():
        collector = Collector(store, 0.05, families_from_text, fetch)
        task = asyncio.ensure_future(collector.run())
        deadline = asyncio.get_running_loop().time() + 5
        while store.count("raw") < 3:
            assert asyncio.get_running_loop().time() < deadline, "the collector stored nothing"
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert collector.last_cost_s is not None and collector.last_cost_s < 1
        return collector

    collector = asyncio.run(scenario())
    points = store.series("request_rate", "1h")["points"]
    assert len(points) >= 3 and all(v > 0 for _, v in points)
    # Live values compare a fresh reading with the oldest kept one (a second or more old).
    collector.recent[0].ts -= 30
    live = asyncio.run(collector.live())
    assert live["engine_metrics"] is True and live["request_rate"] > 0 and live["window_s"] >= 30


def test_a_failing_engine_or_store_does_not_stop_the_collector(tmp_path):
    class BrokenStore:
        def add(self, *a, **k):
            raise OSError("disk full")

    async def fetch():
        raise ConnectionError("engine gone")

    async def scenario():
        collector = Collector(BrokenStore(), 1, families_from_text, fetch)
        await collector.tick()
        await collector.tick()
        return collector

    collector = asyncio.run(scenario())
    assert collector.ticks == 2


def lora_text(base_ok, math_ok, math_400, math_ttft, math_tokens):
    """The proxy's families for a base model and a LoRA adapter (`model` label) between readings."""
    cum = list(itertools.accumulate(math_ttft))
    lines = [
        f'vllm_api_requests_total{{route="/v1/completions",model="tiny",status="200"}} {base_ok}',
        f'vllm_api_requests_total{{route="/v1/completions",model="math",status="200"}} {math_ok}',
        f'vllm_api_requests_total{{route="/v1/completions",model="math",status="400"}} {math_400}',
        'vllm_api_requests_total{route="/v1/completions",model="math",status="499"} 7',
        'vllm_api_requests_total{route="/v1/completions",model="",status="404"} 50',
        f'vllm_api_completion_tokens_total{{model="math"}} {math_tokens}',
    ]
    lines += [
        f'vllm_api_time_to_first_token_seconds_bucket{{route="/v1/completions",model="math",le="{b}"}} {c}'
        for b, c in zip(["0.01", "0.1", "+Inf"], cum, strict=True)
    ]
    return ("\n".join(lines) + "\n").encode()


def test_per_model_rows_hold_totals_and_the_windows_rates_and_ttft_per_adapter():
    """The dashboard's per-model and per-LoRA-adapter table (app/lora/)."""
    from app.metrics_collector import model_rows

    a = snap(lora_text(5, 10, 1, (10, 0, 0), 100), 100.0)
    b = snap(lora_text(5, 30, 3, (10, 0, 20), 500), 110.0)
    rows = {r["model"]: r for r in model_rows(a, b)}
    assert set(rows) == {"tiny", "math"}  # the unlabelled (refused) requests are no model's
    math = rows["math"]
    assert (math["requests"], math["errors"], math["completion_tokens"]) == (40, 3, 500)  # 499 is no error
    assert math["request_rate"] == pytest.approx(2.2) and math["completion_tokens_per_s"] == pytest.approx(40)
    assert math["error_rate"] == pytest.approx(2 / 22)
    assert math["ttft_p50"] == math["ttft_p95"] == 0.1  # this window's streams only, all above 0.1 s
    assert rows["tiny"]["request_rate"] == 0 and rows["tiny"]["ttft_p50"] is None
    assert model_rows(None, b)[0]["request_rate"] is None  # no earlier reading yet
