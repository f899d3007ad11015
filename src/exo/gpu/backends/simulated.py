"""Simulated devices described in a JSON file, for tests and demos.

Schema (``SimulatedGPUFile``)::

    {"devices": [{"device_id": "cuda:0", "name": "Sim H100", "vendor": "NVIDIA",
                  "memory_total_bytes": 85899345920, "memory_used_bytes": 0,
                  "memory_bandwidth_gbps": 3350, "peak_tflops_fp16": 989,
                  "compute_utilization_percent": 0, "thermal_temperature_c": 40,
                  "thermal_throttle_threshold_c": 87, "is_thermal_throttling": false,
                  "battery_percent": 100, "is_plugged_in": true,
                  "max_working_set_gb": 64.0, "peer_links": {"cuda:1": "nvlink"}}]}

Only ``device_id`` and ``memory_total_bytes`` are required; unknown keys are rejected so a
typo is an error rather than a silently ignored field. ``max_working_set_gb`` (GiB, > 0) becomes
``GPUDeviceInfo.max_working_set_bytes``; ``peer_links`` maps other device ids *in the same file*
to ``nvlink``, ``pcie_p2p`` or ``pcie_host`` (an id not in the file, or the device itself, is an
error naming it). The file is re-read whenever its
modification time, size or inode changes (so a test or demo can edit it live). A file that
turns malformed later is logged once per change and the last good reading is kept; a missing
or malformed file at ``initialize`` raises ``GPUBackendError`` with the reason.
Every info and state this backend returns has ``is_simulated=True``.
"""

import os
from pathlib import Path
from typing import Self

import anyio.to_thread
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from exo.gpu.backend import GPUBackendError, GPUDeviceNotFoundError
from exo.gpu.backends.host import DEFAULT_THROTTLE_THRESHOLD_C, utc_now
from exo.shared.types.gpu import (
    NO_BATTERY_PERCENT,
    UNKNOWN_TEMPERATURE_C,
    DeviceGPUState,
    GPUBackendName,
    GPUDeviceInfo,
    PeerLinkKind,
)
from exo.shared.types.ids import DeviceId, NodeId
from exo.shared.types.memory import GIB


class SimulatedDevice(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: DeviceId = Field(min_length=1)
    name: str = "Simulated GPU"
    vendor: str = "simulated"
    memory_total_bytes: int = Field(ge=0)
    memory_used_bytes: int = Field(default=0, ge=0)
    memory_bandwidth_gbps: float = Field(default=100.0, ge=0)
    peak_tflops_fp16: float = Field(default=10.0, ge=0)
    compute_utilization_percent: float = Field(default=0.0, ge=0, le=100)
    thermal_temperature_c: float = UNKNOWN_TEMPERATURE_C
    thermal_throttle_threshold_c: float = DEFAULT_THROTTLE_THRESHOLD_C
    is_thermal_throttling: bool = False
    battery_percent: float = Field(default=NO_BATTERY_PERCENT, ge=0, le=100)
    is_plugged_in: bool = True
    compute_capability: str | None = None
    sm_count: int | None = None
    max_working_set_gb: float | None = Field(default=None, gt=0)
    peer_links: dict[DeviceId, PeerLinkKind] = Field(default_factory=dict[DeviceId, PeerLinkKind])

    @model_validator(mode="after")
    def _used_fits(self) -> Self:
        if self.memory_used_bytes > self.memory_total_bytes:
            raise ValueError(
                f"{self.device_id}: memory_used_bytes ({self.memory_used_bytes}) exceeds "
                f"memory_total_bytes ({self.memory_total_bytes})"
            )
        if self.device_id in self.peer_links:
            raise ValueError(f"{self.device_id}: peer_links names the device itself")
        return self

    @property
    def max_working_set_bytes(self) -> int | None:
        if self.max_working_set_gb is None:
            return None
        return int(self.max_working_set_gb * GIB)


class SimulatedGPUFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    devices: list[SimulatedDevice] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> Self:
        ids = [device.device_id for device in self.devices]
        duplicates = sorted({device_id for device_id in ids if ids.count(device_id) > 1})
        if duplicates:
            raise ValueError(f"duplicate device_id: {', '.join(duplicates)}")
        known = set(ids)
        for device in self.devices:
            unknown = sorted(set(device.peer_links) - known)
            if unknown:
                raise ValueError(
                    f"{device.device_id}: peer_links names unknown device "
                    f"{', '.join(unknown)} (devices in this file: {', '.join(ids)})"
                )
        return self


FileSignature = tuple[int, int, int, int]
"""(inode, size, mtime_ns, ctime_ns): what tells us the file changed."""

_NO_FILE: FileSignature = (-1, -1, -1, -1)


def _signature(path: Path) -> FileSignature:
    """The file's signature; ``_NO_FILE`` when it cannot be looked at (``load_simulated_file``
    then says why)."""
    try:
        status = os.stat(path)
    except OSError:
        return _NO_FILE
    return (status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def load_simulated_file(path: Path) -> SimulatedGPUFile:
    """Read and validate a device file; ``GPUBackendError`` says what is wrong with it."""
    try:
        text = path.read_text()
    except OSError as error:
        raise GPUBackendError(
            f"cannot read simulated GPU file {path}: {error.strerror or error}"
        ) from error
    try:
        return SimulatedGPUFile.model_validate_json(text)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc']) or '(file)'}: {issue['msg']}"
            for issue in error.errors()
        )
        raise GPUBackendError(f"invalid simulated GPU file {path}: {problems}") from error


class SimulatedBackend:
    """Devices read from a JSON file (see the module docstring for the schema)."""

    def __init__(self, devices_file: Path) -> None:
        self._path = devices_file
        self._devices: dict[DeviceId, SimulatedDevice] = {}
        self._seen_signature: FileSignature | None = None

    @property
    def name(self) -> GPUBackendName:
        return "simulated"

    async def initialize(self) -> None:
        def load() -> tuple[FileSignature, SimulatedGPUFile]:
            return _signature(self._path), load_simulated_file(self._path)

        signature, parsed = await anyio.to_thread.run_sync(load)
        self._seen_signature = signature
        self._devices = {device.device_id: device for device in parsed.devices}

    async def shutdown(self) -> None:
        return None

    async def list_devices(self, node_id: NodeId) -> list[GPUDeviceInfo]:
        await self._refresh()
        return [
            GPUDeviceInfo(
                device_id=device.device_id,
                node_id=node_id,
                name=device.name,
                vendor=device.vendor,
                backend="simulated",
                memory_total_bytes=device.memory_total_bytes,
                memory_bandwidth_gbps=device.memory_bandwidth_gbps,
                peak_tflops_fp16=device.peak_tflops_fp16,
                compute_capability=device.compute_capability,
                sm_count=device.sm_count,
                is_simulated=True,
                max_working_set_bytes=device.max_working_set_bytes,
                peer_links=device.peer_links,
            )
            for device in self._devices.values()
        ]

    async def sample(self, node_id: NodeId, device_id: DeviceId) -> DeviceGPUState:
        await self._refresh()
        device = self._devices.get(device_id)
        if device is None:
            raise GPUDeviceNotFoundError(
                f"no simulated device {device_id} in {self._path} "
                f"(have: {', '.join(self._devices) or 'none'})"
            )
        return DeviceGPUState(
            device_id=device.device_id,
            node_id=node_id,
            memory_used_bytes=device.memory_used_bytes,
            memory_total_bytes=device.memory_total_bytes,
            compute_utilization_percent=device.compute_utilization_percent,
            thermal_temperature_c=device.thermal_temperature_c,
            thermal_throttle_threshold_c=device.thermal_throttle_threshold_c,
            is_thermal_throttling=device.is_thermal_throttling,
            battery_percent=device.battery_percent,
            is_plugged_in=device.is_plugged_in,
            last_update=utc_now(),
            is_simulated=True,
        )

    async def _refresh(self) -> None:
        """Re-read the file if it changed; on failure log once and keep the last good one.
        The signature is a ``stat`` of a local file, microseconds, so it is taken on the
        loop instead of one thread hop per device sample; reading and parsing a changed
        file happens in a thread."""
        signature = _signature(self._path)
        if signature == self._seen_signature:
            return
        self._seen_signature = signature
        try:
            parsed = await anyio.to_thread.run_sync(load_simulated_file, self._path)
        except GPUBackendError as error:
            logger.warning(f"{error}; keeping the last good simulated GPU readings")
            return
        self._devices = {device.device_id: device for device in parsed.devices}
