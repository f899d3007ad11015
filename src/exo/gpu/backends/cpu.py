"""CPU fallback backend: the host itself as one device, read with psutil.

- device ``cpu:0``; memory is system RAM (used = total - available);
- utilisation: ``psutil.cpu_percent(interval=None)``, i.e. the average since the previous
  reading (primed at initialise, so never blocks);
- temperature: the hottest CPU sensor from ``psutil.sensors_temperatures`` with its ``high``
  mark as the throttle threshold, else -1 °C and 100 °C; throttling only when a reported
  threshold is reached;
- battery and plug state: ``psutil.sensors_battery`` (no battery → 100 %, plugged in).

Memory bandwidth and peak throughput cannot be read portably, so they are conservative
constants (``CPU_MEMORY_BANDWIDTH_GBPS``, ``CPU_PEAK_TFLOPS_FP16``): dual-channel DDR4/DDR5
desktops measure 40-90 GB/s, and half a TFLOP is below any recent multi-core CPU with SIMD.
Underestimating keeps the placer from preferring a CPU over a real accelerator.
"""

import platform
from pathlib import Path

import anyio.to_thread
import psutil

from exo.gpu.backend import GPUDeviceNotFoundError
from exo.gpu.backends.host import read_battery, read_cpu_temperature, utc_now
from exo.shared.types.gpu import (
    CPU_MEMORY_BANDWIDTH_GBPS,
    CPU_PEAK_TFLOPS_FP16,
    DeviceGPUState,
    GPUBackendName,
    GPUDeviceInfo,
)
from exo.shared.types.ids import DeviceId, NodeId

CPU_DEVICE_ID = DeviceId("cpu:0")


def _cpu_model_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _vendor_of(model_name: str) -> str:
    lowered = model_name.lower()
    for marker, vendor in (("intel", "Intel"), ("amd", "AMD"), ("apple", "Apple")):
        if marker in lowered:
            return vendor
    return platform.machine() or "unknown"


class CPUBackend:
    """The CPU as a single compute device. Always initialises."""

    def __init__(self) -> None:
        self._model_name = "CPU"
        self._memory_total_bytes = 0

    @property
    def name(self) -> GPUBackendName:
        return "cpu"

    async def initialize(self) -> None:
        def prime() -> tuple[str, int]:
            psutil.cpu_percent(interval=None)  # first call only sets the reference point
            return _cpu_model_name(), int(psutil.virtual_memory().total)

        self._model_name, self._memory_total_bytes = await anyio.to_thread.run_sync(prime)

    async def shutdown(self) -> None:
        return None

    async def list_devices(self, node_id: NodeId) -> list[GPUDeviceInfo]:
        """The static facts, read at ``initialize`` (the collector lists devices every pass)."""
        return [
            GPUDeviceInfo(
                device_id=CPU_DEVICE_ID,
                node_id=node_id,
                name=self._model_name,
                vendor=_vendor_of(self._model_name),
                backend="cpu",
                memory_total_bytes=self._memory_total_bytes,
                memory_bandwidth_gbps=CPU_MEMORY_BANDWIDTH_GBPS,
                peak_tflops_fp16=CPU_PEAK_TFLOPS_FP16,
            )
        ]

    async def sample(self, node_id: NodeId, device_id: DeviceId) -> DeviceGPUState:
        if device_id != CPU_DEVICE_ID:
            raise GPUDeviceNotFoundError(
                f"the CPU backend has only {CPU_DEVICE_ID}, not {device_id}"
            )

        def read() -> DeviceGPUState:
            memory = psutil.virtual_memory()
            utilisation = min(100.0, max(0.0, float(psutil.cpu_percent(interval=None))))
            temperature = read_cpu_temperature()
            battery = read_battery()
            return DeviceGPUState(
                device_id=CPU_DEVICE_ID,
                node_id=node_id,
                memory_used_bytes=max(0, int(memory.total) - int(memory.available)),
                memory_total_bytes=int(memory.total),
                compute_utilization_percent=utilisation,
                thermal_temperature_c=temperature.current_c,
                thermal_throttle_threshold_c=temperature.throttle_threshold_c,
                is_thermal_throttling=temperature.threshold_reported
                and temperature.current_c >= temperature.throttle_threshold_c,
                battery_percent=battery.percent,
                is_plugged_in=battery.is_plugged_in,
                last_update=utc_now(),
            )

        return await anyio.to_thread.run_sync(read)
