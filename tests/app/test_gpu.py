from types import SimpleNamespace

import pytest

from app.gpu import GpuCollector, GpuReport, check_cuda, check_device, cuda_version, probe


class FakeNVML:
    """Stands in for pynvml: this machine has no NVIDIA driver to ask."""

    def __init__(self, gpus=(), fail_init=None, cuda=12040, driver="550.54.15"):
        self.gpus = list(gpus)
        self.fail_init = fail_init
        self.shutdown = False
        self.cuda, self.driver = cuda, driver

    def nvmlInit(self):
        if self.fail_init:
            raise self.fail_init

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

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


H100 = [{"name": "NVIDIA H100 80GB HBM3", "mib": 81559}]


def test_a_driver_older_than_the_image_s_cuda_is_one_line_naming_both_and_the_fixes():
    # A 570 driver (CUDA 12.8) under vllm/vllm-openai's CUDA 13 build (the base image's CUDA_VERSION).
    report = probe(FakeNVML(H100, cuda=12080, driver="570.172.08"))
    message, fatal = check_cuda(report, "13.0.1")
    assert fatal and "\n" not in message
    assert "570.172.08" in message and "CUDA up to 12.8" in message and "CUDA 13.0" in message
    assert "580 or newer" in message and "VLLM_CUDA_VARIANT=-cu129" in message
    # The TensorRT-LLM image has no -cu129 base: its fix is another release.
    message, fatal = check_cuda(report, "13.0.1.012", engine="trtllm")
    assert fatal and "TRTLLM_VERSION" in message and "cu129" not in message


@pytest.mark.parametrize(
    ("driver_cuda", "image_cuda"),
    [
        (13000, "13.0.1"),
        (13010, "13.0.1"),
        (12080, "12.8.1"),
        (12090, "12.8.0.038"),
        (12080, None),
        (12080, ""),
    ],
)
def test_a_driver_at_or_above_the_image_s_cuda_or_an_unknown_image_cuda_passes(driver_cuda, image_cuda):
    assert check_cuda(probe(FakeNVML(H100, cuda=driver_cuda)), image_cuda) is None


def test_vllm_s_cuda_compatibility_switch_turns_the_refusal_into_a_warning():
    report = probe(FakeNVML(H100, cuda=12080))
    message, fatal = check_cuda(report, "13.0.1", compat=True)
    assert not fatal and "VLLM_ENABLE_CUDA_COMPATIBILITY=1" in message
    assert check_cuda(report, "13.0.1", engine="trtllm", compat=True)[1]  # vLLM's switch only


def test_cuda_versions_are_read_as_images_and_nvml_write_them():
    assert cuda_version("13.0.1") == (13, 0) and cuda_version("12.8.0.038") == (12, 8)
    assert cuda_version("12.10") == (12, 10) and cuda_version("12") is None and cuda_version(None) is None
