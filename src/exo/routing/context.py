"""What the components of one node share."""

from dataclasses import dataclass, field

from exo.loop_watch import LoopWatch
from exo.routing.election import Election
from exo.routing.router import Router
from exo.routing.topics import Topics
from exo.shared.event_store import EventStore
from exo.shared.types.ids import NodeId


@dataclass(frozen=True)
class ClusterContext:
    """This node's id, the transport and its topics, the election, the node's copy of the
    global log, and the watch on its event loop. Every actor of a node (log sync, outbox,
    master, link prober) takes one."""

    node_id: NodeId
    router: Router
    topics: Topics
    election: Election
    store: EventStore
    loop_watch: LoopWatch = field(default_factory=LoopWatch)
