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
    """An event as indexed by the master of ``term``. Receivers drop it unless it comes
    from the master they follow in their current term (a newer term makes them follow the
    sender)."""

    model_config = ConfigDict(frozen=True)

    master_node_id: NodeId
    term: int = 0
    commit_idx: int = -1
    """The master's commit index when it sent this (every event up to it is stored by a
    majority of the members)."""
    indexed_event: IndexedEvent


class ElectionAnnouncement(BaseModel):
    """Every node's heartbeat, every 0.5 s (and, to its master alone, after it stores
    events): its term, the master it follows, where its log ends, and (as an
    acknowledgement to the master) up to which index its log matches that master's. The
    master's own announcement carries its commit index."""

    model_config = ConfigDict(frozen=True)

    node_id: NodeId
    started_at_us: int
    term: int = 0
    master_node_id: NodeId | None
    last_event_idx: int
    last_log_term: int = 0
    match_idx: int = -1
    """Up to here this node's log is known to equal its master's (-1: not checked yet)."""
    commit_idx: int = -1


class VoteRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    candidate_id: NodeId
    term: int
    last_event_idx: int
    last_log_term: int
    pre_vote: bool = False
    """Only ask whether the voter would grant its vote in ``term``: neither side moves to
    that term or records a vote (Raft's pre-vote). A node cut off from the others keeps its
    term, so on its return it does not displace the master the others chose meanwhile."""


class VoteReply(BaseModel):
    model_config = ConfigDict(frozen=True)

    node_id: NodeId
    term: int
    granted: bool
    reason: str = ""


class LogRangeReply(BaseModel):
    """Answer to a log query: the events in the requested range that this node holds, and
    the index of its last event."""

    model_config = ConfigDict(frozen=True)

    node_id: NodeId
    last_event_idx: int
    first_idx: int = 0
    """The first index this node still holds as an event (the ones before are in its
    snapshot, served on ``snapshot/<node>``)."""
    events: list[IndexedEvent] = Field(default_factory=list)
