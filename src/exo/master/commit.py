"""Where the commit index moves: Raft's rule for a master counting its followers' stores.

An index is committed once a majority of the members stores it, and only an index whose
event is of the master's own term is committed by counting (everything before it is
committed with it). Storing is monotone (a node that stores an index stores every one
before it), so the highest committable index is one of the indices the nodes report: at
most one candidate per node, whatever the number of events not committed yet.
"""

from collections.abc import Callable, Collection, Mapping

from exo.shared.types.ids import NodeId


def next_commit_idx(
    stored_up_to: Mapping[NodeId, int],
    last_idx: int,
    commit_idx: int,
    term: int,
    term_at: Callable[[int], int | None],
    is_majority: Callable[[Collection[NodeId]], bool],
) -> int | None:
    """The highest index past ``commit_idx`` that a majority stores and whose event is of
    ``term``, or None.

    ``stored_up_to``: how far each node's log is stored and equal to the master's (the
    master's own included); ``term_at(idx)``: the term of the event held at ``idx`` (None:
    not held)."""
    candidates = {min(idx, last_idx) for idx in stored_up_to.values()}
    for idx in sorted((c for c in candidates if c > commit_idx), reverse=True):
        if term_at(idx) != term:
            return None  # terms only grow along the log: every lower index is older too
        if is_majority([node for node, stored in stored_up_to.items() if stored >= idx]):
            return idx
    return None
