"""Apple silicon backend: the Metal GPU as MLX sees it (``mlx.core``).

Sources:

- availability: ``mx.metal.is_available()``;
- static facts: ``mx.device_info()`` (``mx.metal.device_info()`` on older MLX): ``device_name``,
  ``architecture``, ``memory_size`` and ``max_recommended_working_set_size``. The device's
  memory total is the recommended working set (what Metal lets one process keep resident),
  else the physical memory size; ``max_working_set_bytes`` is the recommended working set
  itself (None when MLX does not report it);
- used memory: the GPU shares the machine's memory, so free = min(total - MLX's active memory
  in this process, memory the OS reports available) and used = total - free;
- bandwidth and peak fp16 throughput come from ``APPLE_CHIPS`` (Apple's published figures,
  matched on the chip name; unknown chips get ``DEFAULT_APPLE_CHIP``);
- unknowns: MLX exposes no temperature (-1 °C, threshold 100 °C, never "throttling") and no
  GPU utilisation (0 %); battery and plug state come from psutil.

Device id ``metal:0``.
"""

from typing import Any

import anyio.to_thread
import mlx.core as mx
import psutil
from pydantic import BaseModel, ConfigDict

from exo.gpu.backend import GPUBackendUnavailableError, GPUDeviceNotFoundError
from exo.gpu.backends.host import read_battery, utc_now
from exo.shared.types.gpu import DeviceGPUState, GPUBackendName, GPUDeviceInfo
from exo.shared.types.ids import DeviceId, NodeId

METAL_DEVICE_ID = DeviceId("metal:0")


class AppleChip(BaseModel):
    model_config = ConfigDict(frozen=True)

    memory_bandwidth_gbps: float
    peak_tflops_fp16: float


APPLE_CHIPS: dict[str, AppleChip] = {
    # Most specific names first: the first name contained in the device name wins.
    "M1 Ultra": AppleChip(memory_bandwidth_gbps=800, peak_tflops_fp16=21.2),
    "M1 Max": AppleChip(memory_bandwidth_gbps=400, peak_tflops_fp16=10.6),
    "M1 Pro": AppleChip(memory_bandwidth_gbps=200, peak_tflops_fp16=5.3),
    "M1": AppleChip(memory_bandwidth_gbps=68, peak_tflops_fp16=2.6),
    "M2 Ultra": AppleChip(memory_bandwidth_gbps=800, peak_tflops_fp16=27.2),
    "M2 Max": AppleChip(memory_bandwidth_gbps=400, peak_tflops_fp16=13.6),
    "M2 Pro": AppleChip(memory_bandwidth_gbps=200, peak_tflops_fp16=6.8),
    "M2": AppleChip(memory_bandwidth_gbps=100, peak_tflops_fp16=3.6),
    "M3 Ultra": AppleChip(memory_bandwidth_gbps=819, peak_tflops_fp16=28.4),
    "M3 Max": AppleChip(memory_bandwidth_gbps=400, peak_tflops_fp16=16.4),
    "M3 Pro": AppleChip(memory_bandwidth_gbps=150, peak_tflops_fp16=7.4),
    "M3": AppleChip(memory_bandwidth_gbps=100, peak_tflops_fp16=4.1),
    "M4 Max": AppleChip(memory_bandwidth_gbps=546, peak_tflops_fp16=18.4),
    "M4 Pro": AppleChip(memory_bandwidth_gbps=273, peak_tflops_fp16=9.2),
    "M4": AppleChip(memory_bandwidth_gbps=120, peak_tflops_fp16=4.3),
}
"""Published unified-memory bandwidth and approximate GPU fp16 TFLOPS per Apple chip."""

DEFAULT_APPLE_CHIP = AppleChip(memory_bandwidth_gbps=100, peak_tflops_fp16=3.0)


def apple_chip_for(device_name: str) -> AppleChip:
    for chip_name, chip in APPLE_CHIPS.items():
        if chip_name in device_name:
            return chip
    return DEFAULT_APPLE_CHIP


def _device_info() -> dict[str, Any]:
    reader = getattr(mx, "device_info", None) or getattr(mx.metal, "device_info", None)
    if reader is None:
        return {}
    info = reader()
    return dict(info) if isinstance(info, dict) else {}


def _active_memory() -> int:
    reader = getattr(mx, "get_active_memory", None) or getattr(mx.metal, "get_active_memory", None)
    return int(reader()) if reader is not None else 0


class _MetalFacts(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    architecture: str | None
    memory_total_bytes: int
    max_working_set_bytes: int | None
    chip: AppleChip


class MetalBackend:
    """Apple silicon GPU via MLX's Metal backend."""

    def __init__(self) -> None:
        self._facts: _MetalFacts | None = None

    @property
    def name(self) -> GPUBackendName:
        return "metal"

    async def initialize(self) -> None:
        self._facts = await anyio.to_thread.run_sync(self._initialise_blocking)

    async def shutdown(self) -> None:
        self._facts = None

    async def list_devices(self, node_id: NodeId) -> list[GPUDeviceInfo]:
        if self._facts is None:
            return []
        facts = self._facts
        return [
            GPUDeviceInfo(
                device_id=METAL_DEVICE_ID,
                node_id=node_id,
                name=facts.name,
                vendor="Apple",
                backend="metal",
                memory_total_bytes=facts.memory_total_bytes,
                memory_bandwidth_gbps=facts.chip.memory_bandwidth_gbps,
                peak_tflops_fp16=facts.chip.peak_tflops_fp16,
                compute_capability=facts.architecture,
                max_working_set_bytes=facts.max_working_set_bytes,
            )
        ]

    async def sample(self, node_id: NodeId, device_id: DeviceId) -> DeviceGPUState:
        facts = self._facts
        if facts is None or device_id != METAL_DEVICE_ID:
            raise GPUDeviceNotFoundError(f"no Metal device {device_id}")

        def read() -> DeviceGPUState:
            total = facts.memory_total_bytes
            available = int(psutil.virtual_memory().available)
            free = max(0, min(total - _active_memory(), available))
            battery = read_battery()
            return DeviceGPUState(
                device_id=METAL_DEVICE_ID,
                node_id=node_id,
                memory_used_bytes=total - free,
                memory_total_bytes=total,
                compute_utilization_percent=0.0,
                battery_percent=battery.percent,
                is_plugged_in=battery.is_plugged_in,
                last_update=utc_now(),
            )

        return await anyio.to_thread.run_sync(read)

    @staticmethod
    def _initialise_blocking() -> _MetalFacts:
        if not mx.metal.is_available():
            raise GPUBackendUnavailableError("MLX reports no Metal GPU on this machine")
        info = _device_info()
        name = str(info.get("device_name") or "Apple GPU")
        architecture = info.get("architecture")
        working_set = info.get("max_recommended_working_set_size")
        max_working_set = int(working_set) if working_set else None
        memory_total = int(
            max_working_set or info.get("memory_size") or psutil.virtual_memory().total
        )
        return _MetalFacts(
            name=name,
            architecture=str(architecture) if architecture else None,
            memory_total_bytes=memory_total,
            max_working_set_bytes=max_working_set,
            chip=apple_chip_for(name),
        )
