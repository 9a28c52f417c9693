from types import SimpleNamespace

from app.gpu import GpuCollector, GpuReport, check_device, probe


class FakeNVML:
    """Stands in for pynvml: this machine has no NVIDIA driver to ask."""

    def __init__(self, gpus=(), fail_init=None):
        self.gpus = list(gpus)
        self.fail_init = fail_init
        self.shutdown = False

    def nvmlInit(self):
        if self.fail_init:
            raise self.fail_init

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12040

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetName(self, h):
        return h["name"].encode()

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h['name']}"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=h["mib"] * 2**20, used=1024 * 2**20)


def test_probe_reports_every_gpu_and_the_driver():
    nvml = FakeNVML([{"name": "NVIDIA H100 80GB HBM3", "mib": 81559}, {"name": "NVIDIA H100", "mib": 81559}])
    report = probe(nvml)
    assert [g.name for g in report.gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA H100"]
    assert report.gpus[0].memory_total_mib == 81559 and report.gpus[0].memory_used_mib == 1024
    assert (report.driver_version, report.cuda_driver_version) == ("550.54.15", "12.4")
    assert nvml.shutdown and check_device("auto", report) is None


def test_no_driver_is_an_error_unless_device_is_cpu():
    report = probe(FakeNVML(fail_init=RuntimeError("NVML Shared Library Not Found")))
    assert report.gpus == [] and "Shared Library Not Found" in report.error
    message = check_device("auto", report)
    assert "No NVIDIA GPU found" in message and "--gpus all" in message and "DEVICE=cpu" in message
    assert "\n" not in message
    assert check_device("cuda", report) is not None
    assert check_device("cpu", report) is None


def test_real_probe_never_raises_here():
    assert isinstance(probe(), GpuReport)


def test_zero_gpus_with_a_driver_is_an_error():
    assert "0 GPUs" in check_device("auto", probe(FakeNVML([])))


class FakeNVMLWithGauges(FakeNVML):
    """Adds what the metrics read; the second GPU does not report power (some boards do not)."""

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=h["util"], memory=0)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == 0  # NVML_TEMPERATURE_GPU
        return h["temp"]

    def nvmlDeviceGetPowerUsage(self, h):
        if h.get("power_mw") is None:
            raise RuntimeError("NVMLError_NotSupported")
        return h["power_mw"]


def test_gpu_collector_exports_per_gpu_gauges():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    nvml = FakeNVMLWithGauges(
        [
            {"name": "NVIDIA H100", "mib": 81559, "util": 87, "temp": 61, "power_mw": 312_500},
            {"name": "NVIDIA H100", "mib": 81559, "util": 0, "temp": 35, "power_mw": None},
        ]
    )
    registry = CollectorRegistry()
    registry.register(GpuCollector("vllm_api", nvml))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    value = {(f, s.labels["gpu"]): s.value for f, fam in families.items() for s in fam.samples}
    assert value[("vllm_api_gpu_memory_total_bytes", "0")] == 81559 * 2**20
    assert value[("vllm_api_gpu_memory_used_bytes", "1")] == 1024 * 2**20
    assert value[("vllm_api_gpu_utilization_ratio", "0")] == 0.87
    assert value[("vllm_api_gpu_temperature_celsius", "1")] == 35
    assert value[("vllm_api_gpu_power_watts", "0")] == 312.5
    assert ("vllm_api_gpu_power_watts", "1") not in value  # unsupported: left out, not zero
    assert {s.labels["name"] for s in families["vllm_api_gpu_memory_used_bytes"].samples} == {"NVIDIA H100"}


def test_gpu_collector_yields_nothing_without_nvml():
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(GpuCollector("vllm_api", FakeNVML(fail_init=RuntimeError("no driver"))))
    assert b"gpu" not in generate_latest(registry)
    registry = CollectorRegistry()
    registry.register(GpuCollector("vllm_api"))  # the real pynvml: no NVIDIA driver on this machine
    assert b"vllm_api_gpu" not in generate_latest(registry)
