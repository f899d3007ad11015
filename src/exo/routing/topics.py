"""Key expressions. Everything lives under one namespace so two clusters on one LAN don't mix."""

from dataclasses import dataclass

from exo.shared.types.ids import NodeId


@dataclass(frozen=True)
class Topics:
    namespace: str

    @property
    def local_events(self) -> str:
        """Any node's worker -> the master."""
        return f"{self.namespace}/local_events"

    @property
    def global_events(self) -> str:
        """The master -> every node, each event with its gap-free index."""
        return f"{self.namespace}/global_events"

    @property
    def commands(self) -> str:
        """API -> master, as a query: the master answers with a CommandResult."""
        return f"{self.namespace}/commands"

    def election(self, node_id: NodeId) -> str:
        """A node's periodic announcement: start time, log head, the master it follows (one
        key per node, so a queue keeps each node's newest)."""
        return f"{self.namespace}/election/{node_id}"

    @property
    def election_all(self) -> str:
        return f"{self.namespace}/election/*"

    def acknowledgement(self, master: NodeId, node_id: NodeId) -> str:
        """A follower's announcement right after it stored events, for its master alone
        (the others hear the same match index in its next periodic announcement)."""
        return f"{self.namespace}/ack/{master}/{node_id}"

    def acknowledgements_to(self, master: NodeId) -> str:
        return f"{self.namespace}/ack/{master}/*"

    def vote(self, node_id: NodeId) -> str:
        """Queryable on every node: a candidate asks it for its vote in a term."""
        return f"{self.namespace}/vote/{node_id}"

    @property
    def vote_all(self) -> str:
        return f"{self.namespace}/vote/*"

    @property
    def alive_prefix(self) -> str:
        return f"{self.namespace}/alive"

    def alive_token(self, node_id: NodeId, started_at_us: int) -> str:
        """Liveliness token key: membership and the start time used by the election rule."""
        return f"{self.alive_prefix}/{node_id}/{started_at_us}"

    @property
    def alive_all(self) -> str:
        return f"{self.alive_prefix}/*/*"

    def log(self, node_id: NodeId) -> str:
        """Queryable on every node serving ranges of its copy of the global log."""
        return f"{self.namespace}/log/{node_id}"

    def snapshot(self, node_id: NodeId) -> str:
        """Queryable on every node serving its state snapshot (for a peer that needs
        events this node has compacted away)."""
        return f"{self.namespace}/snapshot/{node_id}"

    def prompt(self, node_id: NodeId) -> str:
        """Queryable on every node serving the prompts of the requests it took
        (``?task=<id>``), fetched by the worker whose runner serves the task."""
        return f"{self.namespace}/prompt/{node_id}"

    def ping(self, node_id: NodeId) -> str:
        """Queryable on every node that echoes the payload (link measurements)."""
        return f"{self.namespace}/ping/{node_id}"

    def parse_alive_token(self, key: str) -> tuple[NodeId, int] | None:
        prefix = self.alive_prefix + "/"
        if not key.startswith(prefix):
            return None
        parts = key[len(prefix) :].split("/")
        if len(parts) != 2 or not parts[0] or not parts[1].isdigit():
            return None
        return NodeId(parts[0]), int(parts[1])
