"""The cluster state: what every node derives by applying the global log."""

from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field

from exo.shared.types.calibration import DeviceCalibration
from exo.shared.types.gpu import DeviceGPUState, GPUDeviceInfo, GPULink
from exo.shared.types.ids import DeviceId, InstanceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance
from exo.shared.types.node import NodeInfo
from exo.shared.types.runners import RunnerState
from exo.shared.types.sets import SortedFrozenSet
from exo.shared.types.tasks import Task


class State(BaseModel):
    model_config = ConfigDict(frozen=True)

    master_node_id: NodeId | None = None
    members: SortedFrozenSet[NodeId] = frozenset()
    """The nodes every majority is counted over (``MemberJoined`` adds, ``NodeTimedOut``
    removes); empty until the first master adds itself. Serialised sorted."""
    last_event_applied_idx: int = -1
    nodes: dict[NodeId, NodeInfo] = Field(default_factory=dict)
    gpu_device_info: dict[NodeId, dict[DeviceId, GPUDeviceInfo]] = Field(default_factory=dict)
    """Static device facts, node id -> device id -> info."""
    gpu_device_state: dict[NodeId, dict[DeviceId, DeviceGPUState]] = Field(default_factory=dict)
    """Live device readings, node id -> device id -> state (the seed's flat key collides)."""
    gpu_links: dict[NodeId, dict[NodeId, GPULink]] = Field(default_factory=dict)
    """Measured links, source node -> destination node -> link."""
    instances: dict[InstanceId, Instance] = Field(default_factory=dict)
    runners: dict[RunnerId, RunnerState] = Field(default_factory=dict)
    tasks: dict[TaskId, Task] = Field(default_factory=dict)
    device_calibration: dict[NodeId, dict[DeviceId, DeviceCalibration]] = Field(
        default_factory=dict
    )
    """Measured speed against placement's uncalibrated prediction, node id -> device id ->
    calibration (kept when the node times out: it describes the hardware)."""

    def devices(
        self,
    ) -> Iterator[tuple[NodeId, DeviceId, GPUDeviceInfo | None, DeviceGPUState | None]]:
        """Every device the state knows of (by its facts, its reading or both), ordered by
        node and device: node id, device id, facts, reading."""
        for node_id in sorted(set(self.gpu_device_info) | set(self.gpu_device_state)):
            infos = self.gpu_device_info.get(node_id, {})
            readings = self.gpu_device_state.get(node_id, {})
            for device_id in sorted(set(infos) | set(readings)):
                yield node_id, device_id, infos.get(device_id), readings.get(device_id)
