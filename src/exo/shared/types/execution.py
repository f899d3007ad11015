"""Where a node can compute: the MLX build it runs and the devices that build can use.

A node's GPUs are reported by its GPU telemetry backend (NVML, Metal, ...); whether a model
can *run* on them is a different question, answered by the MLX installed on the node: an
NVIDIA GPU is only usable by MLX's CUDA build (``uv run --extra cuda13 exo``), the Apple
GPU only by MLX on macOS. Each node probes its MLX at start and reports the answer with
its static info; placement puts layers only on devices listed here.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict

from exo.shared.types.ids import DeviceId

ComputeBackend = Literal["cpu", "cuda", "metal"]

CPU_COMPUTE_DEVICE_ID = DeviceId("cpu:0")


def backend_of_device(device_id: str) -> str:
    """``cuda`` for ``cuda:1``: the part before the colon."""
    return device_id.split(":", 1)[0]


class ComputeDevice(BaseModel):
    """A device MLX computes on, as a runner (or the node's probe) found it."""

    model_config = ConfigDict(frozen=True)

    device_id: DeviceId
    """Named like the telemetry's devices: ``cuda:0`` (NVML's index), ``metal:0``, ``cpu:0``."""
    backend: ComputeBackend
    name: str = ""


class ExecutionCapability(BaseModel):
    """What MLX on one node can compute on."""

    model_config = ConfigDict(frozen=True)

    mlx_version: str | None = None
    """None when MLX does not load on the node at all (see ``error``)."""
    mlx_build: str | None = None
    """The installed MLX backend package: ``mlx-cuda-13``, ``mlx-cuda-12``, ``mlx-cpu``,
    ``mlx-metal``."""
    devices: list[ComputeDevice] = []
    """Every device MLX computed a test array on: ``cpu:0`` whenever MLX loads, plus
    ``cuda:N`` for each NVIDIA GPU with the CUDA build, ``metal:0`` on Apple silicon."""
    error: str | None = None
    """Why MLX, or a GPU it should reach, is not usable, when something is not."""

    def device_ids(self) -> set[DeviceId]:
        return {device.device_id for device in self.devices}

    def can_run_on(self, device_id: str) -> bool:
        return device_id in self.device_ids()

    @property
    def backends(self) -> set[str]:
        return {device.backend for device in self.devices}
