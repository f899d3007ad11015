"""The master: the one node that turns commands into events and gives every event its
place in the global log.

Active only on the elected node. On taking over it first catches up to the most advanced
live node's log, then indexes ``MasterElected`` and a ``NodeTimedOut`` for every node in
the state that is no longer alive; only then does it index anything new.
"""

from collections.abc import Callable

import anyio
from loguru import logger
from pydantic import ValidationError

from exo.routing.context import ClusterContext
from exo.routing.event_sync import EventSync, LogSourceUnavailableError
from exo.routing.messages import GlobalEventMessage, LocalEventMessage
from exo.shared.types.commands import Command, CommandAdapter, CommandResult
from exo.shared.types.events import Event, IndexedEvent, MasterElected, NodeTimedOut
from exo.shared.types.ids import NodeId
from exo.shared.types.state import State

CommandHandler = Callable[[Command, State], "list[Event] | CommandResult"]
"""Pure: the events a command produces, or a CommandResult carrying the error."""


class Master:
    def __init__(
        self, context: ClusterContext, sync: EventSync, command_handler: CommandHandler
    ) -> None:
        self._router = context.router
        self._topics = context.topics
        self._election = context.election
        self._store = context.store
        self._sync = sync
        self._node_id = context.node_id
        self._handle_command = command_handler
        self._active = False
        self._role_changed = anyio.Event()

    @property
    def is_active(self) -> bool:
        return self._active

    def start(self) -> None:
        self._router.subscribe(self._topics.local_events, self._on_local_event)
        self._router.declare_queryable(self._topics.commands, self._on_command)
        self._election.on_master_change(self._on_master_change)
        self._election.on_node_departed(self._on_node_departed)

    def _on_master_change(self, old: NodeId | None, new: NodeId | None) -> None:
        if new != self._node_id and self._active:
            logger.warning("stepping down as master")
            self._active = False
        self._role_changed.set()

    async def run(self) -> None:
        while True:
            await self._role_changed.wait()
            self._role_changed = anyio.Event()
            if self._election.is_master and not self._active:
                await self._take_over()

    async def _take_over(self) -> None:
        logger.info("elected master; catching up before indexing anything")
        while self._election.is_master:
            try:
                await self._catch_up()
                break
            except LogSourceUnavailableError as error:
                logger.warning(f"catch-up failed ({error}); retrying")
                await anyio.sleep(0.2)
        if not self._election.is_master:
            return
        self._active = True
        self.index(MasterElected(master_node_id=self._node_id, origin_node_id=self._node_id))
        live = self._election.live_node_ids
        for node_id in list(self._store.state.nodes):
            if node_id not in live:
                self.index(NodeTimedOut(node_id=node_id, origin_node_id=self._node_id))
        logger.info(f"master active at event index {self._store.last_idx}")

    async def _catch_up(self) -> None:
        heads = await self._sync.query_heads()
        live = self._election.live_node_ids
        ahead = {
            node: head
            for node, head in heads.items()
            if node in live and node != self._node_id and head > self._store.last_idx
        }
        if not ahead:
            return
        source = max(ahead, key=lambda node: (ahead[node], node))
        logger.info(f"catching up from {source}: {self._store.last_idx} -> {ahead[source]}")
        await self._sync.align_with(source)

    def index(self, event: Event) -> int:
        """Give the event the next index, apply and persist it, and broadcast it."""
        indexed = IndexedEvent(idx=self._store.last_idx + 1, event=event)
        self._store.append(indexed)
        message = GlobalEventMessage(master_node_id=self._node_id, indexed_event=indexed)
        self._router.publish(self._topics.global_events, message.model_dump_json().encode())
        return indexed.idx

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
        self.index(message.event)

    def _on_node_departed(self, node_id: NodeId) -> None:
        if self._active and node_id in self._store.state.nodes:
            self.index(NodeTimedOut(node_id=node_id, origin_node_id=self._node_id))

    def _on_command(self, parameters: str, payload: bytes | None) -> bytes | None:
        if not self._active:
            return None
        result = self.execute(payload or b"")
        return result.model_dump_json().encode()

    def execute(self, payload: bytes) -> CommandResult:
        try:
            command = CommandAdapter.validate_json(payload)
        except ValidationError as error:
            return CommandResult(ok=False, status_code=422, error=f"invalid command: {error}")
        outcome = self._handle_command(command, self._store.state)
        if isinstance(outcome, CommandResult):
            return outcome
        indices = [self.index(event) for event in outcome]
        return CommandResult(ok=True, event_indices=indices)
