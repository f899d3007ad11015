"""The master: the one node that turns commands into events and gives every event its
place in the global log.

Active only on the node elected master of the current term (:mod:`exo.routing.election`;
its vote rules guarantee it already holds every committed event, so it never takes events
from other nodes). On taking over it indexes ``MasterElected`` in its term, then keeps the
membership in step with who is alive.

- **Commit.** An event is committed once a majority of the members (counted by
  :mod:`exo.routing.quorum`) has stored it: the master counts the match index every
  follower acknowledges in its announcements (the rule: :mod:`exo.master.commit`).
- **Writes need a quorum.** A command is refused with 503 "no quorum", changing nothing,
  unless a majority of the members answered this master within the last
  :data:`~exo.routing.quorum.QUORUM_LEASE_S` seconds, and not since before its own loop
  last stalled (:attr:`~exo.routing.election.Election.serving_writes`). The API acknowledges a write only once its events are
  committed (:mod:`exo.api.context`).
- **Heals and moves.** The :class:`~exo.master.replacement.Rebalancer` heals instances
  that lost a shard and moves those a fresh placement beats (:mod:`exo.master.replacement`).
- **Membership, one change at a time.** A live node that is not a member is added
  (``MemberJoined``), a member whose liveliness is gone is removed (``NodeTimedOut``); the
  next change waits until the previous one is committed, so two majorities of successive
  memberships always overlap.
"""

import contextlib
from collections.abc import Callable

import anyio
import anyio.to_thread
from loguru import logger
from pydantic import ValidationError

from exo.master.commit import next_commit_idx
from exo.master.replacement import Rebalancer, ReplacementConfig
from exo.routing.context import ClusterContext
from exo.routing.messages import ElectionAnnouncement, GlobalEventMessage, LocalEventMessage
from exo.shared.event_log import LogWriteError
from exo.shared.types.commands import Command, CommandAdapter, CommandResult
from exo.shared.types.events import (
    Event,
    IndexedEvent,
    MasterElected,
    MemberJoined,
    NodeTimedOut,
)
from exo.shared.types.ids import NodeId
from exo.shared.types.state import State

CommandHandler = Callable[[Command, State], "list[Event] | CommandResult"]
"""Pure: the events a command produces, or a CommandResult carrying the error."""

MEMBERSHIP_TICK_S = 0.25
DURABILITY_RETRY_S = 1.0
"""How often the master fsyncs again when nothing new was indexed (after a failed fsync)."""


class Master:
    def __init__(
        self,
        context: ClusterContext,
        command_handler: CommandHandler,
        replacement: ReplacementConfig | None = None,
    ) -> None:
        self._router = context.router
        self._topics = context.topics
        self._election = context.election
        self._store = context.store
        self._node_id = context.node_id
        self._handle_command = command_handler
        self._active = False
        self._term = -1
        self._last_membership_change = -1
        self._role_changed = anyio.Event()
        self._durable_due = anyio.Event()
        self.rebalancer = Rebalancer(
            self._store, self.index, lambda: self._active, replacement or ReplacementConfig()
        )

    @property
    def is_active(self) -> bool:
        return self._active

    def start(self) -> None:
        self._router.subscribe(self._topics.local_events, self._on_local_event)
        self._commands = self._router.queries(self._topics.commands)
        self._election.on_master_change(self._on_master_change)
        self._election.on_node_departed(self._on_node_departed)
        self._election.on_announcement(self._on_announcement)

    def _on_master_change(self, old: NodeId | None, new: NodeId | None) -> None:
        if new != self._node_id and self._active:
            logger.warning(f"stepping down as master of term {self._term}")
            self._active = False
        self._role_changed.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(self._membership_loop)
            group.start_soon(self._durability_loop)
            group.start_soon(self.rebalancer.run)
            group.start_soon(self._command_loop)
            while True:
                await self._role_changed.wait()
                self._role_changed = anyio.Event()
                if self._election.is_master and not self._active:
                    self._take_over()

    def _take_over(self) -> None:
        self._term = self._election.term
        self._active = True
        self._last_membership_change = -1
        self._election.match_idx = self._store.last_idx
        with contextlib.suppress(LogWriteError):  # writes are refused until the disk is back
            self.index(MasterElected(master_node_id=self._node_id, origin_node_id=self._node_id))
            live = self._election.live_node_ids
            for node_id in list(self._store.state.nodes):
                if node_id not in live and node_id not in self._store.state.members:
                    self.index(NodeTimedOut(node_id=node_id, origin_node_id=self._node_id))
        self._reconcile_membership()
        logger.info(f"master of term {self._term} active at event index {self._store.last_idx}")

    def index(self, event: Event) -> int:
        """Give the event the next index in this master's term, apply and persist it, and
        broadcast it. It is committed once a majority has stored it. Raises LogWriteError,
        changing nothing, when the disk log cannot be written (a full disk)."""
        indexed = IndexedEvent(idx=self._store.last_idx + 1, term=self._term, event=event)
        self._store.append(indexed)
        self._election.match_idx = indexed.idx
        self._durable_due.set()  # counted as stored here once fsynced, with its burst
        message = GlobalEventMessage(
            master_node_id=self._node_id,
            term=self._term,
            commit_idx=self._election.commit_idx,
            indexed_event=indexed,
        )
        self._router.publish(self._topics.global_events, message.model_dump_json().encode())
        return indexed.idx

    # ---- commit and quorum -------------------------------------------------------------

    def _on_announcement(self, announcement: ElectionAnnouncement) -> None:
        # Only a node that stores more than is committed can move the commit index; most
        # announcements (heartbeats) repeat the committed index. Whatever else moves it (this
        # node's fsync, a smaller membership) has its own call.
        if self._active and announcement.match_idx > self._election.commit_idx:
            self._advance_commit()

    async def _durability_loop(self) -> None:
        """fsync what was indexed, once for a whole burst (a command's events, a stream's
        chunks), then count it as stored here; as followers do before they acknowledge."""
        while True:
            # Also on a timer: after a failed fsync, a later one counts the rest.
            with anyio.move_on_after(DURABILITY_RETRY_S):
                await self._durable_due.wait()
            self._durable_due = anyio.Event()
            await self._store.make_durable_in_thread()
            self._advance_commit()

    def _advance_commit(self) -> None:
        """Move the commit index to the highest event of this term a majority stores (this
        node's own log counts as far as it is on stable storage)."""
        if not self._active:
            return
        election = self._election
        acknowledged = election.acknowledged()
        acknowledged[self._node_id] = self._store.durable_idx

        def term_at(idx: int) -> int | None:
            held = self._store.event_at(idx)
            return None if held is None else held.term

        committed = next_commit_idx(
            acknowledged,
            self._store.last_idx,
            election.commit_idx,
            self._term,
            term_at,
            election.is_majority,
        )
        if committed is not None:
            election.note_commit(committed)
            election.announce()

    def has_quorum(self) -> bool:
        return self._election.serving_writes

    def _quorum_error(self) -> CommandResult:
        members = self._election.members
        answered = self._election.answered_within_lease() & members
        return CommandResult(
            ok=False,
            status_code=503,
            error=(
                f"no quorum: this master reaches {len(answered)} of the cluster's "
                f"{len(members)} members; writes resume when a majority is back"
            ),
        )

    # ---- membership --------------------------------------------------------------------

    async def _membership_loop(self) -> None:
        while True:
            await anyio.sleep(MEMBERSHIP_TICK_S)
            if self._active:
                self._advance_commit()
                self._reconcile_membership()

    def _reconcile_membership(self) -> None:
        """At most one membership change in flight: add a live non-member or remove a
        departed member once the previous change is committed."""
        if not self._active or self._last_membership_change > self._election.commit_idx:
            return
        members = self._store.state.members
        live = self._election.live_node_ids
        departed = sorted(members - live - {self._node_id})
        joined = sorted(live - members)
        if self._node_id in joined:
            joined = [self._node_id]  # the master first, on a fresh log
        if departed and not self.has_quorum():
            return  # removing a member takes a majority of the membership it leaves
        if departed:
            change: Event = NodeTimedOut(node_id=departed[0], origin_node_id=self._node_id)
        elif joined:
            change = MemberJoined(node_id=joined[0], origin_node_id=self._node_id)
        else:
            return
        with contextlib.suppress(LogWriteError):  # the store logged it; tried again next tick
            self._last_membership_change = self.index(change)

    def _on_node_departed(self, node_id: NodeId) -> None:
        state = self._store.state
        if self._active and node_id in state.nodes and node_id not in state.members:
            with contextlib.suppress(LogWriteError):
                self.index(NodeTimedOut(node_id=node_id, origin_node_id=self._node_id))
        else:
            self._reconcile_membership()

    # ---- events and commands -----------------------------------------------------------

    def _on_local_event(self, key: str, payload: bytes) -> None:
        if not self._active:
            return
        try:
            message = LocalEventMessage.model_validate_json(payload)
        except ValidationError as error:
            logger.warning(f"dropped an invalid local event ({error.error_count()} errors)")
            return
        if self._store.contains_event(message.event.event_id):
            return
        with contextlib.suppress(LogWriteError):  # the worker's outbox sends it again
            self.index(message.event)

    async def _command_loop(self) -> None:
        """Commands one at a time (each decided on the state its predecessor left); only
        the active master answers."""
        async with self._commands:
            async for query in self._commands:
                if not self._active:
                    query.answer(None)
                    continue
                result = await self.execute(query.payload or b"")
                query.answer(result.model_dump_json().encode() if self._active else None)

    async def execute(self, payload: bytes) -> CommandResult:
        try:
            command = CommandAdapter.validate_json(payload)
        except ValidationError as error:
            return CommandResult(ok=False, status_code=422, error=f"invalid command: {error}")
        if not self.has_quorum():
            return self._quorum_error()
        # Decided in a thread: placement may load a model card (importing mlx-lm the first
        # time, seconds) and must not stall the loop. The state may gain events meanwhile
        # (telemetry); apply copes with a command's events landing after them.
        outcome = await anyio.to_thread.run_sync(self._handle_command, command, self._store.state)
        if isinstance(outcome, CommandResult):
            return outcome
        if not self._active or not self.has_quorum():
            return self._quorum_error()
        try:
            indices = [self.index(event) for event in outcome]
        except LogWriteError as error:
            return CommandResult(
                ok=False,
                status_code=503,
                error=f"the master cannot store events: {error}; reads still work",
            )
        return CommandResult(ok=True, event_indices=indices, term=self._term)
