"""How fast devices really are, compared with what placement's cost model predicts."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from exo.shared.types.ids import DeviceId, NodeId


class DeviceCalibration(BaseModel):
    """A device's measured stage time relative to the uncalibrated prediction, learned from
    ``StageTimeMeasured`` events of the shards it ran."""

    model_config = ConfigDict(frozen=True)

    node_id: NodeId
    device_id: DeviceId
    model_id: str
    """The model of the measurements; a measurement of another model starts afresh."""
    n_layers: int = Field(ge=0)
    """The layers the measured shard held; another layer count starts afresh."""
    factor: float = Field(ge=0)
    """Measured stage ms / ``base_stage_ms``: how much slower than the uncalibrated model
    this device really is (an exponential moving average, weight 0.5 on the newest)."""
    samples: int = Field(ge=1)
    """Measurements folded into ``factor`` since it last started afresh."""
    measured_at: datetime
