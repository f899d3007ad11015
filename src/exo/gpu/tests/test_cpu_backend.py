from typing import NamedTuple

import psutil
import pytest

from exo.gpu.backend import GPUDeviceNotFoundError
from exo.gpu.backends.cpu import CPU_DEVICE_ID, CPUBackend
from exo.shared.types.ids import DeviceId, NodeId

NODE = NodeId("node-a")


class Battery(NamedTuple):
    percent: float
    secsleft: int
    power_plugged: bool | None


class Temperature(NamedTuple):
    label: str
    current: float
    high: float | None
    critical: float | None


@pytest.mark.anyio
async def test_cpu_backend_reports_one_device_with_system_memory() -> None:
    backend = CPUBackend()
    await backend.initialize()
    devices = await backend.list_devices(NODE)
    assert [device.device_id for device in devices] == [CPU_DEVICE_ID]
    info = devices[0]
    assert info.backend == "cpu"
    assert info.node_id == NODE
    assert info.memory_total_bytes == psutil.virtual_memory().total
    assert info.memory_bandwidth_gbps > 0
    assert info.peak_tflops_fp16 > 0

    state = await backend.sample(NODE, CPU_DEVICE_ID)
    assert state.node_id == NODE
    assert state.memory_total_bytes == psutil.virtual_memory().total
    assert 0 < state.memory_used_bytes <= state.memory_total_bytes
    assert 0.0 <= state.compute_utilization_percent <= 100.0
    assert not state.is_simulated
    await backend.shutdown()


@pytest.mark.anyio
async def test_cpu_backend_reads_battery_and_temperature(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: Battery(42.0, 3600, False))
    monkeypatch.setattr(
        psutil,
        "sensors_temperatures",
        lambda: {
            "nvme": [Temperature("Composite", 70.0, 80.0, 90.0)],
            "coretemp": [
                Temperature("Core 0", 55.0, 95.0, 100.0),
                Temperature("Core 1", 61.0, 95.0, 100.0),
            ],
        },
    )
    backend = CPUBackend()
    await backend.initialize()
    state = await backend.sample(NODE, CPU_DEVICE_ID)
    assert state.battery_percent == 42.0
    assert state.is_plugged_in is False
    assert state.thermal_temperature_c == 61.0  # the hottest CPU core, not the disk
    assert state.thermal_throttle_threshold_c == 95.0
    assert state.is_thermal_throttling is False

    monkeypatch.setattr(
        psutil, "sensors_temperatures", lambda: {"k10temp": [Temperature("Tctl", 96.0, 95.0, None)]}
    )
    hot = await backend.sample(NODE, CPU_DEVICE_ID)
    assert hot.is_thermal_throttling is True


@pytest.mark.anyio
async def test_cpu_backend_unknowns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: None)
    monkeypatch.setattr(psutil, "sensors_temperatures", dict)
    backend = CPUBackend()
    await backend.initialize()
    state = await backend.sample(NODE, CPU_DEVICE_ID)
    assert state.battery_percent == 100.0
    assert state.is_plugged_in is True
    assert state.thermal_temperature_c == -1.0
    assert state.is_thermal_throttling is False
    with pytest.raises(GPUDeviceNotFoundError):
        await backend.sample(NODE, DeviceId("cpu:1"))
