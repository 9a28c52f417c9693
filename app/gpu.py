"""GPU facts from NVML (nvidia-ml-py): what the launcher checks and what /info shows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_mib: int
    memory_used_mib: int


@dataclass
class GpuReport:
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    error: str | None = None
    """Why NVML could not be used (no driver, no library), when it could not."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe(nvml: Any = None) -> GpuReport:
    """Ask NVML for the GPUs. Never raises: a machine without NVIDIA's driver reports an error."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return GpuReport(error="nvidia-ml-py is not installed")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return GpuReport(error=f"NVML unavailable: {exc}")
    try:
        report = GpuReport(driver_version=_text(nvml.nvmlSystemGetDriverVersion()))
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        report.cuda_driver_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            report.gpus.append(
                GpuInfo(
                    index=i,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    memory_total_mib=mem.total // 2**20,
                    memory_used_mib=mem.used // 2**20,
                )
            )
        return report
    except Exception as exc:
        return GpuReport(error=f"NVML query failed: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def check_device(device: str, report: GpuReport) -> str | None:
    """None if the device setting can be served here, else the one-line reason it cannot."""
    if device == "cpu":
        return None
    if not report.gpus:
        why = report.error or "NVML reports 0 GPUs"
        return (
            f"No NVIDIA GPU found ({why}). Start the container with `--gpus all` "
            "(and the NVIDIA Container Toolkit), or set DEVICE=cpu for a CPU build of the engine."
        )
    return None
