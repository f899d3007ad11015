"""GPU device facts (static, reported once) and live readings (DeviceGPUState)."""

from datetime import datetime
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from exo.shared.types.ids import DeviceId, NodeId

GPUBackendName = Literal["cuda", "metal", "cpu", "simulated"]

PeerLinkKind = Literal["nvlink", "pcie_p2p", "pcie_host"]
"""How one GPU reaches another GPU of the same node: ``nvlink`` (NVLink), ``pcie_p2p`` (PCIe
peer-to-peer reads straight from the other GPU's memory) or ``pcie_host`` (PCIe, staged
through host memory)."""

UNKNOWN_TEMPERATURE_C = -1.0
"""``thermal_temperature_c`` when the platform does not expose a temperature."""
CPU_MEMORY_BANDWIDTH_GBPS = 50.0
"""Assumed CPU memory bandwidth (cannot be read portably; dual-channel DDR4/DDR5: 40-90)."""
CPU_PEAK_TFLOPS_FP16 = 0.5
"""Assumed CPU fp16 throughput; deliberately below any recent multi-core CPU with SIMD."""
NO_BATTERY_PERCENT = 100.0
"""``battery_percent`` for a machine without a battery (it behaves as fully charged)."""


class GPUDeviceInfo(BaseModel):
    """Static facts about one device; reported once per device by its node."""

    model_config = ConfigDict(frozen=True)

    device_id: DeviceId
    node_id: NodeId
    name: str
    vendor: str
    backend: GPUBackendName
    memory_total_bytes: int = Field(ge=0)
    memory_bandwidth_gbps: float = Field(ge=0, description="Peak memory bandwidth in GB/s.")
    peak_tflops_fp16: float = Field(ge=0)
    compute_capability: str | None = None
    sm_count: int | None = None
    is_simulated: bool = False
    max_working_set_bytes: int | None = Field(default=None, ge=0)
    """The most memory the device can wire for GPU work (Apple unified memory: MLX's
    ``max_recommended_working_set_size``); None when unknown or unlimited."""
    peer_links: dict[DeviceId, PeerLinkKind] = Field(default_factory=dict)
    """How this device reaches each other GPU of the same node, by that GPU's device id.
    Empty when unknown or when the node has one GPU; a pair the driver cannot answer for is
    left out."""

    @model_validator(mode="after")
    def _not_its_own_peer(self) -> Self:
        if self.device_id in self.peer_links:
            raise ValueError(f"{self.device_id}: peer_links names the device itself")
        return self


class DeviceGPUState(BaseModel):
    """A live reading of one device. Field names follow the seed card."""

    model_config = ConfigDict(frozen=True)

    device_id: DeviceId
    node_id: NodeId
    memory_used_bytes: int = Field(ge=0)
    memory_total_bytes: int = Field(ge=0)
    compute_utilization_percent: float = Field(ge=0, le=100)
    thermal_temperature_c: float = UNKNOWN_TEMPERATURE_C
    thermal_throttle_threshold_c: float = 100.0
    is_thermal_throttling: bool = False
    battery_percent: float = Field(default=NO_BATTERY_PERCENT, ge=0, le=100)
    is_plugged_in: bool = True
    last_update: datetime
    # Beyond the seed card: what placement and operators need.
    power_draw_watts: float | None = None
    power_limit_watts: float | None = None
    sm_clock_mhz: float | None = None
    sm_clock_max_mhz: float | None = None
    throttle_reasons: list[str] = Field(default_factory=list)
    is_simulated: bool = False
    thermal_shutdown_threshold_c: float | None = None
    """The temperature at which the device shuts itself down (NVML), when known."""
    utilization_median_percent: float | None = Field(default=None, ge=0, le=100)
    """The median of this device's last few utilisation samples, the current one included
    (``GPUTelemetryCollector`` fills it; see ``UTILIZATION_MEDIAN_WINDOW`` there). Steadier
    than ``compute_utilization_percent`` against one-off spikes; None when not computed."""
    condition_changes: int = Field(default=0, ge=0)
    """How often the device's throttling or power state changed since its node began
    sampling it, counted at every sample, also the ones never emitted (``GPUTelemetryCollector``
    fills it). Readings are sent as values, and a newer one may replace an unsent older one:
    a reader that sees this grow by two or more between two looks knows the condition went
    and came back in between (the rebalancer does not take such a device as steady)."""

    @property
    def memory_free_bytes(self) -> int:
        return max(0, self.memory_total_bytes - self.memory_used_bytes)


class GPULink(BaseModel):
    """A measured link between two nodes (from ``GPUBandwidthMeasured``)."""

    model_config = ConfigDict(frozen=True)

    source_node_id: NodeId
    dest_node_id: NodeId
    bandwidth_mbps: float = Field(ge=0)
    latency_ms: float = Field(ge=0)
    measurement_count: int = Field(ge=1)
    measured_at: datetime
