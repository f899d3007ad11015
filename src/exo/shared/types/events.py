"""Events: facts, indexed by the master into one global log, applied by every node.

Every event is a pydantic model with a literal ``kind``; ``Event`` is their tagged union.
"""

from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from exo.shared.types.execution import ComputeDevice
from exo.shared.types.generation import TokenLogprob
from exo.shared.types.gpu import DeviceGPUState, GPUDeviceInfo
from exo.shared.types.ids import (
    DeviceId,
    EventId,
    InstanceId,
    NodeId,
    RunnerId,
    TaskId,
    new_event_id,
)
from exo.shared.types.instances import Instance, Replacement
from exo.shared.types.node import NodeStaticInfo
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.tasks import Task, TaskStatus


def utc_now() -> datetime:
    return datetime.now(UTC)


class BaseEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    event_id: EventId = Field(default_factory=new_event_id)
    origin_node_id: NodeId | None = None
    """The node whose worker or master emitted it (None for tests)."""

    ephemeral: ClassVar[bool] = False
    """High-rate events (token chunks) that are indexed but not written to disk."""


class MasterElected(BaseEvent):
    """The first event a new master indexes: the cluster's master changed."""

    kind: Literal["MasterElected"] = "MasterElected"
    master_node_id: NodeId


class NodeInfoReported(BaseEvent):
    kind: Literal["NodeInfoReported"] = "NodeInfoReported"
    node_id: NodeId
    info: NodeStaticInfo
    ram_available_bytes: int = Field(ge=0)
    reported_at: datetime = Field(default_factory=utc_now)


class NodeMemoryUpdated(BaseEvent):
    kind: Literal["NodeMemoryUpdated"] = "NodeMemoryUpdated"
    node_id: NodeId
    ram_available_bytes: int = Field(ge=0)
    reported_at: datetime = Field(default_factory=utc_now)


class MemberJoined(BaseEvent):
    """The node became a member of the cluster: it counts towards every majority (votes
    and commits) until a ``NodeTimedOut`` removes it."""

    kind: Literal["MemberJoined"] = "MemberJoined"
    node_id: NodeId


class NodeTimedOut(BaseEvent):
    """The master saw the node's liveliness token disappear; the node is no longer a
    member."""

    kind: Literal["NodeTimedOut"] = "NodeTimedOut"
    node_id: NodeId


class GPUDeviceInfoReported(BaseEvent):
    kind: Literal["GPUDeviceInfoReported"] = "GPUDeviceInfoReported"
    device_info: GPUDeviceInfo


class DeviceGPUStateUpdated(BaseEvent):
    """One device's live reading (the seed card's event). The collector sends it when a pass
    has exactly one reading to report and no heartbeat; otherwise ``DeviceGPUStatesUpdated``."""

    kind: Literal["DeviceGPUStateUpdated"] = "DeviceGPUStateUpdated"
    device_state: DeviceGPUState


class DeviceGPUStatesUpdated(BaseEvent):
    """One sampling pass of one node: the readings that changed, in full, and the devices
    whose reading did not change, by id only (a heartbeat).

    Why: one event per device per pass put a node's every device in the replicated log
    separately, and an idle node's heartbeats (a full reading each, every ``heartbeat_s``,
    drifting apart) dominated the log. One event per node per pass, with heartbeats as ids,
    keeps the event rate per node and the bytes per heartbeat small. Applying an unchanged
    id moves the stored reading's ``last_update`` to ``sampled_at`` and nothing else; the
    collector remembers the same, so its view of each device equals the state's.
    """

    kind: Literal["DeviceGPUStatesUpdated"] = "DeviceGPUStatesUpdated"
    node_id: NodeId
    device_states: list[DeviceGPUState] = Field(default_factory=list)
    """Readings that changed meaningfully (or are a device's first), in full."""
    unchanged_device_ids: list[DeviceId] = Field(default_factory=list)
    """Devices whose reading did not change meaningfully since their last emitted reading."""
    sampled_at: datetime
    """When the pass sampled; the new ``last_update`` of every unchanged device."""

    @model_validator(mode="after")
    def _readings_are_this_nodes(self) -> Self:
        strays = [s.device_id for s in self.device_states if s.node_id != self.node_id]
        if strays:
            raise ValueError(f"readings of another node than {self.node_id}: {strays}")
        return self


class GPUBandwidthMeasured(BaseEvent):
    """A measured link. The seed names endpoints by device id; links are between nodes,
    so the node ids are carried too and the device ids name each node's endpoint."""

    kind: Literal["GPUBandwidthMeasured"] = "GPUBandwidthMeasured"
    source_node_id: NodeId
    dest_node_id: NodeId
    source_device_id: str
    dest_device_id: str
    bandwidth_mbps: float = Field(ge=0)
    latency_ms: float = Field(ge=0)
    measurement_count: int = Field(ge=1)
    measured_at: datetime = Field(default_factory=utc_now)


class InstanceCreated(BaseEvent):
    kind: Literal["InstanceCreated"] = "InstanceCreated"
    instance: Instance


class InstanceDeleted(BaseEvent):
    kind: Literal["InstanceDeleted"] = "InstanceDeleted"
    instance_id: InstanceId


class InstanceReplacementStarted(BaseEvent):
    """A heal or move begins: the new runner set loads while the serving one goes on (for a
    heal, the serving set is broken; requests it was generating fail, those not started
    wait for the new set)."""

    kind: Literal["InstanceReplacementStarted"] = "InstanceReplacementStarted"
    instance_id: InstanceId
    replacement: Replacement


class InstanceReplaced(BaseEvent):
    """Every runner of the incoming set is ready: it becomes the serving set. The old set
    finishes the requests bound to it and stops (a broken one is dropped at once, and the
    requests it had not started move to the new set)."""

    kind: Literal["InstanceReplaced"] = "InstanceReplaced"
    instance_id: InstanceId
    change_id: str
    switched_at: datetime = Field(default_factory=utc_now)


class InstanceReplacementAborted(BaseEvent):
    """The incoming set could not load (a runner failed, its node left, or it took too
    long); the serving set goes on as it was."""

    kind: Literal["InstanceReplacementAborted"] = "InstanceReplacementAborted"
    instance_id: InstanceId
    change_id: str
    reason: str
    failed_devices: list[tuple[NodeId, DeviceId]] = Field(default_factory=list)
    """The devices where a runner of the new set failed."""
    aborted_at: datetime = Field(default_factory=utc_now)


class InstanceFailed(BaseEvent):
    """The instance cannot serve and cannot be healed now (the model no longer fits the
    live devices, say); requests bound to it fail with the reason. A later heal clears it."""

    kind: Literal["InstanceFailed"] = "InstanceFailed"
    instance_id: InstanceId
    reason: str


class RunnerStatusUpdated(BaseEvent):
    kind: Literal["RunnerStatusUpdated"] = "RunnerStatusUpdated"
    runner_id: RunnerId
    instance_id: InstanceId
    node_id: NodeId
    status: RunnerStatus
    error: str | None = None
    compute_device: ComputeDevice | None = None
    """Where the runner computes (None until it knows, or when its supervisor reports)."""
    loaded_bytes: int | None = Field(default=None, ge=0)
    """Weights loaded so far (reported while the runner loads; None: no news)."""
    total_bytes: int | None = Field(default=None, ge=0)
    """Weights the runner loads in all (None: no news)."""


class TaskCreated(BaseEvent):
    kind: Literal["TaskCreated"] = "TaskCreated"
    task: Task


class TaskStatusUpdated(BaseEvent):
    kind: Literal["TaskStatusUpdated"] = "TaskStatusUpdated"
    task_id: TaskId
    status: TaskStatus
    error: str | None = None


class ChunkGenerated(BaseEvent):
    """Generated text for a task; ``finish_reason`` set on the last chunk."""

    kind: Literal["ChunkGenerated"] = "ChunkGenerated"
    ephemeral: ClassVar[bool] = True
    task_id: TaskId
    chunk_index: int = Field(ge=0)
    text: str
    finish_reason: Literal["stop", "length", "cancelled"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    """The chunk's tokens' log-probabilities, when the request asked for them."""


class StageTimeMeasured(BaseEvent):
    """A runner's measured time per generated token over one request (reported at most
    every few seconds per runner, for requests with enough decode tokens)."""

    kind: Literal["StageTimeMeasured"] = "StageTimeMeasured"
    instance_id: InstanceId
    runner_id: RunnerId
    node_id: NodeId
    device_id: DeviceId
    """The shard's placed device."""
    stage_ms_per_token: float = Field(ge=0)
    """Median over the request's decode tokens of this rank's own compute for its layers
    (from having its input to having its output evaluated; waiting for other ranks is not
    counted)."""
    ms_per_token: float | None = Field(default=None, ge=0)
    """Rank 0 only: end-to-end wall time per generated decode token (the first excluded)."""
    time_to_first_token_ms: float | None = Field(default=None, ge=0)
    """Rank 0 only: from starting the request to its first token."""
    tokens: int = Field(ge=1)
    """Decode tokens measured."""
    measured_at: datetime = Field(default_factory=utc_now)


class ProbeEmitted(BaseEvent):
    """A no-op marker a worker emits on request, to measure propagation latency."""

    kind: Literal["ProbeEmitted"] = "ProbeEmitted"
    probe_id: str
    sent_at: float


class EventElided(BaseEvent):
    """Stands in, on disk and after a reload, for an ephemeral event whose body was not
    persisted; it keeps the log's indices gap-free and applies as a no-op."""

    kind: Literal["EventElided"] = "EventElided"
    elided_kind: str


Event = Annotated[
    MasterElected
    | MemberJoined
    | NodeInfoReported
    | NodeMemoryUpdated
    | NodeTimedOut
    | GPUDeviceInfoReported
    | DeviceGPUStateUpdated
    | DeviceGPUStatesUpdated
    | GPUBandwidthMeasured
    | InstanceCreated
    | InstanceDeleted
    | InstanceReplacementStarted
    | InstanceReplaced
    | InstanceReplacementAborted
    | InstanceFailed
    | RunnerStatusUpdated
    | TaskCreated
    | TaskStatusUpdated
    | ChunkGenerated
    | StageTimeMeasured
    | ProbeEmitted
    | EventElided,
    Field(discriminator="kind"),
]

EventAdapter: TypeAdapter[Event] = TypeAdapter(Event)


class IndexedEvent(BaseModel):
    """An event at its place in the global log."""

    model_config = ConfigDict(frozen=True)

    idx: int = Field(ge=0)
    term: int = Field(default=0, ge=0)
    """The term of the master that indexed it (0 in logs written before terms existed)."""
    event: Event


def elided(indexed: IndexedEvent) -> IndexedEvent:
    """The same place in the log with the event's body dropped (same id, index, term)."""
    stand_in = EventElided(event_id=indexed.event.event_id, elided_kind=indexed.event.kind)
    return IndexedEvent(idx=indexed.idx, term=indexed.term, event=stand_in)
