"""Instances (a model placed on devices), their shards and the placement decision."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from exo.shared.types.ids import DeviceId, InstanceId, NodeId, RunnerId

PlacementStrategy = Literal["greedy", "csp", "greedy_fallback"]

SCORE_WEIGHTS: dict[str, float] = {
    "compute": 0.40,
    "memory": 0.30,
    "network": 0.15,
    "thermal": 0.10,
    "bandwidth": 0.05,
}


class GPUDeviceScore(BaseModel):
    """How suited a device is to hold a shard; each part in [0, 1]."""

    model_config = ConfigDict(frozen=True)

    node_id: NodeId
    device_id: DeviceId
    compute_score: float = Field(ge=0, le=1)
    memory_score: float = Field(ge=0, le=1)
    network_score: float = Field(ge=0, le=1)
    thermal_score: float = Field(ge=0, le=1)
    bandwidth_score: float = Field(ge=0, le=1)

    @computed_field
    @property
    def weighted_score(self) -> float:
        return (
            self.compute_score * SCORE_WEIGHTS["compute"]
            + self.memory_score * SCORE_WEIGHTS["memory"]
            + self.network_score * SCORE_WEIGHTS["network"]
            + self.thermal_score * SCORE_WEIGHTS["thermal"]
            + self.bandwidth_score * SCORE_WEIGHTS["bandwidth"]
        )


PlacementObjective = Literal["latency", "throughput"]
"""``latency``: the fewest ms per token for one request; ``throughput``: the most tokens per
second for several concurrent requests (the slowest stage is the pipeline's pace)."""


class PlacementDecision(BaseModel):
    """Why the layers went where they went."""

    model_config = ConfigDict(frozen=True)

    strategy: PlacementStrategy
    heterogeneous: bool
    reasons: list[str] = Field(default_factory=list)
    predicted_ms_per_token: float
    """Latency: one request's time per generated token."""
    greedy_ms_per_token: float
    solve_ms: float
    device_scores: list[GPUDeviceScore] = Field(default_factory=list)
    objective: PlacementObjective = "latency"
    predicted_bottleneck_ms: float | None = None
    """Throughput: with a request on every stage, a token leaves every this many ms."""
    predicted_time_to_first_token_ms: float | None = None
    """For a prompt of the cost model's typical length."""


class Shard(BaseModel):
    """One pipeline stage: a contiguous layer range on one device."""

    model_config = ConfigDict(frozen=True)

    runner_id: RunnerId
    node_id: NodeId
    device_id: DeviceId
    rank: int = Field(ge=0)
    world_size: int = Field(ge=1)
    start_layer: int = Field(ge=0)
    end_layer: int = Field(gt=0, description="Exclusive.")
    predicted_stage_ms: float | None = None
    """Placement's calibrated prediction of this stage's time per generated token."""
    base_stage_ms: float | None = None
    """The same prediction without calibration (what a device calibration factor scales)."""
    measured_stage_ms: float | None = None
    """This stage's measured compute time per decode token (median of the last reported
    request), set by ``apply`` from ``StageTimeMeasured``."""

    @property
    def n_layers(self) -> int:
        return self.end_layer - self.start_layer


class Instance(BaseModel):
    model_config = ConfigDict(frozen=True)

    instance_id: InstanceId
    model_id: str
    shards: list[Shard]
    placement: PlacementDecision
    ring_endpoints: list[str] = Field(
        default_factory=list, description="host:port per rank for the MLX ring backend."
    )
    measured_ms_per_token: float | None = None
    """Rank 0's measured end-to-end decode time per generated token (the first token
    excluded), from the last reported request; compare ``placement.predicted_ms_per_token``."""
    measured_time_to_first_token_ms: float | None = None
    """Rank 0's measured time from starting the request to its first token."""
    measured_at: datetime | None = None
    """When rank 0 measured the values above."""
