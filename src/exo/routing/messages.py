"""What crosses the wire (JSON of pydantic models), apart from commands and events
themselves. Anything that fails validation is dropped by the receiver."""

from pydantic import BaseModel, ConfigDict, Field

from exo.shared.types.events import Event, IndexedEvent
from exo.shared.types.ids import NodeId


class LocalEventMessage(BaseModel):
    """A worker's event, not yet indexed, sent to the master."""

    model_config = ConfigDict(frozen=True)

    origin_node_id: NodeId
    event: Event


class GlobalEventMessage(BaseModel):
    """An event as indexed by the master. Receivers check ``master_node_id`` against the
    master they follow and drop anything else."""

    model_config = ConfigDict(frozen=True)

    master_node_id: NodeId
    indexed_event: IndexedEvent


class ElectionAnnouncement(BaseModel):
    model_config = ConfigDict(frozen=True)

    node_id: NodeId
    started_at_us: int
    last_event_idx: int
    master_node_id: NodeId | None


class LogRangeReply(BaseModel):
    """Answer to a log query: the events in the requested range that this node holds, and
    the index of its last event."""

    model_config = ConfigDict(frozen=True)

    node_id: NodeId
    last_event_idx: int
    events: list[IndexedEvent] = Field(default_factory=list)
