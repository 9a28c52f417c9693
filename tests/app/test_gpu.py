from types import SimpleNamespace

from app.gpu import GpuReport, check_device, probe


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
