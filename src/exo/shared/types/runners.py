"""Runner processes as the cluster sees them."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

from exo.shared.types.execution import ComputeDevice
from exo.shared.types.ids import InstanceId, NodeId, RunnerId

RunnerStatus = Literal[
    "starting", "connecting", "loading", "ready", "running", "failed", "shut_down"
]


class RunnerState(BaseModel):
    model_config = ConfigDict(frozen=True)

    runner_id: RunnerId
    instance_id: InstanceId
    node_id: NodeId
    status: RunnerStatus
    error: str | None = None
    compute_device: ComputeDevice | None = None
    """The device the runner reported computing on (kept across later status changes)."""
    loaded_bytes: int | None = None
    """Bytes of this runner's weights loaded so far, while it loads (the last known value
    afterwards; None before it reports any, and again when it starts anew)."""
    total_bytes: int | None = None
    """Bytes of weights this runner loads in all (its layers' share); None until known."""
