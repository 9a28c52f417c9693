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
    compute_capability: str | None = None
    """`major.minor` (8.0 A100, 8.9 L4 and RTX 4090, 9.0 H100), None where NVML could not tell."""


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


def _compute_capability(nvml: Any, handle: Any) -> str | None:
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    except Exception:  # an old driver or binding without the call
        return None
    return f"{major}.{minor}"


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
                    compute_capability=_compute_capability(nvml, handle),
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


# The oldest Linux driver of each CUDA release (NVIDIA's CUDA toolkit release notes, table 3).
MIN_DRIVER = {(12, 8): "570", (12, 9): "575", (13, 0): "580", (13, 1): "590"}


def cuda_version(text: str | None) -> tuple[int, int] | None:
    """(major, minor) of a CUDA version as images and NVML write it: `13.0.1`, `12.9`,
    `12.8.0.038` (NGC images); None when there is none to read."""
    parts = (text or "").strip().split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


def check_cuda(
    report: GpuReport, image_cuda: str | None, engine: str = "vllm", compat: bool = False
) -> tuple[str, bool] | None:
    """None if the driver runs this image's CUDA, else (the one-line reason, fatal). The driver's
    CUDA version (NVML) is the newest CUDA it can run; an image built for a newer one fails in the
    engine ("CUDA driver version is insufficient"). With `compat` (vLLM's
    VLLM_ENABLE_CUDA_COMPATIBILITY=1: the image's forward-compatibility libraries, data-centre GPUs
    only) it is a warning instead."""
    image, driver = cuda_version(image_cuda), cuda_version(report.cuda_driver_version)
    if image is None or driver is None or driver >= image:
        return None
    want = f"{image[0]}.{image[1]}"
    found = (
        f"The NVIDIA driver {report.driver_version} supports CUDA up to {report.cuda_driver_version}, "
        f"older than this image's CUDA {want}"
    )
    if compat and engine == "vllm":
        return f"{found}: trying CUDA forward compatibility (VLLM_ENABLE_CUDA_COMPATIBILITY=1).", False
    newer = f" ({MIN_DRIVER[image]} or newer)" if image in MIN_DRIVER else ""
    other = (
        "run the image built on vLLM's CUDA 12.9 base (build argument VLLM_CUDA_VARIANT=-cu129, "
        "driver 575 or newer)"
        if engine == "vllm"
        else "build the image on a TensorRT-LLM release made for your driver's CUDA (TRTLLM_VERSION)"
    )
    return f"{found}: update the host's driver to one for CUDA {want}{newer}, or {other}.", True


class GpuCollector:
    """Prometheus collector of per-GPU gauges read from NVML at each scrape: memory used and
    total, utilization, temperature, power. Yields nothing where NVML has no GPU (CPU machines).

    NVML is initialised once, at the first scrape; a query a GPU does not support (power on some
    boards) leaves that one gauge out for that GPU.
    """

    def __init__(self, prefix: str, nvml: Any = None) -> None:
        self.prefix = prefix
        self._nvml = nvml
        self._handles: list[tuple[str, str, Any]] | None = None  # (index, name, handle)

    def describe(self) -> list:
        return []  # no collect() at registration time: NVML is touched at the first scrape

    def _gpus(self) -> list[tuple[str, str, Any]]:
        if self._handles is None:
            self._handles = []
            try:
                nvml = self._nvml
                if nvml is None:
                    import pynvml as nvml

                    self._nvml = nvml
                nvml.nvmlInit()
                for i in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(i)
                    self._handles.append((str(i), _text(nvml.nvmlDeviceGetName(handle)), handle))
            except Exception:  # no driver, no library: a CPU machine
                self._handles = []
        return self._handles

    def collect(self) -> list:
        from prometheus_client.core import GaugeMetricFamily

        gpus = self._gpus()
        if not gpus:
            return []
        nvml, p, labels = self._nvml, self.prefix, ["gpu", "name"]
        families = {
            "used": GaugeMetricFamily(
                f"{p}_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels
            ),
            "total": GaugeMetricFamily(
                f"{p}_gpu_memory_total_bytes", "GPU memory in all (NVML).", labels=labels
            ),
            "util": GaugeMetricFamily(
                f"{p}_gpu_utilization_ratio",
                "Fraction of the last sample period a kernel ran on the GPU (NVML), 0 to 1.",
                labels=labels,
            ),
            "temp": GaugeMetricFamily(
                f"{p}_gpu_temperature_celsius", "GPU core temperature (NVML).", labels=labels
            ),
            "power": GaugeMetricFamily(f"{p}_gpu_power_watts", "GPU power draw (NVML).", labels=labels),
        }
        readers = {
            "used": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used,
            "total": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).total,
            "util": lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100,
            "temp": lambda h: nvml.nvmlDeviceGetTemperature(h, 0),  # NVML_TEMPERATURE_GPU
            "power": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000,  # milliwatts
        }
        for index, name, handle in gpus:
            for key, read in readers.items():
                try:
                    families[key].add_metric([index, name], float(read(handle)))
                except Exception:  # not supported on this GPU, or the GPU fell off the bus
                    pass
        return list(families.values())
