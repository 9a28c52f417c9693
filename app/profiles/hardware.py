"""The GPUs a configuration is planned for: found through NVML, or declared (`8xH100-80GB`) so a
deployment can be planned on a machine without them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.gpu import GpuReport

GIB = 2**30

# Known boards: compute capability, and the memory NVML reports for each marketed size (MiB), so a
# declared `1xL4-24GB` is planned with the 22.5 GiB an L4 really has. Unknown boards: `<N>GB` is
# taken as N GiB and the compute capability as unknown (not checked).
KNOWN_GPUS: dict[str, tuple[str, dict[int, int]]] = {
    "B200": ("10.0", {180: 183359}),
    "H200": ("9.0", {141: 143771}),
    "GH200": ("9.0", {96: 97871}),
    "H100": ("9.0", {80: 81559, 94: 95830}),
    "H800": ("9.0", {80: 81559}),
    "L40S": ("8.9", {48: 46068}),
    "L40": ("8.9", {48: 46068}),
    "L4": ("8.9", {24: 23034}),
    "RTX6000ADA": ("8.9", {48: 49140}),
    "RTX4090": ("8.9", {24: 24564}),
    "RTX3090": ("8.6", {24: 24576}),
    "A100": ("8.0", {40: 40960, 80: 81920}),
    "A800": ("8.0", {80: 81920}),
    "A6000": ("8.6", {48: 49140}),
    "A40": ("8.6", {48: 46068}),
    "A10G": ("8.6", {24: 23028}),
    "A10": ("8.6", {24: 23028}),
    "T4": ("7.5", {16: 15360}),
    "V100": ("7.0", {16: 16384, 32: 32768}),
}
_SPEC = re.compile(
    r"^(?P<count>\d+)\s*[xX]\s*(?P<name>[A-Za-z0-9_ ]+?)(?:-(?P<gb>\d+)\s*GB?)?$", re.IGNORECASE
)


class GpuSpecError(ValueError):
    """A `--gpus` value that cannot be read; the message says what is expected."""


@dataclass(frozen=True)
class GpuSet:
    """What a plan needs to know about the GPUs: how many, the memory of the smallest, and the
    lowest compute capability among them (a mixed box is planned for its weakest board)."""

    count: int
    name: str
    memory_mib: int
    compute_capability: str | None = None
    declared: bool = False

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 2**20

    @property
    def memory_gb(self) -> float:
        return round(self.memory_mib * 2**20 / 1e9, 1)

    @property
    def label(self) -> str:
        """`8xH100-80GB`: the board's marketed size where the catalogue knows it."""
        if not self.count:
            return "no GPU"
        sizes = KNOWN_GPUS.get(self.name, ("", {}))[1]
        gb = min(sizes, key=lambda g: abs(sizes[g] - self.memory_mib)) if sizes else None
        if gb is None or abs(sizes[gb] - self.memory_mib) > 0.1 * self.memory_mib:
            gb = round(self.memory_mib / 1024)
        return f"{self.count}x{self.name}-{gb}GB"

    def capability_at_least(self, needed: str) -> bool | None:
        """None when this set's capability is unknown."""
        if self.compute_capability is None:
            return None
        return _cc(self.compute_capability) >= _cc(needed)


NO_GPU = GpuSet(count=0, name="none", memory_mib=0)


def _cc(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def _key(name: str) -> str | None:
    """The catalogue key a board name (NVML's `NVIDIA H100 80GB HBM3`, or `h100`) belongs to."""
    upper = name.upper()
    for word in ("NVIDIA", "GEFORCE", "TESLA"):
        upper = upper.replace(word, "")
    flat = re.sub(r"[^A-Z0-9]", "", upper)
    for key in sorted(KNOWN_GPUS, key=len, reverse=True):  # L40S before L40 before L4
        if flat.startswith(key):
            return key
    return None


def parse_gpus(spec: str) -> GpuSet:
    """`8xH100-80GB`, `1xL4-24GB`, `2xRTX4090`, `1xA100-40GB` (the memory may be left out for a
    board sold in one size)."""
    m = _SPEC.match(spec.strip())
    if not m or int(m["count"]) < 1:
        raise GpuSpecError(
            f"--gpus {spec!r} is not <count>x<board>[-<memory>GB], for example 8xH100-80GB or 1xL4-24GB."
        )
    count, name, gb = int(m["count"]), m["name"].replace(" ", ""), m["gb"]
    key = _key(name)
    if key is None:
        if gb is None:
            raise GpuSpecError(
                f"--gpus {spec!r}: unknown board {name!r}; give its memory, as in {spec}-48GB."
            )
        return GpuSet(count, name.upper(), int(gb) * 1024, None, declared=True)
    cc, sizes = KNOWN_GPUS[key]
    if gb is None:
        if len(sizes) != 1:
            options = ", ".join(f"{count}x{key}-{size}GB" for size in sizes)
            raise GpuSpecError(f"--gpus {spec!r}: the {key} comes in several sizes: {options}.")
        gb = str(next(iter(sizes)))
    mib = sizes.get(int(gb), int(gb) * 1024)
    return GpuSet(count, key, mib, cc, declared=True)


def from_report(report: GpuReport) -> GpuSet:
    """The GPUs NVML found (none on a machine without NVIDIA's driver)."""
    if not report.gpus:
        return NO_GPU
    smallest = min(report.gpus, key=lambda g: g.memory_total_mib)
    ccs = [g.compute_capability for g in report.gpus]
    cc = None if None in ccs else min(ccs, key=lambda c: _cc(c))  # type: ignore[arg-type]
    if cc is None:  # NVML did not say: the catalogue may know the board
        key = _key(smallest.name)
        cc = KNOWN_GPUS[key][0] if key else None
    name = _key(smallest.name) or smallest.name
    return GpuSet(len(report.gpus), name, smallest.memory_total_mib, cc)
