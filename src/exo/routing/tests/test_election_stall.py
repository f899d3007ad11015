"""A node's own stall (its event loop did not run) and the timers the election keeps: a
master that stalled does not serve writes until a majority answers it again, a follower
does not drop its master for a silence it caused itself; the write lease, a master's
silence allowance and waiting for a commit."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from loguru import logger

from exo.loop_watch import NOTIFY_AFTER_S, TICK_S, LoopWatch
from exo.routing.election import MASTER_SILENCE_S, STALL_GRACE_S, Election, now_us
from exo.routing.messages import ElectionAnnouncement, VoteRequest
from exo.routing.quorum import QUORUM_LEASE_S
from exo.routing.router import Router, RouterConfig
from exo.routing.term_store import TermStore
from exo.routing.topics import Topics
from exo.shared.event_store import EventStore
from exo.shared.types.events import IndexedEvent, MemberJoined
from exo.shared.types.ids import NodeId

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")
TOPICS = Topics("test")


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []

    def sink(message: Any) -> None:
        lines.append(str(message.record["message"]))

    sink_id = logger.add(sink, level="WARNING", format="{message}")
    yield lines
    logger.remove(sink_id)


def node(tmp_path: Path, node_id: NodeId, clock: Clock, watch: LoopWatch | None = None) -> Election:
    """A member of {A, B, C} (a majority is two), with a never-opened router."""
    store = EventStore(None)
    for idx, member in enumerate([A, B, C]):
        store.append(IndexedEvent(idx=idx, term=1, event=MemberJoined(node_id=member)))
    terms = TermStore(tmp_path)
    terms.load()
    router = Router(RouterConfig([], [], discovery=False))
    return Election(router, TOPICS, node_id, 1, 0.0, store, terms, loop_watch=watch, clock=clock)


def master_of_term_1(election: Election) -> Election:
    assert election.observe_term(1, None)
    election._set_master(election.node_id)  # pyright: ignore[reportPrivateUsage]
    assert election.is_master
    return election


def hear(election: Election, sender: NodeId, master: NodeId | None, term: int = 1) -> None:
    announcement = ElectionAnnouncement(
        node_id=sender, started_at_us=7, term=term, master_node_id=master, last_event_idx=2
    )
    election._on_announcement(  # pyright: ignore[reportPrivateUsage]
        f"test/election/{sender}", announcement.model_dump_json().encode()
    )


def stall(watch: LoopWatch) -> None:
    """This node's loop does not run for longer than a stall the watch tells of."""
    watch.check()  # the last tick: the stall starts now
    time.sleep(TICK_S + NOTIFY_AFTER_S + 0.05)  # late beyond a tick


def test_the_write_lease_counts_this_terms_answers_to_this_master_within_the_lease(
    tmp_path: Path,
) -> None:
    clock = Clock()
    master = master_of_term_1(node(tmp_path, A, clock))
    assert not master.serving_writes, "A alone is no majority of three"
    assert master.answered_within_lease() == {A}
    hear(master, B, A)
    hear(master, C, B)  # C follows another master: no answer to A
    assert master.heard_recently(QUORUM_LEASE_S) == {B}
    assert master.answered_within_lease() == {A, B}
    assert master.serving_writes
    clock.now += QUORUM_LEASE_S
    assert master.heard_recently(QUORUM_LEASE_S) == {B}, "the lease's last instant counts"
    assert master.serving_writes
    clock.now += 0.01
    assert master.heard_recently(QUORUM_LEASE_S) == set()
    assert not master.serving_writes
    hear(master, C, A, term=0)  # a late answer from an older term of A's
    assert master.heard_recently(QUORUM_LEASE_S) == set()
    assert not master.serving_writes
    hear(master, C, A)
    assert master.serving_writes
    hear(master, B, B, term=2)  # a newer term: A steps down
    assert not master.is_master and not master.serving_writes


def test_a_follower_is_never_serving_writes(tmp_path: Path) -> None:
    clock = Clock()
    follower = node(tmp_path, A, clock)
    hear(follower, B, B)
    hear(follower, C, B)
    assert follower.master_node_id == B and not follower.serving_writes
    assert follower.heard_recently(QUORUM_LEASE_S) == set(), "they answer B, not A"


def test_a_master_that_stalled_serves_no_writes_until_a_majority_answers_again(
    tmp_path: Path, warnings: list[str]
) -> None:
    clock = Clock()
    watch = LoopWatch()
    master = master_of_term_1(node(tmp_path, A, clock, watch))
    hear(master, B, A)
    hear(master, C, A)
    assert master.serving_writes
    assert master.heard_recently(QUORUM_LEASE_S) == {B, C}
    stall(watch)
    # B and C may have moved on meanwhile: what they said before the stall counts no more.
    assert not master.serving_writes
    assert master.heard_recently(QUORUM_LEASE_S) == set()
    said = [line for line in warnings if "not serving writes" in line]
    assert len(said) == 1 and "did not run for 1." in said[0], warnings
    # What waited in buffers during the stall and arrives in the grace period is stale too.
    clock.now += STALL_GRACE_S / 2
    hear(master, B, A)
    assert not master.serving_writes
    clock.now += STALL_GRACE_S / 2  # the grace period is over
    assert not master.serving_writes, "B's answer arrived during the grace period"
    hear(master, B, A)
    assert master.heard_recently(QUORUM_LEASE_S) == {B}
    assert master.serving_writes
    assert master.master_heard_s_ago() == 0.0


def test_a_follower_does_not_drop_its_master_for_its_own_stall(
    tmp_path: Path, warnings: list[str]
) -> None:
    clock = Clock()
    watch = LoopWatch()
    follower = node(tmp_path, A, clock, watch)
    follower._on_liveliness(TOPICS.alive_token(B, 7), True)  # pyright: ignore[reportPrivateUsage]
    hear(follower, B, B)
    clock.now += MASTER_SILENCE_S + 0.5  # A itself did not run all this time
    assert follower.master_heard_s_ago() == MASTER_SILENCE_S + 0.5
    stall(watch)
    watch.check()  # the first code that runs after the stall tells of it
    assert follower.master_heard_s_ago() == 0.0, "B's silence was A's own"
    assert follower.master_node_id == B
    rival = VoteRequest(candidate_id=C, term=2, last_event_idx=9, last_log_term=9)
    refused = follower._vote(rival)  # pyright: ignore[reportPrivateUsage]
    assert not refused.granted and "live master" in refused.reason
    assert not any("serving writes" in line for line in warnings), warnings
    clock.now += 0.5
    assert follower.master_heard_s_ago() == 0.5, "the silence timer runs again"


def test_a_stall_starts_the_silence_timer_of_a_master_not_heard_yet(
    tmp_path: Path,
) -> None:
    """Followed from a message before its first announcement came (None: not heard)."""
    clock = Clock()
    watch = LoopWatch()
    follower = node(tmp_path, A, clock, watch)
    assert follower.master_heard_s_ago() is None, "no master"
    assert follower.observe_term(3, B)
    assert follower.master_heard_s_ago() is None, "not heard yet"
    stall(watch)
    watch.check()
    assert follower.master_heard_s_ago() == 0.0
    clock.now += 1.25
    assert follower.master_heard_s_ago() == 1.25


def test_a_vote_is_refused_while_the_master_is_heard_within_its_silence_allowance(
    tmp_path: Path,
) -> None:
    clock = Clock()
    voter = node(tmp_path, A, clock)
    voter._on_liveliness(TOPICS.alive_token(B, 7), True)  # pyright: ignore[reportPrivateUsage]
    hear(voter, B, B)
    rival = VoteRequest(candidate_id=C, term=2, last_event_idx=9, last_log_term=9)
    clock.now += MASTER_SILENCE_S  # the allowance's last instant: B is still there
    assert not voter._vote(rival).granted  # pyright: ignore[reportPrivateUsage]
    clock.now += 0.01
    assert voter._vote(rival).granted  # pyright: ignore[reportPrivateUsage]


@pytest.mark.anyio
async def test_waiting_for_a_commit_returns_once_it_is_committed_or_times_out(
    tmp_path: Path,
) -> None:
    election = node(tmp_path, A, Clock())
    assert not await election.wait_for_commit(0, 0.05), "nothing is committed"
    results: list[bool] = []

    async def wait() -> None:
        results.append(await election.wait_for_commit(2, 5.0))

    with anyio.fail_after(5.0):
        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            await anyio.sleep(0.02)
            election.note_commit(1)
            await anyio.sleep(0.02)
            assert results == [], "index 2 is not committed yet"
            election.note_commit(2)
    assert results == [True]
    assert await election.wait_for_commit(2, 0.0), "already committed: no wait"
    assert await election.wait_for_commit(1, 0.0)


def test_now_us_is_wall_clock_microseconds() -> None:
    before = time.time_ns() // 1000
    stamp = now_us()
    after = time.time_ns() // 1000
    assert isinstance(stamp, int) and before <= stamp <= after
