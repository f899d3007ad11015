"""A worker's outbox: local events go to the master until they are seen in the global log.

Nothing a worker emitted is lost across a master change: an event not yet seen in the
global log is sent again, at once when the new master's ``MasterElected`` arrives in the log
(a master indexes nothing before it), and after a short timeout otherwise; the master
ignores duplicates by event id.
"""

import time

import anyio
from loguru import logger

from exo.routing.context import ClusterContext
from exo.routing.messages import LocalEventMessage
from exo.shared.types.events import Event, MasterElected
from exo.shared.types.ids import EventId

RESEND_AFTER_S = 1.0


class LocalEventSender:
    def __init__(self, context: ClusterContext) -> None:
        self._router = context.router
        self._topics = context.topics
        self._store = context.store
        self._node_id = context.node_id
        self._pending: dict[EventId, tuple[Event, float]] = {}

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    async def emit(self, event: Event) -> None:
        """Send an event to the master; it will be resent until seen in the global log."""
        self.emit_nowait(event)

    def emit_nowait(self, event: Event) -> None:
        if event.origin_node_id is None:
            event = event.model_copy(update={"origin_node_id": self._node_id})
        self._pending[event.event_id] = (event, time.monotonic())
        self._send(event)

    def _send(self, event: Event) -> None:
        message = LocalEventMessage(origin_node_id=self._node_id, event=event)
        self._router.publish(self._topics.local_events, message.model_dump_json().encode())

    def _resend_all(self) -> None:
        if self._pending:
            logger.info(f"resending {len(self._pending)} events not yet in the global log")
        for event, _ in self._pending.values():
            self._send(event)

    async def run(self) -> None:
        events = self._store.subscribe()
        async with anyio.create_task_group() as group:
            group.start_soon(self._resend_loop)
            async with events:
                async for indexed in events:
                    self._pending.pop(indexed.event.event_id, None)
                    if isinstance(indexed.event, MasterElected):
                        # The new master indexes from now on; what it ignored before it
                        # took over goes again at once rather than after the timeout.
                        self._resend_all()
            group.cancel_scope.cancel()

    async def _resend_loop(self) -> None:
        while True:
            await anyio.sleep(RESEND_AFTER_S / 2)
            now = time.monotonic()
            for event_id, (event, sent_at) in list(self._pending.items()):
                if self._store.contains_event(event_id):
                    del self._pending[event_id]
                elif now - sent_at >= RESEND_AFTER_S:
                    self._pending[event_id] = (event, now)
                    self._send(event)
