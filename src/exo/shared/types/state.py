"""The cluster state: what every node derives by applying the global log."""

from pydantic import BaseModel, ConfigDict, Field

from exo.shared.types.calibration import DeviceCalibration
from exo.shared.types.gpu import DeviceGPUState, GPUDeviceInfo, GPULink
from exo.shared.types.ids import DeviceId, InstanceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance
from exo.shared.types.node import NodeInfo
from exo.shared.types.runners import RunnerState
from exo.shared.types.tasks import Task


class State(BaseModel):
    model_config = ConfigDict(frozen=True)

    master_node_id: NodeId | None = None
    members: frozenset[NodeId] = frozenset()
    """The nodes every majority is counted over (``MemberJoined`` adds, ``NodeTimedOut``
    removes); empty until the first master adds itself."""
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
