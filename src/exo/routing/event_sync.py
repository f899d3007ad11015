"""Keeping this node's log equal to the master's.

- Live: global events from the master of this node's term are applied in index order;
  out-of-order ones wait in a buffer; anything from another node, or from an older term, is
  dropped. A newer term makes the node follow the sender (:mod:`exo.routing.election`).
- Gaps: a missing range is fetched from the master's log queryable.
- Divergence: before following a (new) master, the node makes its log a prefix of the
  master's, cutting a tail that differs or runs past the master's end. Such a tail was
  never committed (the vote rules give the master every committed event).
- Acknowledgement: once aligned, stored events move this node's match index, which its
  next announcement (sent at once) reports to the master for the commit count. Only events
  on stable storage count (Raft): the log is fsynced first, once for all the events stored
  since the last acknowledgement (a burst of them shares one fsync), and a failed fsync
  acknowledges only what an earlier one covered.
- Compaction: a node serves ranges of its own log and, for the part it has compacted
  away, its state snapshot; a node that needs events its source no longer holds installs
  that snapshot and goes on from there.
"""

from urllib.parse import parse_qsl

import anyio
from loguru import logger
from pydantic import ValidationError

from exo.routing.context import ClusterContext
from exo.routing.messages import ElectionAnnouncement, GlobalEventMessage, LogRangeReply
from exo.shared.event_log import LogWriteError
from exo.shared.snapshot import Snapshot
from exo.shared.types.events import IndexedEvent
from exo.shared.types.ids import NodeId

MAX_EVENTS_PER_REPLY = 1000
MAX_BUFFERED_EVENTS = 20_000
VERIFY_WINDOW = 256
ACKNOWLEDGE_RETRY_S = 1.0


class LogSourceUnavailableError(Exception):
    pass


class EventSync:
    def __init__(self, context: ClusterContext) -> None:
        self._router = context.router
        self._topics = context.topics
        self._election = context.election
        self._store = context.store
        self._node_id = context.node_id
        self._buffer: dict[int, IndexedEvent] = {}
        self._verified_master: NodeId | None = None
        self._wakeup = anyio.Event()
        self._acknowledge_due = anyio.Event()
        self._dropped_count = 0

    def start(self) -> None:
        self._router.subscribe(self._topics.global_events, self._on_global_event)
        self._router.declare_queryable(self._topics.log(self._node_id), self._answer_log_query)
        self._router.declare_queryable(
            self._topics.snapshot(self._node_id), self._answer_snapshot_query
        )
        self._election.on_master_change(self._on_master_change)
        self._election.on_announcement(self._on_announcement)

    def _wake(self) -> None:
        self._wakeup.set()

    def _on_master_change(self, old: NodeId | None, new: NodeId | None) -> None:
        self._verified_master = None
        self._buffer.clear()
        self._wake()

    def _drop(self, reason: str) -> None:
        self._dropped_count += 1
        logger.warning(f"dropped a message: {reason}")

    # ---- receiving -------------------------------------------------------------------

    def _on_global_event(self, key: str, payload: bytes) -> None:
        try:
            message = GlobalEventMessage.model_validate_json(payload)
        except ValidationError as error:
            self._drop(f"invalid global event ({error.error_count()} validation errors)")
            return
        if message.master_node_id == self._node_id:
            return  # our own broadcast; the master appended it already
        if not self._election.observe_term(message.term, message.master_node_id):
            self._drop(
                f"global event from {message.master_node_id} of term {message.term}, older "
                f"than this node's term {self._election.term}"
            )
            return
        master = self._election.master_node_id
        if message.master_node_id != master:
            self._drop(
                f"global event from {message.master_node_id}, who is not the master ({master})"
            )
            return
        self._receive(message.indexed_event)
        self._election.note_commit(min(message.commit_idx, self._election.match_idx))

    def _receive(self, indexed: IndexedEvent) -> None:
        last = self._store.last_idx
        if self._verified_master != self._election.master_node_id:
            self._buffer_event(indexed)
            return
        if indexed.idx <= last:
            held = self._store.event_at(indexed.idx)
            if held is not None and not _same_entry(held, indexed):
                logger.warning(f"event {indexed.idx} differs from the master's; repairing")
                self._verified_master = None
                self._buffer_event(indexed)
            return
        if indexed.idx == last + 1:
            self._append(indexed)
            self._drain_buffer()
            self._acknowledge()
        else:
            self._buffer_event(indexed)

    def _append(self, indexed: IndexedEvent) -> bool:
        """Store the next event; False (the store logged why) when the disk refuses it: this
        node then stays behind and fetches the rest once it can write again."""
        try:
            self._store.append(indexed)
        except LogWriteError:
            return False
        return True

    def _acknowledge(self) -> None:
        """Acknowledge soon: the acknowledgement task fsyncs once for every event stored
        before it runs, then announces the match index."""
        self._acknowledge_due.set()

    async def acknowledge_now(self) -> None:
        """Tell the master how far this log now matches its own (if it is aligned) and is
        on stable storage: fsync first (one fsync for all events not yet synced, on a
        worker thread)."""
        if not self._aligned():
            return
        durable = await self._store.make_durable_in_thread()
        if not self._aligned():
            return  # the master changed during the fsync: its match index starts afresh
        if self._election.match_idx != durable:
            self._election.match_idx = durable
            self._election.acknowledge()

    def _aligned(self) -> bool:
        verified = self._verified_master
        return verified is not None and verified == self._election.master_node_id

    def _buffer_event(self, indexed: IndexedEvent) -> None:
        if len(self._buffer) < MAX_BUFFERED_EVENTS:
            self._buffer[indexed.idx] = indexed
        self._wake()

    def _drain_buffer(self) -> None:
        for stale in [idx for idx in self._buffer if idx <= self._store.last_idx]:
            del self._buffer[stale]
        while (next_event := self._buffer.pop(self._store.last_idx + 1, None)) is not None:
            if not self._append(next_event):
                return

    def _on_announcement(self, announcement: ElectionAnnouncement) -> None:
        """The master announced a log longer than ours: fetch what we missed."""
        if (
            announcement.node_id == self._election.master_node_id
            and announcement.last_event_idx > self._store.last_idx
        ):
            self._wake()

    # ---- serving ---------------------------------------------------------------------

    def _answer_log_query(self, parameters: str, payload: bytes | None) -> bytes:
        params = dict(parse_qsl(parameters.replace(";", "&")))
        events: list[IndexedEvent] = []
        if "from" in params:
            try:
                first = int(params["from"])
                last = int(params.get("to", str(self._store.last_idx)))
            except ValueError:
                first, last = 0, -1
            last = min(last, first + MAX_EVENTS_PER_REPLY - 1)
            events = self._store.events_between(first, last)
        reply = LogRangeReply(
            node_id=self._node_id,
            last_event_idx=self._store.last_idx,
            first_idx=self._store.base,
            events=events,
        )
        return reply.model_dump_json().encode()

    def _answer_snapshot_query(self, parameters: str, payload: bytes | None) -> bytes | None:
        snapshot = self._store.snapshot()
        return snapshot.model_dump_json().encode() if snapshot is not None else None

    async def install_snapshot_from(self, source: NodeId) -> None:
        """Replace this log by source's snapshot (source compacted the events we need)."""
        for payload in await self._router.query(self._topics.snapshot(source), timeout_s=10.0):
            try:
                snapshot = Snapshot.model_validate_json(payload)
            except ValidationError:
                self._drop("invalid snapshot reply")
                continue
            try:
                self._store.install_snapshot(snapshot)
            except OSError as error:
                raise LogSourceUnavailableError(f"cannot store the snapshot: {error}") from error
            return
        raise LogSourceUnavailableError(f"node {source} did not send its snapshot")

    # ---- fetching --------------------------------------------------------------------

    async def fetch_log(self, source: NodeId, first: int, last: int) -> LogRangeReply:
        selector = f"{self._topics.log(source)}?from={first};to={last}"
        for payload in await self._router.query(selector, timeout_s=3.0):
            try:
                reply = LogRangeReply.model_validate_json(payload)
            except ValidationError:
                self._drop("invalid log reply")
                continue
            if reply.node_id == source:
                return reply
        raise LogSourceUnavailableError(f"node {source} did not answer a log query")

    async def align_with(self, source: NodeId) -> None:
        """Make this log a prefix of source's (cutting a tail that differs from it or runs
        past its end), then fetch up to source's head. Where source no longer holds the
        events to compare (it compacted them), take its snapshot instead."""
        window_end = self._store.last_idx
        head_known = False
        while window_end >= self._store.base:
            window_start = max(self._store.base, window_end - VERIFY_WINDOW + 1)
            reply = await self.fetch_log(source, window_start, window_end)
            if not head_known:
                head_known = True
                if reply.last_event_idx < window_end:
                    window_end = reply.last_event_idx  # compare from source's end
                    continue
            if reply.first_idx > window_start:
                await self.install_snapshot_from(source)
                break
            common = self._highest_common(reply.events)
            if common is not None:
                self._store.truncate_after(common)
                break
            window_end = window_start - 1
        else:
            # Nothing in common after our snapshot (committed, so the same everywhere).
            self._store.truncate_after(self._store.base - 1)
        await self.fetch_up_to(source, None)

    def _highest_common(self, theirs: list[IndexedEvent]) -> int | None:
        for indexed in reversed(theirs):
            ours = self._store.event_at(indexed.idx)
            if ours is not None and _same_entry(ours, indexed):
                return indexed.idx
        return None

    async def fetch_up_to(self, source: NodeId, target: int | None) -> None:
        """Fetch and apply source's events after our last, up to target (or its head)."""
        while True:
            first = self._store.last_idx + 1
            last = first + MAX_EVENTS_PER_REPLY - 1 if target is None else target
            if target is not None and first > target:
                return
            reply = await self.fetch_log(source, first, last)
            if reply.first_idx > first:
                await self.install_snapshot_from(source)
                self._acknowledge()
                continue
            appended = 0
            for indexed in reply.events:
                if indexed.idx == self._store.last_idx + 1:
                    if not self._append(indexed):
                        return
                    appended += 1
            self._acknowledge()
            if appended == 0 or self._store.last_idx >= reply.last_event_idx:
                return

    # ---- loops -----------------------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(self._acknowledge_loop)
            await self._follow_loop()

    async def _acknowledge_loop(self) -> None:
        while True:
            # Also on a timer: after a failed fsync, a later one acknowledges the rest.
            with anyio.move_on_after(ACKNOWLEDGE_RETRY_S):
                await self._acknowledge_due.wait()
            self._acknowledge_due = anyio.Event()
            await self.acknowledge_now()

    async def _follow_loop(self) -> None:
        while True:
            with anyio.move_on_after(1.0):
                await self._wakeup.wait()
            self._wakeup = anyio.Event()
            master = self._election.master_node_id
            if master is None or master == self._node_id:
                continue
            try:
                await self._follow(master)
            except LogSourceUnavailableError as error:
                logger.debug(f"catch-up postponed: {error}")
                await anyio.sleep(0.2)

    async def _follow(self, master: NodeId) -> None:
        if self._verified_master != master:
            await self.align_with(master)
            if self._election.master_node_id != master:
                return
            self._verified_master = master
            logger.info(
                f"following master {master} (term {self._election.term}) from event "
                f"{self._store.last_idx}"
            )
            self._acknowledge()
        self._drain_buffer()
        target = max(self._election.announced_head(master), max(self._buffer, default=0) - 1)
        if target > self._store.last_idx:
            await self.fetch_up_to(master, target)
            self._drain_buffer()


def _same_entry(ours: IndexedEvent, theirs: IndexedEvent) -> bool:
    """The same event at the same place, indexed in the same term."""
    return ours.term == theirs.term and ours.event.event_id == theirs.event.event_id
