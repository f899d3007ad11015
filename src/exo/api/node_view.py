"""What this node itself is and how fresh its view is: the ``this_node`` part of
``GET /state`` (the rest is the cluster state every node derives from the log, in which
``master_node_id`` is the master the log last named, true or not right now)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

from exo.api.context import ApiContext
from exo.shared.types.ids import NodeId

Role = Literal["master", "master_without_quorum", "follower", "no_master"]


class NodeView(BaseModel):
    model_config = ConfigDict(frozen=True)

    node_id: NodeId
    role: Role
    """``master``: master of its term, serving writes. ``master_without_quorum``: master of
    its term by its own reckoning, but no majority answered it within the quorum lease (cut
    off, or its loop stalled), so it refuses writes and may already be replaced.
    ``follower``: follows ``master_node_id``. ``no_master``: an election is on."""
    serving_writes: bool
    term: int
    master_node_id: NodeId | None
    """The master this node follows in ``term`` (itself when master)."""
    master_heard_s_ago: float | None
    """Seconds since that master's last heartbeat (0 on the master; None: none heard)."""
    applied_idx: int
    commit_idx: int
    behind_master_events: int | None
    """Events the master had indexed, as of its last heartbeat, not applied here yet (0 on
    the master; None without a master)."""
    longest_loop_stall_s: float
    """The longest this node's event loop went without running since it started."""


def node_view(context: ApiContext) -> NodeView:
    election = context.election
    store = context.store
    master = election.master_node_id
    serving = election.serving_writes
    if election.is_master:
        role: Role = "master" if serving else "master_without_quorum"
        behind: int | None = 0
    elif master is not None:
        role = "follower"
        head = election.announced_head(master)
        behind = max(0, head - store.last_idx) if head >= 0 else None
    else:
        role = "no_master"
        behind = None
    heard = election.master_heard_s_ago()
    return NodeView(
        node_id=context.node_id,
        role=role,
        serving_writes=serving,
        term=election.term,
        master_node_id=master,
        master_heard_s_ago=round(heard, 3) if heard is not None else None,
        applied_idx=store.last_idx,
        commit_idx=election.commit_idx,
        behind_master_events=behind,
        longest_loop_stall_s=round(context.cluster.loop_watch.longest_stall_s, 3),
    )
