"""The pre-vote: a node stands in a new term only once a majority says it would grant its
vote, so a node cut off from the others keeps its term and, when it comes back, does not
displace the master the others chose meanwhile (a partition test found this under load: the
returning old master's higher term made the majority drop its master and elect again)."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from exo.routing.election import Election
from exo.routing.messages import ElectionAnnouncement, VoteRequest
from exo.routing.router import Router
from exo.routing.term_store import TermStore
from exo.routing.tests.test_term_disk_full import election as with_members
from exo.routing.topics import Topics
from exo.shared.types.ids import NodeId

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")
TOPICS = Topics("test")


class Network:
    """The transport between elections in one process: a vote query reaches each node that
    is connected, through its own vote handler. What is published is only counted."""

    def __init__(self) -> None:
        self.nodes: dict[NodeId, Election] = {}
        self.connected: set[NodeId] = set()
        self.vote_requests: list[VoteRequest] = []

    def router_for(self, node: NodeId) -> Router:
        network = self

        class Link:
            async def query_replies(
                self, selector: str, payload: bytes | None = None, timeout_s: float = 2.0
            ) -> AsyncIterator[bytes]:
                network.vote_requests.append(VoteRequest.model_validate_json(payload or b""))
                reachable = network.connected if node in network.connected else {node}
                for other in sorted(reachable):
                    reply = network.nodes[other]._on_vote_request("", payload)  # pyright: ignore[reportPrivateUsage]
                    if reply is not None:
                        yield reply

            def publish_newest(self, key_expr: str, payload: bytes) -> None:
                pass

        return cast(Router, Link())

    def add(self, tmp_path: Path, node: NodeId, members: list[NodeId]) -> Election:
        election = with_members(tmp_path / node, node, members, self.router_for(node))
        self.nodes[node] = election
        return election


def on_disk(election: Election, tmp_path: Path) -> int:
    return TermStore(tmp_path / election.node_id).load().term


@pytest.mark.anyio
async def test_a_cut_off_node_keeps_its_term_and_stands_once_a_majority_would_grant(
    tmp_path: Path,
) -> None:
    network = Network()
    a, _, _ = (network.add(tmp_path, node, [A, B, C]) for node in (A, B, C))
    network.connected = set()  # a alone
    for _ in range(2):
        assert await a._stand()  # pyright: ignore[reportPrivateUsage]
    assert a.term == 0 and a.master_node_id is None
    assert all(request.pre_vote for request in network.vote_requests)
    assert on_disk(a, tmp_path) == 0, "a pre-vote writes no term"
    network.connected = {A, B, C}
    assert await a._stand()  # pyright: ignore[reportPrivateUsage]
    assert a.is_master and a.term == 1 and on_disk(a, tmp_path) == 1
    assert [request.pre_vote for request in network.vote_requests[-2:]] == [True, False]


@pytest.mark.anyio
async def test_a_returning_node_does_not_displace_the_live_master(tmp_path: Path) -> None:
    network = Network()
    a, b, c = (network.add(tmp_path, node, [A, B, C]) for node in (A, B, C))
    network.connected = {B, C}  # a is away
    assert await b._stand()  # pyright: ignore[reportPrivateUsage]
    assert b.is_master and b.term == 1
    network.connected = {A, B, C}
    # c follows b, alive and heard.
    c._on_liveliness(TOPICS.alive_token(B, 1), True)  # pyright: ignore[reportPrivateUsage]
    heartbeat = ElectionAnnouncement(
        node_id=B, started_at_us=1, term=1, master_node_id=B, last_event_idx=2, last_log_term=1
    )
    c._on_announcement("test/election/b", heartbeat.model_dump_json().encode())  # pyright: ignore[reportPrivateUsage]
    assert c.master_node_id == B
    # a missed b's election and stands on its return.
    assert await a._stand()  # pyright: ignore[reportPrivateUsage]
    assert a.term == 1 and not a.is_master  # it learnt the others' term from their refusals
    assert (b.term, b.master_node_id, c.term, c.master_node_id) == (1, B, 1, B)
    # b's next heartbeat brings a into line.
    a._on_announcement("test/election/b", heartbeat.model_dump_json().encode())  # pyright: ignore[reportPrivateUsage]
    assert a.term == 1 and a.master_node_id == B


def test_a_pre_vote_changes_nothing_on_the_voter(tmp_path: Path) -> None:
    network = Network()
    voter = network.add(tmp_path, A, [A, B, C])

    def pre(candidate: NodeId, term: int, last_idx: int) -> VoteRequest:
        return VoteRequest(
            candidate_id=candidate,
            term=term,
            last_event_idx=last_idx,
            last_log_term=1,
            pre_vote=True,
        )

    would = voter._vote(pre(B, 1, 2))  # pyright: ignore[reportPrivateUsage]
    assert would.granted and would.term == 0
    assert voter.term == 0 and on_disk(voter, tmp_path) == 0
    assert voter._terms.record.voted_for is None  # pyright: ignore[reportPrivateUsage]
    assert voter._vote(pre(C, 1, 2)).granted, "no vote was recorded for b"  # pyright: ignore[reportPrivateUsage]
    behind = voter._vote(pre(B, 1, 1))  # pyright: ignore[reportPrivateUsage]
    assert not behind.granted and "behind" in behind.reason
    # A real vote in term 1 for b: a pre-vote for c in that term is refused, one for b not.
    real = VoteRequest(candidate_id=B, term=1, last_event_idx=2, last_log_term=1)
    assert voter._vote(real).granted  # pyright: ignore[reportPrivateUsage]
    assert not voter._vote(pre(C, 1, 2)).granted  # pyright: ignore[reportPrivateUsage]
    assert voter._vote(pre(B, 1, 2)).granted  # pyright: ignore[reportPrivateUsage]
    assert voter._vote(pre(C, 2, 2)).granted and voter.term == 1  # pyright: ignore[reportPrivateUsage]
    older = voter._vote(pre(C, 0, 9))  # pyright: ignore[reportPrivateUsage]
    assert not older.granted and "older" in older.reason
