"""Who is master.

The rule is deterministic and needs no voting round: among the live nodes (those holding a
zenoh liveliness token), the master is the one that started first, ties broken by node id.
Every node computes it from the same membership, so they agree, and a node that joins
later never unseats a sitting master (it is always younger).

``Election`` is the actor that keeps the membership from liveliness tokens and tells the
other components when the master changes. A node does not act as master during a short
settle period after it starts, so that it first hears of the nodes already running.
"""

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio
from loguru import logger

from exo.routing.router import Router
from exo.routing.topics import Topics
from exo.shared.types.ids import NodeId


@dataclass(frozen=True, order=True)
class LiveNode:
    started_at_us: int
    node_id: NodeId


def elect_master(live_nodes: Iterable[LiveNode]) -> NodeId | None:
    """The earliest-started live node, ties broken by node id; None if nobody is alive."""
    earliest = min(live_nodes, default=None)
    return earliest.node_id if earliest is not None else None


class Election:
    def __init__(
        self,
        router: Router,
        topics: Topics,
        node_id: NodeId,
        started_at_us: int,
        settle_s: float,
    ) -> None:
        self._router = router
        self._topics = topics
        self.node_id = node_id
        self.started_at_us = started_at_us
        self._settle_s = settle_s
        self._settled = settle_s <= 0
        self._live: dict[NodeId, int] = {node_id: started_at_us}
        self._master: NodeId | None = None
        self._listeners: list[Callable[[NodeId | None, NodeId | None], None]] = []
        self._departure_listeners: list[Callable[[NodeId], None]] = []

    @property
    def live_node_ids(self) -> set[NodeId]:
        return set(self._live)

    @property
    def master_node_id(self) -> NodeId | None:
        """The master this node follows (None while it settles and knows no other node)."""
        return self._master

    @property
    def is_master(self) -> bool:
        return self._master == self.node_id

    def on_master_change(self, listener: Callable[[NodeId | None, NodeId | None], None]) -> None:
        """listener(old, new), called on the event loop thread."""
        self._listeners.append(listener)

    def on_node_departed(self, listener: Callable[[NodeId], None]) -> None:
        self._departure_listeners.append(listener)

    def start(self) -> None:
        self._router.declare_liveliness_token(
            self._topics.alive_token(self.node_id, self.started_at_us)
        )
        self._router.watch_liveliness(self._topics.alive_all, self._on_liveliness)

    async def run(self) -> None:
        """Ends the settle period, then keeps nothing else to do (membership is event driven)."""
        if not self._settled:
            await anyio.sleep(self._settle_s)
            self._settled = True
            self._recompute()

    def _on_liveliness(self, key: str, alive: bool) -> None:
        parsed = self._topics.parse_alive_token(key)
        if parsed is None:
            logger.warning(f"ignoring malformed liveliness token {key!r}")
            return
        node_id, started_at_us = parsed
        if node_id == self.node_id:
            return
        if alive:
            if self._live.get(node_id) != started_at_us:
                logger.info(f"node {node_id} is alive")
            self._live[node_id] = started_at_us
        elif self._live.get(node_id) == started_at_us:
            del self._live[node_id]
            logger.info(f"node {node_id} left")
            for listener in self._departure_listeners:
                listener(node_id)
        self._recompute()

    def _recompute(self) -> None:
        candidate = elect_master(LiveNode(s, n) for n, s in self._live.items())
        if candidate == self.node_id and not self._settled:
            candidate = None
        if candidate != self._master:
            old, self._master = self._master, candidate
            logger.info(f"master is now {candidate} (was {old})")
            for listener in self._listeners:
                listener(old, candidate)


def now_us() -> int:
    return time.time_ns() // 1000
