"""Who is master, in which term: Raft's election rules over zenoh.

- **Terms.** Every master holds a term, a number that only grows and is kept on disk
  (:mod:`~exo.routing.term_store`). A node never follows a master of a term older than its
  own, and any message carrying a newer term makes it adopt that term (a master that sees
  one steps down). So a master that was paused or cut off and comes back cannot take over
  again: the others moved to a newer term while it was away.
- **Votes.** When the master it follows is gone (its liveliness token disappeared) a node
  may stand: it moves to the next term, votes for itself and asks every node for its vote
  (a zenoh query on ``vote/*``). A node grants at most one vote per term, only to a
  candidate whose log is at least as up to date as its own (last term, then last index),
  and never while it still hears from a live master. A majority of the members
  (:mod:`~exo.routing.quorum`) makes the candidate master of that term; a split vote is
  retried after a random pause that doubles with each failed round in a row (bounded).
- **Who stands.** To avoid split votes, a node stands only when, among the live nodes it
  has heard from, none has a more up-to-date log or (equal logs) an earlier start; after a
  few seconds without a master (a random number of them, so that not all at once) it
  stands anyway. A node that has just granted its vote to another candidate does not stand
  for a while: the election it voted in gets the time to finish. A node that cannot see a
  majority of the members alive does not stand at all (it could not win), so a cut-off node
  does not inflate its term.
- **A disk that refuses the term file** (full, failing): the node neither votes nor stands
  until it can write it again (a vote must be on disk before it is given); it still
  follows a newer term and notes commits, in memory until the file can be written.
- **Heartbeats.** Every node announces its term, the master it follows and where its log
  ends (the announcement doubles as its acknowledgement to the master): the master, and
  every node while there is none, to every node every 0.5 s; a follower to its master
  every 1 s and to every node every 2 s, and to its master alone as soon as it has stored
  and fsynced events. The master's announcement carries its commit index.
- **A master is judged by its heartbeats**, not only by its liveliness token: a master not
  heard for :data:`MASTER_SILENCE_S` is treated as gone (a process frozen with SIGSTOP
  keeps its token alive until zenoh's lease runs out, ~10 s). Silence this node caused
  itself (its own loop did not run, :mod:`exo.loop_watch`) does not count.
- **A stalled master is not serving writes.** It serves writes only while a majority
  answered within :data:`~exo.routing.quorum.QUORUM_LEASE_S`; after its own loop stalled
  (frozen, overloaded), what it heard before counts no more, and for
  :data:`STALL_GRACE_S` nothing does, so it says it is not serving before it has heard
  whether the others moved on.

The master's side (indexing, commit index, quorum for writes) is in :mod:`exo.master.main`;
keeping a follower's log equal to the master's is :mod:`exo.routing.event_sync`.
"""

import random
import time
from collections.abc import Callable, Iterable
from typing import Literal

import anyio
from loguru import logger
from pydantic import ValidationError

from exo.loop_watch import LoopWatch
from exo.routing import quorum
from exo.routing.messages import ElectionAnnouncement, VoteReply, VoteRequest
from exo.routing.router import NEWEST_PER_KEY, Router
from exo.routing.term_store import TermStore
from exo.routing.topics import Topics
from exo.shared.event_store import EventStore
from exo.shared.types.ids import NodeId

ANNOUNCE_INTERVAL_S = 0.5
"""The master, and every node while there is none, announces to every node this often..."""
FOLLOWER_ANNOUNCE_EVERY = 2
"""...a follower only every this many intervals (1 s), to its master (its acknowledgement,
which the quorum lease counts, besides the one it sends at once for each stored event)..."""
FOLLOWER_BROADCAST_EVERY = 4
"""...and to every node only every this many intervals (2 s): the others need its log
position only to judge who stands first once the master is gone, and then every node
announces to all at each interval again. At 16 nodes this is a sixth of the messages of
everyone announcing to everyone every interval, which was most of an idle node's CPU."""
TICK_S = 0.25
STAND_ANYWAY_AFTER_S = 3.0
"""Without a master for this long (plus a random part of :data:`STAND_ANYWAY_JITTER_S`), a
node stands even if another looks better placed."""
STAND_ANYWAY_JITTER_S = 2.0
"""Spreads the nodes that stand anyway, so that one asks for votes before the others do."""
MASTER_SILENCE_S = 1.5
"""A master not heard from for this long is gone: a voter no longer counts it as present,
and a follower stops following it (three announcement intervals)."""
PEER_SILENCE_S = FOLLOWER_BROADCAST_EVERY * ANNOUNCE_INTERVAL_S + MASTER_SILENCE_S
"""A follower not heard from for this long is left out of who stands first (frozen, cut
off): one broadcast interval plus the master's silence allowance."""
STALL_GRACE_S = 1.0
"""After this node's loop stalled, announcements count towards its write quorum only from
this long after it ran again (the ones that waited in buffers meanwhile are stale)."""
VOTE_TIMEOUT_S = 1.0
AFTER_VOTE_QUIET_S = (VOTE_TIMEOUT_S, 2 * VOTE_TIMEOUT_S)
"""After granting its vote to another candidate, a node does not stand itself for a random
time in this range: the candidate it voted for gets the time to collect the others'
(Raft's reset of the election timer on a granted vote). Standing at once would move every
voter to the next term and undo the election it just took part in."""
RETRY_PAUSE_S = (0.2, 0.8)
"""After a round without a majority, a candidate pauses a random time in this range..."""
RETRY_PAUSE_GROWTH_LIMIT = 8
"""...times 2 for each further failed round in a row, up to this factor (a machine too busy
to finish a round in one pause gets longer ones rather than ever more terms)."""
TERM_WRITE_RETRY_S = 1.0
"""A node that could not store the term it would stand in tries again after this long."""


def heartbeat_route(beat: int, following: bool) -> Literal["all", "master"] | None:
    """Where the ``beat``-th periodic announcement goes (one beat per
    :data:`ANNOUNCE_INTERVAL_S`): to every node, to the master alone, or nowhere."""
    if not following or beat % FOLLOWER_BROADCAST_EVERY == 0:
        return "all"
    return "master" if beat % FOLLOWER_ANNOUNCE_EVERY == 0 else None


def log_position(store: EventStore) -> tuple[int, int]:
    """(term of the last event, index of the last event): what "up to date" compares."""
    return (store.last_term, store.last_idx)


class Election:
    def __init__(
        self,
        router: Router,
        topics: Topics,
        node_id: NodeId,
        started_at_us: int,
        settle_s: float,
        store: EventStore,
        terms: TermStore,
        loop_watch: LoopWatch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``terms`` is loaded already (its errors are start-up errors); ``loop_watch``
        tells of this node's own stalls (None: the loop is assumed never to stall);
        ``clock``: seconds, monotonic."""
        self._clock = clock
        self._router = router
        self._topics = topics
        self.node_id = node_id
        self.started_at_us = started_at_us
        self._settle_s = settle_s
        self._settled = settle_s <= 0
        self._store = store
        self._terms = terms
        self._live: dict[NodeId, int] = {node_id: started_at_us}
        self._master: NodeId | None = None
        self._heard: dict[NodeId, ElectionAnnouncement] = {}
        self._heard_at: dict[NodeId, float] = {}
        self._masterless_since = clock()
        self._stand_anyway_after_s = _stand_anyway_after_s()
        self._quiet_until = 0.0
        """This node does not stand before this (monotonic) time: it granted its vote."""
        self._failed_rounds = 0
        """Rounds in a row this node stood in and found no majority."""
        self._loop_watch = loop_watch
        self._counted_from = 0.0
        """Announcements heard before this (monotonic) time do not count for the write
        quorum or a master's presence: this node stalled after them."""
        if loop_watch is not None:
            loop_watch.on_stall(self._on_stall)
        self.match_idx = -1
        """Up to here this node's log equals its master's (set by the log sync/master)."""
        self.stand_from_idx = -1
        """This node does not stand for master before its log reaches this index (a node
        whose damaged log was cut must first get the rest back from a peer)."""
        self._commit_idx = -1
        self._commit_changed = anyio.Event()
        self._listeners: list[Callable[[NodeId | None, NodeId | None], None]] = []
        self._departure_listeners: list[Callable[[NodeId], None]] = []
        self._announcement_listeners: list[Callable[[ElectionAnnouncement], None]] = []

    # ---- what the other components read -----------------------------------------------

    @property
    def term(self) -> int:
        return self._terms.record.term

    @property
    def live_node_ids(self) -> set[NodeId]:
        return set(self._live)

    @property
    def members(self) -> frozenset[NodeId]:
        """The nodes majorities are counted over (this node alone on a fresh log)."""
        return quorum.voters(self._store.state.members, self.node_id)

    def is_majority(self, agreeing: Iterable[NodeId]) -> bool:
        """Whether ``agreeing`` is a majority of the members (:mod:`exo.routing.quorum`)."""
        return quorum.is_majority(
            agreeing, self.members, self._live, self.node_id, self._membership_committed()
        )

    def _membership_committed(self) -> bool:
        known = max(self._commit_idx, self._terms.record.membership_committed_idx)
        return self._store.membership_idx <= known

    @property
    def master_node_id(self) -> NodeId | None:
        """The master this node follows in its current term (None while there is none)."""
        return self._master

    @property
    def is_master(self) -> bool:
        return self._master == self.node_id

    @property
    def commit_idx(self) -> int:
        """The highest index known to be stored by a majority of the members."""
        return self._commit_idx

    def note_commit(self, commit_idx: int) -> None:
        """The master's commit index; a follower passes at most its match index (what it
        holds beyond that may still differ from the master's log)."""
        if commit_idx > self._commit_idx:
            self._commit_idx = commit_idx
            record = self._terms.record
            membership_idx = self._store.membership_idx
            if record.membership_committed_idx < membership_idx <= commit_idx:
                # In memory at once; on disk now or, if the disk refuses, at the next flush.
                self._terms.remember(
                    record.model_copy(update={"membership_committed_idx": membership_idx})
                )
            self._store.compact_if_due(commit_idx)
            self._commit_changed.set()
            self._commit_changed = anyio.Event()

    async def wait_for_commit(self, idx: int, timeout_s: float) -> bool:
        with anyio.move_on_after(timeout_s):
            while self._commit_idx < idx:
                await self._commit_changed.wait()
            return True
        return False

    def heard_recently(self, within_s: float) -> set[NodeId]:
        """Nodes whose announcement in this term, following this node as master, arrived
        within the last ``within_s`` seconds (and since this node last stalled)."""
        if self._loop_watch is not None:
            self._loop_watch.check()
        now = self._clock()
        return {
            node
            for node, announcement in self._heard.items()
            if announcement.term == self.term
            and announcement.master_node_id == self.node_id
            and now - self._heard_at[node] <= within_s
            and self._heard_at[node] >= self._counted_from
        }

    def answered_within_lease(self) -> set[NodeId]:
        """This node and the nodes that answered it as master within the quorum lease."""
        return self.heard_recently(quorum.QUORUM_LEASE_S) | {self.node_id}

    @property
    def serving_writes(self) -> bool:
        """Master of its term with a majority that answered it within the lease: what it
        needs to accept a write (the write is acknowledged only once committed)."""
        return self.is_master and self.is_majority(self.answered_within_lease())

    def master_heard_s_ago(self) -> float | None:
        """Seconds since the followed master's last announcement (0 on the master itself;
        None without a master or before its first announcement)."""
        master = self._master
        if master is None:
            return None
        if master == self.node_id:
            return 0.0
        heard_at = self._heard_at.get(master)
        return None if heard_at is None else self._clock() - heard_at

    def _on_stall(self, stalled_s: float) -> None:
        now = self._clock()
        self._counted_from = now + STALL_GRACE_S
        # Silence while this node did not run is its own: give the master a fresh start.
        if self._master is not None and self._master != self.node_id:
            self._heard_at[self._master] = max(self._heard_at.get(self._master, now), now)
        if self.is_master:
            logger.warning(
                f"this master's loop did not run for {stalled_s:.1f} s: not serving writes "
                "until a majority answers it again"
            )

    def acknowledged(self) -> dict[NodeId, int]:
        """The match index each node announced for this master in this term."""
        term = self.term
        return {
            node: announcement.match_idx
            for node, announcement in self._heard.items()
            if announcement.term == term and announcement.master_node_id == self.node_id
        }

    def on_master_change(self, listener: Callable[[NodeId | None, NodeId | None], None]) -> None:
        """listener(old, new), called on the event loop thread."""
        self._listeners.append(listener)

    def on_node_departed(self, listener: Callable[[NodeId], None]) -> None:
        self._departure_listeners.append(listener)

    def on_announcement(self, listener: Callable[[ElectionAnnouncement], None]) -> None:
        """listener(announcement) for every other node's announcement of this node's term
        or a newer one (the election has taken in its term and commit index already)."""
        self._announcement_listeners.append(listener)

    def announced_head(self, node: NodeId) -> int:
        """The last index ``node`` announced for its log (-1: not heard)."""
        heard = self._heard.get(node)
        return heard.last_event_idx if heard is not None else -1

    # ---- running ----------------------------------------------------------------------

    def start(self) -> None:
        self._router.declare_liveliness_token(
            self._topics.alive_token(self.node_id, self.started_at_us)
        )
        self._router.watch_liveliness(self._topics.alive_all, self._on_liveliness)
        self._router.subscribe(self._topics.election_all, self._on_announcement, NEWEST_PER_KEY)
        self._router.subscribe(
            self._topics.acknowledgements_to(self.node_id), self._on_announcement, NEWEST_PER_KEY
        )
        self._router.declare_queryable(self._topics.vote(self.node_id), self._on_vote_request)

    async def run(self) -> None:
        if not self._settled:
            await anyio.sleep(self._settle_s)
            self._settled = True
        async with anyio.create_task_group() as group:
            group.start_soon(self._announce_loop)
            group.start_soon(self._stand_loop)

    async def _announce_loop(self) -> None:
        beat = 0
        while True:
            self._terms.flush()  # retries a term kept only in memory (the disk refused it)
            following = self._master is not None and self._master != self.node_id
            match heartbeat_route(beat, following):
                case "all":
                    self.announce()
                case "master":
                    self.acknowledge()
                case None:
                    pass
            beat += 1
            await anyio.sleep(ANNOUNCE_INTERVAL_S)

    def announce(self) -> None:
        """Publish this node's heartbeat now (also its acknowledgement to the master)."""
        self._router.publish_newest(self._topics.election(self.node_id), self._announcement())

    def acknowledge(self) -> None:
        """Tell the master at once how far this node's log matches its own and is stored:
        the announcement goes to the master alone (a burst of events would otherwise make
        every follower announce to every node for every fsync)."""
        master = self._master
        if master is None or master == self.node_id:
            self.announce()
            return
        self._router.publish_newest(
            self._topics.acknowledgement(master, self.node_id), self._announcement()
        )

    def _announcement(self) -> bytes:
        last_term, last_idx = log_position(self._store)
        announcement = ElectionAnnouncement(
            node_id=self.node_id,
            started_at_us=self.started_at_us,
            term=self.term,
            master_node_id=self._master,
            last_event_idx=last_idx,
            last_log_term=last_term,
            match_idx=self.match_idx if self._master is not None else -1,
            commit_idx=self._commit_idx,
        )
        return announcement.model_dump_json().encode()

    async def _stand_loop(self) -> None:
        while True:
            await anyio.sleep(TICK_S)
            if self._loop_watch is not None:
                self._loop_watch.check()  # this node's own stall first: it is not the master's
            self._drop_silent_master()
            if self._master is None and self._should_stand() and not await self._stand():
                await anyio.sleep(TERM_WRITE_RETRY_S)

    def _drop_silent_master(self) -> None:
        master = self._master
        if master is None or master == self.node_id:
            return
        silent_s = self.master_heard_s_ago()
        if silent_s is None:
            # Followed from a global event before its first announcement came: start now.
            self._heard_at[master] = self._clock()
        elif silent_s > MASTER_SILENCE_S:
            logger.warning(
                f"master {master} has not been heard for {silent_s:.1f} s; "
                f"no longer following it (term {self.term})"
            )
            self._set_master(None)

    def _should_stand(self) -> bool:
        if self._store.last_idx < self.stand_from_idx:
            return False
        if not self.is_majority([*self._live, self.node_id]):
            return False
        now = self._clock()
        if now < self._quiet_until:
            return False
        if now - self._masterless_since >= self._stand_anyway_after_s:
            return True
        ours = self._standing_key(self.node_id, log_position(self._store), self.started_at_us)
        for node, announcement in self._heard.items():
            if node == self.node_id or self._live.get(node) != announcement.started_at_us:
                continue
            if now - self._heard_at[node] > PEER_SILENCE_S:
                continue  # silent (frozen, cut off): it will not stand
            theirs = self._standing_key(
                node,
                (announcement.last_log_term, announcement.last_event_idx),
                announcement.started_at_us,
            )
            if theirs < ours:
                return False
        return True

    @staticmethod
    def _standing_key(
        node: NodeId, position: tuple[int, int], started_at_us: int
    ) -> tuple[int, int, int, str]:
        """Smaller stands first: the most up-to-date log, then the earliest start."""
        return (-position[0], -position[1], started_at_us, node)

    async def _stand(self) -> bool:
        """Stand for master in the next term, once a pre-vote says a majority would grant
        it; False (nothing changed) when this node cannot store that term and its vote for
        itself (the term store logged why)."""
        term = self.term + 1
        last_term, last_idx = log_position(self._store)
        request = VoteRequest(
            candidate_id=self.node_id,
            term=term,
            last_event_idx=last_idx,
            last_log_term=last_term,
            pre_vote=True,
        )
        granted, refusals = await self._ask_for_votes(request)
        if self.term != term - 1 or self._master is not None:
            return True  # a newer term, or a master, arrived meanwhile
        if not self.is_majority(granted):
            await self._failed_round(
                f"no majority for a pre-vote in term {term}", granted, refusals
            )
            return True
        if not self._terms.save(
            self._terms.record.model_copy(update={"term": term, "voted_for": self.node_id})
        ):
            return False
        logger.info(
            f"standing for master in term {term} (log ends at {last_idx}, term {last_term})"
        )
        granted, refusals = await self._ask_for_votes(
            request.model_copy(update={"pre_vote": False})
        )
        if self.term != term or self._master is not None:
            return True  # a newer term, or another master of this term, arrived meanwhile
        if self.is_majority(granted):
            logger.info(f"elected master in term {term} with the votes of {sorted(granted)}")
            self._set_master(self.node_id)
            self.announce()
        else:
            await self._failed_round(f"no majority in term {term}", granted, refusals)
        return True

    async def _ask_for_votes(self, request: VoteRequest) -> tuple[set[NodeId], list[str]]:
        """The nodes that granted (this one included) and the others' reasons for refusing.
        Counted as they come: a node that never answers (frozen) costs nothing once a
        majority has granted. A reply of a newer term makes this node adopt it and stop."""
        granted = {self.node_id}
        refusals: list[str] = []
        if self.is_majority(granted):
            return granted, refusals  # a lone member asks no one
        async for payload in self._router.query_replies(
            self._topics.vote_all, request.model_dump_json().encode(), VOTE_TIMEOUT_S
        ):
            try:
                reply = VoteReply.model_validate_json(payload)
            except ValidationError:
                continue
            if reply.term > self.term:
                self._adopt_term(reply.term, None)
                break
            if reply.granted and (request.pre_vote or reply.term == request.term):
                granted.add(reply.node_id)
                if self.is_majority(granted):
                    break
            elif reply.node_id != self.node_id:
                refusals.append(f"{reply.node_id}: {reply.reason}")
        return granted, refusals

    async def _failed_round(self, what: str, granted: set[NodeId], refusals: list[str]) -> None:
        self._failed_rounds += 1
        pause_s = retry_pause_s(self._failed_rounds)
        logger.info(
            f"{what} ({len(granted)} of {len(self.members)} members"
            f"{'; ' + '; '.join(refusals) if refusals else ''}); trying again in {pause_s:.1f} s"
        )
        await anyio.sleep(pause_s)

    # ---- what arrives -----------------------------------------------------------------

    def observe_term(self, term: int, master: NodeId | None) -> bool:
        """A message from ``master`` (None: from no master) carried ``term``. Adopt a newer
        term; follow the sender if it is master of this node's term. False if the message
        is from an older term and must be ignored."""
        if term < self.term:
            return False
        if term > self.term:
            self._adopt_term(term, master)
        elif master is not None and self._master is None and master != self.node_id:
            self._set_master(master)
        return True

    def _adopt_term(self, term: int, master: NodeId | None) -> None:
        logger.info(f"term {self.term} -> {term}" + (f", master {master}" if master else ""))
        # Follow the newer term even when the disk refuses it (kept in memory, written by the
        # next flush): no vote is given in it until it is on disk, so none is given twice.
        self._terms.remember(
            self._terms.record.model_copy(update={"term": term, "voted_for": None})
        )
        self._set_master(master if master != self.node_id else None)

    def _on_announcement(self, key: str, payload: bytes) -> None:
        try:
            announcement = ElectionAnnouncement.model_validate_json(payload)
        except ValidationError:
            logger.warning("dropped an invalid election announcement")
            return
        node = announcement.node_id
        if node == self.node_id:
            return
        previous = self._heard.get(node)
        if (
            previous is not None
            and previous.started_at_us == announcement.started_at_us
            and previous.term == announcement.term
            and previous.master_node_id == announcement.master_node_id
            and previous.match_idx > announcement.match_idx
        ):
            # An acknowledgement and a periodic announcement travel on different keys and
            # may arrive swapped; a running node's match index only grows under one master
            # in one term.
            announcement = announcement.model_copy(update={"match_idx": previous.match_idx})
        self._heard[node] = announcement
        self._heard_at[node] = self._clock()
        claims_master = announcement.master_node_id == node
        if not self.observe_term(announcement.term, node if claims_master else None):
            return
        if claims_master and announcement.term == self.term and self._master == node:
            self.note_commit(min(announcement.commit_idx, self.match_idx))
        for listener in self._announcement_listeners:
            listener(announcement)

    def _on_vote_request(self, parameters: str, payload: bytes | None) -> bytes | None:
        try:
            request = VoteRequest.model_validate_json(payload or b"")
        except ValidationError:
            return None
        return self._vote(request).model_dump_json().encode()

    def _vote(self, request: VoteRequest) -> VoteReply:
        candidate = request.candidate_id

        def reply(granted: bool, reason: str = "") -> VoteReply:
            return VoteReply(node_id=self.node_id, term=self.term, granted=granted, reason=reason)

        if request.term < self.term:
            return reply(False, f"its term {request.term} is older than {self.term}")
        master = self._master
        if master is not None and master != candidate and self._master_present(master):
            return reply(False, f"this node still follows the live master {master}")
        if request.pre_vote:  # would it grant? Nothing on this node changes
            if request.term == self.term and self._terms.record.voted_for not in (None, candidate):
                return reply(False, f"already voted for {self._terms.record.voted_for}")
            if self._log_behind(request):
                return reply(False, "its log is behind this node's")
            return reply(True)
        if request.term > self.term:
            self._adopt_term(request.term, None)
        voted_for = self._terms.record.voted_for
        if voted_for not in (None, candidate):
            return reply(False, f"already voted for {voted_for} in term {self.term}")
        if self._log_behind(request):
            return reply(False, "its log is behind this node's")
        if not self._terms.save(self._terms.record.model_copy(update={"voted_for": candidate})):
            return reply(False, f"this node cannot store its vote ({self._terms.write_error})")
        if candidate != self.node_id:
            self._quiet_until = self._clock() + random.uniform(*AFTER_VOTE_QUIET_S)
        return reply(True)

    def _log_behind(self, request: VoteRequest) -> bool:
        """Whether the candidate's log is less up to date than this node's."""
        return (request.last_log_term, request.last_event_idx) < log_position(self._store)

    def _master_present(self, master: NodeId) -> bool:
        if master == self.node_id:
            return True
        silent_s = self.master_heard_s_ago() if master == self._master else None
        return master in self._live and silent_s is not None and silent_s <= MASTER_SILENCE_S

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
            if node_id == self._master:
                self._set_master(None)

    def _set_master(self, master: NodeId | None) -> None:
        if master == self._master:
            return
        old, self._master = self._master, master
        self.match_idx = -1
        if master is None:
            self._masterless_since = self._clock()
            self._stand_anyway_after_s = _stand_anyway_after_s()
        else:
            self._failed_rounds = 0
        logger.info(f"master is now {master} (was {old}, term {self.term})")
        for listener in self._listeners:
            listener(old, master)


def _stand_anyway_after_s() -> float:
    return STAND_ANYWAY_AFTER_S + random.uniform(0.0, STAND_ANYWAY_JITTER_S)


def retry_pause_s(failed_rounds: int) -> float:
    """The pause after the ``failed_rounds``-th round in a row without a majority."""
    growth = min(2 ** max(failed_rounds - 1, 0), RETRY_PAUSE_GROWTH_LIMIT)
    return random.uniform(*RETRY_PAUSE_S) * growth


def now_us() -> int:
    return time.time_ns() // 1000
