"""How many members make a majority: the one rule behind votes, commits and writes.

A cluster of ``n`` members needs more than half of them (2 of 3, 3 of 4, 3 of 5). An
empty membership (a fresh log, before the first master has added itself) counts as this
node alone.

Two members are the exception: a strict majority of 2 is both, so the cluster would stop
whenever the other machine is switched off. Instead, while the other member is not alive
(its liveliness token is gone), the remaining one is a majority by itself, provided the
two-member membership is committed (``two_committed``). Without that proviso a master cut
off from a three-node cluster could append the removal of one peer, find itself in a
two-member membership, and go on alone. What the exception costs: a real network
partition between the two looks the same as a switched-off peer, so both sides go on
alone, and when the partition heals the side with the older term steps down and loses what
it accepted meanwhile. With three or more members no such case exists.
"""

from collections.abc import Collection, Iterable

from exo.shared.types.ids import NodeId

QUORUM_LEASE_S = 3.0
"""A member heard from within this long counts towards a master's quorum for writes: three
of a follower's announcement intervals (``election.FOLLOWER_ANNOUNCE_EVERY``), as a master
is given three of its own before its followers stop following it."""


def voters(members: Collection[NodeId], self_id: NodeId) -> frozenset[NodeId]:
    """The members a majority is counted over (this node alone when there are none)."""
    return frozenset(members) if members else frozenset({self_id})


def is_majority(
    agreeing: Iterable[NodeId],
    members: Collection[NodeId],
    live: Collection[NodeId],
    self_id: NodeId,
    two_committed: bool,
) -> bool:
    """Whether ``agreeing`` (the nodes that voted, stored an entry, or answered lately) is
    a majority of the members, with the two-member exception above."""
    counted = voters(members, self_id)
    agreed = counted.intersection(agreeing)
    if two_committed and len(counted) == 2 and self_id in counted:
        other = next(iter(counted - {self_id}))
        if other not in live:
            return self_id in agreed
    return 2 * len(agreed) > len(counted)
