"""Keeping this node's log equal to the master's.

- Live: global events from the master are applied in index order; out-of-order ones wait
  in a buffer; anything from a node that is not the master we follow is dropped.
- Gaps: a missing range is fetched from the master's log queryable.
- Divergence: before following a (new) master, the node checks that its log is a prefix
  of the master's, and cuts a tail that is not (a node that briefly thought itself
  master at start-up, or a master that died after writing an event nobody else got).
- Every node serves ranges of its own log, so a new master can catch up from the most
  advanced live node before it indexes anything.
"""

from urllib.parse import parse_qsl

import anyio
from loguru import logger
from pydantic import ValidationError

from exo.routing.context import ClusterContext
from exo.routing.messages import ElectionAnnouncement, GlobalEventMessage, LogRangeReply
from exo.shared.types.events import IndexedEvent
from exo.shared.types.ids import NodeId

MAX_EVENTS_PER_REPLY = 1000
MAX_BUFFERED_EVENTS = 20_000
ANNOUNCE_INTERVAL_S = 0.5
VERIFY_WINDOW = 256


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
        self._heads: dict[NodeId, int] = {}
        self._verified_master: NodeId | None = None
        self._wakeup = anyio.Event()
        self._dropped_count = 0

    def start(self) -> None:
        self._router.subscribe(self._topics.global_events, self._on_global_event)
        self._router.subscribe(self._topics.election, self._on_announcement)
        self._router.declare_queryable(self._topics.log(self._node_id), self._answer_log_query)
        self._election.on_master_change(self._on_master_change)

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
        master = self._election.master_node_id
        if message.master_node_id != master:
            self._drop(
                f"global event from {message.master_node_id}, who is not the master ({master})"
            )
            return
        if master == self._node_id:
            return  # our own broadcast; the master appended it already
        self._receive(message.indexed_event)

    def _receive(self, indexed: IndexedEvent) -> None:
        last = self._store.last_idx
        if self._verified_master != self._election.master_node_id:
            self._buffer_event(indexed)
            return
        if indexed.idx <= last:
            held = self._store.event_at(indexed.idx)
            if held is not None and held.event.event_id != indexed.event.event_id:
                logger.warning(f"event {indexed.idx} differs from the master's; repairing")
                self._verified_master = None
                self._buffer_event(indexed)
            return
        if indexed.idx == last + 1:
            self._store.append(indexed)
            self._drain_buffer()
        else:
            self._buffer_event(indexed)

    def _buffer_event(self, indexed: IndexedEvent) -> None:
        if len(self._buffer) < MAX_BUFFERED_EVENTS:
            self._buffer[indexed.idx] = indexed
        self._wake()

    def _drain_buffer(self) -> None:
        for stale in [idx for idx in self._buffer if idx <= self._store.last_idx]:
            del self._buffer[stale]
        while (next_event := self._buffer.pop(self._store.last_idx + 1, None)) is not None:
            self._store.append(next_event)

    def _on_announcement(self, key: str, payload: bytes) -> None:
        try:
            announcement = ElectionAnnouncement.model_validate_json(payload)
        except ValidationError:
            self._drop("invalid election announcement")
            return
        if announcement.node_id not in self._election.live_node_ids:
            return
        self._heads[announcement.node_id] = announcement.last_event_idx
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
            node_id=self._node_id, last_event_idx=self._store.last_idx, events=events
        )
        return reply.model_dump_json().encode()

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

    async def query_heads(self) -> dict[NodeId, int]:
        """Ask every node for the index of its last event."""
        heads: dict[NodeId, int] = {}
        selector = f"{self._topics.namespace}/log/*?head=1"
        for payload in await self._router.query(selector, timeout_s=1.0):
            try:
                reply = LogRangeReply.model_validate_json(payload)
            except ValidationError:
                continue
            heads[reply.node_id] = reply.last_event_idx
        return heads

    async def align_with(self, source: NodeId) -> bool:
        """Make this log a prefix of source's (cutting a divergent tail), then fetch up to
        source's head. False, changing nothing, if source's log is a prefix of ours (it is
        behind: try again later)."""
        window_end = self._store.last_idx
        source_behind = False
        compared_head = False
        while window_end >= 0:
            window_start = max(0, window_end - VERIFY_WINDOW + 1)
            reply = await self.fetch_log(source, window_start, window_end)
            if not source_behind and reply.last_event_idx < window_end:
                # Source holds fewer events than we do: compare up to its head first.
                if reply.last_event_idx < 0:
                    return False
                source_behind = True
                window_end = reply.last_event_idx
                continue
            common = self._highest_common(reply.events)
            if not compared_head:
                compared_head = True
                if source_behind and common == window_end:
                    return False
            if common is not None:
                self._store.truncate_after(common)
                break
            window_end = window_start - 1
        else:
            self._store.truncate_after(-1)
        await self.fetch_up_to(source, None)
        return True

    def _highest_common(self, theirs: list[IndexedEvent]) -> int | None:
        for indexed in reversed(theirs):
            ours = self._store.event_at(indexed.idx)
            if ours is not None and ours.event.event_id == indexed.event.event_id:
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
            appended = 0
            for indexed in reply.events:
                if indexed.idx == self._store.last_idx + 1:
                    self._store.append(indexed)
                    appended += 1
            if appended == 0 or self._store.last_idx >= reply.last_event_idx:
                return

    # ---- loops -----------------------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(self._announce_loop)
            group.start_soon(self._follow_loop)

    async def _announce_loop(self) -> None:
        while True:
            announcement = ElectionAnnouncement(
                node_id=self._node_id,
                started_at_us=self._election.started_at_us,
                last_event_idx=self._store.last_idx,
                master_node_id=self._election.master_node_id,
            )
            self._router.publish(self._topics.election, announcement.model_dump_json().encode())
            await anyio.sleep(ANNOUNCE_INTERVAL_S)

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
            if not await self.align_with(master):
                return
            if self._election.master_node_id != master:
                return
            self._verified_master = master
            logger.info(f"following master {master} from event {self._store.last_idx}")
        self._drain_buffer()
        target = max(self._heads.get(master, -1), max(self._buffer, default=0) - 1)
        if target > self._store.last_idx:
            await self.fetch_up_to(master, target)
            self._drain_buffer()
