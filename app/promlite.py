"""Counters, gauges and histograms for the hot path, without locks.

prometheus_client guards every update with a `threading.Lock` and re-checks label state on each
call: several microseconds per request across a handful of updates, for a proxy that updates them
from one event-loop thread. These keep plain numbers per labelled child, look children up once, and
are exposed through prometheus_client's own registry and exposition (a `Collector`), so `/metrics`
reads exactly as with prometheus_client's classes. Same update API: `labels(...)`, `inc`, `dec`,
`set`, `observe`.

Updates must come from the event-loop thread (a scrape from another thread reads a consistent-enough
snapshot: each number is read once).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class _Family(Collector):
    kind = ""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._only = self._children[()] = self._child()
        registry.register(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: Any) -> Any:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
            child = self._children[key] = self._child()
        return child

    def describe(self) -> Iterator[Any]:
        yield from self._families({})

    def collect(self) -> Iterator[Any]:
        yield from self._families(dict(self._children))

    def _families(self, children: dict) -> Iterator[Any]:
        raise NotImplementedError


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Counter(_Family):
    """Exposed as `<name>_total`, like prometheus_client's Counter."""

    def _child(self) -> _Value:
        return _Value()

    def inc(self, amount: float = 1) -> None:
        self._only.value += amount

    def _families(self, children: dict) -> Iterator[Any]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in children.items():
            family.add_metric(key, child.value)
        yield family


class Gauge(_Family):
    def _child(self) -> _Value:
        return _Value()

    def inc(self, amount: float = 1) -> None:
        self._only.value += amount

    def dec(self, amount: float = 1) -> None:
        self._only.value -= amount

    def set(self, value: float) -> None:
        self._only.value = value

    def _families(self, children: dict) -> Iterator[Any]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in children.items():
            family.add_metric(key, child.value)
        yield family


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class Histogram(_Family):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        super().__init__(name, documentation, labelnames, registry=registry)

    def _child(self) -> _Buckets:
        return _Buckets(self.bounds)

    def observe(self, value: float) -> None:
        self._only.observe(value)

    def _families(self, children: dict) -> Iterator[Any]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [*(_edge(b) for b in self.bounds), "+Inf"]
        for key, child in children.items():
            running, cumulative = 0, []
            for edge, count in zip(edges, list(child.counts), strict=True):
                running += count
                cumulative.append((edge, running))
            family.add_metric(list(key), cumulative, child.sum)
        yield family


def _edge(bound: float) -> str:
    """A bucket's `le` as prometheus_client writes it (`0.01`, `1.0`)."""
    return floatToGoString(bound)
