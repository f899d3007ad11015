"""The majority rule and a voter's rules (Raft's: one vote per term, only for a log at
least as up to date, never while a live master is heard, terms never go back)."""

import itertools
from pathlib import Path

import pytest

from exo.routing.election import (
    AFTER_VOTE_QUIET_S,
    ANNOUNCE_INTERVAL_S,
    MASTER_SILENCE_S,
    RETRY_PAUSE_GROWTH_LIMIT,
    RETRY_PAUSE_S,
    STAND_ANYWAY_AFTER_S,
    STAND_ANYWAY_JITTER_S,
    Election,
    heartbeat_route,
    retry_pause_s,
)
from exo.routing.messages import ElectionAnnouncement, VoteRequest
from exo.routing.quorum import QUORUM_LEASE_S, is_majority
from exo.routing.router import Router, RouterConfig
from exo.routing.term_store import TermStore, TermStoreError
from exo.routing.topics import Topics
from exo.shared.event_store import EventStore
from exo.shared.types.events import IndexedEvent, MemberJoined
from exo.shared.types.ids import NodeId

A, B, C, D = NodeId("a"), NodeId("b"), NodeId("c"), NodeId("d")


def majority(agreeing: list[NodeId], members: set[NodeId], live: set[NodeId]) -> bool:
    return is_majority(agreeing, members, live, A, two_committed=True)


def test_a_majority_is_more_than_half_of_the_members() -> None:
    members = {A, B, C}
    assert not majority([A], members, members)
    assert majority([A, B], members, members)
    assert not majority([A, D], members, members)  # D is no member
    assert not majority([A, B], {A, B, C, D}, {A, B, C, D})
    assert majority([A, B, C], {A, B, C, D}, {A, B, C, D})


def test_a_fresh_log_counts_this_node_alone() -> None:
    assert majority([A], set(), {A, B})
    assert not majority([B], set(), {A, B})


def test_two_members_go_on_alone_only_when_the_other_is_gone() -> None:
    assert not majority([A], {A, B}, {A, B})  # B alive but silent: no
    assert majority([A], {A, B}, {A})  # B switched off: A alone suffices
    assert majority([A, B], {A, B}, {A, B})


def test_an_uncommitted_shrink_to_two_members_gives_no_exception() -> None:
    """A master cut off from {A, B, C} that appended B's removal must not go on alone."""
    assert not is_majority([A], {A, C}, {A}, A, two_committed=False)
    assert is_majority([A, C], {A, C}, {A, C}, A, two_committed=False)


def test_the_two_member_exception_holds_for_two_members_only() -> None:
    """With three or four members, both others gone leaves no majority; with two, only
    this node's own agreement counts, and only while the other is gone."""
    assert not majority([A], {A, B, C}, {A})
    assert not majority([A], {A, B, C, D}, {A})
    assert not majority([A, B], {A, B, C, D}, {A, B})
    assert not majority([], {A, B}, {A}), "the exception needs this node's own agreement"
    assert not majority([B], {A, B}, {B})
    assert not is_majority([A], {B, C}, {A}, A, two_committed=True), "A is no member"


def election(tmp_path: Path, node: NodeId, log_terms: list[int]) -> Election:
    store = EventStore(None)
    for idx, term in enumerate(log_terms):
        store.append(IndexedEvent(idx=idx, term=term, event=MemberJoined(node_id=node)))
    terms = TermStore(tmp_path)
    terms.load()
    router = Router(RouterConfig([], [], discovery=False))  # never opened: votes need no I/O
    return Election(router, Topics("test"), node, 1, 0.0, store, terms)


def ask(candidate: NodeId, term: int, last_idx: int, last_term: int) -> VoteRequest:
    return VoteRequest(
        candidate_id=candidate, term=term, last_event_idx=last_idx, last_log_term=last_term
    )


def test_one_vote_per_term_kept_across_a_restart(tmp_path: Path) -> None:
    voter = election(tmp_path, A, [1, 1])
    assert voter._vote(ask(B, 2, 1, 1)).granted  # pyright: ignore[reportPrivateUsage]
    assert voter.term == 2
    refused = voter._vote(ask(C, 2, 5, 1))  # pyright: ignore[reportPrivateUsage]
    assert not refused.granted and "already voted for b" in refused.reason
    # The same node after a restart remembers its vote and its term.
    again = election(tmp_path, A, [1, 1])
    assert again.term == 2
    assert not again._vote(ask(C, 2, 5, 1)).granted  # pyright: ignore[reportPrivateUsage]
    assert again._vote(ask(B, 2, 1, 1)).granted  # pyright: ignore[reportPrivateUsage]
    # A newer term frees the vote.
    assert again._vote(ask(C, 3, 5, 1)).granted  # pyright: ignore[reportPrivateUsage]


def test_no_vote_for_a_log_behind_ours_or_an_older_term(tmp_path: Path) -> None:
    voter = election(tmp_path, A, [1, 1, 2])
    behind_by_term = voter._vote(ask(B, 3, 9, 1))  # pyright: ignore[reportPrivateUsage]
    assert not behind_by_term.granted and "behind" in behind_by_term.reason
    behind_by_index = voter._vote(ask(B, 3, 1, 2))  # pyright: ignore[reportPrivateUsage]
    assert not behind_by_index.granted
    assert voter._vote(ask(B, 3, 2, 2)).granted  # pyright: ignore[reportPrivateUsage]
    stale = voter._vote(ask(C, 2, 9, 9))  # pyright: ignore[reportPrivateUsage]
    assert not stale.granted and "older" in stale.reason and stale.term == 3


def test_a_newer_term_makes_a_node_follow_and_an_older_one_is_ignored(tmp_path: Path) -> None:
    node = election(tmp_path, A, [])
    assert node.observe_term(4, B)
    assert node.term == 4 and node.master_node_id == B
    assert not node.observe_term(3, C)
    assert node.master_node_id == B and node.term == 4
    assert TermStore(tmp_path).load().term == 4


def test_a_damaged_term_file_is_a_start_up_error(tmp_path: Path) -> None:
    (tmp_path / "term.json").write_text('{"term": "many"}')
    with pytest.raises(TermStoreError, match=r"term\.json"):
        TermStore(tmp_path).load()


def recorded_publishes(node: Election, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key expressions the node publishes its announcements on (zenoh is never opened)."""
    keys: list[str] = []
    router = node._router  # pyright: ignore[reportPrivateUsage]

    def publish_newest(key: str, payload: bytes) -> None:
        keys.append(key)

    monkeypatch.setattr(router, "publish_newest", publish_newest)
    return keys


def test_an_acknowledgement_goes_to_the_master_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = election(tmp_path, A, [])
    keys = recorded_publishes(node, monkeypatch)
    node.acknowledge()  # no master yet: a plain announcement, for everyone
    assert node.observe_term(2, B)
    node.acknowledge()
    node.announce()
    assert keys == ["test/election/a", "test/ack/b/a", "test/election/a"]


def announcement(started_at_us: int, match_idx: int, master: NodeId = A) -> bytes:
    return (
        ElectionAnnouncement(
            node_id=B,
            started_at_us=started_at_us,
            term=0,
            master_node_id=master,
            last_event_idx=match_idx,
            match_idx=match_idx,
        )
        .model_dump_json()
        .encode()
    )


def test_a_late_periodic_announcement_does_not_take_back_an_acknowledgement(
    tmp_path: Path,
) -> None:
    master = election(tmp_path, A, [])
    hear = master._on_announcement  # pyright: ignore[reportPrivateUsage]
    hear("test/ack/a/b", announcement(7, 5))
    hear("test/election/b", announcement(7, 3))  # sent before the acknowledgement
    assert master.acknowledged() == {B: 5}
    hear("test/election/b", announcement(8, 3))  # B restarted: what it says now is all
    assert master.acknowledged() == {B: 3}
    hear("test/election/b", announcement(8, 9, master=C))  # B follows another master
    hear("test/election/b", announcement(8, 2))
    assert master.acknowledged() == {B: 2}


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def clocked(tmp_path: Path, node: NodeId, clock: Clock) -> Election:
    terms = TermStore(tmp_path)
    terms.load()
    router = Router(RouterConfig([], [], discovery=False))
    return Election(router, Topics("test"), node, 1, 0.0, EventStore(None), terms, clock=clock)


def test_a_node_that_granted_its_vote_lets_that_election_finish(tmp_path: Path) -> None:
    clock = Clock()
    voter = clocked(tmp_path, A, clock)
    should_stand = voter._should_stand  # pyright: ignore[reportPrivateUsage]
    clock.now += STAND_ANYWAY_AFTER_S + STAND_ANYWAY_JITTER_S  # masterless long enough
    assert should_stand()
    assert voter._vote(ask(B, 1, -1, 0)).granted  # pyright: ignore[reportPrivateUsage]
    assert not should_stand(), "it would move everyone to the next term mid-election"
    clock.now += AFTER_VOTE_QUIET_S[0] - 0.01
    assert not should_stand()
    clock.now += AFTER_VOTE_QUIET_S[1] - AFTER_VOTE_QUIET_S[0] + 0.02
    assert should_stand(), "B's election had its time; without a master A stands"


def test_a_node_waits_for_the_better_placed_one_only_so_long(tmp_path: Path) -> None:
    """A (started first, equal logs) is the one to stand while it is heard; when it never
    does, the others stand anyway, each at its own random moment of a window."""
    clock = Clock()
    nodes = [clocked(tmp_path / str(n), NodeId(f"n{n}"), clock) for n in range(10)]
    heard = ElectionAnnouncement(node_id=A, started_at_us=0, master_node_id=None, last_event_idx=-1)

    def standing() -> int:
        count = 0
        for node in nodes:
            node._on_liveliness("test/alive/a/0", True)  # pyright: ignore[reportPrivateUsage]
            node._on_announcement("test/election/a", heard.model_dump_json().encode())  # pyright: ignore[reportPrivateUsage]
            count += node._should_stand()  # pyright: ignore[reportPrivateUsage]
        return count

    assert standing() == 0
    clock.now += STAND_ANYWAY_AFTER_S - 0.01
    assert standing() == 0
    clock.now += STAND_ANYWAY_JITTER_S / 4
    assert standing() < len(nodes), "not all at once (1 in a million that all drew early)"
    clock.now += STAND_ANYWAY_JITTER_S
    assert standing() == len(nodes)


def test_no_vote_while_the_master_this_node_follows_is_alive_and_heard(
    tmp_path: Path,
) -> None:
    clock = Clock()
    voter = clocked(tmp_path, A, clock)
    topics = Topics("test")
    voter._on_liveliness(topics.alive_token(B, 7), True)  # pyright: ignore[reportPrivateUsage]
    heartbeat = ElectionAnnouncement(
        node_id=B, started_at_us=7, term=1, master_node_id=B, last_event_idx=-1
    )
    voter._on_announcement(  # pyright: ignore[reportPrivateUsage]
        "test/election/b", heartbeat.model_dump_json().encode()
    )
    assert voter.master_node_id == B
    refused = voter._vote(ask(C, 2, -1, 0))  # pyright: ignore[reportPrivateUsage]
    assert not refused.granted and "live master" in refused.reason
    assert voter.term == 1, "a refused vote for a live master's rival moves no term"
    clock.now += MASTER_SILENCE_S + 0.01  # B frozen: alive by its token, but silent
    assert voter._vote(ask(C, 2, -1, 0)).granted  # pyright: ignore[reportPrivateUsage]


def test_the_pause_after_a_failed_round_doubles_up_to_a_limit() -> None:
    low, high = RETRY_PAUSE_S
    for rounds, factor in [(1, 1), (2, 2), (3, 4), (4, 8), (9, RETRY_PAUSE_GROWTH_LIMIT)]:
        pauses = [retry_pause_s(rounds) for _ in range(200)]
        assert low * factor <= min(pauses) and max(pauses) <= high * factor, rounds
        assert max(pauses) - min(pauses) > (high - low) * factor / 2, "the pause is random"


def test_a_follower_heartbeats_its_master_each_second_and_everyone_every_two() -> None:
    """Beats are 0.5 s apart. A follower reaches its master on every second beat (within
    the 3 s quorum lease three times over) and every node on every fourth; the master and a
    masterless node reach every node on every beat (followers drop a master after 1.5 s)."""
    assert [heartbeat_route(beat, following=True) for beat in range(8)] == [
        "all", None, "master", None, "all", None, "master", None,
    ]  # fmt: skip
    assert [heartbeat_route(beat, following=False) for beat in range(8)] == ["all"] * 8
    to_master = [beat for beat in range(40) if heartbeat_route(beat, following=True)]
    gaps_s = {(b - a) * ANNOUNCE_INTERVAL_S for a, b in itertools.pairwise(to_master)}
    assert gaps_s == {1.0} and 3 * max(gaps_s) <= QUORUM_LEASE_S
