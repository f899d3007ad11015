"""Standing for master over real zenoh sessions on loopback: the candidate asks in the
next term, counts only the grants of that term, adopts a newer term a reply carries and
gives up, stops waiting once a majority granted, skips an unreadable reply, pauses longer
after each round without a majority (a master resets the count), and yields to a newer
term or a master of its own term heard meanwhile. The voters are scripted queryables on a
second session (what a peer's reply can be); the candidate is a real, started election.
Also: what ``start`` declares (token, announcements, acknowledgements, the vote
queryable), and that a node takes no part before it settled.

Not in ``[tool.mutmut]``'s test selection: mutmut runs each mutant in a child forked from
the process that collected the tests' coverage, and zenoh, once used in a process, hangs in
a forked child, so every mutant these tests cover would count as killed by a timeout."""

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from exo.routing import election as election_module
from exo.routing.election import Election
from exo.routing.messages import ElectionAnnouncement, VoteReply, VoteRequest
from exo.routing.router import IncomingQuery, Router
from exo.routing.term_store import TermStore
from exo.routing.tests.test_election import ask
from exo.routing.tests.test_election_stall import TOPICS, master_of_term_1
from exo.routing.tests.test_event_sync import wait_for
from exo.routing.tests.test_router import two_routers
from exo.routing.tests.test_term_disk_full import election as with_members
from exo.shared.types.ids import NodeId

pytestmark = pytest.mark.anyio

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")
PAUSE_S = 0.1
"""The retry pause of a first failed round in these tests (then 2x, 4x...)."""


def member(
    home: Path, node_id: NodeId, router: Router, started_at_us: int = 1, settle_s: float = 0.0
) -> Election:
    """A member of {A, B, C} (a majority is two) whose log ends in term 1 at index 2, on an
    open router."""
    return with_members(home, node_id, [A, B, C], router, started_at_us, settle_s)


def reply(node: NodeId, term: int, granted: bool, reason: str = "") -> bytes:
    return (
        VoteReply(node_id=node, term=term, granted=granted, reason=reason)
        .model_dump_json()
        .encode()
    )


Answer = Callable[[VoteRequest], Awaitable[bytes | None]]


def would_grant(node: NodeId) -> Answer:
    async def answer(request: VoteRequest) -> bytes:
        return reply(node, request.term - 1, True)  # a pre-vote moves no voter's term

    return answer


@dataclass
class Voter:
    """A peer's vote queryable that answers as the test says (None: no reply): ``answer``
    for a vote, ``pre_answer`` for a pre-vote (by default it would grant)."""

    node_id: NodeId
    answer: Answer
    pre_answer: Answer | None = None
    asked: list[VoteRequest] = field(default_factory=lambda: [])


def grants(node: NodeId) -> Answer:
    async def answer(request: VoteRequest) -> bytes:
        return reply(node, request.term, True)

    return answer


def refuses(node: NodeId) -> Answer:
    async def answer(request: VoteRequest) -> bytes:
        return reply(node, request.term, False, f"already voted in term {request.term}")

    return answer


async def frozen(request: VoteRequest) -> bytes | None:
    """A frozen node: it holds the query (its queryable is still declared) and never answers."""
    await anyio.sleep_forever()
    return None


async def serve(queries: MemoryObjectReceiveStream[IncomingQuery], voter: Voter) -> None:
    async with queries:
        async for query in queries:
            request = VoteRequest.model_validate_json(query.payload or b"")
            voter.asked.append(request)
            if request.pre_vote:
                query.answer(await (voter.pre_answer or would_grant(voter.node_id))(request))
            else:
                query.answer(await voter.answer(request))


@asynccontextmanager
async def standing(home: Path, *voters: Voter) -> AsyncGenerator[tuple[Election, Router]]:
    """Candidate A, started on a session of its own; ``voters`` on the other session (their
    liveliness tokens declared after their queryables, so that once A sees them alive, its
    queries reach them)."""
    async with two_routers() as (own, peers), anyio.create_task_group() as group:
        for voter in voters:
            group.start_soon(serve, peers.queries(TOPICS.vote(voter.node_id)), voter)
        for voter in voters:
            peers.declare_liveliness_token(TOPICS.alive_token(voter.node_id, 5))
        candidate = member(home, A, own)
        candidate.start()
        await wait_for(lambda: candidate.live_node_ids == {A} | {v.node_id for v in voters})
        yield candidate, peers
        group.cancel_scope.cancel()


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, float]]:
    """(failed rounds in a row, pause) for each pause a candidate takes; the pauses are
    the real ones of a shorter base (:data:`PAUSE_S`)."""
    taken: list[tuple[int, float]] = []
    real = election_module.retry_pause_s

    def retry_pause_s(failed_rounds: int) -> float:
        pause_s = real(failed_rounds)
        taken.append((failed_rounds, pause_s))
        return pause_s

    monkeypatch.setattr(election_module, "RETRY_PAUSE_S", (PAUSE_S, PAUSE_S))
    monkeypatch.setattr(election_module, "retry_pause_s", retry_pause_s)
    return taken


def vote_timeout(monkeypatch: pytest.MonkeyPatch, timeout_s: float) -> None:
    monkeypatch.setattr(election_module, "VOTE_TIMEOUT_S", timeout_s)


def announcement(sender: NodeId, term: int, master: NodeId | None) -> bytes:
    return (
        ElectionAnnouncement(
            node_id=sender,
            started_at_us=5,
            term=term,
            master_node_id=master,
            last_event_idx=2,
            last_log_term=1,
        )
        .model_dump_json()
        .encode()
    )


async def test_a_majority_of_grants_in_the_next_term_makes_the_candidate_master(
    tmp_path: Path, pauses: list[tuple[int, float]]
) -> None:
    b = Voter(B, grants(B))
    async with standing(tmp_path, b, Voter(C, refuses(C))) as (candidate, _):
        changes: list[tuple[NodeId | None, NodeId | None]] = []
        candidate.on_master_change(lambda old, new: changes.append((old, new)))
        assert await candidate._stand() is True
        assert candidate.is_master and candidate.term == 1
        assert changes == [(None, A)]
        asked = ask(A, 1, 2, 1)  # the next term, with where A's log ends
        assert b.asked == [asked.model_copy(update={"pre_vote": True}), asked]
        stored = TermStore(tmp_path).load()
        assert (stored.term, stored.voted_for) == (1, A), "its vote for itself is on disk"
        assert pauses == []


async def test_only_grants_of_the_term_stood_in_count(
    tmp_path: Path, pauses: list[tuple[int, float]]
) -> None:
    async def stale_grant(request: VoteRequest) -> bytes:
        return reply(B, request.term - 1, True)  # a grant from an earlier round

    b, c = Voter(B, stale_grant), Voter(C, refuses(C))
    async with standing(tmp_path, b, c) as (candidate, _):
        assert await candidate._stand() is True
        assert not candidate.is_master and candidate.master_node_id is None
        assert candidate.term == 1
        assert [rounds for rounds, _ in pauses] == [1], "a round without a majority"


async def test_a_reply_of_a_newer_term_makes_the_candidate_adopt_it_and_give_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pauses: list[tuple[int, float]]
) -> None:
    vote_timeout(monkeypatch, 5.0)

    async def newer(request: VoteRequest) -> bytes:
        return reply(B, 5, False, "its term 1 is older than 5")

    async with standing(tmp_path, Voter(B, newer), Voter(C, frozen)) as (candidate, _):
        with anyio.fail_after(2.5):  # it does not wait for C
            assert await candidate._stand() is True
        assert candidate.term == 5 and candidate.master_node_id is None
        stored = TermStore(tmp_path).load()
        assert (stored.term, stored.voted_for) == (5, None), "no vote given in term 5 yet"
        assert pauses == [], "no retry pause: the newer term's election is on"


async def test_a_candidate_stops_waiting_once_a_majority_granted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vote_timeout(monkeypatch, 5.0)
    async with standing(tmp_path, Voter(B, grants(B)), Voter(C, frozen)) as (candidate, _):
        with anyio.fail_after(2.5):  # a frozen C costs nothing once B granted
            assert await candidate._stand() is True
        assert candidate.is_master


async def test_a_voter_that_never_answers_costs_only_the_vote_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pauses: list[tuple[int, float]]
) -> None:
    vote_timeout(monkeypatch, 0.3)
    async with standing(tmp_path, Voter(B, refuses(B)), Voter(C, frozen)) as (candidate, _):
        started = time.monotonic()
        assert await candidate._stand() is True
        took_s = time.monotonic() - started
        assert 0.3 <= took_s < 1.5, took_s
        assert not candidate.is_master and len(pauses) == 1


async def test_an_unreadable_reply_is_skipped(tmp_path: Path) -> None:
    answered = anyio.Event()

    async def garbled(request: VoteRequest) -> bytes:
        answered.set()
        return b"not a vote"

    async def grants_after_b(request: VoteRequest) -> bytes:
        await answered.wait()  # same session: B's reply reaches A first
        return reply(C, request.term, True)

    async with standing(tmp_path, Voter(B, garbled), Voter(C, grants_after_b)) as (
        candidate,
        _,
    ):
        assert await candidate._stand() is True
        assert candidate.is_master, "C's grant after B's garbled reply still counts"


async def test_each_round_without_a_majority_pauses_longer_until_a_master_is_followed(
    tmp_path: Path, pauses: list[tuple[int, float]]
) -> None:
    async with standing(tmp_path, Voter(B, refuses(B)), Voter(C, refuses(C))) as (
        candidate,
        _,
    ):
        for term in (1, 2, 3):
            started = time.monotonic()
            assert await candidate._stand() is True
            assert candidate.term == term and not candidate.is_master
            assert time.monotonic() - started >= pauses[-1][1], "it paused"
        assert pauses == [(1, PAUSE_S), (2, 2 * PAUSE_S), (3, 4 * PAUSE_S)]
        assert candidate.observe_term(4, B)  # B won term 4: the failed rounds are over
        assert candidate.observe_term(5, None)
        assert candidate.master_node_id is None
        assert await candidate._stand() is True
        assert candidate.term == 6
        assert pauses[-1] == (1, PAUSE_S), "the first failed round since it followed B"


async def test_a_master_of_the_same_term_heard_meanwhile_wins(
    tmp_path: Path, pauses: list[tuple[int, float]]
) -> None:
    async def wins_first(request: VoteRequest) -> bytes:
        peers.publish_newest(TOPICS.election(B), announcement(B, request.term, B))
        await wait_for(lambda: candidate.master_node_id == B)
        return reply(B, request.term, False, "already voted for b")

    async with standing(tmp_path, Voter(B, wins_first), Voter(C, refuses(C))) as (
        candidate,
        peers,
    ):
        assert await candidate._stand() is True
        assert candidate.master_node_id == B and not candidate.is_master
        assert candidate.term == 1
        assert pauses == [], "no failed round: the term has its master"


async def test_a_newer_term_heard_meanwhile_wins_over_late_grants(
    tmp_path: Path, pauses: list[tuple[int, float]]
) -> None:
    moved_on = anyio.Event()

    async def moves_on(request: VoteRequest) -> bytes:
        peers.publish_newest(TOPICS.election(B), announcement(B, 3, None))
        await wait_for(lambda: candidate.term == 3)
        moved_on.set()
        return reply(B, request.term, True)  # a grant for the term A has left

    async def grants_late(request: VoteRequest) -> bytes:
        await moved_on.wait()
        return reply(C, request.term, True)

    async with standing(tmp_path, Voter(B, moves_on), Voter(C, grants_late)) as (
        candidate,
        peers,
    ):
        assert await candidate._stand() is True
        assert candidate.term == 3
        assert not candidate.is_master, "a majority of term 1 makes no master of term 3"
        assert pauses == []


async def test_a_master_heard_during_the_pre_vote_keeps_the_candidate_in_its_term(
    tmp_path: Path, pauses: list[tuple[int, float]]
) -> None:
    async def master_meanwhile(request: VoteRequest) -> bytes:
        peers.publish_newest(TOPICS.election(B), announcement(B, request.term - 1, B))
        await wait_for(lambda: candidate.master_node_id == B)
        return reply(B, request.term - 1, True)

    async def would_grant_after_b(request: VoteRequest) -> bytes:
        await wait_for(lambda: candidate.master_node_id == B)
        return reply(C, request.term - 1, True)  # a majority would grant: too late

    b = Voter(B, grants(B), master_meanwhile)
    c = Voter(C, grants(C), would_grant_after_b)
    async with standing(tmp_path, b, c) as (candidate, peers):
        assert await candidate._stand() is True
        assert candidate.term == 0 and candidate.master_node_id == B
        assert TermStore(tmp_path).load().term == 0, "it did not stand"
        assert all(request.pre_vote for request in b.asked) and pauses == []


async def test_a_pre_vote_without_a_majority_moves_no_term_and_counts_a_failed_round(
    tmp_path: Path, pauses: list[tuple[int, float]]
) -> None:
    async def would_refuse(request: VoteRequest) -> bytes:
        return reply(B, request.term - 1, False, "its log is behind this node's")

    b, c = Voter(B, grants(B), would_refuse), Voter(C, grants(C), would_refuse)
    async with standing(tmp_path, b, c) as (candidate, _):
        assert await candidate._stand() is True
        assert candidate.term == 0 and candidate.master_node_id is None
        assert pauses == [(1, PAUSE_S)]
        assert all(request.pre_vote for request in b.asked)


async def test_a_started_node_is_seen_heard_acknowledged_and_asked_over_zenoh(
    tmp_path: Path,
) -> None:
    async with two_routers() as (own, other):
        a = member(tmp_path / "a", A, own)
        b = member(tmp_path / "b", B, other, started_at_us=5)
        departed: list[NodeId] = []
        a.on_node_departed(departed.append)
        a.start()
        b.start()
        await wait_for(lambda: a.live_node_ids == {A, B} and b.live_node_ids == {A, B})
        assert a._live[B] == 5, "the token carries B's start"
        b.announce()
        await wait_for(lambda: a.announced_head(B) == 2)
        answers = await own.query(TOPICS.vote(B), ask(A, 1, 2, 1).model_dump_json().encode(), 5.0)
        assert [VoteReply.model_validate_json(answer) for answer in answers] == [
            VoteReply(node_id=B, term=1, granted=True)
        ]
        master_of_term_1(a)
        assert b.observe_term(1, A)
        b.match_idx = 2
        b.acknowledge()  # to A alone, on A's acknowledgement key
        await wait_for(lambda: a.acknowledged() == {B: 2})
        await other.close()
        await wait_for(lambda: departed == [B])
        assert a.live_node_ids == {A}


async def test_a_node_takes_no_part_before_it_settled(tmp_path: Path) -> None:
    settle_s = 0.5
    async with two_routers() as (own, other):
        heard: list[float] = []
        other.subscribe(TOPICS.election_all, lambda key, payload: heard.append(time.monotonic()))
        other.declare_liveliness_token(TOPICS.alive_token(B, 5))  # after the subscription
        settling = member(tmp_path, A, own, settle_s=settle_s)
        settling.start()
        await wait_for(lambda: B in settling.live_node_ids)
        started = time.monotonic()
        async with anyio.create_task_group() as group:
            group.start_soon(settling.run)
            await wait_for(lambda: bool(heard))
            group.cancel_scope.cancel()
        assert heard[0] - started >= settle_s, "it announced before it settled"
