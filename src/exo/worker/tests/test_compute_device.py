"""Taking a compute device: explicit, checked by a test computation, never another device.
MLX is faked at its boundary (:class:`MLXDevices`) for the GPUs this machine lacks; the CPU
and the refusals also run against the real MLX."""

from dataclasses import dataclass, field

import pytest

from exo.shared.types.gpu import GPUDeviceInfo
from exo.shared.types.ids import DeviceId, NodeId
from exo.worker.compute_device import (
    DeviceKind,
    DeviceUnavailableError,
    RealMLX,
    best_compute_device,
    check_compute_device,
    mlx_gpu_index,
    use_compute_device,
)
from exo.worker.execution_probe import probe_devices, probe_execution, unusable_gpu_warning


@dataclass
class FakeMLX:
    """MLX as a CUDA or Metal build would answer, with ``gpus`` devices."""

    cuda: bool = False
    metal: bool = False
    gpus: int = 0
    broken: set[tuple[DeviceKind, int]] = field(default_factory=set[tuple[DeviceKind, int]])
    computed: list[tuple[DeviceKind, int]] = field(default_factory=list[tuple[DeviceKind, int]])
    default: tuple[DeviceKind, int] | None = None

    def cuda_available(self) -> bool:
        return self.cuda

    def metal_available(self) -> bool:
        return self.metal

    def gpu_count(self) -> int:
        return self.gpus

    def device_name(self, kind: DeviceKind, index: int) -> str:
        return "Fake GPU" if kind == "gpu" else "Fake CPU"

    def compute_on(self, kind: DeviceKind, index: int) -> None:
        if (kind, index) in self.broken:
            raise RuntimeError("CUDA error: out of memory")
        self.computed.append((kind, index))

    def make_default(self, kind: DeviceKind, index: int) -> None:
        self.default = (kind, index)


def test_a_cuda_device_is_taken_explicitly() -> None:
    mlx = FakeMLX(cuda=True, gpus=2)
    device = use_compute_device("cuda:1", mlx, environ={})
    assert (device.device_id, device.backend, device.name) == ("cuda:1", "cuda", "Fake GPU")
    assert mlx.computed == [("gpu", 1)] and mlx.default == ("gpu", 1)


def test_a_runner_sees_only_its_gpu_under_cuda_visible_devices() -> None:
    mlx = FakeMLX(cuda=True, gpus=1)
    use_compute_device("cuda:3", mlx, environ={"CUDA_VISIBLE_DEVICES": "3"})
    assert mlx.default == ("gpu", 0)
    assert mlx_gpu_index(2, {"CUDA_VISIBLE_DEVICES": "1,2"}) == 1
    with pytest.raises(DeviceUnavailableError, match="not among this process's visible GPUs"):
        mlx_gpu_index(0, {"CUDA_VISIBLE_DEVICES": "1,2"})


def test_no_cuda_build_means_no_cuda_device_and_says_how_to_fix_it() -> None:
    mlx = FakeMLX()
    with pytest.raises(DeviceUnavailableError, match=r"no CUDA .*--extra cuda13"):
        use_compute_device("cuda:0", mlx, environ={})
    assert mlx.default is None and mlx.computed == []  # nothing else was taken instead


@pytest.mark.parametrize(
    ("mlx", "device_id", "problem"),
    [
        (FakeMLX(cuda=True, gpus=1), "cuda:1", "MLX sees 1 CUDA device"),
        (FakeMLX(cuda=True, gpus=1, broken={("gpu", 0)}), "cuda:0", "out of memory"),
        (FakeMLX(), "metal:0", "no Metal GPU"),
        (FakeMLX(metal=True, gpus=1), "metal:1", "no Metal GPU"),
        (FakeMLX(), "tpu:0", "not a device MLX computes on"),
        (FakeMLX(), "cuda", "not a device name"),
    ],
)
def test_devices_out_of_reach_are_refused_with_the_reason(
    mlx: FakeMLX, device_id: str, problem: str
) -> None:
    with pytest.raises(DeviceUnavailableError, match=problem):
        use_compute_device(device_id, mlx, environ={})
    assert mlx.default is None


def test_without_a_device_a_runner_takes_the_first_gpu_else_the_cpu() -> None:
    assert best_compute_device(FakeMLX(cuda=True, gpus=2), {}) == "cuda:0"
    assert best_compute_device(FakeMLX(cuda=True, gpus=1), {"CUDA_VISIBLE_DEVICES": "2"}) == (
        "cuda:2"
    )
    assert best_compute_device(FakeMLX(metal=True, gpus=1), {}) == "metal:0"
    assert best_compute_device(FakeMLX(), {}) == "cpu:0"


def test_the_real_mlx_here_computes_on_the_cpu_and_refuses_cuda() -> None:
    mlx = RealMLX()
    assert check_compute_device("cpu:0", mlx, environ={}).backend == "cpu"
    if not mlx.cuda_available():
        with pytest.raises(DeviceUnavailableError, match="--extra cuda13"):
            check_compute_device("cuda:0", mlx, environ={})


def test_the_probe_lists_what_mlx_reaches() -> None:
    capability = probe_devices(
        FakeMLX(cuda=True, gpus=2, broken={("gpu", 1)}),
        "0.32.4",
        "mlx-cuda-13",
        {"CUDA_VISIBLE_DEVICES": "0,3"},
    )
    assert [device.device_id for device in capability.devices] == ["cpu:0", "cuda:0"]
    assert capability.error is not None and "cuda:3" in capability.error
    assert capability.can_run_on("cuda:0") and not capability.can_run_on("cuda:3")

    here = probe_execution()
    assert here.mlx_version is not None and here.can_run_on("cpu:0")


def _gpu(device_id: str, simulated: bool = False) -> GPUDeviceInfo:
    return GPUDeviceInfo(
        device_id=DeviceId(device_id),
        node_id=NodeId("n"),
        name="NVIDIA RTX 4090",
        vendor="NVIDIA",
        backend="cuda",
        memory_total_bytes=24 << 30,
        memory_bandwidth_gbps=1008,
        peak_tflops_fp16=165,
        is_simulated=simulated,
    )


def test_a_node_warns_when_nvml_sees_gpus_its_mlx_cannot_use() -> None:
    cpu_only = probe_devices(FakeMLX(), "0.32.4", "mlx-cpu", {})
    warning = unusable_gpu_warning([_gpu("cuda:0"), _gpu("cuda:1")], cpu_only)
    assert warning is not None
    assert "cuda:0, cuda:1" in warning and "mlx-cpu" in warning
    assert "uv run --extra cuda13 exo" in warning
    assert unusable_gpu_warning([_gpu("cuda:0", simulated=True)], cpu_only) is None
    with_cuda = probe_devices(FakeMLX(cuda=True, gpus=1), "0.32.4", "mlx-cuda-13", {})
    assert unusable_gpu_warning([_gpu("cuda:0")], with_cuda) is None
