"""Who stands first, when a master counts as gone, and what one term allows: the most
up-to-date log stands first, then the earliest start; a peer that left, restarted or went
silent holds nobody back; no node stands without a live majority or before its log is
whole; a master is dropped after its silence allowance, never earlier; within a term a
node follows the first master it hears and never another, and never itself unelected.
Driven on a fake clock, with a never-opened router (nothing here needs the network)."""

from pathlib import Path

from exo.routing import election as election_module
from exo.routing.election import (
    MASTER_SILENCE_S,
    PEER_SILENCE_S,
    STAND_ANYWAY_AFTER_S,
    STAND_ANYWAY_JITTER_S,
    Election,
)
from exo.routing.messages import ElectionAnnouncement, VoteReply, VoteRequest
from exo.routing.tests.test_election import ask
from exo.routing.tests.test_election_stall import TOPICS, Clock, master_of_term_1, node
from exo.routing.tests.test_term_disk_full import election as with_members
from exo.shared.types.ids import NodeId

A, B, C, D, X = NodeId("a"), NodeId("b"), NodeId("c"), NodeId("d"), NodeId("x")
OWN_LOG = (1, 2)
"""Where the log of :func:`node` ends (last term, last index); it started at 1."""


def heard_from(
    election: Election,
    sender: NodeId,
    started_at_us: int,
    log: tuple[int, int] = OWN_LOG,
    term: int = 0,
    master: NodeId | None = None,
    match_idx: int = -1,
    commit_idx: int = -1,
    alive: bool = True,
) -> ElectionAnnouncement:
    """``sender`` (whose liveliness token appears first, unless not ``alive``) announces."""
    if alive:
        election._on_liveliness(TOPICS.alive_token(sender, started_at_us), True)
    announcement = ElectionAnnouncement(
        node_id=sender,
        started_at_us=started_at_us,
        term=term,
        master_node_id=master,
        last_event_idx=log[1],
        last_log_term=log[0],
        match_idx=match_idx,
        commit_idx=commit_idx,
    )
    election._on_announcement(TOPICS.election(sender), announcement.model_dump_json().encode())
    return announcement


def left(election: Election, sender: NodeId, started_at_us: int) -> None:
    election._on_liveliness(TOPICS.alive_token(sender, started_at_us), False)


def masterless_now(election: Election, clock: Clock) -> None:
    """The master this node followed (``d``, a live non-member) leaves now: the masterless
    timer starts again, so that only who is better placed decides for a few seconds."""
    heard_from(election, D, 3, term=election.term, master=D)
    assert election.master_node_id == D
    left(election, D, 3)
    assert election.master_node_id is None


def test_the_most_up_to_date_log_stands_first_then_the_earliest_start(tmp_path: Path) -> None:
    """Peer B's log and start against A's (log ends in term 1 at index 2, started at 1)."""
    cases = [
        ((1, 3), 5, False),  # longer log, later start: B first
        ((2, 1), 5, False),  # newer last term beats a longer log: B first
        ((1, 1), 0, True),  # shorter log, earlier start: the log counts first, A stands
        ((0, 9), 0, True),  # older last term, longer log, earlier start: A
        (OWN_LOG, 0, False),  # equal logs, B started earlier: B first
        (OWN_LOG, 5, True),  # equal logs, A started earlier: A stands at once
        (OWN_LOG, 1, True),  # equal logs, equal starts: the smaller id, A
    ]
    for n, (log, started_at_us, a_stands) in enumerate(cases):
        clock = Clock()
        candidate = node(tmp_path / str(n), A, clock)
        heard_from(candidate, B, started_at_us, log)
        assert candidate._should_stand() is a_stands, (log, started_at_us)
    # The other side of the tie: C, hearing B with an equal log and start, waits for B.
    clock = Clock()
    other = node(tmp_path / "tie", C, clock)
    heard_from(other, B, 1)
    assert not other._should_stand()


def test_a_peer_that_left_or_restarted_holds_nobody_back(tmp_path: Path) -> None:
    clock = Clock()
    candidate = node(tmp_path / "left", A, clock)
    heard_from(candidate, X, 0, (9, 9))  # far better placed, but it left
    heard_from(candidate, C, 5)  # a live majority, worse placed
    left(candidate, X, 0)
    assert candidate._should_stand()
    heard_from(candidate, B, 0)  # heard after X: B still holds A back
    assert not candidate._should_stand(), "a peer that left must not end the look at others"
    clock = Clock()
    restarted = node(tmp_path / "restarted", A, clock)
    heard_from(restarted, B, 0)  # better placed...
    assert not restarted._should_stand()
    restarted._on_liveliness(TOPICS.alive_token(B, 9), True)  # ...until it restarted
    left(restarted, B, 0)
    assert restarted.live_node_ids == {A, B}
    assert restarted._should_stand(), "the old incarnation's announcement counts no more"


def test_a_silent_peer_holds_nobody_back_once_its_silence_allowance_is_over(
    tmp_path: Path,
) -> None:
    clock = Clock()
    candidate = node(tmp_path, A, clock)
    heard_from(candidate, B, 0)  # better placed (earlier start)
    clock.now += PEER_SILENCE_S
    masterless_now(candidate, clock)
    assert not candidate._should_stand(), "heard PEER_SILENCE_S ago: it still counts"
    clock.now += 0.01
    assert candidate._should_stand(), "B is frozen or cut off: it will not stand"


def test_a_silent_peer_does_not_end_the_look_at_the_others(tmp_path: Path) -> None:
    clock = Clock()
    candidate = node(tmp_path, A, clock)
    heard_from(candidate, X, 0)  # heard first, then silent
    clock.now += PEER_SILENCE_S
    heard_from(candidate, B, 0)  # better placed and heard just now
    clock.now += 0.01
    masterless_now(candidate, clock)
    assert not candidate._should_stand()


def test_without_a_live_majority_or_a_whole_log_a_node_never_stands(tmp_path: Path) -> None:
    clock = Clock()
    candidate = node(tmp_path, A, clock)
    clock.now += STAND_ANYWAY_AFTER_S + STAND_ANYWAY_JITTER_S  # masterless long enough
    assert not candidate._should_stand(), "A alone of {A, B, C} could not win"
    candidate._on_liveliness(TOPICS.alive_token(B, 5), True)
    assert candidate._should_stand()
    candidate.stand_from_idx = 3  # its damaged log was cut at 3: it must get it back first
    assert not candidate._should_stand()
    candidate.stand_from_idx = 2
    assert candidate._should_stand()


def test_the_masterless_timer_starts_when_the_master_is_lost(tmp_path: Path) -> None:
    clock = Clock()
    follower = node(tmp_path, A, clock)
    changes: list[tuple[NodeId | None, NodeId | None]] = []
    follower.on_master_change(lambda old, new: changes.append((old, new)))
    heard_from(follower, B, 7, term=1, master=B)
    clock.now += 10.0  # following B all this time
    heard_from(follower, C, 0, term=1, master=B)  # better placed than A
    left(follower, B, 7)
    assert changes == [(None, B), (B, None)]
    assert not follower._should_stand(), "masterless for no time: C stands first"
    clock.now += STAND_ANYWAY_AFTER_S + STAND_ANYWAY_JITTER_S
    assert follower._should_stand()


def test_the_stand_anyway_moment_is_spread_over_the_whole_window() -> None:
    moments = [election_module._stand_anyway_after_s() for _ in range(400)]
    low, high = STAND_ANYWAY_AFTER_S, STAND_ANYWAY_AFTER_S + STAND_ANYWAY_JITTER_S
    assert all(low <= moment <= high for moment in moments)
    assert min(moments) < low + STAND_ANYWAY_JITTER_S / 10
    assert max(moments) > high - STAND_ANYWAY_JITTER_S / 10


def test_two_members_make_one_a_majority_only_while_the_other_is_gone_and_committed(
    tmp_path: Path,
) -> None:
    pair = with_members(tmp_path, A, [A, B])  # membership {A, B} appended at index 1
    assert not pair.is_majority([A]), "the pair is not committed: B may still be a member"
    pair.note_commit(1)
    assert pair.is_majority([A]), "committed up to the membership itself"
    assert not pair.is_majority([B]), "the exception needs this node's own agreement"
    pair._on_liveliness(TOPICS.alive_token(B, 5), True)
    assert not pair.is_majority([A]), "B is alive: both are needed"
    assert pair.is_majority([A, B])
    left(pair, B, 5)
    assert pair.is_majority([A])


def test_a_silent_master_is_dropped_after_its_allowance_and_not_before(tmp_path: Path) -> None:
    clock = Clock()
    follower = node(tmp_path, A, clock)
    heard_from(follower, B, 7, term=1, master=B)
    follower.match_idx = 2
    clock.now += MASTER_SILENCE_S
    follower._drop_silent_master()
    assert follower.master_node_id == B, "the allowance's last instant: B is still there"
    clock.now += 0.01
    follower._drop_silent_master()
    assert follower.master_node_id is None
    assert follower.match_idx == -1, "nothing is known to match a master not yet chosen"
    assert follower.term == 1


def test_a_master_followed_before_it_was_heard_gets_the_whole_allowance(tmp_path: Path) -> None:
    clock = Clock()
    follower = node(tmp_path, A, clock)
    assert follower.observe_term(3, B)  # from a global event, say
    clock.now += 10.0
    follower._drop_silent_master()
    assert follower.master_node_id == B, "its silence is timed from now"
    clock.now += MASTER_SILENCE_S
    follower._drop_silent_master()
    assert follower.master_node_id == B
    clock.now += 0.01
    follower._drop_silent_master()
    assert follower.master_node_id is None


def test_a_master_does_not_drop_itself_or_vote_for_a_rival(tmp_path: Path) -> None:
    clock = Clock()
    master = master_of_term_1(node(tmp_path, A, clock))
    clock.now += 10.0  # a master hears no announcement of its own
    master._drop_silent_master()
    assert master.is_master
    rival = master._vote(VoteRequest(candidate_id=C, term=2, last_event_idx=9, last_log_term=9))
    assert not rival.granted and master.is_master and master.term == 1


def test_within_a_term_a_node_follows_the_first_master_and_never_another(tmp_path: Path) -> None:
    clock = Clock()
    voter = node(tmp_path, A, clock)
    assert voter._vote(ask(B, 2, 2, 1)).granted  # term 2, no master yet
    assert voter.observe_term(2, None), "a message of this node's own term is not ignored"
    assert voter.master_node_id is None
    assert voter.observe_term(2, B)
    assert voter.master_node_id == B
    assert voter.observe_term(2, C)
    assert voter.master_node_id == B, "one master per term: C's claim is not followed"
    assert not voter.observe_term(1, C)
    assert voter.master_node_id == B


def test_a_node_is_never_made_master_by_a_message_naming_it(tmp_path: Path) -> None:
    clock = Clock()
    candidate = node(tmp_path, A, clock)
    assert candidate.observe_term(5, A)
    assert candidate.term == 5 and candidate.master_node_id is None
    assert candidate.observe_term(5, A)
    assert not candidate.is_master, "only a majority of votes makes a master"


def test_a_node_follows_only_a_sender_that_claims_to_be_master(tmp_path: Path) -> None:
    clock = Clock()
    follower = node(tmp_path, A, clock)
    assert follower.observe_term(2, None)
    heard_from(follower, B, 7, term=2, master=None)
    assert follower.master_node_id is None
    heard_from(follower, B, 7, term=3, master=C)  # B follows C in a newer term
    assert follower.term == 3 and follower.master_node_id is None
    heard_from(follower, C, 8, term=3, master=C)
    assert follower.master_node_id == C


def test_announcements_of_this_term_or_a_newer_reach_the_listeners(tmp_path: Path) -> None:
    clock = Clock()
    listener = node(tmp_path, A, clock)
    assert listener.announced_head(B) == -1, "not heard"
    heard: list[ElectionAnnouncement] = []
    listener.on_announcement(heard.append)
    assert listener.observe_term(2, None)
    current = heard_from(listener, B, 7, (1, 4), term=2)
    assert heard == [current]
    assert listener.announced_head(B) == 4 and listener.announced_head(C) == -1
    heard_from(listener, C, 8, (1, 6), term=1)  # an older term
    assert heard == [current]
    assert listener.announced_head(C) == 6, "its log position is noted all the same"
    newer = heard_from(listener, C, 8, (1, 6), term=3)
    assert heard == [current, newer]


def test_only_the_followed_masters_heartbeat_moves_the_commit_no_further_than_the_match(
    tmp_path: Path,
) -> None:
    clock = Clock()
    follower = node(tmp_path, A, clock)
    heard_from(follower, B, 7, term=1, master=B)
    follower.match_idx = 2  # the log sync found A's log equal to B's up to 2
    heard_from(follower, C, 8, term=1, master=C, commit_idx=1)  # a rival's claim
    assert follower.commit_idx == -1
    heard_from(follower, B, 7, term=1, master=D, commit_idx=1)  # B does not claim it
    assert follower.commit_idx == -1
    heard_from(follower, B, 7, term=1, master=B, commit_idx=1)
    assert follower.commit_idx == 1
    heard_from(follower, B, 7, term=1, master=B, commit_idx=9)
    assert follower.commit_idx == 2, "beyond its match A's log may still differ from B's"


def test_a_master_counts_acknowledgements_of_its_term_addressed_to_it(tmp_path: Path) -> None:
    clock = Clock()
    master = master_of_term_1(node(tmp_path, A, clock))
    heard_from(master, B, 7, term=1, master=A, match_idx=5)
    heard_from(master, C, 8, term=1, master=B, match_idx=7)  # follows another master
    heard_from(master, D, 9, term=0, master=A, match_idx=6)  # an older term of A's
    assert master.acknowledged() == {B: 5}


def test_a_departure_counts_only_for_the_incarnation_that_left(tmp_path: Path) -> None:
    clock = Clock()
    follower = node(tmp_path, A, clock)
    departed: list[NodeId] = []
    follower.on_node_departed(departed.append)
    heard_from(follower, B, 7, term=1, master=B)
    follower.match_idx = 2
    follower._on_liveliness(TOPICS.alive_token(C, 3), True)
    left(follower, C, 3)
    assert departed == [C] and follower.master_node_id == B, "C was not the master"
    follower._on_liveliness(TOPICS.alive_token(B, 8), True)  # B restarted...
    left(follower, B, 7)  # ...and its old token's end arrives late
    assert departed == [C] and B in follower.live_node_ids
    assert follower.master_node_id == B and follower.match_idx == 2
    follower._on_liveliness("test/alive/b", False)  # malformed: ignored
    follower._on_liveliness(TOPICS.alive_token(A, 1), False)  # its own: ignored
    assert follower.live_node_ids == {A, B}
    left(follower, B, 8)
    assert departed == [C, B] and follower.live_node_ids == {A}
    assert follower.master_node_id is None and follower.match_idx == -1


def test_an_announcement_says_term_master_log_end_match_and_commit(tmp_path: Path) -> None:
    clock = Clock()
    fresh = node(tmp_path, A, clock)
    said = ElectionAnnouncement.model_validate_json(fresh._announcement())
    assert said == ElectionAnnouncement(
        node_id=A,
        started_at_us=1,
        term=0,
        master_node_id=None,
        last_event_idx=2,
        last_log_term=1,
        match_idx=-1,
        commit_idx=-1,
    )
    assert fresh.observe_term(4, B)
    fresh.match_idx = 1
    fresh.note_commit(0)
    said = ElectionAnnouncement.model_validate_json(fresh._announcement())
    assert (said.term, said.master_node_id, said.match_idx, said.commit_idx) == (4, B, 1, 0)
    assert (said.last_log_term, said.last_event_idx) == OWN_LOG


def test_a_vote_request_is_answered_only_when_it_can_be_read(tmp_path: Path) -> None:
    clock = Clock()
    voter = node(tmp_path, A, clock)
    answer = voter._on_vote_request("", ask(B, 1, 2, 1).model_dump_json().encode())
    assert answer is not None
    reply = VoteReply.model_validate_json(answer)
    assert (reply.node_id, reply.term, reply.granted) == (A, 1, True)
    assert voter._on_vote_request("", None) is None
    assert voter._on_vote_request("", b"{not json") is None
