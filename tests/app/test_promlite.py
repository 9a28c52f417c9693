import time

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest

from app import promlite


def _pair(kind: str, *args, **kwargs):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    a = getattr(promlite, kind)(*args, registry=ours, **kwargs)
    b = getattr(prometheus_client, kind)(*args, registry=theirs, **kwargs)
    return a, b, ours, theirs


def _text(registry) -> list[str]:
    return sorted(line for line in generate_latest(registry).decode().splitlines() if "_created" not in line)


def test_counter_exposes_like_prometheus_client():
    a, b, ours, theirs = _pair("Counter", "x_requests", "Requests.", ["route", "status"])
    for metric in (a, b):
        metric.labels("/v1", 200).inc()
        metric.labels("/v1", 200).inc(2.5)
        metric.labels("/other", "404").inc()
    assert _text(ours) == _text(theirs)


def test_histogram_buckets_are_inclusive_and_cumulative_like_prometheus_client():
    buckets = (0.01, 0.1, 1.0, 10.0)
    a, b, ours, theirs = _pair("Histogram", "x_seconds", "Latency.", ["route"], buckets=buckets)
    for metric in (a, b):
        child = metric.labels("/v1")
        for value in (0.005, 0.01, 0.05, 0.1, 3, 10, 11, 1e9):
            child.observe(value)
    assert _text(ours) == _text(theirs)


def test_unlabelled_gauge_and_counter():
    a, b, ours, theirs = _pair("Gauge", "x_in_flight", "In flight.")
    for metric in (a, b):
        metric.inc()
        metric.inc(3)
        metric.dec()
    assert _text(ours) == _text(theirs)
    c, d, ours, theirs = _pair("Counter", "x_total_things", "Things.")
    c.inc(2)
    d.inc(2)
    assert _text(ours) == _text(theirs)


def test_wrong_label_count_is_an_error():
    a, _, _, _ = _pair("Counter", "x_c", "C.", ["a"])
    try:
        a.labels("1", "2")
    except ValueError as exc:
        assert "takes labels" in str(exc)
    else:
        raise AssertionError("no error")


# --- several processes: per-process files, summed ------------------------------------------------


def _shared_families(tmp_path, name: str):
    """One process's families (as app/metrics.py makes them), kept in `<tmp_path>/<name>.metrics`."""
    registry = CollectorRegistry()
    families = (
        promlite.Counter("x_requests", "Requests.", ["route", "status"], registry=registry),
        promlite.Histogram("x_seconds", "Latency.", ["route"], buckets=(0.1, 1.0), registry=registry),
        promlite.Gauge("x_in_flight", "In flight.", registry=registry),
    )
    values = promlite.SharedValues(tmp_path, name)
    promlite.use_shared(values, families)
    return registry, families, values


def _samples(registry) -> dict[tuple, float]:
    """A scrape (files are read again once the previous scrape's reading is READ_EVERY old)."""
    from prometheus_client.parser import text_string_to_metric_families

    time.sleep(promlite.SharedValues.READ_EVERY * 1.2)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_every_process_exposes_the_sum_of_all(tmp_path):
    reg0, (req0, sec0, flight0), _ = _shared_families(tmp_path, "worker-0")
    reg1, (req1, sec1, flight1), _ = _shared_families(tmp_path, "worker-1")
    req0.labels("/v1", "200").inc()
    req1.labels("/v1", "200").inc(2)
    req1.labels("/v1", "500").inc()
    sec0.labels("/v1").observe(0.05)
    sec1.labels("/v1").observe(0.5)
    sec1.labels("/v1").observe(5)
    flight0.inc()
    flight1.inc(2)
    flight1.dec()
    # prometheus_client, told everything that happened in both, is the reference
    ref = CollectorRegistry()
    r = prometheus_client.Counter("x_requests", "Requests.", ["route", "status"], registry=ref)
    h = prometheus_client.Histogram("x_seconds", "Latency.", ["route"], buckets=(0.1, 1.0), registry=ref)
    g = prometheus_client.Gauge("x_in_flight", "In flight.", registry=ref)
    r.labels("/v1", "200").inc(3)
    r.labels("/v1", "500").inc()
    for v in (0.05, 0.5, 5):
        h.labels("/v1").observe(v)
    g.inc(2)
    expected = {k: v for k, v in _samples(ref).items() if not k[0].endswith("_created")}
    assert _samples(reg0) == _samples(reg1) == expected


def test_a_restarted_process_goes_on_counting_and_starts_with_nothing_in_flight(tmp_path):
    reg0, (req0, _, flight0), _ = _shared_families(tmp_path, "worker-0")
    _, (req1, _, flight1), values1 = _shared_families(tmp_path, "worker-1")
    req0.labels("/v1", "200").inc(5)
    req1.labels("/v1", "200").inc(7)
    flight1.inc(3)  # then worker 1 dies with 3 requests in flight
    values1.close()
    before = _samples(reg0)
    assert before[("x_requests_total", (("route", "/v1"), ("status", "200")))] == 12
    _, (again, _, flight_again), _ = _shared_families(tmp_path, "worker-1")  # restarted: same file
    after = _samples(reg0)
    assert after[("x_requests_total", (("route", "/v1"), ("status", "200")))] == 12  # not 5, not 19
    assert after[("x_in_flight", ())] == 0
    again.labels("/v1", "200").inc()
    assert _samples(reg0)[("x_requests_total", (("route", "/v1"), ("status", "200")))] == 13


def test_a_series_made_after_the_switch_lives_in_the_file_too(tmp_path):
    reg0, (req0, _, _), _ = _shared_families(tmp_path, "worker-0")
    reg1, _, _ = _shared_families(tmp_path, "worker-1")
    for i in range(300):  # many series: the file grows entry by entry
        req0.labels(f"/r{i}", "200").inc(i)
    samples = _samples(reg1)
    assert samples[("x_requests_total", (("route", "/r299"), ("status", "200")))] == 299
    assert sum(v for k, v in samples.items() if k[0] == "x_requests_total") == sum(range(300))
