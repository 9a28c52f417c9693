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
