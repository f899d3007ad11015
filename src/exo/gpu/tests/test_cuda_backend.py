"""The CUDA backend against a fake ``pynvml`` (the library boundary) and, when an NVIDIA GPU
is present, against the real NVML (tests marked ``gpu``)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

import pynvml as real_pynvml
import pytest

from exo.gpu.backend import GPUBackendError, GPUBackendFactory, GPUBackendUnavailableError
from exo.gpu.backends import cuda
from exo.gpu.backends.cuda import (
    CUDABackend,
    decode_clock_event_reasons,
    memory_bandwidth_gbps,
    peak_tflops_fp16,
)
from exo.shared.types.ids import DeviceId, NodeId

NODE = NodeId("node-a")
GIB = 2**30
NOT_SUPPORTED = real_pynvml.NVML_ERROR_NOT_SUPPORTED
FUNCTION_NOT_FOUND = real_pynvml.NVML_ERROR_FUNCTION_NOT_FOUND


def nvml_error(code: int) -> Exception:
    return real_pynvml.NVMLError(code)


@dataclass
class FakeGPU:
    """One device as the fake NVML reports it; None means NVML_ERROR_NOT_SUPPORTED."""

    name: bytes | str = b"NVIDIA H100 80GB HBM3"
    capability: tuple[int, int] = (9, 0)
    multiprocessor_count: int | None = 132
    core_count: int | None = 16896
    memory_total: int = 80 * GIB
    memory_used_v1: int = 3 * GIB  # v1 "used" includes driver-reserved memory
    memory_used_v2: int = 2 * GIB
    memory_v2_error: int | None = None
    memory_v2_type_error: bool = False
    bus_width_bits: int | None = 5120
    max_memory_clock_mhz: int | None = 2619
    max_sm_clock_mhz: int | None = 1980
    sm_clock_mhz: int | None = 1755
    utilization_gpu: int | None = 37
    temperature_c: int | None = 45
    slowdown_c: int | None = 87
    gpu_max_c: int | None = 85
    shutdown_c: int | None = 92
    power_mw: int | None = 250_000
    power_limit_mw: int | None = 700_000
    clock_reasons: int | None = 0
    sample_error: int | None = None  # every query of this device fails with this code
    utilization_error: int | None = None  # only the utilisation query fails
    event_reasons_error: int | None = None  # only the "clocks event" query fails


T = TypeVar("T")


def _answer(value: T | None) -> T:
    if value is None:
        raise nvml_error(NOT_SUPPORTED)
    return value


P2PAnswer = dict[int, int] | int
"""For one ordered pair of devices: P2P status by caps index, or an NVML error code that every
P2P query of the pair raises."""

NVLINK: int = real_pynvml.NVML_P2P_CAPS_INDEX_NVLINK
READ = 0  # nvml.h; nvidia-ml-py spells it ``NVML_P2P_CAPS_INDEX_READ = 0,``, the tuple (0,)
P2P_OK = real_pynvml.NVML_P2P_STATUS_OK
P2P_CHIPSET_NOT_SUPPORTED = real_pynvml.NVML_P2P_STATUS_CHIPSET_NOT_SUPPORTED


def p2p_both_ways(
    pairs: dict[tuple[int, int], P2PAnswer],
) -> dict[tuple[int, int], P2PAnswer]:
    return {**pairs, **{(b, a): answer for (a, b), answer in pairs.items()}}


@dataclass
class FakeNVML:
    """Just the ``pynvml`` surface the backend uses, with the real ``NVMLError`` classes."""

    gpus: list[FakeGPU]
    init_error: int | None = None
    p2p: dict[tuple[int, int], P2PAnswer] = field(default_factory=dict[tuple[int, int], P2PAnswer])
    """(index, index) -> answer; a pair not listed is NOT_SUPPORTED."""
    calls: dict[str, int] = field(default_factory=dict)
    NVMLError: type[Exception] = real_pynvml.NVMLError
    nvmlMemory_v2: int = real_pynvml.nvmlMemory_v2

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _gpu(self, handle: Any) -> FakeGPU:
        gpu: FakeGPU = handle.gpu
        if gpu.sample_error is not None:
            raise nvml_error(gpu.sample_error)
        return gpu

    def nvmlInit(self) -> None:
        self._count("nvmlInit")
        if self.init_error is not None:
            raise nvml_error(self.init_error)

    def nvmlShutdown(self) -> None:
        self._count("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._count("nvmlDeviceGetHandleByIndex")
        return SimpleNamespace(gpu=self.gpus[index], index=index)

    def nvmlDeviceGetName(self, handle: Any) -> bytes | str:
        return self._gpu(handle).name

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        return self._gpu(handle).capability

    def nvmlDeviceGetAttributes(self, handle: Any) -> Any:
        count = _answer(self._gpu(handle).multiprocessor_count)
        return SimpleNamespace(multiprocessorCount=count)

    def nvmlDeviceGetNumGpuCores(self, handle: Any) -> int:
        return _answer(self._gpu(handle).core_count)

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        gpu = self._gpu(handle)
        if version is None:
            self._count("memory_v1")
            return SimpleNamespace(
                total=gpu.memory_total,
                used=gpu.memory_used_v1,
                free=gpu.memory_total - gpu.memory_used_v1,
            )
        self._count("memory_v2")
        if gpu.memory_v2_type_error:
            raise TypeError("nvmlDeviceGetMemoryInfo() takes 1 positional argument")
        if gpu.memory_v2_error is not None:
            raise nvml_error(gpu.memory_v2_error)
        assert version == real_pynvml.nvmlMemory_v2
        return SimpleNamespace(
            version=version,
            total=gpu.memory_total,
            reserved=gpu.memory_used_v1 - gpu.memory_used_v2,
            used=gpu.memory_used_v2,
            free=gpu.memory_total - gpu.memory_used_v1,
        )

    def nvmlDeviceGetMemoryBusWidth(self, handle: Any) -> int:
        return _answer(self._gpu(handle).bus_width_bits)

    def nvmlDeviceGetMaxClockInfo(self, handle: Any, clock_type: int) -> int:
        gpu = self._gpu(handle)
        if clock_type == real_pynvml.NVML_CLOCK_MEM:
            return _answer(gpu.max_memory_clock_mhz)
        assert clock_type == real_pynvml.NVML_CLOCK_SM
        return _answer(gpu.max_sm_clock_mhz)

    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: int) -> int:
        assert clock_type == real_pynvml.NVML_CLOCK_SM
        return _answer(self._gpu(handle).sm_clock_mhz)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        self._count("nvmlDeviceGetUtilizationRates")
        error = self._gpu(handle).utilization_error
        if error is not None:
            raise nvml_error(error)
        return SimpleNamespace(gpu=_answer(self._gpu(handle).utilization_gpu), memory=0)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        assert sensor == real_pynvml.NVML_TEMPERATURE_GPU
        return _answer(self._gpu(handle).temperature_c)

    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int:
        gpu = self._gpu(handle)
        by_kind = {
            real_pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: gpu.slowdown_c,
            real_pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: gpu.shutdown_c,
            real_pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: gpu.gpu_max_c,
        }
        return _answer(by_kind.get(threshold))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return _answer(self._gpu(handle).power_mw)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return _answer(self._gpu(handle).power_limit_mw)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        self._count("nvmlDeviceGetCurrentClocksEventReasons")
        error = self._gpu(handle).event_reasons_error
        if error is not None:
            raise nvml_error(error)
        return _answer(self._gpu(handle).clock_reasons)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return _answer(self._gpu(handle).clock_reasons)

    def nvmlDeviceGetP2PStatus(self, device1: Any, device2: Any, p2p_index: Any) -> int:
        self._count("nvmlDeviceGetP2PStatus")
        if not isinstance(p2p_index, int):  # what ctypes does with the real library
            raise TypeError(f"Don't know how to convert parameter 3 ({p2p_index!r})")
        answer = self.p2p.get((device1.index, device2.index), NOT_SUPPORTED)
        if isinstance(answer, int):
            raise nvml_error(answer)
        return answer.get(p2p_index, P2P_CHIPSET_NOT_SUPPORTED)


@pytest.fixture
def install_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeNVML]:
    def install(
        *gpus: FakeGPU,
        init_error: int | None = None,
        p2p: dict[tuple[int, int], P2PAnswer] | None = None,
    ) -> FakeNVML:
        fake = FakeNVML(gpus=list(gpus), init_error=init_error, p2p=p2p or {})
        monkeypatch.setattr(cuda, "pynvml", fake)
        return fake

    return install


async def _started(
    *gpus: FakeGPU,
    install: Callable[..., FakeNVML],
    p2p: dict[tuple[int, int], P2PAnswer] | None = None,
) -> tuple[CUDABackend, FakeNVML]:
    fake = install(*gpus, p2p=p2p)
    backend = CUDABackend()
    await backend.initialize()
    return backend, fake


def test_bandwidth_formula_matches_published_numbers() -> None:
    # (bus width bits, NVML max memory clock MHz, datasheet GB/s)
    assert memory_bandwidth_gbps(5120, 2619) == pytest.approx(3350, rel=0.01)  # H100 SXM
    assert memory_bandwidth_gbps(6144, 3201) == pytest.approx(4800, rel=0.03)  # H200
    assert memory_bandwidth_gbps(5120, 1215) == pytest.approx(1555, rel=0.01)  # A100 40 GB
    assert memory_bandwidth_gbps(384, 10501) == pytest.approx(1008, rel=0.01)  # RTX 4090


def test_tflops_estimate_is_near_datasheets() -> None:
    assert peak_tflops_fp16(132, 1830, 9, 0) == pytest.approx(989, rel=0.01)  # H100 SXM
    assert peak_tflops_fp16(108, 1410, 8, 0) == pytest.approx(312, rel=0.01)  # A100
    assert peak_tflops_fp16(80, 1530, 7, 0) == pytest.approx(125, rel=0.01)  # V100
    assert peak_tflops_fp16(142, 2520, 8, 9) == pytest.approx(366, rel=0.01)  # L40S
    assert peak_tflops_fp16(16, 1000, 42, 0) > 0  # unknown architecture still estimates


def test_clock_event_reasons_decode_to_names() -> None:
    assert decode_clock_event_reasons(0) == []
    assert decode_clock_event_reasons(0x20 | 0x04) == ["sw_power_cap", "sw_thermal_slowdown"]
    assert decode_clock_event_reasons(0x40 | 0x08) == ["hw_slowdown", "hw_thermal_slowdown"]
    assert decode_clock_event_reasons(0x1) == ["gpu_idle"]


@pytest.mark.anyio
async def test_static_facts_from_nvml(install_fake_nvml: Callable[..., FakeNVML]) -> None:
    backend, _ = await _started(
        FakeGPU(),
        FakeGPU(
            name="NVIDIA H200",
            memory_total=141 * GIB,
            bus_width_bits=6144,
            max_memory_clock_mhz=3201,
        ),
        install=install_fake_nvml,
    )
    devices = await backend.list_devices(NODE)
    assert [device.device_id for device in devices] == ["cuda:0", "cuda:1"]
    h100, h200 = devices
    assert h100.name == "NVIDIA H100 80GB HBM3"  # bytes decoded
    assert h200.name == "NVIDIA H200"
    assert h100.vendor == "NVIDIA"
    assert h100.backend == "cuda"
    assert h100.node_id == NODE
    assert h100.compute_capability == "9.0"
    assert h100.sm_count == 132
    assert h100.memory_total_bytes == 80 * GIB
    assert h100.memory_bandwidth_gbps == pytest.approx(3352, rel=0.001)
    assert h200.memory_bandwidth_gbps == pytest.approx(4917, rel=0.001)
    assert h100.peak_tflops_fp16 == pytest.approx(132 * 1980e6 * 4096 / 1e12)
    assert not h100.is_simulated


@pytest.mark.anyio
async def test_peer_links_nvlink_pcie_p2p_and_host(
    install_fake_nvml: Callable[..., FakeNVML],
) -> None:
    # cuda:0 <-> cuda:1 over NVLink (P2P reads work too), cuda:2 <-> cuda:3 PCIe P2P only,
    # the rest through host memory (NVML answers with a non-OK status).
    nvlink: P2PAnswer = {NVLINK: P2P_OK, READ: P2P_OK}
    pcie_p2p: P2PAnswer = {NVLINK: real_pynvml.NVML_P2P_STATUS_NOT_SUPPORTED, READ: P2P_OK}
    host: P2PAnswer = {
        NVLINK: real_pynvml.NVML_P2P_STATUS_NOT_SUPPORTED,
        READ: P2P_CHIPSET_NOT_SUPPORTED,
    }
    pairs: dict[tuple[int, int], P2PAnswer] = {
        (a, b): host for a in range(4) for b in range(4) if a != b
    }
    pairs.update(p2p_both_ways({(0, 1): nvlink, (2, 3): pcie_p2p}))
    backend, fake = await _started(*[FakeGPU()] * 4, install=install_fake_nvml, p2p=pairs)
    links = {info.device_id: info.peer_links for info in await backend.list_devices(NODE)}
    assert links == {
        "cuda:0": {"cuda:1": "nvlink", "cuda:2": "pcie_host", "cuda:3": "pcie_host"},
        "cuda:1": {"cuda:0": "nvlink", "cuda:2": "pcie_host", "cuda:3": "pcie_host"},
        "cuda:2": {"cuda:0": "pcie_host", "cuda:1": "pcie_host", "cuda:3": "pcie_p2p"},
        "cuda:3": {"cuda:0": "pcie_host", "cuda:1": "pcie_host", "cuda:2": "pcie_p2p"},
    }
    # Topology is read once at initialise, not on every listing.
    calls = fake.calls["nvmlDeviceGetP2PStatus"]
    await backend.list_devices(NODE)
    assert fake.calls["nvmlDeviceGetP2PStatus"] == calls


@pytest.mark.anyio
async def test_peer_links_left_out_where_nvml_errs(
    install_fake_nvml: Callable[..., FakeNVML], monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = p2p_both_ways(
        {
            (0, 1): {NVLINK: P2P_OK},
            (0, 2): NOT_SUPPORTED,
            (1, 2): real_pynvml.NVML_ERROR_UNKNOWN,  # any NVML error: left out, no crash
        }
    )
    pairs[(2, 0)] = {NVLINK: real_pynvml.NVML_P2P_STATUS_NOT_SUPPORTED, READ: P2P_OK}
    backend, _ = await _started(*[FakeGPU()] * 3, install=install_fake_nvml, p2p=pairs)
    links = {info.device_id: info.peer_links for info in await backend.list_devices(NODE)}
    assert links == {
        "cuda:0": {"cuda:1": "nvlink"},
        "cuda:1": {"cuda:0": "nvlink"},
        "cuda:2": {"cuda:0": "pcie_p2p"},
    }

    # One GPU, or a pynvml without the function at all: no links, and listing still works.
    backend, fake = await _started(FakeGPU(), install=install_fake_nvml)
    (single,) = await backend.list_devices(NODE)
    assert single.peer_links == {}
    assert "nvmlDeviceGetP2PStatus" not in fake.calls
    fake = install_fake_nvml(FakeGPU(), FakeGPU())
    monkeypatch.setattr(fake, "nvmlDeviceGetP2PStatus", None)  # an older pynvml
    backend = CUDABackend()
    await backend.initialize()
    assert [info.peer_links for info in await backend.list_devices(NODE)] == [{}, {}]


@pytest.mark.anyio
async def test_live_reading(install_fake_nvml: Callable[..., FakeNVML]) -> None:
    backend, fake = await _started(FakeGPU(clock_reasons=0x04), install=install_fake_nvml)
    state = await backend.sample(NODE, DeviceId("cuda:0"))
    assert state.device_id == "cuda:0"
    assert state.node_id == NODE
    assert state.memory_total_bytes == 80 * GIB
    assert state.memory_used_bytes == 2 * GIB  # from the v2 struct
    assert state.compute_utilization_percent == 37.0
    assert state.thermal_temperature_c == 45.0
    assert state.thermal_throttle_threshold_c == 87.0
    assert state.thermal_shutdown_threshold_c == 92.0
    assert state.power_draw_watts == 250.0
    assert state.power_limit_watts == 700.0
    assert state.sm_clock_mhz == 1755.0
    assert state.sm_clock_max_mhz == 1980.0
    assert state.throttle_reasons == ["sw_power_cap"]
    assert state.is_thermal_throttling is False  # a power cap is not thermal

    fake.gpus[0].clock_reasons = 0x20
    hot = await backend.sample(NODE, DeviceId("cuda:0"))
    assert hot.throttle_reasons == ["sw_thermal_slowdown"]
    assert hot.is_thermal_throttling is True
    fake.gpus[0].clock_reasons = 0x40
    assert (await backend.sample(NODE, DeviceId("cuda:0"))).is_thermal_throttling is True

    # NVML initialised once and handles kept: readings never re-initialise.
    assert fake.calls["nvmlInit"] == 1
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == 1


@pytest.mark.anyio
async def test_unsupported_queries_are_absent_not_errors(
    install_fake_nvml: Callable[..., FakeNVML],
) -> None:
    gpu = FakeGPU(
        multiprocessor_count=None,
        core_count=None,
        bus_width_bits=None,
        utilization_gpu=None,
        temperature_c=None,
        slowdown_c=None,
        gpu_max_c=None,
        shutdown_c=None,
        power_mw=None,
        power_limit_mw=None,
        sm_clock_mhz=None,
        clock_reasons=None,
    )
    backend, _ = await _started(
        gpu,
        FakeGPU(name="Prototype", multiprocessor_count=None, core_count=None),
        install=install_fake_nvml,
    )
    known_name, unknown_name = await backend.list_devices(NODE)
    assert known_name.sm_count == 132  # "H100" in the name: the published SM count
    assert unknown_name.sm_count is None
    assert unknown_name.peak_tflops_fp16 == 0.0
    assert known_name.peak_tflops_fp16 > 0
    assert known_name.memory_bandwidth_gbps == 0.0  # bus width unsupported
    state = await backend.sample(NODE, DeviceId("cuda:0"))
    assert state.compute_utilization_percent == 0.0
    assert state.thermal_temperature_c == -1.0
    assert state.thermal_throttle_threshold_c == 100.0
    assert state.thermal_shutdown_threshold_c is None
    assert state.power_draw_watts is None
    assert state.power_limit_watts is None
    assert state.sm_clock_mhz is None
    assert state.throttle_reasons == []
    assert state.is_thermal_throttling is False


@pytest.mark.anyio
async def test_fallbacks_for_sm_count_and_threshold(
    install_fake_nvml: Callable[..., FakeNVML],
) -> None:
    # nvmlDeviceGetAttributes is MIG-only on many drivers: SM count comes from the core count.
    a100 = FakeGPU(
        name="NVIDIA A100-SXM4-40GB",
        capability=(8, 0),
        multiprocessor_count=None,
        core_count=6912,
        slowdown_c=None,
        gpu_max_c=85,
    )
    backend, _ = await _started(a100, install=install_fake_nvml)
    (info,) = await backend.list_devices(NODE)
    assert info.sm_count == 108
    state = await backend.sample(NODE, DeviceId("cuda:0"))
    assert state.thermal_throttle_threshold_c == 85.0


@pytest.mark.anyio
@pytest.mark.parametrize("v2_failure", ["function_not_found", "not_supported", "old_pynvml"])
async def test_memory_v2_falls_back_to_v1_once(
    install_fake_nvml: Callable[..., FakeNVML], v2_failure: str
) -> None:
    gpu = FakeGPU(
        memory_v2_error={
            "function_not_found": FUNCTION_NOT_FOUND,
            "not_supported": NOT_SUPPORTED,
        }.get(v2_failure),
        memory_v2_type_error=v2_failure == "old_pynvml",
    )
    backend, fake = await _started(gpu, install=install_fake_nvml)
    first = await backend.sample(NODE, DeviceId("cuda:0"))
    second = await backend.sample(NODE, DeviceId("cuda:0"))
    assert first.memory_used_bytes == second.memory_used_bytes == 3 * GIB  # the v1 figure
    assert fake.calls["memory_v2"] == 1  # not retried on every reading


@pytest.mark.anyio
async def test_queries_the_device_lacks_are_asked_once(
    install_fake_nvml: Callable[..., FakeNVML],
) -> None:
    # An older driver without the "clocks event" name, on a device without utilisation.
    gpu = FakeGPU(clock_reasons=0x20, event_reasons_error=FUNCTION_NOT_FOUND, utilization_gpu=None)
    backend, fake = await _started(gpu, install=install_fake_nvml)
    for _ in range(3):
        state = await backend.sample(NODE, DeviceId("cuda:0"))
        assert state.throttle_reasons == ["sw_thermal_slowdown"]  # from the older name
        assert state.is_thermal_throttling is True
        assert state.compute_utilization_percent == 0.0
    assert fake.calls["nvmlDeviceGetCurrentClocksEventReasons"] == 1
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == 1

    # Missing permission may be granted later: that query is asked on every reading.
    backend, fake = await _started(
        FakeGPU(utilization_error=real_pynvml.NVML_ERROR_NO_PERMISSION), install=install_fake_nvml
    )
    for _ in range(3):
        assert (await backend.sample(NODE, DeviceId("cuda:0"))).compute_utilization_percent == 0
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == 3

    # A restart forgets what the devices lacked (the driver may have changed).
    gpu.event_reasons_error = None
    backend, fake = await _started(gpu, install=install_fake_nvml)
    await backend.sample(NODE, DeviceId("cuda:0"))
    await backend.shutdown()
    await backend.initialize()
    await backend.sample(NODE, DeviceId("cuda:0"))
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == 2


@pytest.mark.anyio
async def test_real_failures_raise(install_fake_nvml: Callable[..., FakeNVML]) -> None:
    backend, fake = await _started(FakeGPU(), install=install_fake_nvml)
    fake.gpus[0].utilization_error = real_pynvml.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(real_pynvml.NVMLError):
        await backend.sample(NODE, DeviceId("cuda:0"))
    fake.gpus[0].utilization_error = None
    fake.gpus[0].sample_error = real_pynvml.NVML_ERROR_UNKNOWN
    with pytest.raises(real_pynvml.NVMLError):
        await backend.sample(NODE, DeviceId("cuda:0"))
    with pytest.raises(GPUBackendError):
        await backend.sample(NODE, DeviceId("cuda:7"))


@pytest.mark.anyio
async def test_initialise_failures(install_fake_nvml: Callable[..., FakeNVML]) -> None:
    install_fake_nvml(init_error=real_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(GPUBackendUnavailableError):
        await CUDABackend().initialize()

    no_devices = install_fake_nvml()
    with pytest.raises(GPUBackendUnavailableError, match="no NVIDIA GPU"):
        await CUDABackend().initialize()
    assert no_devices.calls["nvmlShutdown"] == 1  # released again

    install_fake_nvml(init_error=real_pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(GPUBackendError) as raised:
        await CUDABackend().initialize()
    assert not isinstance(raised.value, GPUBackendUnavailableError)


@pytest.mark.anyio
async def test_shutdown_is_idempotent(install_fake_nvml: Callable[..., FakeNVML]) -> None:
    backend, fake = await _started(FakeGPU(), install=install_fake_nvml)
    await backend.shutdown()
    await backend.shutdown()
    assert fake.calls["nvmlShutdown"] == 1
    assert await backend.list_devices(NODE) == []


@pytest.mark.anyio
async def test_factory_picks_cuda_when_nvml_sees_a_gpu(
    install_fake_nvml: Callable[..., FakeNVML], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EXO_GPU_BACKEND", raising=False)
    install_fake_nvml(FakeGPU())
    backend = await GPUBackendFactory.create_backend()
    assert backend.name == "cuda"
    await backend.shutdown()


@pytest.mark.anyio
async def test_factory_warns_once_and_uses_cpu_when_nvml_is_broken(
    install_fake_nvml: Callable[..., FakeNVML],
    monkeypatch: pytest.MonkeyPatch,
    logged_warnings: list[str],
) -> None:
    monkeypatch.delenv("EXO_GPU_BACKEND", raising=False)
    install_fake_nvml(init_error=real_pynvml.NVML_ERROR_UNKNOWN)
    backend = await GPUBackendFactory.create_backend()
    assert backend.name == "cpu"
    assert len(logged_warnings) == 1
    assert "cuda" in logged_warnings[0]


# --- real NVML: only where an NVIDIA GPU is present ---


def _real_nvml_device_count() -> int:
    try:
        real_pynvml.nvmlInit()
    except real_pynvml.NVMLError:
        return 0
    try:
        return int(real_pynvml.nvmlDeviceGetCount())
    finally:
        real_pynvml.nvmlShutdown()


@pytest.fixture
def real_nvidia_gpu() -> None:
    if _real_nvml_device_count() == 0:
        pytest.skip("no NVIDIA GPU visible through NVML")


@pytest.mark.gpu
@pytest.mark.anyio
@pytest.mark.usefixtures("real_nvidia_gpu")
async def test_real_nvml_static_facts() -> None:
    backend = CUDABackend()
    await backend.initialize()
    try:
        devices = await backend.list_devices(NODE)
        assert devices
        for info in devices:
            assert info.device_id.startswith("cuda:")
            assert info.name
            assert info.memory_total_bytes > 0
            assert info.compute_capability is not None
            assert info.sm_count is not None and info.sm_count > 0
            assert info.memory_bandwidth_gbps > 1000  # any datacenter GPU (H100: ~3350)
            assert info.peak_tflops_fp16 > 50
        device_ids = {info.device_id for info in devices}
        for info in devices:  # one GPU: empty; several: links to the others only
            assert set(info.peer_links) <= device_ids - {info.device_id}
            assert set(info.peer_links.values()) <= {"nvlink", "pcie_p2p", "pcie_host"}
    finally:
        await backend.shutdown()


@pytest.mark.gpu
@pytest.mark.anyio
@pytest.mark.usefixtures("real_nvidia_gpu")
async def test_real_nvml_readings() -> None:
    backend = await GPUBackendFactory.create_backend("auto")
    assert backend.name == "cuda"
    try:
        for info in await backend.list_devices(NODE):
            state = await backend.sample(NODE, info.device_id)
            assert state.memory_total_bytes > 0
            assert 0 <= state.memory_used_bytes <= state.memory_total_bytes
            assert 0 <= state.compute_utilization_percent <= 100
            assert 5 < state.thermal_temperature_c < 110
            assert 50 < state.thermal_throttle_threshold_c < 120
            assert state.power_draw_watts is not None and state.power_draw_watts > 0
            assert state.sm_clock_max_mhz is not None and state.sm_clock_max_mhz > 500
    finally:
        await backend.shutdown()
