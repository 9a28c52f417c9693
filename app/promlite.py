"""Counters, gauges and histograms for the hot path, without locks.

prometheus_client guards every update with a `threading.Lock` and re-checks label state on each
call: several microseconds per request across a handful of updates, for a proxy that updates them
from one event-loop thread. These keep plain numbers per labelled child, look children up once, and
are exposed through prometheus_client's own registry and exposition (a `Collector`), so `/metrics`
reads exactly as with prometheus_client's classes. Same update API: `labels(...)`, `inc`, `dec`,
`set`, `observe`.

Updates must come from the event-loop thread (a scrape from another thread reads a consistent-enough
snapshot: each number is read once).

Several processes (PROXY_WORKERS > 1, app/workers.py): `use_shared(SharedValues(dir, name))` moves
this process's numbers into a file of its own, mmap'd (an update is still one store of a double),
and every family then exposes the sum over all the files in `dir`: one /metrics for the whole
service, whichever process is scraped. A process restarted under the same name takes its file back:
its counters go on from where they were (never backwards), its gauges start again at 0 (what a
dead process had in flight is no longer in flight); the file of a process that died stays and is
summed once, by name, never twice.
"""

from __future__ import annotations

import bisect
import math
import mmap
import os
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

_FAMILIES: list[_Family] = []
"""Every family made in this process, for `use_shared`."""


class _Family(Collector):
    kind = ""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._shared: SharedValues | None = None
        if not self.labelnames:
            self._only = self._children[()] = self._child()
        registry.register(self)
        _FAMILIES.append(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def _width(self) -> int:
        """Doubles one child takes in a shared file."""
        return 1

    def _shared_child(self, key: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def labels(self, *values: Any) -> Any:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
            child = self._children[key] = self._shared_child(key) if self._shared else self._child()
        return child

    def share(self, values: SharedValues) -> None:
        """From now on, keep this family's numbers in `values` and expose every process's sum."""
        self._shared = values
        for key in list(self._children):
            self._children[key] = self._shared_child(key)
        if not self.labelnames:
            self._only = self._children[()]

    def describe(self) -> Iterator[Any]:
        yield from self._families({})

    def collect(self) -> Iterator[Any]:
        if self._shared is not None:
            yield from self._families(self._shared.summed(self.name, self._width()))
        else:
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


class _SharedValue:
    """A `_Value` kept in a shared file: one double."""

    __slots__ = ("_d", "_i")

    def __init__(self, doubles: memoryview, index: int) -> None:
        self._d = doubles
        self._i = index

    @property
    def value(self) -> float:
        return self._d[self._i]

    def inc(self, amount: float = 1) -> None:
        self._d[self._i] += amount

    def dec(self, amount: float = 1) -> None:
        self._d[self._i] -= amount

    def set(self, value: float) -> None:
        self._d[self._i] = value


class _Summed:
    """What a shared family exposes for one label set: every process's numbers added up."""

    __slots__ = ("value", "counts", "sum")

    def __init__(self, values: list[float]) -> None:
        self.value = values[0]
        self.counts = values[:-1]
        self.sum = values[-1]


class Counter(_Family):
    """Exposed as `<name>_total`, like prometheus_client's Counter."""

    def _child(self) -> _Value:
        return _Value()

    def _shared_child(self, key: tuple[str, ...]) -> _SharedValue:
        assert self._shared is not None
        return _SharedValue(self._shared.doubles, self._shared.slot(self.name, key, 1))

    def inc(self, amount: float = 1) -> None:
        self._only.inc(amount)

    def _families(self, children: dict) -> Iterator[Any]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in children.items():
            family.add_metric(key, child.value)
        yield family


class Gauge(_Family):
    def _child(self) -> _Value:
        return _Value()

    def _shared_child(self, key: tuple[str, ...]) -> _SharedValue:
        assert self._shared is not None
        index = self._shared.slot(self.name, key, 1)
        self._shared.doubles[index] = 0.0  # a restarted process starts with nothing in flight
        return _SharedValue(self._shared.doubles, index)

    def inc(self, amount: float = 1) -> None:
        self._only.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._only.dec(amount)

    def set(self, value: float) -> None:
        self._only.set(value)

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


class _SharedBuckets:
    """`_Buckets` kept in a shared file: a count per bucket, then the sum."""

    __slots__ = ("bounds", "_d", "_i", "_sum")

    def __init__(self, bounds: tuple[float, ...], doubles: memoryview, index: int) -> None:
        self.bounds = bounds
        self._d = doubles
        self._i = index
        self._sum = index + len(bounds) + 1

    def observe(self, value: float) -> None:
        d = self._d
        d[self._i + bisect.bisect_left(self.bounds, value)] += 1
        d[self._sum] += value


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

    def _width(self) -> int:
        return len(self.bounds) + 2

    def _shared_child(self, key: tuple[str, ...]) -> _SharedBuckets:
        assert self._shared is not None
        return _SharedBuckets(
            self.bounds, self._shared.doubles, self._shared.slot(self.name, key, self._width())
        )

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


# --- several processes --------------------------------------------------------------------------

_MAGIC = b"vllmapi1"
_HEAD = 16  # magic, then the bytes used (entries end there)
_ENTRY = struct.Struct("<II")  # key length, doubles


class SharedValues:
    """This process's numbers in `<dir>/<name>.metrics` (mmap'd, fixed size, sparse), and the sum of
    every `*.metrics` file in `dir` for exposition.

    The file is a header (magic, bytes used) and entries appended as children are first made: key
    length and width, the key (JSON: family name and label values), padding to 8 bytes, then
    `width` doubles. The bytes-used field is written after an entry is whole, so a reader never
    sees half of one; a double is stored in one aligned write.
    """

    SIZE = 16 << 20
    READ_EVERY = 0.02
    """A scrape reads every file once for all its families (they are collected one after another)."""

    def __init__(self, directory: str | Path, name: str) -> None:
        self.dir = Path(directory)
        self.path = self.dir / f"{name}.metrics"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < self.SIZE:
                os.ftruncate(fd, self.SIZE)
            self._mm = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)
        if self._mm[:8] != _MAGIC:
            self._mm[:8] = _MAGIC
            struct.pack_into("<Q", self._mm, 8, _HEAD)
        self.doubles = memoryview(self._mm).cast("d")
        self._slots = {key: (at, width) for key, at, width in _entries(self._mm)}
        self._used = struct.unpack_from("<Q", self._mm, 8)[0]
        self._summed: dict[str, dict[tuple[str, ...], list[float]]] = {}
        self._read_at = -math.inf

    def slot(self, family: str, labels: tuple[str, ...], width: int) -> int:
        """Index (in `doubles`) of the first of `width` doubles for this child: its old place if
        this file already has it (a restarted process), else a new one, zeroed."""
        key = orjson.dumps([family, list(labels)])
        found = self._slots.get(key)
        if found is not None and found[1] == width:
            return found[0] // 8
        start = self._used + _ENTRY.size + len(key)
        start += -start % 8
        end = start + width * 8
        if end > self.SIZE:
            raise RuntimeError(f"{self.path}: no room for more metric series")
        _ENTRY.pack_into(self._mm, self._used, len(key), width)
        self._mm[self._used + _ENTRY.size : self._used + _ENTRY.size + len(key)] = key
        self._mm[start:end] = bytes(end - start)
        struct.pack_into("<Q", self._mm, 8, end)  # the entry is whole: readers may see it
        self._used = end
        self._slots[key] = (start, width)
        return start // 8

    def summed(self, family: str, width: int) -> dict[tuple[str, ...], Any]:
        """Every process's numbers for one family, added up per label set."""
        now = time.monotonic()
        if now - self._read_at > self.READ_EVERY:
            self._summed = read_dir(self.dir)
            self._read_at = now
        return {
            labels: _Summed(values)
            for labels, values in self._summed.get(family, {}).items()
            if len(values) == width
        }

    def close(self) -> None:
        self.doubles.release()
        self._mm.close()


def _entries(buf: Any) -> Iterator[tuple[bytes, int, int]]:
    """(key, byte offset of the doubles, width) of each whole entry in a file's bytes."""
    if bytes(buf[:8]) != _MAGIC:
        return
    used = struct.unpack_from("<Q", buf, 8)[0]
    at = _HEAD
    while at < used:
        length, width = _ENTRY.unpack_from(buf, at)
        key = bytes(buf[at + _ENTRY.size : at + _ENTRY.size + length])
        start = at + _ENTRY.size + length
        start += -start % 8
        yield key, start, width
        at = start + width * 8


def read_dir(directory: Path) -> dict[str, dict[tuple[str, ...], list[float]]]:
    """family -> label values -> the doubles of every `*.metrics` file in `directory`, summed."""
    out: dict[str, dict[tuple[str, ...], list[float]]] = {}
    for path in sorted(directory.glob("*.metrics")):
        try:
            with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
                for key, start, width in _entries(mm):
                    family, labels = orjson.loads(key)
                    values = struct.unpack_from(f"<{width}d", mm, start)
                    series = out.setdefault(family, {})
                    known = series.get(tuple(labels))
                    if known is None:
                        series[tuple(labels)] = list(values)
                    elif len(known) == width:
                        for i, v in enumerate(values):
                            known[i] += v
        except (OSError, ValueError):  # a file being created: no entries yet
            continue
    return out


def use_shared(values: SharedValues, families: Sequence[_Family] | None = None) -> None:
    """Keep every family's numbers (or those given) in `values`, summed over all processes."""
    for family in _FAMILIES if families is None else families:
        family.share(values)
