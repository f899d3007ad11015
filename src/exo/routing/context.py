"""What the components of one node share."""

from dataclasses import dataclass

from exo.routing.election import Election
from exo.routing.router import Router
from exo.routing.topics import Topics
from exo.shared.event_store import EventStore
from exo.shared.types.ids import NodeId


@dataclass(frozen=True)
class ClusterContext:
    """This node's id, the transport and its topics, the election, and the node's copy of
    the global log. Every actor of a node (log sync, outbox, master, link prober) takes one."""

    node_id: NodeId
    router: Router
    topics: Topics
    election: Election
    store: EventStore
