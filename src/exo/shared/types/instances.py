"""Instances (a model placed on devices), their shards and the placement decision."""

from datetime import datetime
from typing import Literal, get_args

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


RebalancePolicy = Literal["auto", "heal_only", "off"]
"""What the master may do with an instance on its own: ``auto`` heals it when a shard's node
or runner is lost and moves it when a fresh placement is predicted clearly faster;
``heal_only`` only heals; ``off`` leaves it as placed (a lost shard fails it)."""

ChangeKind = Literal["heal", "move", "manual"]
"""``heal``: a shard's node or runner was lost; ``move``: a fresh placement was predicted
faster for long enough; ``manual``: ``POST /instance/{id}/replace``."""

ChangeOutcome = Literal["loading", "switched", "aborted"]

RunnerSet = Literal["serving", "incoming", "retiring"]
"""An instance's runners come in sets, one pipeline each: the set that serves new requests,
the set a change is loading (make before break), and the set that finishes the requests it
had when a move switched away from it."""
RUNNER_SETS: tuple[RunnerSet, ...] = get_args(RunnerSet)


class PlacementChange(BaseModel):
    """One heal or move of an instance, as decided and as it ended."""

    model_config = ConfigDict(frozen=True)

    change_id: str
    kind: ChangeKind
    reason: str
    old_shards: list[Shard]
    new_shards: list[Shard]
    old_predicted_ms: float | None
    """The old layout under the conditions at the decision (None: a device of it is gone).
    In the instance's objective: ms per token (latency) or the bottleneck stage's ms
    (throughput)."""
    new_predicted_ms: float
    predicted_gain: float | None
    """``1 - new / old``: the share of time per token the new layout is predicted to save."""
    started_at: datetime
    finished_at: datetime | None = None
    outcome: ChangeOutcome = "loading"
    outcome_reason: str | None = None
    failed_devices: list[tuple[NodeId, DeviceId]] = Field(default_factory=list)
    """Where a runner of the new set failed (an aborted change): heals avoid them a while."""


class Replacement(BaseModel):
    """The runner set a change is loading; it serves once every runner of it is ready."""

    model_config = ConfigDict(frozen=True)

    change: PlacementChange
    shards: list[Shard]
    ring_endpoints: list[str]
    placement: PlacementDecision


class Instance(BaseModel):
    model_config = ConfigDict(frozen=True)

    instance_id: InstanceId
    model_id: str
    shards: list[Shard]
    """The serving set: new requests go to its rank 0."""
    placement: PlacementDecision
    ring_endpoints: list[str] = Field(
        default_factory=list, description="host:port per rank for the MLX ring backend."
    )
    min_nodes: int = Field(default=1, ge=1)
    """As placed; a heal or move keeps it."""
    rebalance: RebalancePolicy = "auto"
    incoming: Replacement | None = None
    """A heal or move in progress: its runners load while the serving set goes on."""
    retiring_shards: list[Shard] = Field(default_factory=list)
    """The set a move switched away from: it finishes the requests bound to it, then stops."""
    retiring_ring_endpoints: list[str] = Field(default_factory=list)
    failure: str | None = None
    """Why the instance cannot serve and could not be healed (None: it can, or heals)."""
    changes: list[PlacementChange] = Field(default_factory=list)
    """Its heals and moves, oldest first (the most recent ``CHANGES_KEPT``)."""
    measured_ms_per_token: float | None = None
    """Rank 0's measured end-to-end decode time per generated token (the first token
    excluded), from the last reported request; compare ``placement.predicted_ms_per_token``."""
    measured_time_to_first_token_ms: float | None = None
    """Rank 0's measured time from starting the request to its first token."""
    measured_at: datetime | None = None
    """When rank 0 measured the values above."""

    def runner_set(self, runner_id: RunnerId) -> RunnerSet | None:
        """Which of the instance's sets the runner belongs to (None: none any more)."""
        return next(
            (
                runner_set
                for runner_set in RUNNER_SETS
                if any(shard.runner_id == runner_id for shard in self.shards_of(runner_set))
            ),
            None,
        )

    def shards_of(self, runner_set: RunnerSet) -> list[Shard]:
        match runner_set:
            case "serving":
                return self.shards
            case "incoming":
                return self.incoming.shards if self.incoming is not None else []
            case "retiring":
                return self.retiring_shards

    def set_with(self, runner_id: RunnerId) -> list[Shard]:
        """The shards of the set the runner belongs to (empty: none)."""
        runner_set = self.runner_set(runner_id)
        return self.shards_of(runner_set) if runner_set is not None else []

    def ring_endpoints_of(self, runner_set: RunnerSet) -> list[str]:
        match runner_set:
            case "serving":
                return self.ring_endpoints
            case "incoming":
                return self.incoming.ring_endpoints if self.incoming is not None else []
            case "retiring":
                return self.retiring_ring_endpoints

    def all_ring_endpoints(self) -> list[str]:
        """The ring ports every set of the instance holds."""
        return [endpoint for each in RUNNER_SETS for endpoint in self.ring_endpoints_of(each)]


CHANGES_KEPT = 20


def rank_zero_runner(shards: list[Shard]) -> RunnerId | None:
    """The runner of the set's rank 0 (the one that takes its requests)."""
    return next((shard.runner_id for shard in shards if shard.rank == 0), None)
